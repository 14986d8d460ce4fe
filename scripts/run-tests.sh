#!/usr/bin/env bash
# Run the test suite on every supported PyMC line found on this machine:
#   - the default python3 (pymc 5.x / pytensor 2.x / arviz 0.x),
#   - Python 3.12 from pyenv when present (pymc 6.x / pytensor 3.x / arviz 1.x).
# Each line gets its own virtual environment under .venv/ (created on first use).
# Extra arguments are passed to pytest.  Exits non-zero if any line fails or runs no test.
#
#   bash scripts/run-tests.sh --list-lines          print the lines that would be tested, one "name:python" a line
#   bash scripts/run-tests.sh --cholmod-note PYTHON print what is said of scikit-sparse for that interpreter
set -uo pipefail
cd "$(dirname "$0")/.."

find_py312() {
  # Python 3.12: pyenv's own interpreter when pyenv's tree is there (its shims alone do not select a version; the
  # `pyenv` command may be off the PATH while they are on it), else any python3.12 that runs. No pipeline decides
  # anything here: under pipefail a reader that stops early (grep -q) makes the writer exit 141 at random.
  local roots="${PYENV_ROOT:-} $HOME/.pyenv" shim interpreters="" root candidate
  shim=$(command -v python3.12 2>/dev/null || true)
  case "$shim" in */shims/python3.12) roots="$roots ${shim%/shims/python3.12}" ;; esac
  for root in $roots; do
    for candidate in "$root"/versions/3.12.*/bin/python3.12; do
      [ -x "$candidate" ] && interpreters="$interpreters $candidate"  # any 3.12 that runs will do
    done
  done
  for candidate in $interpreters python3.12; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

cholmod_note() {
  # judged by the import itself: pip's exit status is lost in a pipe, and grep's says only whether it printed
  "$1" -c "import sksparse.cholmod" >/dev/null 2>&1 \
    || echo "(scikit-sparse did not build: CHOLMOD tests will be skipped)"
}

lines=("default:python3")
if py312=$(find_py312); then
  lines+=("py312:$py312")
elif [ "${1:-}" != "--cholmod-note" ]; then
  echo "(no Python 3.12 found: only the default line is tested)"
fi

case "${1:-}" in
  --list-lines) printf '%s\n' "${lines[@]}"; exit 0 ;;
  --cholmod-note) cholmod_note "$2"; exit 0 ;;
esac

status=0
for entry in "${lines[@]}"; do
  name=${entry%%:*}; py=${entry#*:}
  venv=".venv/$name"
  echo "=== test line '$name' ($py) ==="
  if [ ! -x "$venv/bin/python" ]; then
    $py -m venv "$venv" || { echo "could not create $venv"; status=1; continue; }
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # the optional bambi front end is tested wherever it installs (its tests skip otherwise)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,bambi]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -c "import bambi" >/dev/null 2>&1 || echo "(bambi did not install: its tests will be skipped)"
  # The optional CHOLMOD backend is tested where SuiteSparse's headers are present (its SuperLU fallback always).
  if [ -f /usr/include/suitesparse/cholmod.h ] && ! "$venv/bin/python" -c "import sksparse.cholmod" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,sparse]" 2>&1 \
      | grep -v "^WARNING: Location" || true
    cholmod_note "$venv/bin/python"
  fi
  "$venv/bin/python" -c "import pymc, pytensor, arviz; print('pymc', pymc.__version__, '| pytensor', pytensor.__version__, '| arviz', arviz.__version__)"
  "$venv/bin/python" -m pytest "$@"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "=== line '$name': pytest exit code $rc (5 means no test ran) ==="
    status=1
  fi
done
exit $status
