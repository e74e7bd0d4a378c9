"""In-step (online) filtering in one forward and one backward (Book-Keeping style).

One forward under the ghost capture, one activation backward of Σ_b L_b: every rule layer hands over
its inputs A and output gradients G. From them come, in order:

1. the per-sample norms (exactly as ``GradNormEngine(backend="ghost")``),
2. the keep-mask m of the per-batch policy (``gradsel_core.selection.keep_mask``),
3. the update  ∇W = loss_scale · Σ_b m_b G_bᵀ A_b / Σ_b m_b  — one matmul per layer over the kept
   samples only, which is the weight-gradient matmul a normal backward does, on ρ·B samples.

There is no second backward. Parameters without a rule use the torch.func fallback's per-sample
gradients. The result is accumulated into ``p.grad`` as ``loss.backward()`` would; the optimizer is not
stepped, so it composes with any optimizer, scheduler or accumulation scheme.

Engines that own the backward (FSDP2 ``fully_shard``, DeepSpeed) cannot take a gradient written by
hand: ``mode="two_pass"`` (:class:`TwoPassFilteredBackward`) keeps the graph of the activation backward
and runs an ordinary backward of the kept samples' masked mean loss through the engine's hooks, at the
cost of one more activation backward.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .batching import LossFn, prepare_batch
from .dispatch import triton_usable
from .engine import GradNormEngine
from .factors import weighted_total
from .errors import UsageError
from .params import ParamSpec
from .errors import UnsupportedModule
from .types import grad_enabled_for

log = logging.getLogger(__name__)


def _explain_reentrant_checkpointing(step: Callable) -> Callable:
    """Turn torch's error about reentrant activation checkpointing (deep inside the activation backward,
    which is a ``.grad()`` call) into one that says what to change."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except RuntimeError as e:
            if "use_reentrant" not in str(e) and "Checkpointing is not compatible" not in str(e):
                raise
            raise UsageError(
                "in-step filtering does not work with reentrant activation checkpointing (its activation "
                "backward is a torch.autograd.grad call, which reentrant checkpointing refuses). Use "
                "non-reentrant checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}), TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': "
                "False}), or torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
            ) from e

    return wrapper


@dataclass
class FilteredResult:
    kept: torch.Tensor  # (B,) bool
    norms: torch.Tensor  # (B,) float32
    losses: torch.Tensor  # (B,) float32
    tokens: torch.Tensor  # (B,) int64
    loss: float  # mean loss over the kept samples (0.0 when none is kept)
    n_kept: int
    summary: Dict[str, Any] = field(default_factory=dict)
    cosines: Optional[torch.Tensor] = None  # (B,) with reference=: cosine of each gradient with the reference

    @property
    def kept_fraction(self) -> float:
        return self.n_kept / max(1, self.kept.shape[0])


class FilteredBackward:
    """Reusable in-step filter for one model: ``step(batch)`` fills ``.grad`` of the selected parameters.

    ``loss_filter_std``: ``"auto"`` (1.0 for ``median_band``, no loss filter for other policies),
    ``None`` or a number (any policy); ``ratio > 0`` keeps at least one sample per batch.
    The model's mode is left as the caller set it (train mode: dropout on; the norms are then those of
    the training loss actually optimised).
    """

    def __init__(self, model: nn.Module, policy: str = "median_band", ratio: float = 0.2,
                 params: ParamSpec = "trainable", loss_filter_std: Union[float, None, str] = "auto",
                 loss_fn: Optional[LossFn] = None, loss_reduction: str = "mean", backend: str = "auto",
                 reference: Any = None, **policy_kwargs: Any):
        if backend not in ("auto", "ghost", "triton"):
            raise ValueError(f"filtered_backward needs the one-backward engine: backend 'auto', 'ghost' or "
                             f"'triton', got {backend!r}")
        self.engine = GradNormEngine(model, params=params, loss_fn=loss_fn, backend="ghost",
                                     loss_reduction=loss_reduction)
        self.backend = backend
        from .selection import resolve_loss_filter_std

        # "auto": 1.0 for median_band (the paper's loss pre-filter), none for other policies
        self.policy, self.ratio = policy, ratio
        self.loss_filter_std = resolve_loss_filter_std(policy, loss_filter_std)
        self.policy_kwargs = policy_kwargs
        if policy_kwargs.get("score", "norm") == "norm_per_token":  # ||grad sum_t l_t|| / sqrt(n), same backward
            if loss_fn is not None:
                raise UsageError("score='norm_per_token' rescales the norm by the target-token count of the built-in "
                                 "causal-LM loss; with a custom loss_fn the token count is not the loss's: use "
                                 "score='norm'")
            self.policy_kwargs = dict(policy_kwargs, loss_reduction=loss_reduction)
        # reference=: the per-sample cosines with it come from the same backward (policies drop_opposed,
        # project_band rank by them)
        self.refs = None
        if reference is not None:
            from .reference import stack_references
            from .types import acc_dtype

            self.refs = stack_references(reference, self.engine.params, acc_dtype(self.engine.params))
        sharded = sharded_param_names(self.engine.params)
        if sharded and not isinstance(self, TwoPassFilteredBackward):
            raise UsageError(
                f"{len(sharded)} selected parameter(s) are sharded DTensors (FSDP2 fully_shard / tensor "
                f"parallel), e.g. {sharded[0]}: the one-backward path writes whole gradients itself; use "
                "filtered_backward(..., mode='two_pass') or TwoPassFilteredBackward, whose update runs through "
                "the sharding engine's own backward")

    @_explain_reentrant_checkpointing
    def step(self, batch: Mapping[str, Any], loss_scale: float = 1.0, seed: Any = 0) -> FilteredResult:
        from .selection import keep_mask

        engine = self.engine
        prepared, device, use_triton = self._begin(batch)
        if prepared.batch_size == 0:
            return _empty_result(device)
        with grad_enabled_for(engine.params):
            cap, losses, tokens = engine.ghost.run(prepared, use_triton, keep_factors=True, strict=True,
                                                   refs=self.refs)
        sq = cap.per_param_sq(engine.params, device)
        norms = torch.stack(list(sq.values())).sum(0).clamp(min=0).sqrt().float()  # (B,)
        losses = losses.detach().float()
        cos = self._cosines(cap, norms, device)
        kept, summary = keep_mask(norms, losses, policy=self.policy, ratio=self.ratio,
                                  loss_filter_std=self.loss_filter_std, tokens=tokens, seed=seed,
                                  return_summary=True, cosines=cos, **self.policy_kwargs)
        index = kept.nonzero().squeeze(1)  # (K,)
        K = int(index.numel())
        if K == 0:
            log.debug("filtered_backward: no sample kept in this batch; no gradient added")
            return FilteredResult(kept, norms, losses, tokens, 0.0, 0, summary, cos)
        w = torch.full((K,), loss_scale / K, device=device)  # mean over the kept samples
        for name, factors in cap.factors.items():
            p = engine.params[name]
            g = weighted_total(factors, w, index).reshape(p.shape).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return FilteredResult(kept, norms, losses, tokens, float(losses[index].mean()), K, summary, cos)

    def _begin(self, batch: Mapping[str, Any]):
        """(prepared batch, device, whether the Triton kernels reduce the norms)."""
        prepared = prepare_batch(batch, lm_loss=self.engine.loss_fn is None)
        device = prepared.full["input_ids"].device
        use_triton = self.backend == "triton" or (self.backend == "auto" and device.type == "cuda"
                                                  and triton_usable(device))
        return prepared, device, use_triton

    def _cosines(self, cap, norms: torch.Tensor, device) -> Optional[torch.Tensor]:
        """(B,) or (B, R) cosines with the reference(s), from the capture's dots (None without one)."""
        if self.refs is None:
            return None
        from .reference import alignment

        single = next(iter(self.refs.values())).shape[0] == 1
        return alignment(cap.per_param_dots(self.refs, device), norms, self.refs, single=single)[1]


def _empty_result(device) -> FilteredResult:
    empty = torch.zeros(0, device=device)
    return FilteredResult(empty.bool(), empty, empty.clone(), empty.long(), 0.0, 0, {"n": 0})


MODES = ("auto", "one_backward", "two_pass")


def sharded_param_names(params: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the parameters that are ``DTensor`` shards (FSDP2 ``fully_shard``, tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [n for n, p in params.items() if isinstance(p, DTensor)]


_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q", "max_length_k")


def packed_rows(batch: Mapping[str, Any]) -> Optional[str]:
    """Why ``batch`` holds packed rows (several sequences in one row: padding-free / packing collators),
    or ``None``. Packed when it carries flash-attention varlen keys (``cu_seq_lens_q``...), or when
    ``position_ids`` restart inside a row's attended tokens."""
    keys = [k for k in _PACKED_KEYS if k in batch]
    if keys:
        return f"the batch carries {keys[0]!r} (a padding-free batch: sequences flattened into one row)"
    pos = batch.get("position_ids")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] < 2:
        return None
    restart = pos[:, 1:] <= pos[:, :-1]  # (B, T-1)
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == pos.shape:
        restart &= mask[:, 1:].bool()
    if not bool(restart.any()):
        return None
    b, t = (int(v) for v in restart.nonzero()[0])
    return f"row {b} of the batch packs several sequences (its position_ids restart at token {t + 1})"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class TwoPassFilteredBackward(FilteredBackward):
    """In-step filtering for engines that own the backward (FSDP2, DeepSpeed, DDP): two backwards.

    1. One forward under the ghost capture and the activation-only backward of Σ_b L_b, with the graph
       retained: the per-sample norms, exactly as in :class:`FilteredBackward` (they read activations and
       output gradients, which no engine shards).
    2. The keep-mask of the policy, then an ordinary ``backward_fn(Σ_b w_b L_b)`` with
       ``w_b = loss_scale · m_b / K`` over the same graph: the gradient of the kept samples' mean loss,
       accumulated into ``p.grad`` by autograd and the engine's own gradient hooks (FSDP2 reduce-scatter,
       DDP all-reduce). ``backward_fn`` defaults to ``loss.backward()``; pass ``accelerator.backward``
       or a DeepSpeed engine's ``backward`` where those own it.

    Cost: a plain step plus one activation backward (no weight-gradient matmuls); peak memory that of a
    plain step (the graph is kept once, the per-sample factors are reduced as they arrive). Under
    ``torch.distributed`` the second backward runs on every rank even when a rank keeps no sample
    (weight 0), so that the engine's collectives stay matched.
    """

    def __init__(self, model: nn.Module, *args: Any, backward_fn: Optional[Callable[[torch.Tensor], Any]] = None,
                 **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        self.backward_fn = backward_fn

    @_explain_reentrant_checkpointing
    def step(self, batch: Mapping[str, Any], loss_scale: float = 1.0, seed: Any = 0) -> FilteredResult:
        from .selection import keep_mask

        engine = self.engine
        prepared, device, use_triton = self._begin(batch)
        B = prepared.batch_size
        if B == 0:
            if _distributed():
                raise UsageError("two-pass filtering got an empty batch (B = 0) under torch.distributed: every rank "
                                 "must step with at least one sample, or the engine's collectives hang")
            return _empty_result(device)
        with grad_enabled_for(engine.params):
            # the activation backward keeps the graph; op uses compute with the real weights, so the ordinary
            # backward below reaches every use
            cap, losses, tokens = engine.ghost.run(prepared, use_triton, keep_factors=False, strict=True,
                                                   retain_graph=True, weights_in_graph=True, refs=self.refs)
            sharded_fallback = [n for plan in cap.plan.modules.values() if plan.rule is None
                                for n in plan.names.values() if sharded_param_names({n: engine.params[n]})]
            if sharded_fallback:
                raise UnsupportedModule(
                    f"parameter {sharded_fallback[0]} is sharded and its module has no norm rule (the torch.func "
                    "fallback needs whole weights); register a norm rule for that module type with "
                    "@gradsel_core.register_norm_rule, or leave the module unsharded")
            sq = cap.per_param_sq(engine.params, device)
            norms = torch.stack(list(sq.values())).sum(0).clamp(min=0).sqrt().float()  # (B,)
            cos = self._cosines(cap, norms, device)
            kept, summary = keep_mask(norms, losses.detach().float(), policy=self.policy, ratio=self.ratio,
                                      loss_filter_std=self.loss_filter_std, tokens=tokens, seed=seed,
                                      return_summary=True, cosines=cos, **self.policy_kwargs)
            K = int(kept.sum())
            if K > 0 or _distributed():
                w = kept.to(losses.dtype) * (loss_scale / max(K, 1))  # (B,) mean over the kept samples
                masked = (losses * w).sum()
                if self.backward_fn is None:
                    masked.backward()
                else:
                    self.backward_fn(masked)
            else:
                log.debug("filtered_backward: no sample kept in this batch; no gradient added")
        del cap
        losses = losses.detach().float()
        loss = float(losses[kept].mean()) if K else 0.0
        return FilteredResult(kept, norms, losses, tokens, loss, K, summary, cos)


def filtered_backward(model: nn.Module, batch: Mapping[str, Any], policy: str = "median_band",
                      ratio: float = 0.2, params: ParamSpec = "trainable",
                      loss_filter_std: Union[float, None, str] = "auto",
                      loss_scale: float = 1.0, loss_fn: Optional[LossFn] = None, seed: Any = 0,
                      mode: str = "auto", backward_fn: Optional[Callable[[torch.Tensor], Any]] = None,
                      reference: Any = None, **policy_kwargs: Any) -> FilteredResult:
    """Score ``batch``, keep samples by the per-batch ``policy``, and accumulate
    ``loss_scale · ∇(mean loss over the kept samples)`` into ``p.grad`` of the selected parameters.

    ``mode="one_backward"``: one forward and one backward; gradsel writes ``p.grad`` itself
    (:class:`FilteredBackward`). ``mode="two_pass"``: the norms from the activation backward, then an
    ordinary ``backward_fn(masked mean loss)`` (default ``.backward()``) through the engine's own hooks
    (:class:`TwoPassFilteredBackward`; FSDP2, DeepSpeed). ``"auto"``: two_pass when a selected parameter is
    a sharded ``DTensor`` (FSDP2) or ``backward_fn`` is given, else one_backward. See the classes to reuse
    the setup across steps."""
    if mode not in MODES:
        raise UsageError(f"mode={mode!r} is unknown; choose one of {MODES}")
    kwargs = dict(policy=policy, ratio=ratio, params=params, loss_filter_std=loss_filter_std, loss_fn=loss_fn,
                  reference=reference,
                  **policy_kwargs)
    if mode == "auto":
        two = backward_fn is not None
        if not two:
            from .params import select_params

            two = bool(sharded_param_names(select_params(model, params)))
        mode = "two_pass" if two else "one_backward"
    if mode == "two_pass":
        fb: FilteredBackward = TwoPassFilteredBackward(model, backward_fn=backward_fn, **kwargs)
    else:
        if backward_fn is not None:
            raise UsageError("backward_fn is used by mode='two_pass' only; the one-backward path writes p.grad itself")
        fb = FilteredBackward(model, **kwargs)
    return fb.step(batch, loss_scale=loss_scale, seed=seed)
