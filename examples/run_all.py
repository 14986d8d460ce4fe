"""Run every example and write the comparison report: ``python examples/run_all.py --out out``.

Each example module has ``main(out_dir) -> markdown``; each notebook is executed into ``out_dir``. The report
``out_dir/report.md`` collects the sections, the versions used and the wall times. Exits non-zero if any
example fails.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# one line per example module (and notebook of the same name, if any)
EXAMPLES = ["bioassay", "random_effects", "mixed_models"]


def run_notebook(path: Path, out_dir: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, out_dir / path.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-notebooks", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))

    import arviz
    import pymc
    import pytensor

    sections, failures = [], []
    for name in EXAMPLES:
        start = time.perf_counter()
        try:
            section = importlib.import_module(name).main(args.out)
            sections.append(section + f"\n_{name}: {time.perf_counter() - start:.1f} s_\n")
        except Exception:
            failures.append(name)
            sections.append(f"## {name}: FAILED\n\n```\n{traceback.format_exc()}\n```\n")
        notebook = HERE / f"{name}.ipynb"
        if notebook.exists() and not args.no_notebooks:
            start = time.perf_counter()
            try:
                run_notebook(notebook, args.out)
                sections.append(f"_notebook {notebook.name} executed in {time.perf_counter() - start:.1f} s_\n")
            except Exception:
                failures.append(notebook.name)
                sections.append(f"## notebook {notebook.name}: FAILED\n\n```\n{traceback.format_exc()}\n```\n")
    header = (
        "# pymc_laplace examples\n\n"
        f"pymc {pymc.__version__}, pytensor {pytensor.__version__}, arviz {arviz.__version__}, "
        f"Python {sys.version.split()[0]}\n"
    )
    (args.out / "report.md").write_text(header + "\n" + "\n".join(sections))
    print(f"report written to {args.out / 'report.md'}" + (f"; FAILED: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
