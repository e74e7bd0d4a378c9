"""Every ```python block of README.md and docs/*.md runs as printed: each block on its own (a reader
copies one), in a fresh interpreter, in an empty temporary directory (the blocks write scores/ and
runs/ relative to it). Links to files in the repository resolve."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TIMEOUT = 300  # seconds per block: tiny models, a few seconds each on an idle 2-core machine


def python_blocks():
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append(pytest.param(doc, line, m.group(1), id=f"{doc.relative_to(REPO)}:{line}"))
    return out


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert sum(1 for b in BLOCKS if b.values[0].name == "README.md") >= 4


@pytest.mark.parametrize("doc, line, code", BLOCKS)
def test_python_block_runs_as_printed(doc, line, code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{doc.name}:{line} failed:\n{code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_relative_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if "://" in target:
            continue
        path = (doc.parent / target).resolve()
        assert path.exists(), f"{doc.name} links {target}, which does not exist"
        assert REPO in path.parents, f"{doc.name} links {target}, outside the repository"
    assert "shared/design" not in text, f"{doc.name} cites notes outside the repository"
