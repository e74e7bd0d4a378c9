"""``gradsel demo``: the safety-drift experiment (see ``gradsel_core.experiment``).

    gradsel demo                      # small testbed run, ≤ 5 minutes on 2 CPU cores
    gradsel demo --full               # the whole grid: 3 seeds, all methods, offline and online, larger data
    gradsel demo --model DIR --task name=train.jsonl,eval.jsonl [--task ...] --harmful prompts.jsonl \
        [--mc facts.jsonl] [--template "USER: {prompt} ASSISTANT:"] --device cuda
"""
from __future__ import annotations

import argparse
import logging
import os

from ..errors import UsageError
from ..experiment import FULL_METHODS, ExperimentConfig, method_label, run_experiment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="the whole grid (3 seeds, every method, larger data)")
    p.add_argument("--out", default=None, help="output directory (default gradsel_runs/demo or /full)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--ratio", type=float, default=None, help="kept fraction ρ for every selection method")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"labels among {[method_label(m) for m in FULL_METHODS]}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="a local HF model dir: run on real data instead of the testbed")
    p.add_argument("--task", action="append", default=[], metavar="NAME=TRAIN[,EVAL]",
                   help="a task of JSONL prompt/response records (repeat, in training order)")
    p.add_argument("--harmful", default=None, help="held-out harmful prompts (JSONL 'prompt' or TXT)")
    p.add_argument("--mc", default=None, help="multiple-choice items {question, choices, answer} (JSONL)")
    p.add_argument("--template", default=None, help="prompt template with {prompt}")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per continual task")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    kw = {"device": args.device}
    if args.out:
        kw["out_dir"] = args.out
    if args.seeds:
        kw["seeds"] = tuple(args.seeds)
    if args.ratio is not None:
        kw["keep_ratio"] = args.ratio
    if args.lr is not None:
        kw["lr"] = args.lr
    if args.epochs is not None:
        kw["task_epochs"] = args.epochs
    if args.methods:
        known = {method_label(m): m for m in FULL_METHODS}
        bad = [m for m in args.methods if m not in known]
        if bad:
            raise UsageError(f"--methods: unknown methods {bad}; choose from {sorted(known)}")
        kw["methods"] = tuple(known[m] for m in args.methods)
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
    return ExperimentConfig.full(**kw) if args.full else ExperimentConfig(**kw)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    noisy = [logging.getLogger(n) for n in ("gradsel_core.scoring", "gradsel_core.trainer", "gradsel_core.evaluation",
                                            "gradsel_core.store")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:  # per-batch and per-evaluation lines would drown the per-method summary
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        result = run_experiment(cfg)
    finally:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)
    with open(os.path.join(cfg.out_dir, "results.md")) as f:
        print(f.read())
    print(f"results: {os.path.join(cfg.out_dir, 'results.json')}")
    for name in ("refusal.png", "norms.png"):
        path = os.path.join(cfg.out_dir, name)
        if os.path.exists(path):
            print(f"plot: {path}")
    print(f"total wall time: {result['wall_s']:.0f} s")
    return 0
