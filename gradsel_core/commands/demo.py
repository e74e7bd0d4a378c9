"""``gradsel demo``: the safety-drift study (see ``gradsel_core.study.experiment``).

    gradsel demo                      # the small slice: ρ = 0.2, offline, equal steps, 3 seeds (≤ 5 min, 2 cores)
    gradsel demo --control            # the positive control: oracle vs random, ρ = 0.2 and 0.5, equal steps, 5 seeds
    gradsel demo --study              # the headline cells: ρ = 0.2 and 0.5, offline and online, equal steps, 10 seeds
    gradsel demo --full               # the whole study: every method, mode, budget and ρ, 5 seeds
    gradsel demo --full --seeds 3 --methods median_band --ratios 0.35   # rerun one cell (its numbers reproduce)
    gradsel demo --model DIR --task name=train.jsonl,eval.jsonl [--task ...] --harmful prompts.jsonl \
        [--mc facts.jsonl] [--template "USER: {prompt} ASSISTANT:"] --device cuda
"""
from __future__ import annotations

import argparse
import logging
import os

from ..errors import UsageError
from ..study.experiment import BUDGETS, METHODS, MODES, ExperimentConfig, run_experiment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true",
                   help="the whole study (5 seeds, every method, offline and online, both budgets, 5 ratios); "
                        "the grid flags below narrow it")
    p.add_argument("--study", action="store_true",
                   help="the headline cells (10 seeds; random, oracle, median_band, norm_per_token, drop_opposed, "
                        "full; rho 0.2 and 0.5; offline and online; equal steps); the grid flags below narrow it")
    p.add_argument("--control", action="store_true",
                   help="the positive control alone (oracle vs random, offline, equal steps, rho 0.2 and 0.5, 5 seeds)")
    p.add_argument("--out", default=None, help="output directory (default gradsel_runs/demo or gradsel_runs/full); "
                                               "finished runs in it are reused, so an interrupted study resumes")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --full: 0..4)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                   help=f"among {list(METHODS)} (default: all; the demo slice leaves out drop_opposed)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES, metavar="MODE",
                   help="offline and/or online selection (default offline; --full: both)")
    p.add_argument("--ratios", "--ratio", type=float, nargs="+", default=None, metavar="RHO",
                   help="kept fractions ρ (default 0.2; --full: 0.1 0.2 0.35 0.5 0.75)")
    p.add_argument("--budgets", nargs="+", default=None, choices=BUDGETS, metavar="BUDGET",
                   help="'epochs' (as many passes over the kept data as full data makes) and/or 'steps' (as many "
                        "optimizer steps as full data) (default steps; --full: both)")
    p.add_argument("--loss-filter-std", type=float, default=None, metavar="K",
                   help="apply the loss pre-filter with width K to every policy (ablation: default 1.0 for "
                        "median_band only, the paper's rule)")
    p.add_argument("--mechanism", type=int, default=None, metavar="N",
                   help="samples of the per-sample mechanism study (default 240 on the first seed; --full: every "
                        "seed; 0: off)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: aggregate the finished runs under --out for this grid and list what did not run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (pinned: numbers depend on it)")
    p.add_argument("--jobs", type=int, default=2, help="seeds run in parallel processes (numbers do not depend on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="a local HF model dir: run on real data instead of the testbed")
    p.add_argument("--task", action="append", default=[], metavar="NAME=TRAIN[,EVAL]",
                   help="a task of JSONL prompt/response records (repeat, in training order)")
    p.add_argument("--harmful", default=None,
                   help="held-out harmful prompts (JSONL 'prompt' or TXT); JSONL rows with 'refusal' and "
                        "'compliance' answers also give the safety margin")
    p.add_argument("--mc", default=None, help="multiple-choice items {question, choices, answer} (JSONL)")
    p.add_argument("--template", default=None, help="prompt template with {prompt}")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the continual tasks (default 2.5e-4)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per continual task for full data (default 4)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    kw = {"device": args.device, "threads": args.threads, "jobs": args.jobs, "progress": not args.no_progress}
    if args.out:
        kw["out_dir"] = args.out
    for name, key in (("seeds", "seeds"), ("methods", "methods"), ("modes", "modes"), ("ratios", "ratios"),
                      ("budgets", "budgets")):
        v = getattr(args, name)
        if v:
            kw[key] = tuple(dict.fromkeys(v))
    if args.loss_filter_std is not None:
        kw["loss_filter_std"] = {m: args.loss_filter_std for m in METHODS if m != "full"}
    if args.mechanism is not None:
        kw["mechanism_samples"] = args.mechanism
    if args.lr is not None:
        kw["lr"] = args.lr
    if args.epochs is not None:
        kw["task_epochs"] = args.epochs
    if args.model:
        if not args.task:
            raise UsageError("--model needs at least one --task NAME=TRAIN[,EVAL]")
        files = []
        for spec in args.task:
            name, _, paths = spec.partition("=")
            train, _, ev = paths.partition(",")
            if not name or not train:
                raise UsageError(f"--task {spec!r}: use NAME=TRAIN.jsonl[,EVAL.jsonl]")
            files.append({"name": name, "train": train, "eval": ev or None})
        kw.update(model_dir=args.model, task_files=files, harmful_prompts=args.harmful, mc_file=args.mc,
                  prompt_template=args.template, seeds=kw.get("seeds", (0,)))
        kw.setdefault("out_dir", "gradsel_runs/model")
        kw.setdefault("lr", 1e-4)
        kw.setdefault("mechanism_samples", 0)
    grids = [name for name in ("full", "study", "control") if getattr(args, name, False)]
    if len(grids) > 1:
        raise UsageError(f"choose one of --full, --study, --control (got {', '.join('--' + g for g in grids)})")
    if "seeds" in kw and args.mechanism is None and not grids:
        kw["mechanism_seeds"] = kw["seeds"][:1]
    if grids:
        return getattr(ExperimentConfig, {"full": "full", "study": "headline", "control": "control"}[grids[0]])(**kw)
    return ExperimentConfig(**kw)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    noisy = [logging.getLogger(n) for n in ("gradsel_core.scoring", "gradsel_core.trainer", "gradsel_core.study.evaluation",
                                            "gradsel_core.store", "gradsel_core.study.testbed", "matplotlib")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:  # per-batch and per-evaluation lines would drown the progress bars and the tables
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        result = run_experiment(cfg, run_missing=not args.report_only)
    finally:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)
    with open(os.path.join(cfg.out_dir, "results.md")) as f:
        print(f.read())
    print(f"results: {os.path.join(cfg.out_dir, 'results.json')}")
    for name in ("refusal.png", "frontier.png", "norms.png", "mechanism.png"):
        path = os.path.join(cfg.out_dir, name)
        if os.path.exists(path):
            print(f"plot: {path}")
    print(f"total wall time: {result['wall_s']:.0f} s")
    return 0
