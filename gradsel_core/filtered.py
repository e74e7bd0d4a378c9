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

The step goes through the engine's own path (``GradNormEngine``): the same check against the per-sample loop
until the ghost path is verified (on the capture itself for a model in eval mode; in train mode, where dropout
makes a per-sample forward differ, by one eval-mode score of the batch first), the same moves down ``auto``'s
chain, and the same NaN/inf norms as ``score()``. Where the one-backward path cannot be exact (the engine moved
to vmap or the loop), the norms are the engine's (eval mode) and the update is an ordinary forward and backward
of the kept samples' mean loss over the batch: exact, at the cost of that extra pass. Layers that mix samples
in train mode (BatchNorm) are refused before any forward; buffers move as one forward moves them.

Engines that own the backward (FSDP2 ``fully_shard``, DeepSpeed) cannot take a gradient written by
hand: ``mode="two_pass"`` (:class:`TwoPassFilteredBackward`) keeps the graph of the activation backward
and runs an ordinary backward of the kept samples' masked mean loss through the engine's hooks, at the
cost of one more activation backward.
"""
from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .batching import LossFn, PreparedBatch, per_sample_losses
from .engine import GradNormEngine, _first_line
from .factors import weighted_total
from .errors import UsageError
from .params import ParamSpec
from .errors import UnsupportedModule
from .types import BufferSnapshot, RawScores, acc_dtype, finish_norms, grad_enabled_for, refuse_sample_mixing, scoring_mode

log = logging.getLogger(__name__)


def _explain_reentrant_checkpointing(step: Callable) -> Callable:
    """Turn torch's error about reentrant activation checkpointing (deep inside the activation backward,
    which is a ``.grad()`` call) into one that says what to change."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except RuntimeError as e:
            if not _is_reentrant_error(e):
                raise
            raise UsageError(
                "in-step filtering does not work with reentrant activation checkpointing (its activation "
                "backward is a torch.autograd.grad call, which reentrant checkpointing refuses). Use "
                "non-reentrant checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}), TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': "
                "False}), or torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
            ) from e

    return wrapper


def _is_reentrant_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and ("use_reentrant" in str(e) or "Checkpointing is not compatible" in str(e))


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
    the training loss actually optimised). ``verify``: the engine's check against the per-sample loop
    (:class:`GradNormEngine`; default on for ``backend="auto"``).
    """

    def __init__(self, model: nn.Module, policy: str = "median_band", ratio: float = 0.2,
                 params: ParamSpec = "trainable", loss_filter_std: Union[float, None, str] = "auto",
                 loss_fn: Optional[LossFn] = None, loss_reduction: str = "mean", backend: str = "auto",
                 reference: Any = None, verify: Optional[bool] = None, fused_head: Optional[bool] = None,
                 **policy_kwargs: Any):
        if backend not in ("auto", "ghost", "triton"):
            raise ValueError(f"filtered_backward needs the one-backward engine: backend 'auto', 'ghost' or "
                             f"'triton', got {backend!r}")
        from .params import select_params

        # sharded parameters cannot leave the ghost path (the loop and vmap need whole weights)
        engine_backend = backend if backend != "auto" or not sharded_param_names(select_params(model, params)) \
            else "ghost"
        self.engine = GradNormEngine(model, params=params, loss_fn=loss_fn, backend=engine_backend,
                                     loss_reduction=loss_reduction, verify=verify,
                                     fused_head=fused_head)
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
        engine = self.engine
        prepared, device, backend = self._begin(batch)
        if prepared.batch_size == 0:
            return _empty_result(device)
        snapshot = BufferSnapshot(engine.model)
        backend = self._settle(prepared, backend, snapshot)
        if backend in ("ghost", "triton"):
            got = self._ghost_pass(prepared, backend, snapshot, lambda: engine.ghost.run(
                prepared, backend == "triton", keep_factors=True, strict=True, refs=self.refs))
            if got is not None:
                return self._one_backward_update(got, loss_scale, seed, device)
        return self._exact_step(prepared, engine.resolve_backend(prepared), snapshot, loss_scale, seed)

    def _one_backward_update(self, got, loss_scale: float, seed: Any, device) -> FilteredResult:
        cap, losses, tokens, norms = got
        engine = self.engine
        losses = losses.detach().float()
        cos = self._cosines(cap, norms, device)
        kept, summary, index = self._keep(norms, losses, tokens, cos, seed)
        K = int(index.numel())
        if K == 0:
            log.debug("filtered_backward: no sample kept in this batch; no gradient added")
            return FilteredResult(kept, norms, losses, tokens, 0.0, 0, summary, cos)
        w = torch.full((K,), loss_scale / K, device=device, dtype=acc_dtype(engine.params))  # mean over the kept
        # samples (in fp64 for fp64 parameters: 1/K rounded to fp32 is 3e-8 off)
        for name, factors in cap.factors.items():
            p = engine.params[name]
            g = weighted_total(factors, w, index).reshape(p.shape).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return FilteredResult(kept, norms, losses, tokens, float(losses[index].mean()), K, summary, cos)

    def _keep(self, norms, losses, tokens, cos, seed):
        from .selection import keep_mask

        kept, summary = keep_mask(norms, losses, policy=self.policy, ratio=self.ratio,
                                  loss_filter_std=self.loss_filter_std, tokens=tokens, seed=seed,
                                  return_summary=True, cosines=cos, **self.policy_kwargs)
        return kept, summary, kept.nonzero().squeeze(1)  # (K,)

    def _begin(self, batch: Mapping[str, Any]):
        """(prepared batch, device, the backend the engine resolves to); refuses sample-mixing layers before
        any forward."""
        prepared = self.engine.prepare(batch)
        refuse_sample_mixing(self.engine.model, "filtered_backward")
        device = prepared.full["input_ids"].device
        return prepared, device, self.engine.resolve_backend(prepared)

    def _training(self) -> bool:
        return any(m.training for m in self.engine.model.modules())

    def _settle(self, prepared: PreparedBatch, backend: str, snapshot: BufferSnapshot) -> str:
        """In train mode, while the ghost path is not verified: check it by an eval-mode score of the batch
        (dropout makes a train-mode capture differ from a per-sample forward); buffers restored after."""
        engine = self.engine
        if backend not in ("ghost", "triton") or not engine.needs_check(backend) or not self._training() \
                or not engine._should_verify(backend):
            return backend
        with scoring_mode(engine.model, engine.params):
            _, backend = engine.score_prepared(prepared, backend, None, snapshot)
        snapshot.restore()
        engine.last_backend = backend
        return backend

    def _ghost_pass(self, prepared: PreparedBatch, backend: str, snapshot: BufferSnapshot,
                    run: Callable[[], Any]):
        """The capture in the model's own mode: (capture, losses, tokens, norms), or ``None`` when the engine
        moved off the ghost path (``auto``: the backend cannot score the model, or the check on an eval-mode
        model failed). The batch's own errors are raised as they are."""
        engine = self.engine
        try:
            with grad_enabled_for(engine.params):
                cap, losses, tokens = run()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted out by the engine: the batch's errors are raised
            if engine.backend != "auto" or isinstance(e, UsageError) or _is_reentrant_error(e):
                raise  # (reentrant checkpointing: refused with the fix, which costs nothing, by the step's wrapper)
            reason = engine.cannot_score(e, prepared, snapshot)
            snapshot.restore()
            engine.move_down(backend, f"{type(reason).__name__}: {_first_line(reason)}")
            return None
        device = prepared.full["input_ids"].device
        sq = cap.per_param_sq(engine.params, device)
        if engine.needs_check(backend) and not self._training():
            with grad_enabled_for(engine.params):
                bad = engine.check(prepared, RawScores(sq, losses.detach(), tokens), backend)
            if bad is not None:
                del cap
                snapshot.restore()
                engine.move_down(backend, bad, verification=True)  # raises for an explicit backend
                return None
        engine.last_backend = backend
        total = torch.stack(list(sq.values())).sum(0)  # (B,)
        return cap, losses, tokens, finish_norms(total, losses.detach()).float()

    def _exact_step(self, prepared: PreparedBatch, backend: str, snapshot: BufferSnapshot, loss_scale: float,
                    seed: Any, backward_fn: Optional[Callable[[torch.Tensor], Any]] = None,
                    all_params: bool = False) -> FilteredResult:
        """Where the one-backward path cannot be exact: the engine's norms (eval mode, checked), then an
        ordinary forward of the batch in the model's own mode and a backward of the kept samples' mean loss.
        ``all_params``: ``backward_fn`` (default ``.backward()``) fills every gradient the model's own backward
        does (two_pass); else only the selected parameters' ``.grad`` get the update."""
        engine = self.engine
        with scoring_mode(engine.model, engine.params):
            raw, backend = engine.score_prepared(prepared, backend, self.refs, snapshot)
        snapshot.restore()
        engine.last_backend = backend
        res = engine._finish(raw, backend)
        norms, losses, tokens = res.norms, res.losses, res.tokens
        cos = None
        if self.refs is not None:
            from .reference import alignment

            cos = alignment(raw.dots, norms, self.refs, single=next(iter(self.refs.values())).shape[0] == 1)[1]
        kept, summary, index = self._keep(norms, losses, tokens, cos, seed)
        K = int(index.numel())
        if K > 0 or (all_params and _distributed()):
            w = kept.to(torch.float64) * (loss_scale / max(K, 1))  # (B,) mean over the kept samples
            with grad_enabled_for(engine.params):
                out = engine.model(**prepared.model_inputs)
                batch_losses, _ = per_sample_losses(out, prepared, engine.loss_fn, engine.loss_reduction)
                masked = (batch_losses * w.to(batch_losses.dtype)).sum()
                if all_params:
                    masked.backward() if backward_fn is None else backward_fn(masked)
                else:
                    params = list(engine.params.values())
                    grads = torch.autograd.grad(masked, params, allow_unused=True)
                    for p, g in zip(params, grads):
                        if g is None:
                            continue
                        if p.grad is None:
                            p.grad = g.to(p.dtype)
                        else:
                            p.grad.add_(g.to(p.dtype))
        else:
            log.debug("filtered_backward: no sample kept in this batch; no gradient added")
        loss = float(losses[kept].mean()) if K else 0.0
        return FilteredResult(kept, norms, losses, tokens, loss, K, summary, cos)

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
        engine = self.engine
        prepared, device, backend = self._begin(batch)
        B = prepared.batch_size
        if B == 0:
            if _distributed():
                raise UsageError("two-pass filtering got an empty batch (B = 0) under torch.distributed: every rank "
                                 "must step with at least one sample, or the engine's collectives hang")
            return _empty_result(device)
        snapshot = BufferSnapshot(engine.model)
        backend = self._settle(prepared, backend, snapshot)
        if backend not in ("ghost", "triton"):
            return self._exact_step(prepared, backend, snapshot, loss_scale, seed, self.backward_fn, all_params=True)
        # the activation backward keeps the graph; op uses compute with the real weights, so the ordinary
        # backward below reaches every use
        got = self._ghost_pass(prepared, backend, snapshot, lambda: engine.ghost.run(
            prepared, backend == "triton", keep_factors=False, strict=True, retain_graph=True,
            weights_in_graph=True, refs=self.refs))
        if got is None:
            return self._exact_step(prepared, engine.resolve_backend(prepared), snapshot, loss_scale, seed,
                                    self.backward_fn, all_params=True)
        cap, losses, tokens, norms = got
        with grad_enabled_for(engine.params):
            sharded_fallback = [n for plan in cap.plan.modules.values() if plan.rule is None
                                for n in plan.names.values() if sharded_param_names({n: engine.params[n]})]
            if sharded_fallback:
                raise UnsupportedModule(
                    f"parameter {sharded_fallback[0]} is sharded and its module has no norm rule (the torch.func "
                    "fallback needs whole weights); register a norm rule for that module type with "
                    "@gradsel_core.register_norm_rule, or leave the module unsharded")
            cos = self._cosines(cap, norms, device)
            kept, summary, _ = self._keep(norms, losses.detach().float(), tokens, cos, seed)
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
                      reference: Any = None, fused_head: Optional[bool] = None,
                      **policy_kwargs: Any) -> FilteredResult:
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
                  reference=reference, fused_head=fused_head,
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
    key = _learned_key(fb)
    if key is not None:
        _LEARNED.setdefault(model, {}).get(key, _Learned()).give(fb.engine)
    try:
        return fb.step(batch, loss_scale=loss_scale, seed=seed)
    finally:
        if key is not None:
            _LEARNED.setdefault(model, {})[key] = _Learned.take(fb.engine)


@dataclass
class _Learned:
    """What an engine learned about a model (verified backends, the backend auto settled on, the ghost path's
    moves), carried from one ``filtered_backward`` call to the next on the same model and parameters, so the
    check and the learning passes are paid once, as with a reused :class:`FilteredBackward`. Names only:
    nothing that holds the model."""

    verified: frozenset = frozenset()
    unchecked: frozenset = frozenset()
    settled: Optional[str] = None
    moved: Dict[str, Any] = field(default_factory=dict)
    track: frozenset = frozenset()
    copy_taps: bool = False
    follow_rows: bool = False

    @classmethod
    def take(cls, engine: GradNormEngine) -> "_Learned":
        g = engine.ghost
        return cls(frozenset(engine._verified), frozenset(engine._unchecked), engine._settled, dict(g.moved),
                   frozenset(g.track), g.copy_taps, g.follow_rows)

    def give(self, engine: GradNormEngine) -> None:
        g = engine.ghost
        engine._verified, engine._unchecked, engine._settled = set(self.verified), set(self.unchecked), self.settled
        g.moved, g.track, g.copy_taps, g.follow_rows = dict(self.moved), set(self.track), self.copy_taps, self.follow_rows
        g._plan = None  # re-planned from the moves


_LEARNED: "weakref.WeakKeyDictionary[nn.Module, Dict[Any, _Learned]]" = weakref.WeakKeyDictionary()


def _learned_key(fb: FilteredBackward):
    """The engine's identity across calls (the selected parameter objects, mode, backend, loss reduction), or
    ``None`` with a custom ``loss_fn`` (a new function each call cannot be told from the last one)."""
    e = fb.engine
    if e.loss_fn is not None:
        return None
    return (type(fb).__name__, e.backend, e.loss_reduction, tuple((n, id(p)) for n, p in e.params.items()))
