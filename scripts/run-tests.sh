#!/usr/bin/env bash
# Run the test suite on every supported PyMC line found on this machine:
#   - the default python3 (pymc 5.x / pytensor 2.x / arviz 0.x),
#   - Python 3.12 from pyenv when present (pymc 6.x / pytensor 3.x / arviz 1.x).
# Each line gets its own virtual environment under .venv/ (created on first use).
# Extra arguments are passed to pytest.  Exits non-zero if any line fails or runs no test.
set -uo pipefail
cd "$(dirname "$0")/.."

lines=("default:python3")
if command -v pyenv >/dev/null 2>&1 && pyenv versions --bare 2>/dev/null | grep -qx '3\.12\.[0-9]*'; then
  v312=$(pyenv versions --bare | grep -x '3\.12\.[0-9]*' | sort -V | tail -n 1)
  lines+=("py312:env PYENV_VERSION=$v312 python3.12")
elif command -v python3.12 >/dev/null 2>&1; then
  lines+=("py312:python3.12")
fi

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
  # The optional CHOLMOD backend is tested where SuiteSparse's headers are present (its SuperLU fallback always).
  if [ -f /usr/include/suitesparse/cholmod.h ] && ! "$venv/bin/python" -c "import sksparse.cholmod" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,sparse]" 2>&1 \
      | grep -v "^WARNING: Location" || echo "(scikit-sparse did not build: CHOLMOD tests will be skipped)"
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
