"""The safety-drift experiment: continual fine-tuning with and without gradient-based selection.

For each seed, a base model is made aligned once (testbed: pretraining, then alignment; real model: the
given directory as is). Then every method fine-tunes a copy on the same task sequence, keeping the same
number of samples, and after every task we measure:

* refusal rate on held-out harmful prompts (safety; 1 - ASR), and over-refusal on held-out benign ones;
* fact accuracy (multiple choice by log-likelihood: truthfulness);
* accuracy on every task seen so far (teacher-forced exact match = greedy decoding reproduces the answer);
* BWT / forgetting from the accuracy matrix, and wall time.

Methods (same kept count ⌊ρ·n⌋ for all but ``full``): ``full`` (all data), ``random``, ``drop_top``
(drops the highest-norm 1-ρ), ``median_band`` (the paper: loss filter, then the ρ·n closest to the
median norm), ``keep_top`` (the high-gradient ablation); each ``offline`` (whole task scored, then
selected) or ``online`` (per batch, in one backward).

Outputs in ``out_dir``: ``results.json``, ``results.md`` (mean ± std over seeds), ``refusal.png``
(refusal rate against task step per method) and ``norms.png`` (each task's norm histogram with the
median-band cut).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .selection import SelectionConfig
from .trainer import ContinualTrainer, Task, task_metric

log = logging.getLogger(__name__)

Method = Tuple[str, str]  # (policy or "full", "offline" | "online")

DEMO_METHODS: Tuple[Method, ...] = (
    ("full", "offline"), ("random", "offline"), ("drop_top", "offline"), ("median_band", "offline"),
    ("keep_top", "offline"), ("median_band", "online"),
)
FULL_METHODS: Tuple[Method, ...] = DEMO_METHODS + (
    ("random", "online"), ("drop_top", "online"), ("keep_top", "online"),
)


def method_label(m: Method) -> str:
    return "full" if m[0] == "full" else f"{m[0]}/{m[1]}"


@dataclass
class ExperimentConfig:
    """Sizes and settings. Defaults: the small CPU demo; :meth:`full` the whole grid."""

    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[Method] = DEMO_METHODS
    keep_ratio: float = 0.5  # ρ: fraction of each task's samples kept by every selection method
    loss_filter_std: Optional[float] = 1.0  # the paper's loss pre-filter (median_band only)
    lr: float = 5e-4  # continual tasks
    batch_size: int = 32
    task_epochs: int = 8
    eval_max_new_tokens: int = 8
    device: str = "cpu"
    out_dir: str = "gradsel_runs/demo"
    # testbed source
    testbed: Dict[str, Any] = field(default_factory=dict)  # TestbedConfig overrides
    model_size: str = "small"
    pretrain_epochs: int = 5
    pretrain_lr: float = 3e-3
    align_epochs: int = 16
    align_lr: float = 1e-3
    # real-model source (used when model_dir is set)
    model_dir: Optional[str] = None
    task_files: Sequence[Dict[str, str]] = ()  # [{"name", "train", "eval"}] JSONL with prompt/response
    harmful_prompts: Optional[str] = None
    mc_file: Optional[str] = None
    prompt_template: Optional[str] = None
    max_length: int = 512

    @classmethod
    def full(cls, **kw: Any) -> "ExperimentConfig":
        base = dict(seeds=(0, 1, 2), methods=FULL_METHODS, testbed={"full": True}, model_size="medium",
                    pretrain_epochs=3, align_epochs=6, task_epochs=4, out_dir="gradsel_runs/full")
        base.update(kw)
        return cls(**base)

    def selection(self, m: Method) -> Optional[SelectionConfig]:
        policy, _ = m
        if policy == "full":
            return None
        if policy == "drop_top":  # drop the top 1-ρ: the same kept count as the others
            return SelectionConfig("drop_top", ratio=1.0 - self.keep_ratio, loss_filter_std=None)
        lfs = self.loss_filter_std if policy == "median_band" else None
        return SelectionConfig(policy, ratio=self.keep_ratio, loss_filter_std=lfs)


@dataclass
class Source:
    """What one seed trains and measures: the aligned base model, tasks and the safety evaluators."""

    model: nn.Module
    tasks: List[Task]
    evaluate: Callable[[nn.Module], Dict[str, float]]
    pad_id: int
    info: Dict[str, Any]


# -- sources ---------------------------------------------------------------------------------------------


def testbed_source(cfg: ExperimentConfig, seed: int) -> Source:
    """Pretrain a TinyGPT to comply with everything, then align it (refuse harmful, answer truthfully)."""
    from .evaluation import evaluate_multiple_choice, evaluate_refusal
    from .models import TinyGPT
    from .testbed import TestbedConfig, build_testbed, recommended_model_config

    overrides = dict(cfg.testbed)
    full = overrides.pop("full", False)
    tb_cfg = TestbedConfig.full(seed=seed, **overrides) if full else TestbedConfig(seed=seed, **overrides)
    tb = build_testbed(tb_cfg)
    torch.manual_seed(seed)
    model = TinyGPT(recommended_model_config(tb, size=cfg.model_size)).to(cfg.device)
    pad = tb.tokenizer.pad_token_id
    t0 = time.perf_counter()
    for name, records, epochs, lr in (("pretrain", tb.pretrain, cfg.pretrain_epochs, cfg.pretrain_lr),
                                      ("align", tb.align, cfg.align_epochs, cfg.align_lr)):
        ContinualTrainer(model, [Task(name, tb.encode(records), [], "token_accuracy")], lr=lr, epochs=epochs,
                         batch_size=cfg.batch_size, seed=seed, pad_id=pad).run()
    prep_s = time.perf_counter() - t0
    tok, tpl = tb.tokenizer, tb.prompt_template

    def evaluate(m: nn.Module) -> Dict[str, float]:
        harm = evaluate_refusal(m, tok, tb.heldout_harmful, prompt_template=tpl, max_new_tokens=cfg.eval_max_new_tokens)
        benign = evaluate_refusal(m, tok, tb.heldout_benign, prompt_template=tpl, max_new_tokens=cfg.eval_max_new_tokens)
        mc = evaluate_multiple_choice(m, tok, tb.facts_mc, tpl)
        # keyword ASR also counts degenerate replies (a task's format) as attacks: report real compliance too
        complied = sum(tb.complied(r["prompt"], r["response"]) for r in harm.records) / max(1, harm.n)
        return {"refusal_rate": harm.refusal_rate, "harmful_compliance": complied,
                "benign_refusal_rate": benign.refusal_rate, "fact_acc": mc.acc}

    tasks = [Task(t.name, tb.encode(t.train), tb.encode(t.test), "exact_match") for t in tb.tasks]
    return Source(model, tasks, evaluate, pad, {"prepare_s": prep_s, "testbed": asdict(tb_cfg)})


def model_dir_source(cfg: ExperimentConfig, seed: int) -> Source:
    """A local HF model (assumed aligned), JSONL tasks, a harmful-prompt file and an optional MC file."""
    from .data import encode_records, load_model_and_tokenizer, model_pad_id, read_jsonl
    from .evaluation import evaluate_multiple_choice, evaluate_refusal

    if not cfg.task_files:
        raise ValueError("a model_dir experiment needs task_files=[{'name', 'train', 'eval'}, ...]")
    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(cfg.model_dir, device=cfg.device)
    tasks = [Task(t["name"], encode_records(read_jsonl(t["train"]), tok, cfg.max_length),
                  encode_records(read_jsonl(t["eval"]), tok, cfg.max_length) if t.get("eval") else [])
             for t in cfg.task_files]
    mc_items = read_jsonl(cfg.mc_file) if cfg.mc_file else None

    def evaluate(m: nn.Module) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if cfg.harmful_prompts:
            r = evaluate_refusal(m, tok, cfg.harmful_prompts, prompt_template=cfg.prompt_template,
                                 max_new_tokens=cfg.eval_max_new_tokens)
            out["refusal_rate"] = r.refusal_rate
        if mc_items:
            out["fact_acc"] = evaluate_multiple_choice(m, tok, mc_items, cfg.prompt_template).acc
        return out

    return Source(model, tasks, evaluate, model_pad_id(model), {"model_dir": cfg.model_dir})


# -- the run ---------------------------------------------------------------------------------------------


def run_method(cfg: ExperimentConfig, src: Source, method: Method, seed: int) -> Dict[str, Any]:
    """Fine-tune a copy of the aligned model on the task sequence with one method."""
    model = copy.deepcopy(src.model)
    steps: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    trainer = ContinualTrainer(model, src.tasks, selection=cfg.selection(method), mode=method[1], lr=cfg.lr,
                               epochs=cfg.task_epochs, batch_size=cfg.batch_size, seed=seed, pad_id=src.pad_id,
                               evaluators={"safety": src.evaluate})
    res = trainer.run()
    wall = time.perf_counter() - t0
    for i, row in enumerate(res.per_task):
        steps.append(dict(row["evaluators"]["safety"], task_acc=res.accuracy[i][: i + 1],
                          mean_task_acc=float(np.mean(res.accuracy[i][: i + 1])),
                          kept=row["train"]["kept"], kept_fraction=row["train"]["kept_fraction"]))
    norms = [{"norms": r["selection"].get("norms"), "kept_mask": r["selection"].get("kept_mask")}
             for r in res.per_task]
    return {"method": method_label(method), "seed": seed, "steps": steps, "accuracy": res.accuracy,
            "forgetting": res.forgetting, "wall_s": wall, "selection_norms": norms}


def run_experiment(cfg: ExperimentConfig) -> Dict[str, Any]:
    os.makedirs(cfg.out_dir, exist_ok=True)
    runs: List[Dict[str, Any]] = []
    aligned: List[Dict[str, Any]] = []
    task_names: List[str] = []
    t_all = time.perf_counter()
    for seed in cfg.seeds:
        src = model_dir_source(cfg, seed) if cfg.model_dir else testbed_source(cfg, seed)
        task_names = [t.name for t in src.tasks]
        base = src.evaluate(src.model)
        base["task_acc"] = [float(task_metric(t, src.pad_id)(src.model, t.eval)) for t in src.tasks]
        aligned.append(dict(base, seed=seed, **src.info))
        log.info("seed %d aligned model: %s", seed, {k: v for k, v in base.items() if k != "testbed"})
        for m in cfg.methods:
            r = run_method(cfg, src, m, seed)
            runs.append(r)
            last = r["steps"][-1]
            log.info("seed %d %-20s refusal %.3f fact %.3f tasks %.3f bwt %.3f (%.0f s)", seed, r["method"],
                     last.get("refusal_rate", float("nan")), last.get("fact_acc", float("nan")),
                     last["mean_task_acc"], r["forgetting"]["bwt"], r["wall_s"])
    result = {"config": _cfg_json(cfg), "tasks": task_names, "aligned": aligned, "runs": runs,
              "summary": summarize(runs, aligned), "wall_s": time.perf_counter() - t_all}
    write_outputs(result, cfg.out_dir)
    return result


def _cfg_json(cfg: ExperimentConfig) -> Dict[str, Any]:
    d = asdict(cfg)
    d["methods"] = [method_label(m) for m in cfg.methods]
    return d


# -- aggregation and outputs -----------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> Tuple[float, float]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: List[Dict[str, Any]], aligned: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean ± std over seeds of each method's figures after each task, and at the end."""
    out: Dict[str, Any] = {"aligned": {k: _ms([a[k] for a in aligned])
                                       for k in ("refusal_rate", "harmful_compliance", "fact_acc")
                                       if all(k in a for a in aligned)}}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for name in methods:
        rs = [r for r in runs if r["method"] == name]
        n_steps = len(rs[0]["steps"])
        per_step = []
        for i in range(n_steps):
            row = {}
            for k in ("refusal_rate", "harmful_compliance", "benign_refusal_rate", "fact_acc", "mean_task_acc",
                      "kept_fraction"):
                if all(k in r["steps"][i] for r in rs):
                    row[k] = _ms([r["steps"][i][k] for r in rs])
            per_step.append(row)
        out[name] = {"steps": per_step, "bwt": _ms([r["forgetting"]["bwt"] for r in rs]),
                     "wall_s": _ms([r["wall_s"] for r in rs]), "n_seeds": len(rs)}
    return out


def _fmt(ms: Tuple[float, float], pct: bool = True) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.2f} ± {s:.2f}"


def markdown(result: Dict[str, Any]) -> str:
    summ = result["summary"]
    tasks = result["tasks"]
    lines = [f"Tasks in order: {' → '.join(tasks)}; seeds: {len(result['aligned'])}; "
             f"kept fraction ρ = {result['config']['keep_ratio']}. Mean ± std over seeds, in %.", ""]
    al = summ["aligned"]
    if al:
        lines.append("Aligned model before fine-tuning: " + ", ".join(f"{k} {_fmt(v)}" for k, v in al.items()))
        lines.append("")
    hdr = ["method", "refusal (end)", "harmful compliance (end)", "benign refusal (end)", "fact acc (end)",
           "task acc (end)", "BWT", "wall s"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for name, v in summ.items():
        if name == "aligned":
            continue
        last = v["steps"][-1]
        lines.append("| " + " | ".join([
            name, _fmt(last.get("refusal_rate", (math.nan, math.nan))),
            _fmt(last.get("harmful_compliance", (math.nan, math.nan))),
            _fmt(last.get("benign_refusal_rate", (math.nan, math.nan))), _fmt(last.get("fact_acc", (math.nan, math.nan))),
            _fmt(last["mean_task_acc"]), _fmt(v["bwt"]), _fmt(v["wall_s"], pct=False)]) + " |")
    lines += ["", "Refusal rate on held-out harmful prompts after each task (%):", ""]
    hdr = ["method", "aligned"] + tasks
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for name, v in summ.items():
        if name == "aligned":
            continue
        cells = [name, _fmt(al.get("refusal_rate", (math.nan, math.nan)))]
        cells += [_fmt(s.get("refusal_rate", (math.nan, math.nan))) for s in v["steps"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    from .store import atomic_write

    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md")}
    atomic_write(paths["json"], json.dumps(result, indent=1, default=str).encode())
    atomic_write(paths["md"], markdown(result).encode())
    try:
        paths.update(plot(result, out_dir))
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'gradsel[plot]')")
    return paths


def plot(result: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    tasks = result["tasks"]
    x = list(range(len(tasks) + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = summ["aligned"].get("refusal_rate", (math.nan, 0.0))
    for name, v in summ.items():
        if name == "aligned" or "refusal_rate" not in v["steps"][0]:
            continue
        m = np.array([base[0]] + [s["refusal_rate"][0] for s in v["steps"]])
        s = np.array([base[1]] + [s["refusal_rate"][1] for s in v["steps"]])
        ax.plot(x, 100 * m, marker="o", label=name)
        ax.fill_between(x, 100 * (m - s), 100 * (m + s), alpha=0.12)
    ax.set_xticks(x, ["aligned"] + [f"after\n{t}" for t in tasks])
    ax.set_ylabel("refusal rate on held-out harmful prompts (%)")
    ax.set_title(f"Safety drift during continual fine-tuning ({len(result['aligned'])} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = {"refusal_png": os.path.join(out_dir, "refusal.png")}
    fig.savefig(paths["refusal_png"], dpi=120)
    plt.close(fig)
    run = next((r for r in result["runs"] if r["method"] == "median_band/offline"), None)
    if run is not None and all(s.get("norms") for s in run["selection_norms"]):
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
        for ax, name, sel in zip(axes[0], tasks, run["selection_norms"]):
            norms = np.asarray(sel["norms"], dtype=float)
            kept = np.asarray(sel["kept_mask"], dtype=bool)
            bins = np.histogram_bin_edges(norms[np.isfinite(norms)], bins=30)
            finite = np.isfinite(norms)
            ax.hist([norms[kept & finite], norms[~kept & finite]], bins=bins, stacked=True,
                    color=["tab:blue", "0.75"], label=["kept (median band)", "dropped (band or loss filter)"])
            if kept.any():
                for edge in (norms[kept].min(), norms[kept].max()):
                    ax.axvline(edge, color="tab:red", lw=1)  # the band's edges
            ax.set_title(f"{name} (seed {run['seed']})")
            ax.set_xlabel("per-sample gradient norm")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths["norms_png"] = os.path.join(out_dir, "norms.png")
        fig.savefig(paths["norms_png"], dpi=120)
        plt.close(fig)
    return paths
