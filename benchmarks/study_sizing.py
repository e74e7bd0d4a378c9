"""Sizing the safety testbed (issue #22 item 3): does full-data fine-tuning leave the refusal rate graded, does
the positive control still hold, and what does a variant cost?

For each variant (model size, continual-task lr) this runs ``gradsel demo``'s cells ``full``, ``random`` and
``oracle`` (offline, ρ = 0.2, equal steps) on the given seeds, through the study's own code
(:func:`gradsel_core.study.experiment.run_experiment`; finished runs under ``--out`` are reused, so a rerun
only aggregates), then reports per seed the full-data refusal rate after every task and whether it stays in
the issue's graded range (15-85% after every task), the oracle - random paired difference of the primary
metric (refusal %, mean over tasks) with its 95% t-interval, and the wall time of preparation (pretraining
and alignment) and of each run.

    python benchmarks/study_sizing.py --variant small:5e-4 --variant small:3.5e-4 --variant medium:5e-4 \\
        --seeds 0 1 2 3 4 --out /tmp/sizing

Aligned models do not depend on the task lr: ``--aligned-from DIR`` copies a study's ``aligned/`` cache into
every variant of the same model size, so only the continual tasks run. Wall times come from a shared, loaded
2-core CPU: compare them within one run only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS_DIR, env_info, markdown_table, utc_stamp, write_results  # noqa: E402

GRADED = (0.15, 0.85)
CELLS = ("full", "random-offline-r0.2-steps", "oracle-offline-r0.2-steps")


def parse_variant(text: str) -> Tuple[str, float]:
    size, _, lr = text.partition(":")
    if size not in ("small", "medium") or not lr:
        raise SystemExit(f"--variant {text!r}: expected SIZE:LR with SIZE small or medium, e.g. small:3.5e-4")
    return size, float(lr)


def run_variant(size: str, lr: float, seeds: List[int], out: str, aligned_from: str | None) -> str:
    from gradsel_core.study.experiment import ExperimentConfig, run_experiment

    out_dir = os.path.join(out, f"{size}-lr{lr:g}")
    os.makedirs(out_dir, exist_ok=True)
    if aligned_from and size == "small" and not os.path.exists(os.path.join(out_dir, "aligned")):
        shutil.copytree(os.path.join(aligned_from, "aligned"), os.path.join(out_dir, "aligned"))
    cfg = ExperimentConfig(model_size=size, lr=lr, methods=("full", "random", "oracle"), ratios=(0.2,),
                           modes=("offline",), budgets=("steps",), seeds=tuple(seeds), mechanism_samples=0,
                           jobs=1, progress=False, out_dir=out_dir)
    timing_path = os.path.join(out_dir, "timing.json")
    before = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
    run_experiment(cfg)  # rewrites timing.json; preparation times of earlier invocations are kept
    after = json.load(open(timing_path))
    for k, v in before.items():
        if k.startswith("prepare/") and k not in after:
            after[k] = v
    with open(timing_path, "w") as f:
        json.dump(after, f, indent=1)
    return out_dir


def t_interval(x: List[float]) -> Tuple[float, float, float]:
    from gradsel_core.study.experiment import _t975

    n = len(x)
    m = sum(x) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))
    h = _t975(n - 1) * sd / math.sqrt(n)
    return m, m - h, m + h


def summarize(size: str, lr: float, out_dir: str, seeds: List[int]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    diffs: List[float] = []
    graded = 0
    timing = json.load(open(os.path.join(out_dir, "timing.json")))
    for s in seeds:
        rec = {c: json.load(open(os.path.join(out_dir, "runs", f"seed{s}", f"{c}.json"))) for c in CELLS}
        full = [st["refusal_rate"] for st in rec["full"]["run"]["steps"]]
        ok = all(GRADED[0] <= r <= GRADED[1] for r in full)
        graded += ok
        mean = {c: sum(st["refusal_rate"] for st in rec[c]["run"]["steps"]) / len(full) for c in CELLS}
        diff = 100 * (mean[CELLS[2]] - mean[CELLS[1]])
        diffs.append(diff)
        rows.append({"variant": f"{size}:{lr:g}", "seed": s, "full_refusal_after_each_task": [round(100 * r, 1) for r in full],
                     "graded": ok, "random_refusal_mean": round(100 * mean[CELLS[1]], 1),
                     "oracle_refusal_mean": round(100 * mean[CELLS[2]], 1), "oracle_minus_random_pp": round(diff, 1),
                     "prepare_s": timing.get(f"prepare/seed{s}"),
                     "run_s": {c: round(rec[c]["wall_s"], 1) for c in CELLS}})
    m, lo, hi = t_interval(diffs)
    summary = {"variant": f"{size}:{lr:g}", "graded_seeds": f"{graded}/{len(seeds)}",
               "control_pp": round(m, 1), "control_ci": [round(lo, 1), round(hi, 1)],
               "control_holds": bool(lo > 0)}
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="SIZE:LR (repeatable), e.g. small:3.5e-4")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", required=True, help="where the variants' runs go (reused when rerun)")
    ap.add_argument("--aligned-from", default=None, help="a study's out dir whose aligned/ cache (small model) to reuse")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where study-sizing-<timestamp>.* go")
    args = ap.parse_args()
    all_rows: List[Dict[str, Any]] = []
    summaries: List[Dict[str, Any]] = []
    for text in args.variant:
        size, lr = parse_variant(text)
        out_dir = run_variant(size, lr, args.seeds, args.out, args.aligned_from)
        rows, summary = summarize(size, lr, out_dir, args.seeds)
        all_rows += rows
        summaries.append(summary)
    md = ["Testbed sizing (issue #22 item 3): full data, random and oracle at ρ = 0.2 (offline, equal steps). "
          "Graded: the full-data refusal rate within 15-85% after every task. Control: oracle − random, "
          "refusal % mean over tasks, 95% t-interval over seeds.", "",
          markdown_table(["variant", "graded seeds", "control pp [95% CI]", "control holds"],
                         [[s["variant"], s["graded_seeds"], f"{s['control_pp']:+.1f} [{s['control_ci'][0]:+.1f}, "
                           f"{s['control_ci'][1]:+.1f}]", "yes" if s["control_holds"] else "no"] for s in summaries]),
          "", markdown_table(["variant", "seed", "full: refusal % after each task", "graded", "random %", "oracle %",
                              "prepare s", "run s (full, random, oracle)"],
                             [[r["variant"], r["seed"], r["full_refusal_after_each_task"], "yes" if r["graded"] else "no",
                               r["random_refusal_mean"], r["oracle_refusal_mean"],
                               "" if r["prepare_s"] is None else round(r["prepare_s"]),
                               list(r["run_s"].values())] for r in all_rows])]
    text = "\n".join(md) + "\n"
    paths = write_results(all_rows, args.out_dir, f"study-sizing-{utc_stamp()}",
                          {"env": env_info("cpu"), "summaries": summaries, "seeds": args.seeds}, markdown=text)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
