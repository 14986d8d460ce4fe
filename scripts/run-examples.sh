#!/usr/bin/env bash
# The main job: run every example fit and write their comparison report (markdown + PNG plots) to out/.
# Uses the default python3 in its own virtual environment .venv/examples (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=".venv/examples"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[examples]" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" examples/run_all.py --out out "$@"
