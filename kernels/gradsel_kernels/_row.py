"""rowsum_sq: ||Σ_t g_t||² per sample (Linear bias, LayerNorm β) and weighted_rowsum_sq: ||Σ_t x_t ⊙ g_t||²
per sample (LayerNorm γ, RMSNorm w with X = x̂). Memory-bound: each element of G (and X) is read once.

With few (sample, column tile) programs (small batches) the sum over T is split over ``n_split`` programs
per tile, each writing its partial column sums to scratch; the launcher sums them in a fixed order and
squares.

Three layers: ``_row_sq_kernel`` (Triton, both ops via the WEIGHTED flag), ``row_sq_launch``, and the
entry points ``rowsum_sq`` / ``weighted_rowsum_sq`` behind ``gradsel_kernels``.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from ._utils import block_for, check_device, check_float, device_guard, launch_opts, n_splits, sm_count, split_len

log = logging.getLogger(__name__)


@triton.jit
def _row_sq_kernel(
    X_ptr,  # (B, T, p) weights x_t, fp32/fp16/bf16, any strides (read only when WEIGHTED)
    G_ptr,  # (B, T, p) output gradients g_t, fp32/fp16/bf16, any strides
    out_ptr,  # SPLIT: (B, n_tiles, n_split, BLOCK_P) fp32 partial column sums; else (B, n_tiles) fp32
    T,  # rows per sample (summed)
    p,  # columns
    n_tiles,  # column tiles = cdiv(p, BLOCK_P)
    n_split,  # programs per column tile (grid axis 2), each over rows_per rows
    rows_per,  # rows per split (a multiple of BLOCK_T; T when unsplit)
    stride_xb, stride_xt, stride_xp,  # X strides (elements) over B, T, p
    stride_gb, stride_gt, stride_gp,  # G strides (elements) over B, T, p
    WEIGHTED: tl.constexpr,  # True: sum x_t ⊙ g_t; False: sum g_t (X unused)
    SPLIT: tl.constexpr,  # write the partial column sums (n_split > 1) instead of their squared norm
    BLOCK_T: tl.constexpr,  # rows per step
    BLOCK_P: tl.constexpr,  # columns per program
):
    """One program = one sample b, one column tile j and one split c of the rows:

        col[y] = Σ_{t∈c} x_{t,y} g_{t,y}   (x ≡ 1 when not WEIGHTED), y ∈ j
        unsplit: out[b, j] = Σ_y col[y]²;   SPLIT: out[b, j, c, :] = col (the launcher sums over c, squares)

    Σ over tiles = ||Σ_t x_t ⊙ g_t||². Unsplit, the column sums are complete within the program (the
    whole T), so squaring them there is exact. fp32 accumulation; offsets in int64.
    """
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)  # (BP,)
    mask_p = offs_p < p
    offs_t0 = tl.arange(0, BLOCK_T)  # (BT,)
    g_base = G_ptr + b * stride_gb
    x_base = X_ptr + b * stride_xb

    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)  # (BT, BP) partial column sums
    r_lo = split * rows_per
    for t0 in range(r_lo, tl.minimum(T, r_lo + rows_per), BLOCK_T):
        offs_t = (t0 + offs_t0).to(tl.int64)  # (BT,)
        m = (offs_t < T)[:, None] & mask_p[None, :]  # (BT, BP)
        g = tl.load(g_base + offs_t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=m, other=0.0).to(tl.float32)  # (BT, BP)
        if WEIGHTED:
            x = tl.load(x_base + offs_t[:, None] * stride_xt + offs_p[None, :] * stride_xp,
                        mask=m, other=0.0).to(tl.float32)  # (BT, BP)
            g = g * x
        acc += g

    col = tl.sum(acc, axis=0)  # (BP,) Σ_t x_t ⊙ g_t on this tile (over the split's rows)
    if SPLIT:
        tl.store(out_ptr + ((b * n_tiles + pid_p) * n_split + split) * BLOCK_P + tl.arange(0, BLOCK_P), col)
    else:
        tl.store(out_ptr + b * n_tiles + pid_p, tl.sum(col * col, axis=0))


def row_sq_launch(
    X: torch.Tensor | None,
    G: torch.Tensor,
    block_t: int = 32,
    block_p: int = 128,
    n_split: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Launch ``_row_sq_kernel``; X None = unweighted. Strided inputs read in place. fp32 (B,).

    ``n_split`` > 1 splits the sum over T (partial column sums in scratch, summed here in a fixed order,
    then squared). Runs under G's CUDA device (and so on its current stream)."""
    B, T, p = G.shape
    with device_guard(G.device):
        n_tiles = triton.cdiv(p, block_p)
        split = n_split > 1
        if split:
            out = torch.empty(B, n_tiles, n_split, block_p, dtype=torch.float32, device=G.device)
            rows_per = split_len(T, block_t, n_split)
        else:
            out = torch.empty(B, n_tiles, dtype=torch.float32, device=G.device)  # (B, n_tiles)
            rows_per = T
        Xk = X if X is not None else G
        grid = (n_tiles, B, n_split)
        _row_sq_kernel[grid](
            Xk, G, out,
            T, p, n_tiles, n_split, rows_per,
            Xk.stride(0), Xk.stride(1), Xk.stride(2),
            G.stride(0), G.stride(1), G.stride(2),
            WEIGHTED=X is not None, SPLIT=split,
            BLOCK_T=block_t, BLOCK_P=block_p,
            **launch_opts(num_warps, num_stages),
        )
        if not split:
            return out.sum(dim=1)  # (B,)
        return out.sum(dim=2).pow(2).sum(dim=(1, 2))  # (B,): splits summed, then squared


def row_config(B: int, T: int, p: int, sms: int) -> dict:
    """Fixed launch configuration: 128 columns per program (16 minimum), 32 rows per step (16 for short T);
    the sum over T split over ``n_split`` programs when B·tiles programs fall short of two per SM."""
    block_t, block_p = block_for(T, 16, 32), block_for(p, 16, 128)
    n_split = n_splits(B * triton.cdiv(p, block_p), triton.cdiv(T, block_t), sms)
    return {"block_t": block_t, "block_p": block_p, "n_split": n_split, "num_warps": 4, "num_stages": 2}


def rowsum_sq(G: torch.Tensor) -> torch.Tensor:
    """||Σ_t g_t||² per sample. G (B, T, p) fp32/fp16/bf16, any strides. Returns (B,) float32.

    fp64 G raises TypeError (use the torch path for fp64)."""
    check_float("G", G, 3)
    device = check_device(("G", G))
    B, T, p = G.shape
    if B == 0 or T == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    return row_sq_launch(None, G, **row_config(B, T, p, sm_count(device)))


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
    return row_sq_launch(X, G, **row_config(B, T, p, sm_count(device)))
