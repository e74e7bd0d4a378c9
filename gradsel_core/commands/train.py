"""``gradsel train --config run.json``: the continual trainer (``gradsel_core.trainer``) from a JSON config.

The config keys, their types, defaults and allowed values are the table :func:`config_keys` below; ``gradsel
train --help`` prints it with an example, ``gradsel train --print-config`` writes a complete config to
start from. Paths in the config are relative to the config file. A config is checked in full before
anything is loaded: an unknown key, a wrong type or value, or a missing file is an error naming the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from ..errors import UsageError

if TYPE_CHECKING:
    from ..selection import SelectionConfig
    from ..trainer import LoRAConfig

log = logging.getLogger(__name__)

REQUIRED = object()  # the default of a key that must be given
TASK_METRICS = ("exact_match", "token_accuracy")
PARAM_SPECS = ("trainable", "lora", "all")


@dataclass(frozen=True)
class ConfigKey:
    """One config key: dotted ``key`` (``tasks[].train`` for each entry of a list), its JSON ``type``
    (``|``-separated alternatives), ``default`` (``REQUIRED`` when it must be given), the ``allowed``
    scalar values (if restricted; a list value is not checked against them), bounds for numbers, and
    what it does."""

    key: str
    type: str
    default: Any
    help: str
    allowed: Optional[Tuple[Any, ...]] = None
    min: Optional[float] = None
    min_inclusive: bool = True
    max: Optional[float] = None


def _defaults(cls) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _trainer_defaults() -> Dict[str, Any]:
    from ..trainer import ContinualTrainer

    sig = inspect.signature(ContinualTrainer.__init__)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def config_keys() -> List[ConfigKey]:
    """Every key of a ``gradsel train`` config; the defaults are read from the classes that use them."""
    from ..selection import SelectionConfig, policy_names
    from ..trainer import LoRAConfig

    tr, sel, lora = _trainer_defaults(), _defaults(SelectionConfig), _defaults(LoRAConfig)
    K = ConfigKey
    return [
        K("model", "str", "tiny", "'tiny' (the built-in TinyGPT, byte tokenizer), a local HF causal-LM directory or a "
          "Hugging Face Hub id (org/name: the HF cache, offline with HF_HUB_OFFLINE=1, else downloaded)"),
        K("tasks", "list[object]", REQUIRED, "the continual tasks, trained in this order (at least one)"),
        K("tasks[].name", "str", REQUIRED, "the task's name (in metrics.jsonl and the accuracy matrix)"),
        K("tasks[].train", "str", REQUIRED, "JSONL of training records: {text}, {prompt, response} or {messages}"),
        K("tasks[].eval", "str | null", None, "JSONL of evaluation records for the task's metric (null: none)"),
        K("tasks[].metric", "str", "exact_match", "the task's metric (teacher-forced, on the eval records)",
          allowed=TASK_METRICS),
        K("selection", "object | str | null", None,
          "which samples to train on: null trains on everything; a policy name is {\"policy\": name}"),
        K("selection.policy", "str", sel["policy"], "the selection policy (median_band is the paper's rule)",
          allowed=tuple(policy_names())),
        K("selection.ratio", "float", sel["ratio"], "fraction of each batch (online) or task (offline) kept; "
          "the fraction dropped for drop_top", min=0.0, max=1.0),
        K("selection.loss_filter_std", "float | null | str", sel["loss_filter_std"],
          "keep losses within K std of the mean first (null: no loss filter; \"auto\": 1.0 for median_band, "
          "none for other policies)", min=0.0),
        K("selection.params", "str | list[str]", sel["params"], "parameters the norm is taken over "
          "(or a list of parameter names)", allowed=PARAM_SPECS),
        K("selection.group_by", "str | null", sel["group_by"], "offline only: select within each value of this record field"),
        K("selection.length_normalize", "str | bool | null", sel["length_normalize"],
          "rank norm / tokens ('tokens') or norm / sqrt(tokens) ('sqrt') instead of the norm",
          allowed=(False, None, "none", "tokens", "sqrt", True)),
        K("selection.score", "str", sel["score"], "what the norm policies rank by: norm, or norm_per_token "
          "(||grad sum_t l_t|| / sqrt(target tokens), the length-debiased norm)", allowed=("norm", "norm_per_token")),
        K("selection.policy_kwargs", "object", sel["policy_kwargs"],
          "the policy's own parameters (band: low_q, high_q; threshold: max_norm)"),
        K("mode", "str", tr["mode"], "offline: score each task first, then train on what the policy keeps; "
          "online: filter every batch inside its backward", allowed=("offline", "online")),
        K("lora", "object | null", None, "LoRA adapters on the model (null: train the parameters themselves)"),
        K("lora.r", "int", lora["r"], "LoRA rank", min=1),
        K("lora.alpha", "float", lora["alpha"], "LoRA alpha (scaling alpha / r)", min=0.0, min_inclusive=False),
        K("lora.dropout", "float", lora["dropout"], "LoRA dropout", min=0.0),
        K("lora.target_modules", "list[str] | null", lora["target_modules"],
          "names of the nn.Linear modules to adapt (null: every Linear but the output head)"),
        K("lora.use_peft", "bool | null", lora["use_peft"], "use PEFT (null: when installed) or the built-in wrapper"),
        K("optimizer", "str", tr["optimizer"], "a fresh optimizer per task", allowed=("adamw", "sgd")),
        K("lr", "float", tr["lr"], "learning rate", min=0.0, min_inclusive=False),
        K("weight_decay", "float", tr["weight_decay"], "weight decay", min=0.0),
        K("epochs", "int", tr["epochs"], "passes over each task's (selected) data", min=1),
        K("batch_size", "int", tr["batch_size"], "records per micro-batch", min=1),
        K("grad_accum", "int", tr["grad_accum"], "micro-batches per optimizer step", min=1),
        K("seed", "int", tr["seed"], "seed of the data order, dropout and the random policy"),
        K("max_grad_norm", "float | null", tr["max_grad_norm"], "clip the update's gradient norm (null: no clipping)",
          min=0.0, min_inclusive=False),
        K("params", "str | list[str]", tr["params"], "the parameters trained (or a list of parameter names)",
          allowed=PARAM_SPECS),
        K("max_length", "int | null", None, "truncate records to this many tokens (null: the model's maximum positions)",
          min=1),
        K("safety", "object | null", None, "the safety evaluation after each task (null: none)"),
        K("safety.harmful_prompts", "str | null", None, "held-out harmful prompts (JSONL 'prompt' or TXT): refusal rate"),
        K("safety.mc", "str | null", None, "multiple-choice items {question, choices, answer} (JSONL): accuracy"),
        K("safety.prompt_template", "str | null", None, "prompt template with {prompt}, e.g. 'USER: {prompt} ASSISTANT:'"),
        K("out_dir", "str | null", tr["out_dir"], "where metrics.jsonl, checkpoints and state.json go (resumable); "
          "null: nothing is written (--out overrides)"),
        K("checkpoint_format", "str", tr.get("checkpoint_format", "model"),
          "model: the whole model as safetensors per task; peft: a PEFT adapter folder per task (needs lora)",
          allowed=("model", "peft")),
    ]


EXAMPLE = {
    "model": "tiny",
    "tasks": [{"name": "dolly", "train": "dolly_train.jsonl", "eval": "dolly_eval.jsonl", "metric": "exact_match"}],
    "selection": {"policy": "median_band", "ratio": 0.2, "loss_filter_std": "auto"},
    "mode": "online",
    "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "lr": 1e-4, "epochs": 1, "batch_size": 16,
    "safety": {"harmful_prompts": "harmful.jsonl", "prompt_template": "USER: {prompt} ASSISTANT:"},
    "out_dir": "runs/my-run",
}


def _shown(v: Any) -> str:
    return "(required)" if v is REQUIRED else json.dumps(v)


def config_help() -> str:
    """The config reference printed by ``gradsel train --help``."""
    rows = [(k.key, k.type, _shown(k.default), " | ".join(json.dumps(a) for a in k.allowed) if k.allowed else "")
            for k in config_keys()]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["config file (JSON; paths relative to the config file):", ""]
    lines.append(f"  {'key':<{w[0]}}  {'type':<{w[1]}}  {'default':<{w[2]}}  allowed / meaning")
    for k, (key, typ, dflt, allowed) in zip(config_keys(), rows):
        lines.append(f"  {key:<{w[0]}}  {typ:<{w[1]}}  {dflt:<{w[2]}}  {allowed + ': ' if allowed else ''}{k.help}")
    lines += ["", "JSONL records: {\"text\"} (every token a target), {\"prompt\", \"response\"} (loss on the response)",
              "or {\"messages\": [{\"role\", \"content\"}, ...]} (loss on the assistant turns); optional \"id\".", "",
              "example (gradsel train --print-config writes a complete one):", ""]
    body = [f'    "{k}": {json.dumps(v)}' for k, v in EXAMPLE.items()]
    lines += ["  {", ",\n".join(body), "  }"]
    return "\n".join(lines)


def default_config() -> Dict[str, Any]:
    """A complete config to start from: every top-level key at its default, except ``tasks`` (one example
    entry, required), ``selection`` (the paper's median band, every key at its default) and ``lora`` and
    ``safety`` (null; their keys are in ``gradsel train --help``)."""
    out: Dict[str, Any] = {}
    for k in config_keys():
        if "." in k.key or "[]" in k.key:
            continue
        out[k.key] = k.default
    placeholders = {"name": "task1", "train": "task1_train.jsonl"}  # the required task keys
    out["tasks"] = [{name: placeholders.get(name, k.default) for k in config_keys()
                     for sec, _, name in [k.key.partition(".")] if sec == "tasks[]" and name}]
    out["selection"] = {name: k.default for k in config_keys()
                        for sec, _, name in [k.key.partition(".")] if sec == "selection" and name}
    out["out_dir"] = "runs/run1"  # a run started from this config saves its metrics, checkpoints and state
    return out


# -- validation -----------------------------------------------------------------------------------------


def _type_ok(value: Any, typ: str) -> bool:
    for t in typ.split(" | "):
        if (t == "null" and value is None) or (t == "str" and isinstance(value, str)) \
                or (t == "bool" and isinstance(value, bool)) or (t == "object" and isinstance(value, dict)):
            return True
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t == "list[str]" and isinstance(value, list) and all(isinstance(x, str) for x in value):
            return True
        if t == "list[object]" and isinstance(value, list) and all(isinstance(x, dict) for x in value):
            return True
    return False


def _check_section(obj: Mapping[str, Any], prefix: str, where: str, keys: Mapping[str, ConfigKey],
                   shown: Optional[str] = None) -> None:
    """Check one object's keys against the table: ``prefix`` selects its rows (``""``, ``"tasks[]."``,
    ``"selection."`` ...), ``shown`` is how errors name it (``"tasks[2]."``), ``where`` the file."""
    shown = prefix if shown is None else shown
    own = {k[len(prefix):]: spec for k, spec in keys.items()
           if k.startswith(prefix) and "." not in k[len(prefix):] and "[]" not in k[len(prefix):]}
    unknown = sorted(set(obj) - set(own))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {[shown + k for k in unknown]}; allowed here: "
                         f"{sorted(own)} (see gradsel train --help)")
    for name, spec in own.items():
        label = f"{where}: {shown}{name}"
        if name not in obj:
            if spec.default is REQUIRED:
                raise UsageError(f"{label} is required (see gradsel train --help)")
            continue
        v = obj[name]
        if not _type_ok(v, spec.type):
            raise UsageError(f"{label} must be {spec.type}, got {json.dumps(v)}")
        if spec.allowed is not None and not isinstance(v, (list, dict)) and v not in spec.allowed:
            raise UsageError(f"{label} = {json.dumps(v)} is not allowed; use one of "
                             f"{', '.join(json.dumps(a) for a in spec.allowed)}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            low = spec.min is not None and (v < spec.min or (v == spec.min and not spec.min_inclusive))
            if low or (spec.max is not None and v > spec.max):
                bounds = [f"{'>=' if spec.min_inclusive else '>'} {spec.min}"] if spec.min is not None else []
                bounds += [f"<= {spec.max}"] if spec.max is not None else []
                raise UsageError(f"{label} = {v} must be {' and '.join(bounds)}")


@dataclass
class TaskSpec:
    name: str
    train: str
    eval: Optional[str] = None
    metric: str = "exact_match"


@dataclass
class TrainConfig:
    """A checked ``gradsel train`` config (see :func:`config_keys`); file paths are absolute."""

    tasks: List[TaskSpec]
    model: str = "tiny"
    selection: Optional["SelectionConfig"] = None  # None: train on everything
    lora: Optional["LoRAConfig"] = None
    safety: Dict[str, Any] = field(default_factory=dict)
    max_length: Optional[int] = None
    out_dir: Optional[str] = None
    trainer: Dict[str, Any] = field(default_factory=dict)  # ContinualTrainer keyword arguments

    @classmethod
    def from_dict(cls, cfg: Any, base_dir: str = ".", where: str = "config") -> "TrainConfig":
        """Check ``cfg`` against the key table (names the key at fault) and resolve paths against ``base_dir``."""
        from ..selection import SelectionConfig
        from ..trainer import LoRAConfig

        if not isinstance(cfg, dict):
            raise UsageError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
        keys = {k.key: k for k in config_keys()}
        _check_section(cfg, "", where, keys)
        if not cfg["tasks"]:
            raise UsageError(f"{where}: tasks must hold at least one task")
        tasks = []
        for i, t in enumerate(cfg["tasks"]):
            _check_section(t, "tasks[].", where, keys, shown=f"tasks[{i}].")  # t is a dict: list[object]
            paths = {p: _existing(base_dir, t[p], f"{where}: tasks[{i}].{p}") for p in ("train", "eval") if t.get(p)}
            tasks.append(TaskSpec(t["name"], paths["train"], paths.get("eval"), t.get("metric", "exact_match")))
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise UsageError(f"{where}: task names must differ, got {names}")
        selection = cfg.get("selection")
        if isinstance(selection, str):
            selection = {"policy": selection}
        if selection is not None:
            _check_section(selection, "selection.", where, keys)
            try:
                selection = SelectionConfig(**selection)
            except (TypeError, ValueError) as e:
                raise UsageError(f"{where}: selection: {e}") from e
        if selection is not None and selection.group_by and cfg.get("mode", "offline") == "online":
            raise UsageError(f"{where}: selection.group_by = {selection.group_by!r} works in mode \"offline\" only "
                             "(online mode filters each batch as a whole); drop it or set mode to \"offline\"")
        lora = cfg.get("lora")
        if lora is not None:
            _check_section(lora, "lora.", where, keys)
            lora = LoRAConfig(**lora)
        safety = dict(cfg.get("safety") or {})
        _check_section(safety, "safety.", where, keys)
        for p in ("harmful_prompts", "mc"):
            if safety.get(p):
                safety[p] = _existing(base_dir, safety[p], f"{where}: safety.{p}")
        model = cfg.get("model", "tiny")
        if model != "tiny":
            from ..data import is_hub_id

            local = _path(base_dir, model)
            if os.path.isdir(local):
                model = local
            elif not is_hub_id(model):
                raise UsageError(f"{where}: model = {cfg['model']!r}: not 'tiny' and not a directory ({local}) nor a "
                                 "Hugging Face Hub id (org/name)")
        trainer = {k: cfg[k] for k in TRAINER_KEYS if k in cfg}
        out_dir = _path(base_dir, cfg["out_dir"]) if cfg.get("out_dir") else None
        return cls(tasks, model, selection, lora, safety, cfg.get("max_length"), out_dir, trainer)


TRAINER_KEYS = ("mode", "lr", "weight_decay", "epochs", "batch_size", "grad_accum", "seed", "optimizer",
                "max_grad_norm", "params", "checkpoint_format")


def _path(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _existing(base: str, p: str, label: str) -> str:
    full = _path(base, p)
    if not os.path.isfile(full):
        raise UsageError(f"{label} = {p!r}: no such file ({full}; paths are relative to the config file)")
    return full


# -- the command -----------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = config_help()  # the CLI's help formatter keeps the epilog as written
    p.add_argument("--config", metavar="JSON", help="the run's config file (required unless --print-config)")
    p.add_argument("--out", default=None, metavar="DIR", help="override the config's out_dir")
    p.add_argument("--print-config", nargs="?", const="-", default=None, metavar="FILE",
                   help="write a complete config to start from to FILE (or stdout) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout (NaN as null) instead of the summary lines")
    p.add_argument("--dry-run", action="store_true",
                   help="train nothing: print the tasks, their records and tokens, and a time estimate from a few "
                        "timed training batches")


def _mc_figures(res: Any) -> Dict[str, float]:
    return {"acc": res.acc, "acc_norm_token": res.acc_norm_token, "acc_norm_char": res.acc_norm_char}


def _read_records(path: str, tok: Any, max_len: int, label: str) -> List[Dict[str, Any]]:
    from ..data import encode_records, read_jsonl

    try:
        return encode_records(read_jsonl(path), tok, max_len)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{label} ({path}): {e}") from e


def build_trainer(cfg: Any, base_dir: str = ".", progress: bool = False):
    """A :class:`ContinualTrainer` from a config mapping (checked, see :func:`config_keys`) or a :class:`TrainConfig`."""
    from ..data import load_model_and_tokenizer, model_max_length, model_pad_id, read_jsonl
    from ..study.evaluation import evaluate_multiple_choice, evaluate_refusal
    from ..trainer import ContinualTrainer, Task

    tc = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg, base_dir)
    model, tok = load_model_and_tokenizer(tc.model)
    max_len = tc.max_length or model_max_length(model)
    tasks = []
    for i, t in enumerate(tc.tasks):
        train = _read_records(t.train, tok, max_len, f"tasks[{i}].train")
        ev = _read_records(t.eval, tok, max_len, f"tasks[{i}].eval") if t.eval else []
        tasks.append(Task(t.name, train, ev, t.metric))
    evaluators: Dict[str, Any] = {}
    template = tc.safety.get("prompt_template")
    if tc.safety.get("harmful_prompts"):
        prompts = tc.safety["harmful_prompts"]
        evaluators["refusal"] = lambda m: {"refusal_rate": evaluate_refusal(m, tok, prompts, prompt_template=template).refusal_rate}
    if tc.safety.get("mc"):
        items = read_jsonl(tc.safety["mc"])
        evaluators["mc"] = lambda m: _mc_figures(evaluate_multiple_choice(m, tok, items, prompt_template=template))
    return ContinualTrainer(model, tasks, selection=tc.selection, lora=tc.lora, evaluators=evaluators,
                            out_dir=tc.out_dir, pad_id=model_pad_id(model), progress=progress, **tc.trainer)


def load_config(path: str) -> Any:
    """The JSON object in ``path``; errors name the file (and line and column for bad JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file (gradsel train --print-config writes one)") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def dry_run(trainer: Any, n_timed: int = 3) -> Dict[str, Any]:
    """What ``trainer.run()`` would do: tasks, records, tokens, optimizer steps, and a time estimate from
    ``n_timed`` timed forward+backward batches (after one warm-up; the weights are restored, nothing written).
    Selection, evaluation and checkpoints are not timed: the estimate covers the training batches only."""
    import time

    import torch

    from ..batching import per_sample_losses, prepare_batch
    from ..data import collate

    tasks = []
    for t in trainer.tasks:
        n_tok = int(sum(len(r["input_ids"]) for r in t.train))
        tasks.append({"name": t.name, "records": len(t.train), "tokens": n_tok, "eval_records": len(t.eval)})
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    first = trainer.tasks[0].train
    B = trainer.batch_size
    batches = [first[s:s + B] for s in range(0, min(len(first), B * (n_timed + 1)), B)]
    device = next(model.parameters()).device
    t_used = tok_used = 0.0
    was_training = model.training
    model.train()
    try:
        for k, chunk in enumerate(batches):
            batch = {key: v.to(device) for key, v in collate(chunk, trainer.pad_id).items()}
            t0 = time.perf_counter()
            prepared = prepare_batch(batch, lm_loss=True)
            per, _ = per_sample_losses(model(**prepared.model_inputs), prepared, None, "mean")
            per.mean().backward()
            if k == 0 and len(batches) > 1:
                continue  # warm-up
            t_used += time.perf_counter() - t0
            tok_used += sum(len(r["input_ids"]) for r in chunk)
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        model.train(was_training)
    total_tok = sum(t["tokens"] for t in tasks) * trainer.epochs
    est = t_used / tok_used * total_tok if tok_used else None
    return {"tasks": tasks, "epochs": trainer.epochs, "mode": trainer.mode,
            "selection": trainer.selection.to_dict() if trainer.selection else None, "out_dir": trainer.out_dir,
            "timed_batches": max(0, len(batches) - 1) if len(batches) > 1 else len(batches),
            "estimate_train_s": None if est is None else round(est, 3)}


def run(args: argparse.Namespace) -> int:
    from .select import jsonable

    if args.print_config is not None:
        text = json.dumps(default_config(), indent=2) + "\n"
        if args.print_config == "-":
            sys.stdout.write(text)
        else:
            if os.path.exists(args.print_config):
                raise UsageError(f"--print-config {args.print_config}: the file exists; give a new path")
            with open(args.print_config, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {args.print_config}")
        return 0
    if not args.config:
        raise UsageError("--config is required (gradsel train --print-config writes a config to start from)")
    cfg = load_config(args.config)
    base = os.path.dirname(os.path.abspath(args.config))
    tc = TrainConfig.from_dict(cfg, base, where=args.config)
    if args.out:
        tc.out_dir = args.out
    if args.dry_run:
        tc.out_dir = None  # nothing is written
    trainer = build_trainer(tc, progress=not args.no_progress and not args.json and not args.dry_run)
    if args.dry_run:
        d = dry_run(trainer)
        if args.json:
            print(json.dumps(jsonable(d), allow_nan=False))
        else:
            for t in d["tasks"]:
                print(f"task {t['name']}: {t['records']} records, {t['tokens']:,} tokens, {t['eval_records']} eval records")
            est = "-" if d["estimate_train_s"] is None else f"about {d['estimate_train_s']:.1f} s"
            print(f"dry run: {len(d['tasks'])} tasks x {d['epochs']} epochs, mode {d['mode']}; training batches would "
                  f"take {est} (from {d['timed_batches']} timed batch{'es' if d['timed_batches'] != 1 else ''}; selection "
                  "and evaluation not included)")
        return 0
    res = trainer.run()
    out = jsonable({"tasks": res.tasks, "accuracy": res.accuracy, "forgetting": res.forgetting,
                    "out_dir": tc.out_dir})
    if args.json:
        print(json.dumps(out, allow_nan=False))
    else:
        for i, name in enumerate(res.tasks):
            print(f"after task {name}: " + ", ".join(f"{res.tasks[j]} {res.accuracy[i][j]:.3f}" for j in range(i + 1)))
        fg = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.forgetting.items())
        print(f"forgetting: {fg}" + (f" | results in {tc.out_dir}" if tc.out_dir else " | nothing saved (no out_dir)"))
    return 0
