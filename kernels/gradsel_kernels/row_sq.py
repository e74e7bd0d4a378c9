"""rowsum_sq: ||Σ_t g_t||² per sample (Linear bias, LayerNorm β) and weighted_rowsum_sq: ||Σ_t x_t ⊙ g_t||²
per sample (LayerNorm γ, RMSNorm w with X = x̂). Memory-bound: each element of G (and X) is read once.

Three layers: ``_row_sq_kernel`` (Triton, both ops via the WEIGHTED flag), ``row_sq_launch``, and the
public ``rowsum_sq`` / ``weighted_rowsum_sq``.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from ._utils import block_for, check_device, check_float, launch_opts

log = logging.getLogger(__name__)


@triton.jit
def _row_sq_kernel(
    X_ptr,  # (B, T, p) weights x_t, fp32/fp16/bf16, any strides (read only when WEIGHTED)
    G_ptr,  # (B, T, p) output gradients g_t, fp32/fp16/bf16, any strides
    part_ptr,  # (B, n_tiles) fp32 contiguous: one partial per (sample, column tile)
    T,  # rows per sample (summed)
    p,  # columns
    n_tiles,  # column tiles = cdiv(p, BLOCK_P)
    stride_xb, stride_xt, stride_xp,  # X strides (elements) over B, T, p
    stride_gb, stride_gt, stride_gp,  # G strides (elements) over B, T, p
    WEIGHTED: tl.constexpr,  # True: sum x_t ⊙ g_t; False: sum g_t (X unused)
    BLOCK_T: tl.constexpr,  # rows per step
    BLOCK_P: tl.constexpr,  # columns per program
):
    """One program = one sample b and one column tile j:

        part[b, j] = Σ_{y∈j} (Σ_t x_{t,y} g_{t,y})²   (x ≡ 1 when not WEIGHTED)

    Σ over tiles = ||Σ_t x_t ⊙ g_t||². The column sums are complete within the program (the whole T),
    so squaring them there is exact. fp32 accumulation.
    """
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BP,)
    mask_p = offs_p < p
    offs_t0 = tl.arange(0, BLOCK_T)  # (BT,)
    g_base = G_ptr + b * stride_gb
    x_base = X_ptr + b * stride_xb

    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)  # (BT, BP) partial column sums
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + offs_t0).to(tl.int64)  # (BT,)
        m = (offs_t < T)[:, None] & mask_p[None, :]  # (BT, BP)
        g = tl.load(g_base + offs_t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=m, other=0.0).to(tl.float32)  # (BT, BP)
        if WEIGHTED:
            x = tl.load(x_base + offs_t[:, None] * stride_xt + offs_p[None, :] * stride_xp,
                        mask=m, other=0.0).to(tl.float32)  # (BT, BP)
            g = g * x
        acc += g

    col = tl.sum(acc, axis=0)  # (BP,) Σ_t x_t ⊙ g_t on this tile
    tl.store(part_ptr + b * n_tiles + pid_p, tl.sum(col * col, axis=0))


def row_sq_launch(
    X: torch.Tensor | None,
    G: torch.Tensor,
    block_t: int = 32,
    block_p: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Launch ``_row_sq_kernel``; X None = unweighted. Strided inputs read in place. fp32 (B,)."""
    B, T, p = G.shape
    n_tiles = triton.cdiv(p, block_p)
    part = torch.empty(B, n_tiles, dtype=torch.float32, device=G.device)  # (B, n_tiles)
    Xk = X if X is not None else G
    grid = (n_tiles, B)
    _row_sq_kernel[grid](
        Xk, G, part,
        T, p, n_tiles,
        Xk.stride(0), Xk.stride(1), Xk.stride(2),
        G.stride(0), G.stride(1), G.stride(2),
        WEIGHTED=X is not None,
        BLOCK_T=block_t, BLOCK_P=block_p,
        **launch_opts(num_warps, num_stages),
    )
    return part.sum(dim=1)  # (B,)


def row_config(T: int, p: int) -> dict:
    """Fixed block sizes: 128 columns per program (16 minimum), 32 rows per step (16 for short T)."""
    return {"block_t": block_for(T, 16, 32), "block_p": block_for(p, 16, 128), "num_warps": 4, "num_stages": 2}


def rowsum_sq(G: torch.Tensor) -> torch.Tensor:
    """||Σ_t g_t||² per sample. G (B, T, p) fp32/fp16/bf16, any strides. Returns (B,) float32.

    fp64 G raises TypeError (use the torch path for fp64)."""
    check_float("G", G, 3)
    device = check_device(("G", G))
    B, T, p = G.shape
    if B == 0 or T == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    return row_sq_launch(None, G, **row_config(T, p))


def weighted_rowsum_sq(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """||Σ_t x_t ⊙ g_t||² per sample. X, G (B, T, p) fp32/fp16/bf16 (may differ), any strides.

    Returns (B,) float32; the product x·g is formed in fp32. fp64 inputs raise TypeError."""
    check_float("X", X, 3)
    check_float("G", G, 3)
    if X.shape != G.shape:
        raise ValueError(f"X {tuple(X.shape)} and G {tuple(G.shape)} must have the same shape")
    device = check_device(("X", X), ("G", G))
    B, T, p = G.shape
    if B == 0 or T == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    return row_sq_launch(X, G, **row_config(T, p))
