"""Every python block of every docs/*.md page runs (blocks of a page share one namespace)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # a page that plots must not need a display

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
REQUIRES = re.compile(r"# requires: (\w+)\n")


def test_docs_exist():
    assert DOCS, "no documentation pages found"


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_doc_page_runs(page, capsys):
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page.name} has no python block"
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks):
        # a block that starts "# requires: <package>" documents an optional extra: run where it is installed
        required = REQUIRES.match(code)
        if required and importlib.util.find_spec(required.group(1)) is None:
            continue
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
