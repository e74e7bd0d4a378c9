"""``gradsel train --config run.json``: the continual trainer from a config file.

Config (paths relative to the config file)::

    {
      "model": "tiny" | "path/to/hf-model-dir",
      "tasks": [{"name": "dolly", "train": "dolly_train.jsonl", "eval": "dolly_eval.jsonl",
                 "metric": "exact_match"}, ...],
      "selection": {"policy": "median_band", "ratio": 0.2, "loss_filter_std": 1.0} | null,
      "mode": "offline" | "online",
      "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]} | null,
      "lr": 1e-4, "epochs": 1, "batch_size": 16, "grad_accum": 1, "seed": 0, "max_length": 512,
      "safety": {"harmful_prompts": "advbench.jsonl", "mc": "truthfulqa_mc.jsonl",
                 "prompt_template": "USER: {prompt} ASSISTANT:"},
      "out_dir": "runs/my-run"
    }

JSONL records carry ``text`` or ``prompt`` + ``response`` (loss on the response only).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, Mapping

log = logging.getLogger(__name__)

TRAINER_KEYS = ("mode", "lr", "weight_decay", "epochs", "batch_size", "grad_accum", "seed", "optimizer",
                "max_grad_norm", "params", "checkpoint_format")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run.json (see `gradsel_core.commands.train` docstring)")
    p.add_argument("--out", default=None, help="override the config's out_dir")


def _path(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _mc_figures(res: Any) -> Dict[str, float]:
    return {"acc": res.acc, "acc_norm_token": res.acc_norm_token, "acc_norm_char": res.acc_norm_char}


def build_trainer(cfg: Mapping[str, Any], base_dir: str = "."):
    """A :class:`ContinualTrainer` from a config mapping (see the module docstring)."""
    from ..data import encode_records, load_model_and_tokenizer, model_max_length, model_pad_id, read_jsonl
    from ..evaluation import evaluate_multiple_choice, evaluate_refusal
    from ..trainer import ContinualTrainer, LoRAConfig, Task

    unknown = set(cfg) - set(TRAINER_KEYS) - {"model", "tasks", "selection", "lora", "safety", "out_dir", "max_length"}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    if not cfg.get("tasks"):
        raise ValueError("the config needs a non-empty 'tasks' list")
    model, tok = load_model_and_tokenizer(cfg.get("model", "tiny"))
    max_len = cfg.get("max_length") or model_max_length(model)
    tasks = []
    for t in cfg["tasks"]:
        train = encode_records(read_jsonl(_path(base_dir, t["train"])), tok, max_len)
        ev = encode_records(read_jsonl(_path(base_dir, t["eval"])), tok, max_len) if t.get("eval") else []
        tasks.append(Task(t["name"], train, ev, t.get("metric", "exact_match")))
    evaluators: Dict[str, Any] = {}
    safety = cfg.get("safety") or {}
    template = safety.get("prompt_template")
    if safety.get("harmful_prompts"):
        prompts = _path(base_dir, safety["harmful_prompts"])
        evaluators["refusal"] = lambda m: {"refusal_rate": evaluate_refusal(m, tok, prompts, prompt_template=template).refusal_rate}
    if safety.get("mc"):
        items = read_jsonl(_path(base_dir, safety["mc"]))
        evaluators["mc"] = lambda m: _mc_figures(evaluate_multiple_choice(m, tok, items, prompt_template=template))
    kw = {k: cfg[k] for k in TRAINER_KEYS if k in cfg}
    lora = LoRAConfig(**cfg["lora"]) if cfg.get("lora") else None
    return ContinualTrainer(model, tasks, selection=cfg.get("selection"), lora=lora, evaluators=evaluators,
                            out_dir=cfg.get("out_dir"), pad_id=model_pad_id(model), **kw)


def run(args: argparse.Namespace) -> int:
    with open(args.config) as f:
        cfg = json.load(f)
    base = os.path.dirname(os.path.abspath(args.config))
    if args.out:
        cfg["out_dir"] = args.out
    elif cfg.get("out_dir"):
        cfg["out_dir"] = _path(base, cfg["out_dir"])
    res = build_trainer(cfg, base).run()
    print(json.dumps({"tasks": res.tasks, "accuracy": res.accuracy, "forgetting": res.forgetting}, indent=1))
    return 0
