"""Every ```python block of README.md and docs/*.md runs as printed: each block on its own (a reader
copies one), in a fresh interpreter, in an empty temporary directory (the blocks write scores/ and
runs/ relative to it). Links to files in the repository resolve.

Blocks fenced ```py are templates that name the reader's own objects (a trainer's model, loader, args),
said so in the text next to them; the trainer section has a complete ```python loop beside them."""
from __future__ import annotations

import os
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
    # this checkout's code, whatever is installed (the block runs outside the repo, in tmp_path)
    path = [str(REPO), str(REPO / "kernels"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
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


def test_ci_runs_the_readme_commands_first():
    """.ci/run's first phase is the README's two commands (pip's -q and `python3 -m pip` aside)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## The two commands\n+```bash\n(.*?)```", readme, re.S).group(1)
    commands = [c.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")
                for c in line.split("&&")]
    assert commands == ['pip install torch==2.13.0 -e ".[dev,hf]"', "gradsel demo", "python3 -m pytest -q tests"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    phase1 = ci[ci.index("phase 1"):ci.index("phase 2")]
    def normal(line: str) -> str:
        if line.startswith("python3 -m pip "):
            return " ".join(w for w in line[len("python3 -m "):].split() if w != "-q")
        if line.startswith("run_pytest "):  # .ci/run's wrapper of `python3 -m pytest` (exit 5 fails)
            return "python3 -m pytest " + line[len("run_pytest "):]
        return line

    lines = [normal(line.strip()) for line in phase1.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    positions = [lines.index(c) for c in commands]  # each command is a line of phase 1, in this order
    assert positions == sorted(positions)
