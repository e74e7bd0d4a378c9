"""Shared types of the scoring path, below the engine and its backends (imports run one way:
``engine`` -> ``backends`` -> ``types``).

- :class:`ScoreResult`: what ``GradNormEngine.score`` returns;
- :class:`RawScores`: what a backend returns (squared norms per parameter, accumulation dtype);
- :class:`ScoringSpec`: what a backend needs to know of the engine (model, parameters, loss);
- :class:`Coverage`: how each selected parameter is scored;
- the contexts every backend scores under (grad on, eval mode, out of ``inference_mode``).
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional

import torch
from torch import nn

from .batching import LossFn


@dataclass
class ScoreResult:
    """Per-sample scores of one batch (tensors on the batch's device).

    A norm is NaN where the sample's loss is NaN, and +inf where its loss is finite but its gradient is
    not (overflow), in every backend."""

    norms: torch.Tensor  # (B,) float32: ||∇θ L_i||
    losses: torch.Tensor  # (B,) float32: L_i
    tokens: torch.Tensor  # (B,) int64: counted target tokens
    per_param: Optional[Dict[str, torch.Tensor]] = None  # name -> (B,) float32 squared norms
    backend: str = ""
    dots: Optional[torch.Tensor] = None  # (B,) or (B, R) float32: ⟨∇θ L_i, r⟩ (score(..., reference=))
    cosines: Optional[torch.Tensor] = None  # (B,) or (B, R): dots / (||∇θ L_i|| ||r||), 0 where either is 0
    # "mean" | "sum": how each L_i reduces its target tokens' losses (built-in causal-LM loss; None with a
    # custom loss_fn), which select(score="norm_per_token") reads
    loss_reduction: Optional[str] = None

    def __len__(self) -> int:
        return self.norms.shape[0]


@dataclass
class RawScores:
    """What a backend returns: squared norms per parameter in the accumulation dtype."""

    per_param_sq: Dict[str, torch.Tensor]  # name -> (B,)
    losses: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B,)
    dots: Optional[Dict[str, torch.Tensor]] = None  # name -> (B, R): ⟨per-sample gradient, reference⟩


@dataclass
class ScoringSpec:
    """What every backend needs: the model, the selected parameters and the per-sample loss."""

    model: nn.Module
    params: Dict[str, nn.Parameter]
    loss_fn: Optional[LossFn] = None
    loss_reduction: str = "mean"
    chunk_size: Optional[int] = None


@dataclass
class CoverageEntry:
    param: str
    how: str  # "rule", "op", "module fallback", "whole-model vmap", "loop"
    module: str = ""  # the module (or op place) that scores it
    detail: str = ""  # the rule's name, the op, or why it was moved


@dataclass
class Coverage:
    """How each selected parameter is scored (``GradNormEngine.coverage()``)."""

    backend: str
    entries: List[CoverageEntry] = field(default_factory=list)
    head: str = ""  # the fused LM head (ghost/head.py): "on: ..." or "off: why", "" before any ghost batch

    def counts(self) -> Dict[str, int]:
        return dict(Counter(e.how for e in self.entries))

    def by(self, how: str) -> List[CoverageEntry]:
        return [e for e in self.entries if e.how == how]

    def summary(self) -> str:
        """One line: ``backend ghost: 28 params by rules, 2 by op uses, 1 by module fallback (h.0.attn)``."""
        parts = []
        for how in ("rule", "op", "module fallback", "whole-model vmap", "loop"):
            es = self.by(how)
            if not es:
                continue
            label = {"rule": "by rules", "op": "by op uses", "module fallback": "by module fallback",
                     "whole-model vmap": "by whole-model vmap", "loop": "by the per-sample loop"}[how]
            where = ""
            if how == "module fallback":
                mods = sorted({e.module or "<root>" for e in es})
                where = f" ({', '.join(mods[:4])}{', ...' if len(mods) > 4 else ''})"
            parts.append(f"{len(es)} params {label}{where}")
        if self.head.startswith("on"):
            parts.append(f"LM head {self.head}")
        return f"backend {self.backend}: " + ("; ".join(parts) if parts else "no parameters")

    def __str__(self) -> str:
        return self.summary()


def acc_dtype(params: Mapping[str, torch.Tensor]) -> torch.dtype:
    """fp64 when any selected parameter is fp64, else fp32 (bf16/fp16 accumulate in fp32)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a fast norm against the per-sample reference, by parameter dtype."""
    return {torch.float64: 1e-8, torch.float32: 1e-3}.get(dtype, 5e-2)


@contextlib.contextmanager
def grad_enabled_for(params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Grad enabled (also inside ``torch.no_grad()`` and ``torch.inference_mode()``) and the selected
    parameters requiring grad; ``requires_grad`` restored on exit.

    Parameters created under ``inference_mode`` cannot take part in autograd: that raises a clear error."""
    inference = [n for n, p in params.items() if p.is_inference()]
    if inference:
        raise RuntimeError(
            f"parameters {inference[:3]} are inference tensors (created under torch.inference_mode()); "
            "per-sample gradients need ordinary parameters: build or load the model outside inference_mode")
    flags = [(p, p.requires_grad) for p in params.values()]
    with torch.inference_mode(False), torch.enable_grad():
        for p in params.values():
            p.requires_grad_(True)
        try:
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


def finish_norms(total_sq: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """sqrt of the summed squared norms, with one meaning for non-finite values in every backend:
    NaN where the loss is NaN, +inf where the loss is finite but the squared norm is not (overflow)."""
    norms = total_sq.clamp(min=0).sqrt()
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        inf = torch.full_like(norms, math.inf)
        norms = torch.where(bad, torch.where(torch.isnan(losses.to(norms.dtype)), inf * 0, inf), norms)
    return norms


class BufferSnapshot:
    """The model's buffers as they were (objects and values), to undo what extra forwards did to them.

    Scoring may run the model more than the user's one forward would (a retry while the ghost engine
    learns the model, the per-sample reference of the first-batch check, a move down ``auto``'s chain); each
    of those can move state kept in buffers (BatchNorm running statistics in train mode, the power iteration
    of ``spectral_norm``, a counter). ``restore()`` puts every buffer that existed at the snapshot back, by
    value and in its own tensor object."""

    def __init__(self, model: nn.Module):
        self.items = []
        seen = set()
        for mod in model.modules():
            for key, buf in mod._buffers.items():
                if buf is None:
                    continue
                saved = buf if id(buf) in seen else buf.detach().clone()
                seen.add(id(buf))
                self.items.append((mod, key, buf, saved))

    def restore(self) -> None:
        with torch.no_grad():
            for mod, key, buf, saved in self.items:
                mod._buffers[key] = buf
                if saved is not buf and not (buf.shape == saved.shape and torch.equal(buf, saved)):
                    if buf.shape != saved.shape:
                        buf.data = saved.clone()
                    else:
                        buf.copy_(saved)


def sample_mixing_modules(model: nn.Module) -> List[str]:
    """Names of modules that mix the samples of a batch in their current mode: BatchNorm and SyncBatchNorm in
    train mode or without running statistics (batch statistics), InstanceNorm with ``track_running_stats`` in
    train mode (running statistics over the batch). A per-sample gradient of such a model is not the gradient of a sample's own loss."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    out = []
    for name, m in model.named_modules():
        # BatchNorm without running statistics uses batch statistics in eval mode too
        bn = isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
        if bn or (isinstance(m, _InstanceNorm) and m.track_running_stats and m.training):
            out.append(name or "<root>")
    return out


def refuse_sample_mixing(model: nn.Module, what: str) -> None:
    """Raise :class:`UsageError` naming the first module that mixes samples in train mode (before any forward)."""
    mixing = sample_mixing_modules(model)
    if not mixing:
        return
    from .errors import UsageError

    mod = model.get_submodule("" if mixing[0] == "<root>" else mixing[0])
    raise UsageError(
        f"{what}: module {mixing[0]} ({type(mod).__name__}) mixes the samples of a batch in its current mode "
        f"(batch statistics in train mode), so a sample's gradient is not that of its own loss"
        f"{f' ({len(mixing)} such modules)' if len(mixing) > 1 else ''}. Put these modules in eval mode "
        "(model.eval(), or module.eval() on each: running statistics, per-sample), or replace them by GroupNorm / "
        "LayerNorm (opacus.validators.ModuleValidator.fix does it)")
