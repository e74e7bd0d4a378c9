"""Sizing the safety testbed (issue #22 item 3): does full-data fine-tuning leave the refusal rate graded, does
the positive control still hold, and what does a variant cost?

For each variant (model size, continual-task lr) this runs ``gradsel demo``'s cells ``full``, ``random`` and
``oracle`` (offline, ρ = 0.2, equal steps) on the given seeds, through the study's own code
(:func:`gradsel_core.study.experiment.run_experiment`; finished runs under ``--out`` are reused, so a rerun
only aggregates), then reports per seed the full-data refusal rate after every task and whether it stays in
the issue's graded range (15-85% after every task), the oracle - random paired difference of the primary
metric (refusal %, mean over tasks) with its 95% t-interval, and the wall time of preparation (pretraining
and alignment) and of each run.

    python benchmarks/study_sizing.py --variant small:2.5e-4:0.1 --variant small:3.5e-4:0.08 --variant medium:5e-4 \\
        --seeds 0 1 2 3 4 --out /tmp/sizing

Aligned models depend on neither the task lr nor the eroding fraction (their cache key is exactly what the
weights depend on): ``--aligned-from DIR`` copies a study's ``aligned/`` cache into every variant, so only the
continual tasks run. Wall times come from a shared, loaded
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
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS_DIR, env_info, markdown_table, utc_stamp, write_results  # noqa: E402

GRADED = (0.15, 0.85)
CELLS = ("full", "random-offline-r0.2-steps", "oracle-offline-r0.2-steps")


Variant = Tuple[str, float, Optional[float], Optional[int]]  # size, task lr, eroding fraction, task epochs


def parse_variant(text: str) -> Variant:
    """``SIZE:LR[:FRAC[:EPOCHS]]``: FRAC the testbed's ``eroding_frac``, EPOCHS the study's ``task_epochs`` (both
    default to the current defaults)."""
    parts = text.split(":")
    if parts[0] not in ("small", "medium") or not 2 <= len(parts) <= 4 or not parts[1]:
        raise SystemExit(f"--variant {text!r}: expected SIZE:LR[:FRAC[:EPOCHS]] with SIZE small or medium, "
                         "e.g. small:2.5e-4:0.1")
    try:
        frac = float(parts[2]) if len(parts) > 2 and parts[2] else None
        epochs = int(parts[3]) if len(parts) > 3 else None
        return parts[0], float(parts[1]), frac, epochs
    except ValueError:
        raise SystemExit(f"--variant {text!r}: LR and FRAC must be numbers, EPOCHS an integer") from None


def variant_name(v: Variant) -> str:
    size, lr, frac, epochs = v
    return f"{size}:{lr:g}" + (f":{frac:g}" if frac is not None else "") + (f":{epochs}ep" if epochs else "")


def run_variant(v: Variant, seeds: List[int], out: str, aligned_from: str | None, jobs: int, full_only: bool) -> str:
    from gradsel_core.study.experiment import ExperimentConfig, run_experiment

    size, lr, frac, epochs = v
    out_dir = os.path.join(out, f"{size}-lr{lr:g}" + (f"-e{frac:g}" if frac is not None else "")
                           + (f"-ep{epochs}" if epochs else ""))
    os.makedirs(out_dir, exist_ok=True)
    if aligned_from and not os.path.exists(os.path.join(out_dir, "aligned")):
        # the cache key holds the model config: a medium variant simply finds no small model and prepares its own
        shutil.copytree(os.path.join(aligned_from, "aligned"), os.path.join(out_dir, "aligned"))
    extra: Dict[str, Any] = {"task_epochs": epochs} if epochs else {}
    cfg = ExperimentConfig(model_size=size, lr=lr, methods=("full",) if full_only else ("full", "random", "oracle"),
                           ratios=(0.2,),
                           modes=("offline",), budgets=("steps",), seeds=tuple(seeds), mechanism_samples=0,
                           testbed={"eroding_frac": frac} if frac is not None else {}, jobs=jobs,
                           progress=False, out_dir=out_dir, **extra)
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


def summarize(v: Variant, out_dir: str, seeds: List[int], full_only: bool) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    cells = CELLS[:1] if full_only else CELLS
    rows: List[Dict[str, Any]] = []
    diffs: List[float] = []
    graded = 0
    timing = json.load(open(os.path.join(out_dir, "timing.json")))
    for s in seeds:
        rec = {c: json.load(open(os.path.join(out_dir, "runs", f"seed{s}", f"{c}.json"))) for c in cells}
        full = [st["refusal_rate"] for st in rec["full"]["run"]["steps"]]
        ok = all(GRADED[0] <= r <= GRADED[1] for r in full)
        graded += ok
        mean = {c: sum(st["refusal_rate"] for st in rec[c]["run"]["steps"]) / len(full) for c in cells}
        diff = math.nan if full_only else 100 * (mean[CELLS[2]] - mean[CELLS[1]])
        diffs.append(diff)
        rows.append({"variant": variant_name(v), "seed": s,
                     "full_refusal_after_each_task": [round(100 * r, 1) for r in full],
                     "full_plasticity_em": [round(100 * e) for e in rec["full"]["run"]["plasticity_em"]],
                     "graded": ok, "random_refusal_mean": None if full_only else round(100 * mean[CELLS[1]], 1),
                     "oracle_refusal_mean": None if full_only else round(100 * mean[CELLS[2]], 1),
                     "oracle_minus_random_pp": None if full_only else round(diff, 1),
                     "prepare_s": timing.get(f"prepare/seed{s}"),
                     "run_s": {c: round(rec[c]["wall_s"], 1) for c in cells}})
    m, lo, hi = (math.nan,) * 3 if full_only else t_interval(diffs)
    summary = {"variant": variant_name(v), "graded_seeds": f"{graded}/{len(seeds)}",
               "control_pp": None if full_only else round(m, 1),
               "control_ci": None if full_only else [round(lo, 1), round(hi, 1)],
               "control_holds": None if full_only else bool(lo > 0)}
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True,
                    help="SIZE:LR[:FRAC[:EPOCHS]] (repeatable), e.g. small:2.5e-4:0.1 (FRAC: the eroding fraction)")
    ap.add_argument("--full-only", action="store_true",
                    help="run full data only: the graded check, without the positive control (random and oracle)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds in parallel processes (the numbers do not depend on it)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", required=True, help="where the variants' runs go (reused when rerun)")
    ap.add_argument("--aligned-from", default=None, help="a study's out dir whose aligned/ cache (small model) to reuse")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where study-sizing-<timestamp>.* go")
    args = ap.parse_args()
    all_rows: List[Dict[str, Any]] = []
    summaries: List[Dict[str, Any]] = []
    for text in args.variant:
        v = parse_variant(text)
        out_dir = run_variant(v, args.seeds, args.out, args.aligned_from, args.jobs, args.full_only)
        rows, summary = summarize(v, out_dir, args.seeds, args.full_only)
        all_rows += rows
        summaries.append(summary)
    def control(s: Dict[str, Any]) -> List[str]:
        if s["control_holds"] is None:
            return ["not run (--full-only)", ""]
        return [f"{s['control_pp']:+.1f} [{s['control_ci'][0]:+.1f}, {s['control_ci'][1]:+.1f}]",
                "yes" if s["control_holds"] else "no"]

    what = "full data only" if args.full_only else "full data, random and oracle at ρ = 0.2 (offline, equal steps)"
    md = [f"Testbed sizing (issue #22 item 3): {what}. Variant SIZE:LR[:FRAC[:EPOCHS]]: model size, task lr, "
          "eroding fraction, epochs per task (defaults where absent). Graded: the full-data refusal rate within "
          "15-85% after every task. Control: oracle − random, refusal % mean over tasks, 95% t-interval over "
          "seeds. EM: teacher-forced exact match on each task right after training it (plasticity).", "",
          markdown_table(["variant", "graded seeds", "control pp [95% CI]", "control holds"],
                         [[s["variant"], s["graded_seeds"], *control(s)] for s in summaries]),
          "", markdown_table(["variant", "seed", "full: refusal % after each task", "graded", "full: EM % after each task",
                              "random %", "oracle %", "prepare s", "run s (" + ", ".join(
                                  "full random oracle".split()[:1 if args.full_only else 3]) + ")"],
                             [[r["variant"], r["seed"], r["full_refusal_after_each_task"], "yes" if r["graded"] else "no",
                               r["full_plasticity_em"],
                               "" if r["random_refusal_mean"] is None else r["random_refusal_mean"],
                               "" if r["oracle_refusal_mean"] is None else r["oracle_refusal_mean"],
                               "" if r["prepare_s"] is None else round(r["prepare_s"]),
                               list(r["run_s"].values())] for r in all_rows])]
    text = "\n".join(md) + "\n"
    paths = write_results(all_rows, args.out_dir, f"study-sizing-{utc_stamp()}",
                          {"env": env_info("cpu"), "summaries": summaries, "seeds": args.seeds}, markdown=text)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
