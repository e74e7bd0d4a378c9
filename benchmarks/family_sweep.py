"""Score every causal-LM family of the installed transformers (tiny random configs) with ``auto`` and
``ghost`` against the per-sample loop, and write the table the README shows.

    python benchmarks/family_sweep.py                 # all but the slow ones (benchmarks/families.py SLOW)
    python benchmarks/family_sweep.py --all llama opt  # named families (or all with --all)

Results: ``<out-dir>/families-<UTC timestamp>.json`` (per family: how auto scores it, its error vs the loop,
ghost exact / refused) and ``docs/families.md`` (the summary table).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness as H  # noqa: E402
from benchmarks.families import SLOW, causal_lm_families, sweep_one  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="families to sweep (default: all but the slow ones)")
    ap.add_argument("--all", action="store_true", help="include the slow families")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--table", default="docs/families.md", help="markdown table to write ('' for none)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    fams = args.families or [f for f in causal_lm_families() if args.all or f not in SLOW]
    results = []
    for fam in fams:
        r = sweep_one(fam)
        results.append(r)
        print(f"{fam:28s} {r.status:4s} {r.how:18s} auto {r.auto_backend:6s} err {r.auto_err:.1e}  ghost {r.ghost[:60]}",
              flush=True)
    meta = H.env_info()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"families-{H.utc_stamp()}.json"
    path.write_text(json.dumps({"meta": meta, "results": [asdict(r) | {"how": r.how} for r in results]}, indent=1))
    if args.table:
        Path(args.table).write_text(table(results, meta))
    print(f"wrote {path}" + (f" and {args.table}" if args.table else ""))
    bad = [r.family for r in results if r.status == "ok" and (not r.auto_err <= 1e-5 or r.ghost.startswith(("WRONG", "crash")))]
    if bad:
        print(f"DEFECTS: {bad}")
    return 1 if bad else 0


def table(results, meta) -> str:
    ok = [r for r in results if r.status == "ok"]
    groups = defaultdict(list)
    for r in ok:
        groups[r.how].append(r.family)
    lines = [
        "# Causal-LM families: how gradsel scores each", "",
        f"Every causal-LM family of transformers {meta.get('transformers_version', '?')} that builds from a tiny random "
        f"config here ({len(ok)} of {len(results)} swept), scored with `backend=\"auto\"` and `backend=\"ghost\"` "
        "against the per-sample loop (one batch, B = 3, T = 8, right padding). Produced by "
        "`python benchmarks/family_sweep.py`; `tests/test_families.py` asserts the same on every run.", "",
        f"- `auto` exact (relative error ≤ 1e-5) on {sum(r.auto_err <= 1e-5 for r in ok)} of {len(ok)}; "
        f"max error {max((r.auto_err for r in ok), default=0):.1e}.",
        f"- `ghost` exact on {sum(r.ghost == 'exact' for r in ok)}, refused cleanly on "
        f"{sum(r.ghost.startswith('refused') for r in ok)}, wrong or crashed on "
        f"{sum(r.ghost.startswith(('WRONG', 'crash')) for r in ok)}.", "",
        "| how `auto` scores it | families | which |", "|---|---|---|",
    ]
    for how in ("rules", "rules (+ op uses)", "module fallbacks", "whole-model vmap", "loop"):
        fams = groups.get(how, [])
        if fams:
            lines.append(f"| {how} | {len(fams)} | {', '.join(fams)} |")
    skipped = [r for r in results if r.status != "ok"]
    lines += ["", f"Not swept ({len(skipped)}: the tiny config does not build or run here):", ""]
    lines += [f"- {r.family}: {r.reason[:110]}" for r in skipped]
    refused = [r for r in ok if r.ghost.startswith("refused")]
    if refused:
        lines += ["", "`ghost` refusals (auto moves these to an exact path):", ""]
        lines += [f"- {r.family}: {r.ghost[len('refused: '):][:150]}" for r in refused]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
