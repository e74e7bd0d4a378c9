"""Normalization layers: ``nn.LayerNorm``, ``nn.RMSNorm`` and HF RMSNorm look-alikes."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModule
from ..factors import Factor, RowSum
from .base import ModuleCall, as_btd, only, register_norm_rule


def _layernorm_output(call: ModuleCall) -> torch.Tensor:
    m = call.module
    return F.layer_norm(call.input(), m.normalized_shape, m.weight, m.bias, m.eps)


@register_norm_rule(nn.LayerNorm, rowwise=True, check=_layernorm_output)
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


def _rms_xhat(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ = x/√(mean(x²) + ε) over the weight's dims (the last ``weight.dim()`` dims: nn.RMSNorm's
    normalized_shape), computed in fp32 (fp64 for fp64 inputs), in that accumulation dtype."""
    w: torch.Tensor = m.weight  # type: ignore[assignment]
    k = w.dim()
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != tuple(w.shape):
        raise UnsupportedModule(f"an RMSNorm weight of shape {tuple(w.shape)} on an input of shape "
                                f"{tuple(x.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    dims = tuple(range(x.dim() - k, x.dim()))
    return xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + _rms_eps(m, x))


def _rmsnorm_output(call: ModuleCall):
    """The forms the rule's gradient x̂ ⊙ g describes: w ⊙ x̂ (x̂ cast to the input dtype first, as Llama) or
    (1 + w) ⊙ x̂ (Gemma), each computed in the accumulation dtype or in the input dtype."""
    m, x = call.module, call.input()
    xhat = _rms_xhat(m, x)  # (..., *w.shape), accumulation dtype
    w = m.weight.detach()
    acc = xhat.dtype
    return (w * xhat.to(x.dtype), (w.to(acc) * xhat).to(x.dtype),
            ((1.0 + w.to(acc)) * xhat).to(x.dtype), (1.0 + w) * xhat.to(x.dtype))


@register_norm_rule(nn.RMSNorm, predicate=_is_rmsnorm_lookalike, rowwise=True, check=_rmsnorm_output)
def rmsnorm_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = w ⊙ x̂ (or (1 + w) ⊙ x̂) with x̂ = x/√(mean(x²) + ε) over the weight's dims (nn.RMSNorm's
    ``normalized_shape``, possibly several), computed in fp32 and cast back to the input dtype as HF's
    LlamaRMSNorm does: w -> Σ_t x̂_t ⊙ g_t. Look-alikes matched by name are checked against their output
    (``check``) before the rule scores them."""
    only(names, ("weight",), call)
    m = call.module
    B = call.batch_size
    x = call.input()
    n = m.weight.numel()
    xhat = _rms_xhat(m, x).to(x.dtype)
    G = as_btd(call.grad_output, B, call.name, call.rows, last=n)  # (B, T, n)
    return {"weight": RowSum(G, as_btd(xhat, B, call.name, call.rows, last=n), shape=tuple(m.weight.shape))}
