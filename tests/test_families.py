"""The family sweep: every causal-LM family of the installed transformers that builds from a tiny config.

``auto`` must be exact (1e-5 relative, fp32) against the per-sample loop; ``ghost`` must be exact or refuse
cleanly (UnsupportedModule), never wrong and never crash. ``benchmarks/family_sweep.py`` writes the same
results as the README's table.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.families import SLOW, causal_lm_families, sweep_one  # noqa: E402

FAMILIES = [f for f in causal_lm_families() if f not in SLOW]


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, one_thread):
    logging.disable(logging.WARNING)
    try:
        r = sweep_one(family)
    finally:
        logging.disable(logging.NOTSET)
    if r.status == "skip":
        pytest.skip(r.reason)
    assert r.auto_err <= 1e-5, f"{family}: auto ({r.auto_backend}) relative error {r.auto_err:.3g}"
    assert r.ghost == "exact" or r.ghost.startswith("refused"), f"{family}: ghost {r.ghost}"


def test_sweep_covers_the_main_families():
    """The families users bring most must be in the sweep and build here."""
    for fam in ("llama", "gpt2", "gemma", "gemma2", "mistral", "qwen2", "opt", "falcon", "mixtral", "phi3"):
        assert fam in FAMILIES, fam
