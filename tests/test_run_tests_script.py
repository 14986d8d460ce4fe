"""The README's test command itself: which Python lines it finds, and what it says of scikit-sparse.

Each case runs ``scripts/run-tests.sh --list-lines`` (or ``--cholmod-note``) in a made-up environment: a HOME and
PYENV_ROOT of its own, and a PATH holding only the system's tools and the fake interpreters of the case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run-tests.sh"
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def fake_python(path: Path, *, works: bool) -> Path:
    """An executable that answers the script's version check with success (or failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexit {0 if works else 1}\n")
    path.chmod(0o755)
    return path


def run(tmp_path: Path, *args: str, path_dirs: tuple[Path, ...] = (), pyenv_root: Path | None = None) -> list[str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "HOME": str(home),
        "PATH": os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"]),
        "PYENV_ROOT": str(pyenv_root) if pyenv_root else "",
    }
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_finds_pyenvs_python_312_every_time(tmp_path):
    """The detection once failed 1 run in 5 (a pipeline under pipefail exiting 141); it must not fail in 30."""
    root = tmp_path / "pyenv"
    interpreter = fake_python(root / "versions" / "3.12.4" / "bin" / "python3.12", works=True)
    for _ in range(30):
        assert run(tmp_path, "--list-lines", pyenv_root=root) == ["default:python3", f"py312:{interpreter}"]


def test_a_shim_that_does_not_run_is_passed_over_for_pyenvs_interpreter(tmp_path):
    """pyenv's shims are on the PATH but select no version (the shim fails); the tree next to them has 3.12."""
    root = tmp_path / "elsewhere-pyenv"
    shim = fake_python(root / "shims" / "python3.12", works=False)
    interpreter = fake_python(root / "versions" / "3.12.1" / "bin" / "python3.12", works=True)
    assert run(tmp_path, "--list-lines", path_dirs=(shim.parent,)) == ["default:python3", f"py312:{interpreter}"]


def test_a_python312_on_the_path_is_used_without_pyenv(tmp_path):
    plain = fake_python(tmp_path / "bin" / "python3.12", works=True)
    assert run(tmp_path, "--list-lines", path_dirs=(plain.parent,)) == ["default:python3", "py312:python3.12"]


@pytest.mark.skipif(
    any(Path(d, "python3.12").exists() for d in ("/usr/bin", "/bin")), reason="the system itself has python3.12"
)
def test_without_python_312_only_the_default_line_is_tested(tmp_path):
    broken = fake_python(tmp_path / "bin" / "python3.12", works=False)  # e.g. a shim with no version behind it
    lines = run(tmp_path, "--list-lines", path_dirs=(broken.parent,))
    assert lines == ["(no Python 3.12 found: only the default line is tested)", "default:python3"]


def test_the_scikit_sparse_note_follows_the_import(tmp_path):
    importing = fake_python(tmp_path / "ok" / "python", works=True)
    failing = fake_python(tmp_path / "bad" / "python", works=False)
    assert run(tmp_path, "--cholmod-note", str(importing)) == []
    assert run(tmp_path, "--cholmod-note", str(failing)) == [
        "(scikit-sparse did not build: CHOLMOD tests will be skipped)"
    ]
