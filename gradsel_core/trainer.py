"""A thin continual trainer: tasks in sequence, gradient-based selection, evaluation after each task.

Per task:
1. Select: ``mode="offline"`` scores the task's data with the current model (``score_dataset``) and keeps
   what the policy keeps; ``mode="online"`` filters every batch in one backward (``FilteredBackward``).
   ``selection=None`` trains on everything.
2. Train: a fresh optimizer per task, ``epochs`` passes, ``grad_accum`` micro-batches per step.
3. Evaluate every task seen so far (its metric) and the extra ``evaluators`` (e.g. the safety suite).

Outputs in ``out_dir``: ``metrics.jsonl`` (training logs and one ``task_end`` line per task), a
checkpoint after each task, ``state.json`` (what is done, for resume), and the offline score stores under
``scores/``. Re-running with the same ``out_dir`` resumes after the last finished task.

Checkpoints (``checkpoint_format``): ``"model"`` (default) writes the whole model as
``checkpoints/task-<i>.safetensors``; ``"peft"`` (LoRA runs) writes a PEFT adapter folder
``checkpoints/task-<i>/`` (``adapter_config.json`` + ``adapter_model.safetensors``, the layout of
``PeftModel.save_pretrained``) that ``PeftModel.from_pretrained(base, folder)`` and
``gradsel score --model folder`` load. Its ``base_model_name_or_path`` is ``base_model`` when given, else
the model's ``name_or_path`` (absolute when it is a local folder). Checkpoint files get the permissions
of any file the process creates (``0666 & ~umask``, e.g. 0644), not safetensors' private 0600.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .batching import per_sample_losses, prepare_batch
from .errors import UsageError
from .fileio import atomic_path, atomic_write
from .params import ParamSpec, select_params
from .selection import SelectionConfig

log = logging.getLogger(__name__)

Metric = Callable[[nn.Module, Sequence[Mapping[str, Any]]], float]
Evaluator = Callable[[nn.Module], Mapping[str, float]]


# -- configuration --------------------------------------------------------------------------------------


@dataclass
class LoRAConfig:
    """LoRA adapters: PEFT when installed (``use_peft=None``), else the built-in wrapper. Both name
    parameters as PEFT does (``<module>.lora_A.default.weight``), so ``params="lora"`` works on either."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None  # default: every nn.Linear except the output head
    use_peft: Optional[bool] = None


@dataclass
class Task:
    """A task: train records, eval records and a metric (``"exact_match"``, ``"token_accuracy"``, or
    ``callable(model, records) -> float``, higher is better).

    The trainer takes encoded records (``input_ids``, optional ``labels``); the study's testbed builds its
    tasks with raw ``prompt``/``response`` records and encodes them before training."""

    name: str
    train: Sequence[Mapping[str, Any]]
    eval: Sequence[Mapping[str, Any]] = ()
    metric: Union[str, Metric] = "exact_match"
    description: str = ""


CHECKPOINT_FORMATS = ("model", "peft")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# -- LoRA ------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = base(x) + s · B(A(drop(x))), s = alpha / r, laid out as PEFT's ``lora.Linear``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, adapter: str = "default"):
        super().__init__()
        self.base_layer = base
        self.lora_dropout = nn.ModuleDict({adapter: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.lora_A = nn.ModuleDict({adapter: nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(r, base.out_features, bias=False)})
        self.scaling = {adapter: alpha / r}
        self.adapter = adapter
        nn.init.kaiming_uniform_(self.lora_A[adapter].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        return self.base_layer(x) + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]


def _default_targets(model: nn.Module) -> List[str]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m is not out_emb and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Add LoRA adapters to ``model`` (in place where possible) and freeze everything else."""
    targets = cfg.target_modules or _default_targets(model)
    use_peft = cfg.use_peft
    if use_peft is None:
        import importlib.util

        use_peft = importlib.util.find_spec("peft") is not None
    if use_peft:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        model = inject_adapter_in_model(
            PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets), model)
    else:
        for name, m in list(model.named_modules()):
            for cname, child in list(m.named_children()):
                if isinstance(child, nn.Linear) and cname in targets:
                    setattr(m, cname, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout))
    from .params import is_lora_name

    found = False
    for n, p in model.named_parameters():
        p.requires_grad_(is_lora_name(n))
        found |= is_lora_name(n)
    if not found:
        raise ValueError(f"LoRA targets {targets} match no nn.Linear of {type(model).__name__}")
    return model


# -- metrics ---------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_scores(model: nn.Module, records: Sequence[Mapping[str, Any]], batch_size: int = 64,
                          pad_id: int = 0) -> Dict[str, float]:
    """Exact match (every target token is the argmax given the true prefix: the same as greedy decoding
    reproducing the answer) and token accuracy over the records' target tokens (labels != -100)."""
    from .batching import extract_logits
    from .data import collate

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    exact = tok_ok = tok_n = n = 0
    try:
        for s in range(0, len(records), batch_size):
            batch = {k: v.to(device) for k, v in collate(records[s:s + batch_size], pad_id).items()}
            prepared = prepare_batch(batch, lm_loss=True)
            logits = extract_logits(model(**prepared.model_inputs))  # (B, T, V)
            pred = logits[:, :-1].argmax(-1)  # (B, T-1)
            tgt = prepared.labels[:, 1:]  # (B, T-1)
            valid = tgt != -100
            ok = (pred == tgt) & valid
            exact += int(((ok | ~valid).all(1) & valid.any(1)).sum())
            tok_ok += int(ok.sum())
            tok_n += int(valid.sum())
            n += pred.shape[0]
    finally:
        model.train(was)
    return {"exact_match": exact / max(1, n), "token_accuracy": tok_ok / max(1, tok_n)}


def task_metric(task: Task, pad_id: int) -> Metric:
    """The callable metric of ``task`` (a named metric resolved to its function)."""
    if callable(task.metric):
        return task.metric
    if task.metric in ("exact_match", "token_accuracy"):
        key = task.metric
        return lambda model, records: teacher_forced_scores(model, records, pad_id=pad_id)[key]
    raise ValueError(f"task {task.name}: metric {task.metric!r} is unknown; use 'exact_match', "
                     "'token_accuracy' or a callable(model, records) -> float")


# -- checkpoints -----------------------------------------------------------------------------------------


_ADAPTER_NAME = re.compile(r"(lora_\w+)\.default(?=\.|$)")
PEFT_PREFIX = "base_model.model."


def _lora_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{saved PEFT key: parameter}`` of ``model``'s LoRA weights: the PeftModel prefix, no adapter name
    (``model.q_proj.lora_A.default.weight`` -> ``base_model.model.model.q_proj.lora_A.weight``)."""
    from .params import is_lora_name

    return {PEFT_PREFIX + _ADAPTER_NAME.sub(r"\1", n): p for n, p in model.named_parameters() if is_lora_name(n)}


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` keyed as a saved PEFT adapter (``base_model.model.<module>.lora_A.weight``:
    the PeftModel prefix, no adapter name), from PEFT's layers or the built-in :class:`LoRALinear`."""
    out = {k: p.detach().to("cpu").contiguous() for k, p in _lora_params(model).items()}
    if not out:
        raise ValueError(f"{type(model).__name__} has no LoRA parameters to save as a PEFT adapter")
    return out


def save_adapter(model: nn.Module, path: str, lora: LoRAConfig, target_modules: Sequence[str],
                 base_model: Optional[str]) -> None:
    """Write ``model``'s LoRA adapter as a PEFT adapter folder at ``path`` (written beside it, then moved
    in; an earlier folder there is replaced)."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:  # a folder left by a run killed before it recorded this task is replaced
        os.makedirs(tmp)
        PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(target_modules),
                       task_type="CAUSAL_LM", base_model_name_or_path=base_model).save_pretrained(tmp)
        save_file(adapter_state_dict(model), os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, path: str) -> None:
    """Load a PEFT adapter folder written by :func:`save_adapter` into ``model``'s LoRA parameters (the
    same targets and rank); errors name the folder and the parameters that do not match."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    mine = _lora_params(model)
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    bad = [k for k in set(mine) & set(saved) if tuple(mine[k].shape) != tuple(saved[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"{path}: the adapter does not fit this model's LoRA layers (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, shape mismatch {bad[:3]}); use the run's own config")
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(saved[k].to(device=p.device, dtype=p.dtype))


def _model_name_or_path(model: nn.Module) -> Optional[str]:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    return os.path.abspath(name) if os.path.isdir(name) else name


# -- the trainer -----------------------------------------------------------------------------------------


@dataclass
class ContinualResult:
    tasks: List[str]
    accuracy: List[List[float]]  # R[i][j]: metric of task j after training task i (NaN for j > i)
    forgetting: Dict[str, float]
    per_task: List[Dict[str, Any]]  # selection summary, train loss, evaluator metrics, wall time

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


class ContinualTrainer:
    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        selection: Union[None, SelectionConfig, Mapping[str, Any], str] = None,
        mode: str = "offline",
        lora: Optional[LoRAConfig] = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        epochs: int = 1,
        batch_size: int = 16,
        grad_accum: int = 1,
        evaluators: Union[Sequence[Evaluator], Mapping[str, Evaluator]] = (),
        out_dir: Optional[str] = None,
        seed: int = 0,
        params: ParamSpec = "trainable",
        max_grad_norm: Optional[float] = 1.0,
        pad_id: int = 0,
        log_every: int = 10,
        checkpoint_format: str = "model",
        base_model: Optional[str] = None,
        reference_records: Optional[Sequence[Mapping[str, Any]]] = None,
        progress: bool = False,
    ):
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise UsageError(f"checkpoint_format must be 'model' or 'peft', got {checkpoint_format!r}")
        from .batching import is_encoder_decoder

        if is_encoder_decoder(model):  # its records, losses and metrics are causal-LM ones
            raise UsageError(f"ContinualTrainer trains causal LMs; {type(model).__name__} is an encoder-decoder model "
                             "(config.is_encoder_decoder): use gradsel_core.filtered_backward in your own training loop")
        if checkpoint_format == "peft":
            if lora is None:
                raise UsageError("checkpoint_format 'peft' saves LoRA adapters, but this run has no 'lora' config; "
                                 "add one or use checkpoint_format 'model'")
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise UsageError("checkpoint_format 'peft' needs the peft package: pip install 'gradsel[hf]'")
        if mode not in ("offline", "online"):
            raise ValueError(f"mode must be 'offline' or 'online', got {mode!r}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if not tasks:
            raise ValueError("tasks is empty")
        self.checkpoint_format, self.lora = checkpoint_format, lora
        self.base_model = base_model or _model_name_or_path(model)
        self.lora_targets = (lora.target_modules or _default_targets(model)) if lora is not None else None
        self.model = apply_lora(model, lora) if lora is not None else model
        self.tasks = list(tasks)
        self.selection = SelectionConfig.coerce(selection)
        if mode == "online" and self.selection is not None and self.selection.group_by:
            raise UsageError(f"selection.group_by = {self.selection.group_by!r} works in mode 'offline' only (a "
                             "task's scores are grouped before selecting); online mode filters each batch as a whole: "
                             "drop group_by or use mode 'offline'")
        self.mode, self.progress = mode, progress
        self.optimizer, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.epochs, self.batch_size, self.grad_accum = epochs, batch_size, grad_accum
        self.evaluators = dict(evaluators) if isinstance(evaluators, Mapping) else {
            getattr(e, "__name__", f"eval{i}"): e for i, e in enumerate(evaluators)}
        self.out_dir, self.seed, self.params_spec = out_dir, seed, params
        self.max_grad_norm, self.pad_id, self.log_every = max_grad_norm, pad_id, log_every
        # records whose mean per-sample gradient is the reference direction of policies that rank by a cosine
        # (drop_opposed, project_band): recomputed with the current weights at the start of every task
        self.reference_records = list(reference_records) if reference_records is not None else None
        if self.selection is not None and self._ranks_by_cosine() and not self.reference_records:
            raise UsageError(f"policy {self.selection.policy!r} ranks samples by their cosine with a reference "
                             "gradient: pass reference_records (e.g. harmful prompts with refusals)")
        self.params = select_params(self.model, params)
        if out_dir:
            os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, *parts)

    def _log(self, row: Mapping[str, Any]) -> None:
        if self.out_dir:
            with open(self._path("metrics.jsonl"), "a") as f:
                f.write(json.dumps(row, default=_jsonable) + "\n")

    def _config_key(self) -> Dict[str, Any]:
        """Everything that changes the run: a resume with any of it changed is refused, naming the key."""
        return {"tasks": [t.name for t in self.tasks], "mode": self.mode,
                "selection": self.selection.to_dict() if self.selection else None, "lr": self.lr,
                "epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum, "seed": self.seed,
                "optimizer": self.optimizer, "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                "params": self.params_spec if isinstance(self.params_spec, str) else sorted(self.params),
                "lora": asdict(self.lora) if self.lora is not None else None,
                "checkpoint_format": self.checkpoint_format,
                # the records' tokens (so another max_length, tokenizer or edited file is a change too)
                "data": {t.name: _records_digest(t.train, t.eval) for t in self.tasks}}

    def _load_state(self) -> Optional[Dict[str, Any]]:
        if not self.out_dir or not os.path.exists(self._path("state.json")):
            return None
        with open(self._path("state.json")) as f:
            state = json.load(f)
        new = json.loads(json.dumps(self._config_key(), default=_jsonable))
        if state.get("config") != new:
            from .store import describe_difference

            old = state.get("config") or {}

            def at(d: Any, key: str) -> Any:
                for part in key.split("."):
                    d = d.get(part) if isinstance(d, dict) else None
                return d

            changed = [f"{k} {json.dumps(at(old, k))} -> {json.dumps(at(new, k))}" for k in describe_difference(old, new)]
            raise ValueError(
                f"{self.out_dir} holds a run with another configuration (changed: {'; '.join(changed)}); "
                "use a new out_dir, or restore the previous values to resume it"
            )
        return state

    def _save(self, i: int, state: Dict[str, Any]) -> None:
        from safetensors.torch import save_model


        if self.checkpoint_format == "peft":
            ckpt = self._path("checkpoints", f"task-{i}")
            save_adapter(self.model, ckpt, self.lora, self.lora_targets, self.base_model)
        else:
            ckpt = self._path("checkpoints", f"task-{i}.safetensors")
            with atomic_path(ckpt) as tmp:
                save_model(self.model, tmp)
        state["checkpoint"] = ckpt
        atomic_write(self._path("state.json"), json.dumps(state, default=_jsonable, indent=1).encode())

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> ContinualResult:
        T = len(self.tasks)
        R = [[float("nan")] * T for _ in range(T)]
        per_task: List[Dict[str, Any]] = []
        start = 0
        state = self._load_state()
        if state is not None:
            from safetensors.torch import load_model

            if os.path.isdir(state["checkpoint"]):
                load_adapter(self.model, state["checkpoint"])
            else:
                load_model(self.model, state["checkpoint"])
            R, per_task, start = state["accuracy"], state["per_task"], state["done"]
            log.info("resuming after task %d of %d from %s", start, T, state["checkpoint"])
        for i in range(start, T):
            task = self.tasks[i]
            t0 = time.perf_counter()
            ref = self._reference()
            records, sel_summary = self._select_offline(i, task, ref)
            train = self._train(i, task, records, ref)
            for j in range(i + 1):
                R[i][j] = float(task_metric(self.tasks[j], self.pad_id)(self.model, self.tasks[j].eval))
            evals = {name: dict(fn(self.model)) for name, fn in self.evaluators.items()}
            row = {"event": "task_end", "task": task.name, "index": i, "accuracy": R[i][: i + 1],
                   "selection": sel_summary, "train": train, "evaluators": evals,
                   "wall_s": time.perf_counter() - t0}
            per_task.append(row)
            self._log(row)
            log.info("task %d/%d %s done in %.1f s: %s %s, train loss %s, kept %d of %d samples%s", i + 1, T,
                     task.name, row["wall_s"], task.metric, [round(v, 3) for v in R[i][: i + 1]],
                     "-" if train["mean_loss"] is None else f"{train['mean_loss']:.4g}", train["kept"],
                     train["samples"], "".join(f"; {k}: {json.dumps(v, default=_jsonable)}" for k, v in evals.items()))
            if self.out_dir:
                self._save(i, {"config": self._config_key(), "done": i + 1, "accuracy": R, "per_task": per_task})
        from .study.evaluation import forgetting_metrics

        fm = forgetting_metrics(R)
        forgetting = dict(fm.summary(), max_drop_task=fm.max_drop_task)
        return ContinualResult([t.name for t in self.tasks], R, forgetting, per_task)

    def _ranks_by_cosine(self) -> bool:
        from .selection import POLICIES

        return getattr(POLICIES.get(self.selection.policy), "ranks_by", "norm") == "cosine"

    def _reference(self):
        """The reference gradient at the current weights, for a policy that ranks by a cosine (else None)."""
        if self.selection is None or not self._ranks_by_cosine():
            return None
        from .data import collate
        from .reference import reference_gradient

        device = next(self.model.parameters()).device
        recs, B = self.reference_records, self.batch_size
        batches = [{k: v.to(device) for k, v in collate(recs[s:s + B], self.pad_id).items()}
                   for s in range(0, len(recs), B)]
        return reference_gradient(self.model, batches, params=self.params_spec)

    def _select_offline(self, i: int, task: Task, ref=None):
        records = [dict(r, id=k) for k, r in enumerate(task.train)]
        if self.selection is None or self.mode == "online":
            return records, {"kept": len(records), "n": len(records), "mode": self.mode if self.selection else "full"}
        import tempfile

        from .scoring import score_dataset
        from .selection import select

        cfg = self.selection
        with tempfile.TemporaryDirectory() as tmp:
            where = self._path("scores", f"task-{i}") if self.out_dir else tmp
            store = score_dataset(self.model, records, where, batch_size=self.batch_size, params=self.params_spec,
                                  progress=False, overwrite=True, pad_id=self.pad_id, reference=ref)
            sel = select(store, policy=cfg.policy, ratio=cfg.ratio, loss_filter_std=cfg.loss_filter_std,
                         group_by=cfg.group_by, seed=self.seed + i, length_normalize=cfg.length_normalize,
                         score=cfg.score, **cfg.policy_kwargs)
        kept = set(int(k) for k in sel.kept_ids)
        summary = {k: v for k, v in sel.summary.items() if not isinstance(v, (list, dict))}
        summary["norms"] = np.asarray(store.norms, dtype=float).tolist()
        summary["kept_mask"] = [r["id"] in kept for r in records]
        summary["mode"] = "offline"
        return [r for r in records if r["id"] in kept], summary

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.params.values()]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def _train(self, i: int, task: Task, records: List[Dict[str, Any]], ref=None) -> Dict[str, Any]:
        from .data import collate
        from .filtered import FilteredBackward

        model = self.model
        device = next(model.parameters()).device
        opt = self._make_optimizer()
        online = self.mode == "online" and self.selection is not None
        fb = None
        if online:
            cfg = self.selection
            fb = FilteredBackward(model, policy=cfg.policy, ratio=cfg.ratio, params=self.params_spec,
                                  loss_filter_std=cfg.loss_filter_std, length_normalize=cfg.length_normalize,
                                  score=cfg.score, reference=ref, **cfg.policy_kwargs)
        gen = torch.Generator().manual_seed(self.seed * 1000 + i)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(records) * self.epochs, unit="sample", dynamic_ncols=True, smoothing=0.05,
                       desc=f"task {i + 1}/{len(self.tasks)} {task.name} ({'online ' + self.selection.policy if online else 'train'})")
        model.train()
        step = micro = 0
        losses: List[float] = []
        kept = seen = 0
        for epoch in range(self.epochs):
            order = torch.randperm(len(records), generator=gen).tolist()
            for s in range(0, len(order), self.batch_size):
                chunk = [records[k] for k in order[s:s + self.batch_size]]
                batch = {k: v.to(device) for k, v in collate(chunk, self.pad_id).items()}
                if online:
                    res = fb.step(batch, loss_scale=1.0 / self.grad_accum, seed=self.seed * 100003 + micro)
                    kept += res.n_kept
                    seen += len(chunk)
                    if res.n_kept:
                        losses.append(res.loss)
                else:
                    prepared = prepare_batch(batch, lm_loss=True)
                    per, _ = per_sample_losses(model(**prepared.model_inputs), prepared, None, "mean")
                    (per.mean() / self.grad_accum).backward()
                    losses.append(float(per.mean().detach()))
                    kept += len(chunk)
                    seen += len(chunk)
                micro += 1
                if bar is not None:
                    bar.update(len(chunk))
                    if losses:
                        bar.set_postfix_str(f"loss {losses[-1]:.4g}", refresh=False)
                if micro % self.grad_accum == 0:
                    self._optimizer_step(opt)
                    step += 1
                    if step % self.log_every == 0:
                        self._log({"event": "train", "task": task.name, "step": step, "epoch": epoch,
                                   "loss": float(np.mean(losses[-self.log_every:])) if losses else None,
                                   "kept_fraction": kept / max(1, seen)})
        if micro % self.grad_accum:
            self._optimizer_step(opt)
            step += 1
        if bar is not None:
            bar.close()
        model.eval()
        offered = len(task.train) * self.epochs  # before any selection
        return {"steps": step, "samples": seen, "kept": kept, "kept_fraction": kept / max(1, offered),
                "mean_loss": float(np.mean(losses)) if losses else None}

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.params.values() if p.grad is not None], self.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _records_digest(*parts: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over the token ids and labels of every record in ``parts`` (in order)."""
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        h.update(b"P")
        for r in part or ():
            for key in ("input_ids", "labels"):
                v = r.get(key)
                h.update(key.encode() + (b"-" if v is None else np.asarray(v, dtype=np.int64).tobytes()))
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)
