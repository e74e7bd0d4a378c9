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
