"""Layouts only from proof: the loss-weight probe.

Every rule and fallback reads the gradient at a module's output as rows that belong to samples: row b is
sample b (dim 0 = B), or row i is sample ``rows.seg[i]`` for a proven flatten or routing map
(``gradsel_core.ghost.rows``). A shape cannot prove that: a time-major (T, B, d) activation with T == B, or a
(1, T, d) position lookup expanded to B and then indexed ``[0]`` by the model, has dim 0 = B and rows that mix
samples.

The probe tests exactly the assumption the rules make. The gradient of Σ_b c_b L_b at a module's output is, on
a row that belongs to sample b alone, c_b times the gradient of Σ_b L_b there. So on the first batch (B ≥ 2,
and again whenever the engine learned something new about the model) one more activation backward of
Σ_b c_b L_b, with fixed weights c_b that differ per sample, records each tap's row norms n₂; the
ordinary backward then checks n₂[i] = c²_{s(i)} n₁[i] on every row before a rule reads it (c_b are powers
of two, so on a row of one sample this holds to rounding of the norm sums). A row that mixes
samples breaks that (unless the mixed samples' gradients there vanish, where it does not matter); the module
then moves out to an exact fallback, or ghost refuses. The cost is one activation backward on the first batch.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


# model -> the signatures (``GhostBackend.layout_signature``) of the plans the probe passed on: one cache for
# the process, so an engine built per step (``gs.filtered_backward``) does not probe again.
PROVEN: WeakIdKeyDictionary = WeakIdKeyDictionary()


def hooks_signature(model: nn.Module) -> Tuple[Any, ...]:
    """The forward / forward-pre hooks of every module (a hook may change a layout)."""
    return tuple((i, tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for i, m in enumerate(model.modules())
                 if m._forward_pre_hooks or m._forward_hooks)


def probe_weights(B: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B,) weights 2^k, k in -4..4, distinct for any 9 consecutive samples (a fixed permutation, tiled).

    Powers of two: scaling a gradient by c is exact in floating point (no overflow or underflow aside), and
    the activation backward is linear in the gradient, so a row of one sample gets exactly c_b times its
    gradient, whatever precision the model computes in, and the check can be tight."""
    g = torch.Generator().manual_seed(20260415)
    k = (torch.randperm(9, generator=g) - 4).repeat((B + 8) // 9)[:B]
    return torch.pow(2.0, k.to(torch.float64)).to(dtype=dtype, device=device)


def batch_dim(module: Optional[nn.Module]) -> int:
    """The dim of a module's output that is the batch: 1 for a sequence-first nn.MultiheadAttention, else 0."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


def row_sq(g: torch.Tensor, dim: int = 0) -> Optional[torch.Tensor]:
    """(n,) squared norm of each slice of ``g`` along ``dim`` (fp64 accumulation), or None for a scalar."""
    if g.dim() <= dim:
        return None
    g = g.detach().transpose(0, dim) if dim else g.detach()
    # a reduction kernel, no G-sized temporary (exact under the power-of-two scaling, like the backward)
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).double().pow(2)


def rows_agree(n1: torch.Tensor, n2: torch.Tensor, c_rows: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether n2 = c² n1 row by row, within rounding of ``dtype`` (relative to the row and to the largest)."""
    want = c_rows.double().pow(2) * n1
    fin = torch.isfinite(want) & torch.isfinite(n2)  # (a NaN/inf loss is no evidence either way)
    want, n2 = want[fin], n2[fin]
    rel = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    scale = float(torch.maximum(want.abs().max(), n2.abs().max())) if want.numel() else 0.0
    err = (n2 - want).abs()
    return bool((err <= rel * torch.maximum(want.abs(), n2.abs()) + rel * 1e-3 * scale + 1e-300).all())
