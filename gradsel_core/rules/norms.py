"""Normalization layers: ``nn.LayerNorm``, ``nn.RMSNorm`` and HF RMSNorm look-alikes."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from ..factors import Factor, RowSum
from .base import ModuleCall, as_btd, only, register_norm_rule


@register_norm_rule(nn.LayerNorm, rowwise=True)
def layernorm_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """γ: Σ_t x̂_t ⊙ g_t with x̂ = (x - μ)/√(σ² + ε) (recomputed in fp32); β: Σ_t g_t."""
    only(names, ("weight", "bias"), call)
    m: nn.LayerNorm = call.module
    B = call.batch_size
    k = len(m.normalized_shape)
    x = call.input()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    dims = tuple(range(x.dim() - k, x.dim()))
    xhat = (xf - xf.mean(dims, keepdim=True)) * torch.rsqrt(xf.var(dims, unbiased=False, keepdim=True) + m.eps)
    n = int(torch.Size(m.normalized_shape).numel())
    X = as_btd(xhat, B, call.name, call.rows, last=n)  # (B, T, n)
    G = as_btd(call.grad_output, B, call.name, call.rows, last=n)  # (B, T, n)
    out: Dict[str, Factor] = {}
    if "weight" in names:
        out["weight"] = RowSum(G, X, shape=tuple(m.normalized_shape))
    if "bias" in names:
        out["bias"] = RowSum(G, shape=tuple(m.normalized_shape))
    return out


def _rms_eps(m: nn.Module, x: torch.Tensor) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(m, attr, None)
        if eps is not None:
            return float(eps)
    return float(torch.finfo(x.dtype).eps)  # nn.RMSNorm(eps=None)


def _is_rmsnorm_lookalike(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(w, nn.Parameter)
        and w.dim() == 1
        and any(hasattr(m, a) for a in ("variance_epsilon", "eps", "epsilon"))
    )


@register_norm_rule(nn.RMSNorm, predicate=_is_rmsnorm_lookalike, rowwise=True)
def rmsnorm_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = w ⊙ x̂ (or (1 + w) ⊙ x̂) with x̂ = x/√(mean(x²) + ε), computed in fp32 and cast back to the
    input dtype as HF's LlamaRMSNorm does: w -> Σ_t x̂_t ⊙ g_t."""
    only(names, ("weight",), call)
    m = call.module
    B = call.batch_size
    x = call.input()
    n = m.weight.numel()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _rms_eps(m, x))).to(x.dtype)
    G = as_btd(call.grad_output, B, call.name, call.rows, last=n)  # (B, T, n)
    return {"weight": RowSum(G, as_btd(xhat, B, call.name, call.rows, last=n))}
