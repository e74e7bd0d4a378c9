"""The public scoring API: ``GradNormEngine`` and ``per_sample_grad_norms``.

G_i = ||∇θ L(x_i)||_2 over the selected parameters θ, with L(x_i) sample i's own loss.
Scoring is deterministic and side-effect free: it runs in eval mode (dropout off) and restores every
module's mode, leaves ``param.grad`` and ``requires_grad`` as found, and works inside ``torch.no_grad()``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from torch import nn

from .batching import LossFn, PreparedBatch, prepare_batch
from .params import ParamSpec, select_params

log = logging.getLogger(__name__)

BACKENDS = ("auto", "loop", "vmap", "ghost", "triton")


@dataclass
class ScoreResult:
    """Per-sample scores of one batch (tensors on the batch's device)."""

    norms: torch.Tensor  # (B,) float32: ||∇θ L_i||
    losses: torch.Tensor  # (B,) float32: L_i
    tokens: torch.Tensor  # (B,) int64: counted target tokens
    per_param: Optional[Dict[str, torch.Tensor]] = None  # name -> (B,) float32 squared norms
    backend: str = ""

    def __len__(self) -> int:
        return self.norms.shape[0]


@dataclass
class RawScores:
    """What a backend returns: squared norms per parameter in the accumulation dtype."""

    per_param_sq: Dict[str, torch.Tensor]  # name -> (B,)
    losses: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B,)


@contextlib.contextmanager
def grad_enabled_for(params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Grad enabled (also inside ``torch.no_grad()``) and the selected parameters requiring grad;
    ``requires_grad`` restored on exit."""
    flags = [(p, p.requires_grad) for p in params.values()]
    for p in params.values():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def scoring_mode(model: nn.Module, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Eval mode (dropout off) on top of :func:`grad_enabled_for`; every module's mode restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with grad_enabled_for(params):
            yield
    finally:
        for m, training in modes:
            m.training = training


def acc_dtype(params: Mapping[str, torch.Tensor]) -> torch.dtype:
    """fp64 when any selected parameter is fp64, else fp32 (bf16/fp16 accumulate in fp32)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32


class GradNormEngine:
    """Exact per-sample gradient norms.

    Args:
        model: any ``nn.Module`` taking the batch's tensors as keyword arguments.
        params: ``"trainable"``, ``"all"``, ``"lora"``, a list of names or ``callable(name, param)``.
        loss_fn: ``(outputs, batch) -> (B,)`` per-sample loss; default: causal LM on ``labels``.
        backend: ``"loop"`` (reference), ``"vmap"`` (torch.func), ``"ghost"`` (hooks, one backward),
            ``"triton"`` (ghost with fused kernels on CUDA) or ``"auto"``.
        per_param: also return each parameter's squared norms.
        chunk_size: samples per vmap chunk (memory bound); ``None`` = whole batch.
        loss_reduction: ``"mean"`` or ``"sum"`` over each sample's target tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = "trainable",
        loss_fn: Optional[LossFn] = None,
        backend: str = "auto",
        per_param: bool = False,
        chunk_size: Optional[int] = None,
        loss_reduction: str = "mean",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.model = model
        self.params = select_params(model, params)
        self.loss_fn = loss_fn
        self.backend = backend
        self.per_param = per_param
        self.chunk_size = chunk_size
        self.loss_reduction = loss_reduction

    # -- public -----------------------------------------------------------------------------------
    def score(self, batch: Mapping[str, Any]) -> ScoreResult:
        """Score one batch. Returns a :class:`ScoreResult`; B = 0 gives empty tensors."""
        prepared = prepare_batch(batch, lm_loss=self.loss_fn is None)
        backend = self.resolve_backend(prepared)
        device = prepared.full["input_ids"].device
        if prepared.batch_size == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=device)
            per = {n: empty.clone() for n in self.params} if self.per_param else None
            return ScoreResult(empty, empty.clone(), torch.zeros(0, dtype=torch.int64, device=device), per, backend)
        from .rules import UnsupportedModule

        with scoring_mode(self.model, self.params):
            try:
                raw = self._run_backend(backend, prepared)
            except UnsupportedModule as e:
                if self.backend != "auto":
                    raise
                log.warning("ghost backend cannot score this model exactly (%s); using backend='vmap'", e)
                backend = "vmap"
                raw = self._run_backend(backend, prepared)
        return self._finish(raw, backend)

    def resolve_backend(self, prepared: Optional[PreparedBatch] = None) -> str:
        """The backend ``score`` will use: ``"auto"`` is ghost (triton on CUDA when triton imports) when
        every selected parameter is covered by a norm rule or a module-level fallback, else vmap."""
        if self.backend != "auto":
            return self.backend
        from .ghost import engine_plan  # local: keeps import light

        if not engine_plan(self).complete:
            return "vmap"
        from .dispatch import triton_usable

        device = prepared.full["input_ids"].device if prepared is not None else None
        return "triton" if device is not None and device.type == "cuda" and triton_usable(device) else "ghost"

    # -- internals --------------------------------------------------------------------------------
    def _run_backend(self, backend: str, prepared: PreparedBatch) -> RawScores:
        if backend == "loop":
            from .backends.loop import score_loop

            return score_loop(self, prepared)
        if backend == "vmap":
            from .backends.vmap import score_vmap

            return score_vmap(self, prepared)
        from .ghost import score_ghost

        return score_ghost(self, prepared, use_triton=backend == "triton")

    def _finish(self, raw: RawScores, backend: str) -> ScoreResult:
        total = None
        for sq in raw.per_param_sq.values():
            total = sq if total is None else total + sq
        norms = total.clamp(min=0).sqrt()
        per = {n: raw.per_param_sq[n].float() for n in self.params} if self.per_param else None
        return ScoreResult(
            norms=norms.float().detach(),
            losses=raw.losses.float().detach(),
            tokens=raw.tokens.long(),
            per_param=per,
            backend=backend,
        )


def per_sample_grad_norms(model: nn.Module, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
    """Shorthand for ``GradNormEngine(model, **kwargs).score(batch).norms`` (float32, shape (B,))."""
    return GradNormEngine(model, **kwargs).score(batch).norms
