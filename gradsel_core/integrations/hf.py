"""Hugging Face integration: in-step filtering in ``transformers.Trainer`` and offline dataset selection.

    from gradsel_core.integrations.hf import GradSelTrainer, SelectionConfig, select_dataset

    trainer = GradSelTrainer(model=peft_model, args=args, train_dataset=ds, data_collator=collator,
                             selection=SelectionConfig(policy="median_band", ratio=0.2))
    trainer.train()          # every micro-batch: one forward + one backward over the kept samples' loss

    subset, sel = select_dataset(model, ds, policy="median_band", ratio=0.2)   # offline, whole dataset

``GradSelTrainer`` (``selection=None`` is exactly ``transformers.Trainer``)
    ``training_step`` prepares the inputs as the Trainer does (``_prepare_inputs``) and calls
    :meth:`gradsel_core.FilteredBackward.step` on the unwrapped model, which adds
    ``loss_scale · ∇(mean over the kept samples of each sample's mean token loss)`` to ``p.grad`` of
    the selected parameters (``params="trainable"``: the LoRA weights of a PEFT model). Labels of -100
    (prompt tokens, padding) are not counted, exactly as in :func:`gradsel_core.batching.causal_lm_losses`.

    Gradient accumulation: ``loss_scale = 1 / current_gradient_accumulation_steps`` (the number of
    micro-batches of the current optimizer step; ``args.gradient_accumulation_steps`` on versions
    without it). The optimizer therefore sees the *mean over the micro-batches* of each micro-batch's
    kept-sample mean loss -- the same scaling the Trainer applies to a loss that is not already
    normalised for accumulation. The Trainer's alternative, dividing a token-sum by
    ``num_items_in_batch`` (the target tokens of the whole accumulation window), is *not* used: the
    selection rule and the norms are defined on per-sample mean losses, so every kept sample weighs the
    same whatever its length. ``num_items_in_batch`` is accepted and ignored. The returned (detached)
    loss is ``kept-mean loss / accumulation steps``, so the Trainer's logged ``loss`` is the mean
    kept-sample loss per optimizer step. A micro-batch that keeps nothing adds no gradient and reports 0.
    The filtered step does not call ``compute_loss`` (nor ``compute_loss_func`` or label smoothing; a
    warning says so when they are set): it trains on gradsel's per-sample causal-LM loss of ``labels``.

    The model handed to ``training_step`` may be wrapped (DDP, DataParallel, torch.compile, the
    accelerate autocast wrapper); the filter runs on ``accelerator.unwrap_model(model)`` (keeping the
    autocast forward), whose parameters are the optimizer's. Under fp16 with a ``GradScaler`` the
    gradient is multiplied by the current scale so that ``unscale_`` restores it. Under multi-process
    data parallelism (DDP) the selected parameters' gradients are averaged over the processes on the
    last micro-batch of each optimizer step (as DDP would do for ordinary gradients); the logged
    statistics are those of the local process. ``nn.DataParallel`` (several GPUs, one process) runs the
    filter on the first GPU only. Under FSDP2 (``fsdp_config={"fsdp_version": 2}``) and DeepSpeed
    ZeRO-1/2, whose engines own the backward, the filter runs in two passes
    (:class:`~gradsel_core.TwoPassFilteredBackward`): the norms from the activation backward, then
    ``accelerator.backward`` of the kept samples' masked mean loss, so the engine reduces the gradients
    itself (no all-reduce by gradsel; the AMP scale is the engine's). FSDP1, DeepSpeed ZeRO-3, Megatron-LM,
    XLA, context parallelism and LOMO optimizers are refused with an error. Packed batches (TRL
    ``packing`` / ``padding_free``: several samples in one row) are refused: a row's norm would be no
    sample's.

    ``random`` policy: the seed is ``state.global_step``; with gradient accumulation or several
    processes, micro-batch ``i`` on rank ``r`` other than ``(0, 0)`` uses ``[global_step, i, r]`` so
    micro-batches draw independently. Override :meth:`GradSelTrainer.gradsel_seed` to change it.

    Logged (added to the Trainer's training logs, hence ``trainer.state.log_history``), over every
    micro-batch since the previous log: ``gradsel/kept_fraction``, ``gradsel/norm_mean``,
    ``gradsel/norm_median``, ``gradsel/norm_max`` (finite norms of all scored samples),
    ``gradsel/norm_mean_kept``, ``gradsel/loss_kept`` (mean loss of the kept samples),
    ``gradsel/loss_mean`` (all samples), ``gradsel/samples``, ``gradsel/kept``,
    ``gradsel/loss_filtered`` and ``gradsel/nonfinite`` (counts).

    The results are also kept on the trainer: ``trainer.gradsel_last`` (the last micro-batch's
    :class:`~gradsel_core.FilteredResult`) and ``trainer.gradsel_step`` (those of the micro-batches of
    the current -- after ``train()``, the last -- optimizer step).

``select_dataset``
    Scores every record (``gradsel_core.score_dataset``: length-bucketed batches, into ``out_dir`` when
    given -- resumable -- else into a temporary directory), selects with :func:`gradsel_core.select`
    and returns ``(dataset.select(kept_positions), Selection)`` for a ``datasets.Dataset`` (anything
    with ``.select``), else ``([kept records], Selection)``. ``Selection.kept_ids`` are the records'
    positions in the dataset.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradsel_core.integrations.hf needs transformers: pip install 'gradsel[hf]'"
    ) from e

from ..errors import UsageError
from ..filtered import MODES, FilteredBackward, FilteredResult, TwoPassFilteredBackward, packed_rows
from ..params import ParamSpec
from ..selection import Selection, SelectionConfig, select

log = logging.getLogger(__name__)

__all__ = ["SelectionConfig", "GradSelMixin", "GradSelTrainer", "GradSelSFTTrainer", "select_dataset", "LOG_PREFIX"]

LOG_PREFIX = "gradsel/"


# --------------------------------------------------------------------------------------------------
# configuration


# --------------------------------------------------------------------------------------------------
# statistics between two logs


class _Stats:
    """Per-micro-batch results accumulated between two training logs (kept on the host)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.norms: List[torch.Tensor] = []
        self.losses: List[torch.Tensor] = []
        self.kept: List[torch.Tensor] = []
        self.loss_filtered = 0
        self.nonfinite = 0

    def __len__(self) -> int:
        return len(self.norms)

    def add(self, res: FilteredResult) -> None:
        self.norms.append(res.norms.detach().float().cpu())
        self.losses.append(res.losses.detach().float().cpu())
        self.kept.append(res.kept.detach().bool().cpu())
        self.loss_filtered += int(res.summary.get("loss_filtered", 0) or 0)
        self.nonfinite += int(res.summary.get("nonfinite", 0) or 0)

    def logs(self) -> Dict[str, float]:
        norms, losses, kept = torch.cat(self.norms), torch.cat(self.losses), torch.cat(self.kept)
        n, k = int(norms.numel()), int(kept.sum())
        fin = norms[torch.isfinite(norms)]
        nan = float("nan")
        kept_norms = norms[kept & torch.isfinite(norms)]
        kept_losses = losses[kept & torch.isfinite(losses)]
        fin_losses = losses[torch.isfinite(losses)]
        out = {
            "kept_fraction": k / n if n else nan,
            "norm_mean": float(fin.mean()) if fin.numel() else nan,
            # the lower median for an even count (torch.median); norms are continuous, so this is a value
            # of the data, not an interpolation
            "norm_median": float(fin.median()) if fin.numel() else nan,
            "norm_max": float(fin.max()) if fin.numel() else nan,
            "norm_mean_kept": float(kept_norms.mean()) if kept_norms.numel() else nan,
            "loss_kept": float(kept_losses.mean()) if kept_losses.numel() else nan,
            "loss_mean": float(fin_losses.mean()) if fin_losses.numel() else nan,
            "samples": n,
            "kept": k,
            "loss_filtered": self.loss_filtered,
            "nonfinite": self.nonfinite,
        }
        return {LOG_PREFIX + key: v for key, v in out.items()}


# --------------------------------------------------------------------------------------------------
# the trainer


def _accepts(fn: Any, name: str, or_var_args: bool = False) -> bool:
    """``fn`` takes a parameter ``name`` (or, with ``or_var_args``, any positional via ``*args``: a
    subclass's ``training_step(*args, **kwargs)`` such as TRL's passes it on)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (or_var_args and any(p.kind is p.VAR_POSITIONAL for p in params.values()))


_UNSUPPORTED = ("MEGATRON_LM", "XLA")
_TWO_PASS = ("FSDP", "DEEPSPEED")  # engines that own the backward: filtered_backward(mode="two_pass")


class GradSelMixin:
    """Mixin for any ``transformers.Trainer`` subclass (``class MyTrainer(GradSelMixin, SFTTrainer)``):
    keeps, in every micro-batch, only the samples a gradient-norm policy selects, and trains on their
    mean loss (see the module docstring for the exact semantics). Put it first in the bases.

    Args:
        selection: a :class:`SelectionConfig`, a dict of its fields, or ``None`` (the base trainer as is).
        *args, **kwargs: those of the base trainer.

    Attributes:
        gradsel_last: the :class:`~gradsel_core.FilteredResult` of the last micro-batch (or ``None``).
        gradsel_step: the results of the micro-batches of the current / last optimizer step.
        gradsel_mode: ``"one_backward"`` or ``"two_pass"``, known after the first step.

    ``gradsel_mode="auto"`` (the constructor argument): two-pass under FSDP2 and DeepSpeed ZeRO-1/2 (their
    engine owns the backward), else one backward; ``"two_pass"`` forces it on one process (to compare);
    ``"one_backward"`` refuses the engines that own the backward.
    """

    def __init__(self, *args: Any, selection: Union[SelectionConfig, Mapping[str, Any], None] = None,
                 gradsel_mode: str = "auto", **kwargs: Any):
        if gradsel_mode not in MODES:
            raise UsageError(f"gradsel_mode={gradsel_mode!r} is unknown; choose one of {MODES}")
        self.selection = SelectionConfig.coerce(selection)
        self._gradsel_mode_arg = gradsel_mode
        super().__init__(*args, **kwargs)
        self.gradsel_last: Optional[FilteredResult] = None
        self.gradsel_step: List[FilteredResult] = []
        self._gradsel_stats = _Stats()
        self._gradsel_module: Optional[nn.Module] = None
        self._gradsel_fb: Optional[FilteredBackward] = None
        self._gradsel_micro = 0
        self._gradsel_checked = False
        self.gradsel_mode = "one_backward"

    # -- the filter -------------------------------------------------------------------------------
    def gradsel_filter(self, model: nn.Module) -> FilteredBackward:
        """The :class:`FilteredBackward` of the (unwrapped) ``model``, created on first use and reused
        while the underlying module stays the same."""
        target = self._gradsel_unwrap(model)
        if self._gradsel_fb is None or self._gradsel_module is not target:
            cfg = self.selection
            kw: Dict[str, Any] = dict(policy=cfg.policy, ratio=cfg.ratio, params=cfg.params,
                                      loss_filter_std=cfg.loss_filter_std, score=cfg.score, **cfg.policy_kwargs)
            if self.gradsel_mode == "two_pass":
                self._gradsel_fb = TwoPassFilteredBackward(target, backward_fn=self._gradsel_backward, **kw)
            else:
                self._gradsel_fb = FilteredBackward(target, **kw)
            self._gradsel_module = target
            opt_params = self._gradsel_optimizer_params()
            if opt_params is not None:
                missing = [n for n, p in self._gradsel_fb.engine.params.items() if id(p) not in opt_params]
                if missing:
                    log.warning(
                        "GradSelTrainer: %d selected parameter(s) are not in the optimizer and will not be "
                        "updated (e.g. %s)", len(missing), ", ".join(missing[:3]),
                    )
            log.info(
                "GradSelTrainer: filtering (%s) with policy=%s ratio=%s loss_filter_std=%s over %d parameter "
                "tensors (%d values)", self.gradsel_mode, cfg.policy, cfg.ratio, cfg.loss_filter_std,
                len(self._gradsel_fb.engine.params), sum(p.numel() for p in self._gradsel_fb.engine.params.values()),
            )
        return self._gradsel_fb

    def _gradsel_unwrap(self, model: nn.Module) -> nn.Module:
        unwrap = self.accelerator.unwrap_model
        if _accepts(unwrap, "keep_torch_compile"):
            return unwrap(model, keep_torch_compile=False)  # keeps the autocast forward of mixed precision
        return unwrap(model)

    def _gradsel_optimizer_params(self) -> Optional[set]:
        opt = getattr(self, "optimizer", None)
        groups = getattr(opt, "param_groups", None)
        if not groups:
            return None
        return {id(p) for g in groups for p in g["params"]}

    def _gradsel_check_setup(self) -> None:
        if self._gradsel_checked:
            return
        dt = getattr(self.accelerator, "distributed_type", None)
        name = getattr(dt, "name", str(dt))
        if name in _UNSUPPORTED:
            raise NotImplementedError(
                f"GradSelTrainer does not support distributed_type={name}; use DDP, FSDP2 or DeepSpeed ZeRO-1/2 "
                "(or a single device)"
            )
        if name == "FSDP" and not getattr(self.accelerator, "is_fsdp2", False):
            raise NotImplementedError(
                "GradSelTrainer supports FSDP2 only (torch fully_shard): set fsdp_config={'fsdp_version': 2} "
                "(accelerate config: fsdp_version: 2)"
            )
        if name == "DEEPSPEED":
            plugin = getattr(getattr(self.accelerator, "state", None), "deepspeed_plugin", None)
            if int(getattr(plugin, "zero_stage", 0) or 0) >= 3:
                raise NotImplementedError(
                    "GradSelTrainer does not support DeepSpeed ZeRO-3 (its norm rules read module weights that "
                    "ZeRO-3 partitions); use FSDP2 (fsdp_config={'fsdp_version': 2}) or ZeRO-1/2"
                )
        wanted = self._gradsel_mode_arg
        if name in _TWO_PASS:
            if wanted == "one_backward":
                raise UsageError(f"gradsel_mode='one_backward' cannot run under distributed_type={name} (the engine "
                                 "owns the backward and shards the gradients); use gradsel_mode='auto'")
            self.gradsel_mode = "two_pass"
            log.info("GradSelTrainer: distributed_type=%s owns the backward: two-pass filtering (norms from an "
                     "activation backward, then the engine's backward of the kept samples' loss)", name)
        elif wanted == "two_pass":
            if int(getattr(self.accelerator, "num_processes", 1) or 1) > 1:
                raise UsageError(
                    "gradsel_mode='two_pass' under DDP is not supported (the filter's forward runs on the unwrapped "
                    "model, outside DDP's reducer); use gradsel_mode='auto' (one backward, gradients averaged over "
                    "the processes by gradsel)")
            self.gradsel_mode = "two_pass"
        else:
            self.gradsel_mode = "one_backward"
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "cp_enabled", False):
            raise NotImplementedError("GradSelTrainer does not support context parallelism")
        optim = str(getattr(self.args, "optim", "")).lower()
        if "lomo" in optim:
            raise NotImplementedError("GradSelTrainer does not support LOMO optimizers (they update inside backward)")
        ignored = []
        if getattr(self, "compute_loss_func", None) is not None:
            ignored.append("compute_loss_func")
        if float(getattr(self.args, "label_smoothing_factor", 0.0) or 0.0) != 0.0:
            ignored.append("label_smoothing_factor")
        if type(self).compute_loss is not transformers.Trainer.compute_loss:
            owner = next(c for c in type(self).__mro__ if "compute_loss" in vars(c))
            ignored.append(f"{owner.__name__}.compute_loss (and the metrics it logs)")
        if ignored:
            log.warning(
                "GradSelTrainer: the filtered step trains on gradsel's per-sample causal-LM loss (labels, -100 "
                "ignored); %s is not used for training", ", ".join(ignored),
            )
        self._gradsel_checked = True

    def _gradsel_accumulation_steps(self) -> int:
        ga = getattr(self, "current_gradient_accumulation_steps", None)
        if not isinstance(ga, int) or ga < 1:
            ga = int(self.args.gradient_accumulation_steps)
        return max(1, ga)

    def _gradsel_amp_scale(self, device: torch.device) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        # scale() initialises the scaler's state lazily; unscale_ will divide our gradient by this value
        return float(scaler.scale(torch.ones((), device=device)))

    def gradsel_seed(self, micro_index: int) -> Any:
        """Seed of the ``random`` policy for micro-batch ``micro_index`` of the current optimizer step."""
        rank = int(getattr(self.args, "process_index", 0) or 0)
        step = int(self.state.global_step)
        return step if (micro_index, rank) == (0, 0) else [step, int(micro_index), rank]

    # -- Trainer overrides ------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any = None,
                      *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.selection is None:
            if _accepts(super().training_step, "num_items_in_batch", or_var_args=True):
                return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
            return super().training_step(model, inputs, *args, **kwargs)
        # num_items_in_batch (the accumulation window's target-token count) is deliberately unused: the
        # loss is a mean over kept samples of per-sample means, scaled by 1 / accumulation steps.
        self._gradsel_check_setup()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        packed = packed_rows(inputs)
        if packed is not None:
            raise UsageError(
                f"{packed}: gradsel scores and keeps whole rows, and a packed row mixes samples, so its gradient "
                "norm is no sample's. Train without packing (TRL: SFTConfig(packing=False, padding_free=False)); "
                "pad instead"
            )
        fb = self.gradsel_filter(model)
        if "use_cache" not in inputs and getattr(getattr(fb.engine.model, "config", None), "use_cache", None):
            inputs = {**inputs, "use_cache": False}  # no KV cache in training (as TRL's compute_loss does)

        micro = self._gradsel_micro
        if micro == 0:
            self.gradsel_step = []
        sync = bool(getattr(self.accelerator, "sync_gradients", True))
        self._gradsel_micro = 0 if sync else micro + 1

        ga = self._gradsel_accumulation_steps()
        device = inputs["input_ids"].device if isinstance(inputs.get("input_ids"), torch.Tensor) else self.args.device
        # two-pass: the engine's backward (accelerator.backward) applies the AMP scale itself
        loss_scale = (1.0 if self.gradsel_mode == "two_pass" else self._gradsel_amp_scale(device)) / ga
        with self.compute_loss_context_manager(), getattr(self, "maybe_activation_offload_context",
                                                          contextlib.nullcontext()):
            res = fb.step(inputs, loss_scale=loss_scale, seed=self.gradsel_seed(micro))
        del inputs

        if sync and self.gradsel_mode == "one_backward":
            self._gradsel_sync_gradients(fb)
        empty_every = getattr(self.args, "torch_empty_cache_steps", None)
        if empty_every is not None and self.state.global_step % empty_every == 0:
            try:
                from accelerate.utils.memory import clear_device_cache
            except ImportError:  # pragma: no cover - old accelerate
                clear_device_cache = None
            if clear_device_cache is not None:
                clear_device_cache()

        self.gradsel_last = res
        self.gradsel_step.append(res)
        self._gradsel_stats.add(res)
        log.debug("gradsel step %d micro %d: kept %d/%d, loss %.4g", self.state.global_step, micro,
                  res.n_kept, res.kept.shape[0], res.loss)
        return torch.tensor(res.loss / ga, dtype=torch.float32, device=self.args.device)

    def _gradsel_backward(self, loss: torch.Tensor) -> None:
        """The second pass of two-pass filtering: the engine's own backward, as ``Trainer.training_step``
        calls it (FSDP2: reduce-scatter in its hooks; DeepSpeed: its engine, loss already scaled for
        accumulation)."""
        kwargs = {}
        dt = getattr(self.accelerator, "distributed_type", None)
        if getattr(dt, "name", str(dt)) == "DEEPSPEED":
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)

    def _gradsel_sync_gradients(self, fb: FilteredBackward) -> None:
        """Average the selected parameters' gradients over the processes (what DDP does in backward)."""
        world = int(getattr(self.accelerator, "num_processes", 1) or 1)
        if world <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        params = list(fb.engine.params.values())
        for p in params:
            if p.grad is None:  # this rank kept nothing; the others may have
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= world
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the gradsel statistics accumulated since the previous log to a training log."""
        if self.selection is not None and len(self._gradsel_stats) and not any(
            str(k).startswith(("eval_", "test_", "predict_")) for k in logs
        ):
            logs = dict(logs)
            logs.update(self._gradsel_stats.logs())
            self._gradsel_stats.reset()
        return super().log(logs, *args, **kwargs)


class GradSelTrainer(GradSelMixin, transformers.Trainer):
    """``transformers.Trainer`` with in-step gradient-norm selection (:class:`GradSelMixin`).

    Args:
        selection: a :class:`SelectionConfig`, a dict of its fields, or ``None`` (plain ``Trainer``).
        *args, **kwargs: those of ``transformers.Trainer``.
    """


def __getattr__(name: str) -> Any:
    if name == "GradSelSFTTrainer":  # needs trl: imported on first use
        from .trl import GradSelSFTTrainer

        return GradSelSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# offline selection


def _score_dataset_kwargs() -> set:
    from ..scoring import score_dataset

    return {n for n in inspect.signature(score_dataset).parameters if n not in ("model", "dataset", "out_dir")}


def _group_labels(records: Any, n: int, store: Any, group_by: Any) -> Optional[np.ndarray]:
    if group_by is None:
        return None
    if callable(group_by) and not isinstance(group_by, str):
        return np.asarray([group_by(records[i]) for i in range(n)], dtype=object)
    if isinstance(group_by, str):
        fields = getattr(store, "fields", None) or {}
        if group_by in fields:
            return np.asarray(fields[group_by])
        labels = []
        for i in range(n):
            rec = records[i]
            if not isinstance(rec, Mapping) or group_by not in rec:
                raise ValueError(f"cannot group by {group_by!r}: record {i} has no such field")
            labels.append(rec[group_by])
        return np.asarray(labels, dtype=object)
    labels = np.asarray(group_by)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"group_by labels must be 1-D of length {n} (one per record), got shape {labels.shape}")
    return labels


def select_dataset(
    model: nn.Module,
    hf_dataset: Any,
    policy: str = "median_band",
    ratio: float = 0.2,
    *,
    params: ParamSpec = "trainable",
    batch_size: int = 16,
    loss_filter_std: Union[float, None, str] = "auto",
    group_by: Any = None,
    out_dir: Optional[str] = None,
    **kw: Any,
) -> Tuple[Any, Selection]:
    """Score every record of ``hf_dataset`` with ``model`` and keep those ``policy`` selects.

    Args:
        hf_dataset: records ``{"input_ids", "labels"?, "attention_mask"?, "id"?, ...}`` (labels -100 are
            not counted): a ``datasets.Dataset``, a list, any sequence or iterable of dicts.
        policy, ratio, loss_filter_std: as in :func:`gradsel_core.select`.
        params, batch_size: the parameters scored and the records per scoring batch.
        group_by: ``None``; a field name (a scalar field of the records); an array-like of one label per
            record; or ``callable(record) -> label``. Selection then runs within each group.
        out_dir: keep the score store there (resumable; reused on a rerun); default: a temporary one.
        **kw: ``gradsel_core.score_dataset`` options (``max_tokens``, ``backend``, ``progress`` (default
            off), ``pad_id``, ``resume``, ``overwrite``, ...) and :func:`gradsel_core.select` options
            (``seed``, ``length_normalize``, ``score``, a policy's own parameters such as ``low_q``/``high_q``).

    Returns:
        ``(selected, selection)``: ``hf_dataset.select(kept positions)`` when the dataset has
        ``.select``, else the list of kept records (in dataset order); ``selection.kept_ids`` are the
        kept records' positions in ``hf_dataset``.
    """
    from ..scoring import score_dataset

    if isinstance(hf_dataset, (Mapping, str, bytes)):
        raise TypeError(f"hf_dataset must be a sequence of records (dicts), got {type(hf_dataset).__name__}")
    records = hf_dataset
    if not (hasattr(records, "__len__") and hasattr(records, "__getitem__")):
        records = list(records)  # a generator or other one-shot iterable
    n = len(records)

    score_keys = _score_dataset_kwargs()
    score_kw = {k: v for k, v in kw.items() if k in score_keys}
    select_kw = {k: v for k, v in kw.items() if k not in score_keys}
    score_kw.setdefault("progress", False)

    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="gradsel_select_") as tmp:
            store = score_dataset(model, records, tmp, batch_size=batch_size, params=params, **score_kw).load()  # lazy: read before tmp goes
    else:
        store = score_dataset(model, records, out_dir, batch_size=batch_size, params=params, **score_kw)
    if len(store) != n:  # pragma: no cover - score_dataset guarantees it
        raise RuntimeError(f"scored {len(store)} records of {n}")

    groups = _group_labels(records, n, store, group_by)
    scores = {"norms": store.norms, "losses": store.losses, "tokens": store.tokens, "ids": np.arange(n)}
    sel = select(scores, policy=policy, ratio=ratio, loss_filter_std=loss_filter_std, group_by=groups, **select_kw)
    if isinstance(group_by, str):
        sel.summary["group_by"] = group_by
    elif callable(group_by):
        sel.summary["group_by"] = getattr(group_by, "__name__", "<callable>")
    if out_dir is not None:
        sel.summary["score_store"] = str(out_dir)
    kept = [int(i) for i in sel.kept_ids]
    log.info("select_dataset: kept %d of %d records (policy=%s, ratio=%s)", len(kept), n, policy, ratio)
    select_fn = getattr(hf_dataset, "select", None)
    if callable(select_fn):
        return select_fn(kept), sel
    return [records[i] for i in kept], sel
