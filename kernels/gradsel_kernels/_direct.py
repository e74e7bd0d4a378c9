"""direct_sq: ||A_bᵀ G_b||²_F per sample, the direct form of a Linear weight's per-sample gradient norm,
fused: the (d, p) per-sample gradient exists only tile by tile in registers and is squared there.

Also the LoRA kernel: with one side r = 4…64 the block configuration keeps that side whole, so each
program reads its slice of the wide side once and the narrow side in full.

When the (sample, tile) programs fall short of two per SM (small batches, LoRA), the reduction over T is
split over ``n_split`` programs per tile, each writing its partial (BLOCK_D, BLOCK_P) tile to scratch; the
launcher sums the partials in a fixed order and squares the sum.

Three layers: ``_direct_sq_kernel`` (Triton), ``direct_sq_launch``, ``direct_sq`` (the entry point behind
``gradsel_kernels.direct_sq``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (block_for, check_pair, device_guard, dot_acc, dot_config, launch_opts, n_splits, sm_count,
                     split_len, warps_for)

log = logging.getLogger(__name__)


@triton.jit
def _direct_sq_kernel(
    A_ptr,  # (B, T, d) layer inputs, fp32/fp16/bf16, any strides
    G_ptr,  # (B, T, p) output gradients, fp32/fp16/bf16, any strides
    len_ptr,  # (B,) int32 rows to use per sample (read only when HAS_LEN)
    out_ptr,  # SPLIT: (B, n_tiles, n_split, BD, BP) fp32 partial tiles; else (B, n_tiles) fp32
    T,  # rows per sample (the reduction dim)
    d,  # columns of A = rows of the per-sample gradient A_bᵀG_b
    p,  # columns of G = columns of the per-sample gradient
    n_tiles_p,  # number of p tiles = cdiv(p, BLOCK_P)
    n_tiles,  # number of (d, p) tiles = cdiv(d, BLOCK_D)·n_tiles_p
    n_split,  # programs per tile (grid axis 2), each over rows_per rows
    rows_per,  # rows per split (a multiple of BLOCK_T; T when unsplit)
    stride_ab, stride_at, stride_ad,  # A strides (elements) over B, T, d
    stride_gb, stride_gt, stride_gp,  # G strides (elements) over B, T, p
    HAS_LEN: tl.constexpr,  # rows >= lengths[b] are skipped
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,  # dot config (see _utils.dot_config)
    SPLIT: tl.constexpr,  # write the partial tile (n_split > 1) instead of its squared norm
    BLOCK_D: tl.constexpr,  # rows of the gradient tile (columns of A)
    BLOCK_P: tl.constexpr,  # columns of the gradient tile (columns of G)
    BLOCK_T: tl.constexpr,  # rows of A and G per reduction step
):
    """One program = one sample b, one (BLOCK_D, BLOCK_P) tile (i, j) of the per-sample gradient and one
    split c of the rows:

        W_ij = Σ_{t∈c} a_t[i-tile] ⊗ g_t[j-tile]  (reduced over the split's rows in registers)
        unsplit: out[b, (i, j)] = ||W_ij||²_F;   SPLIT: out[b, (i, j), c] = W_ij (the launcher sums over c)

    Σ over tiles of the squared (summed) tiles = ||A_bᵀ G_b||²_F. fp32 accumulation; offsets in int64.
    """
    pid_tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    pid_d = pid_tile // n_tiles_p
    pid_p = pid_tile % n_tiles_p
    n_rows = T
    if HAS_LEN:
        n_rows = tl.minimum(tl.load(len_ptr + b), T)

    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # (BD,)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)  # (BP,)
    mask_d = offs_d < d
    mask_p = offs_p < p
    offs_t0 = tl.arange(0, BLOCK_T)  # (BT,)
    a_base = A_ptr + b * stride_ab
    g_base = G_ptr + b * stride_gb

    acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)  # (BD, BP) tile of A_bᵀG_b over the split
    r_lo = split * rows_per
    for t0 in range(r_lo, tl.minimum(n_rows, r_lo + rows_per), BLOCK_T):
        offs_t = (t0 + offs_t0).to(tl.int64)  # (BT,)
        mask_t = offs_t < n_rows
        a = tl.load(a_base + offs_t[:, None] * stride_at + offs_d[None, :] * stride_ad,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0)  # (BT, BD)
        g = tl.load(g_base + offs_t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=mask_t[:, None] & mask_p[None, :], other=0.0)  # (BT, BP)
        acc = dot_acc(tl.trans(a), g, acc, UPCAST, PRECISION)  # (BD, BP) += (BD, BT) @ (BT, BP)

    if SPLIT:
        offs_blk = (tl.arange(0, BLOCK_D)[:, None] * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]).to(tl.int64)  # (BD, BP)
        tl.store(out_ptr + ((b * n_tiles + pid_tile) * n_split + split) * (BLOCK_D * BLOCK_P) + offs_blk, acc)
    else:
        # epilogue: square and sum the tile
        val = tl.sum(tl.sum(acc * acc, axis=1), axis=0)  # scalar
        tl.store(out_ptr + b * n_tiles + pid_tile, val)


def direct_sq_launch(
    A: torch.Tensor,
    G: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    block_d: int = 64,
    block_p: int = 64,
    block_t: int = 32,
    n_split: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Launch ``_direct_sq_kernel`` on checked inputs; returns fp32 (B,). Strided inputs read in place.

    ``n_split`` > 1 splits the reduction over T (partial tiles in scratch, summed here in a fixed order,
    then squared). Runs under the inputs' CUDA device (and so on its current stream)."""
    B, T, d = A.shape
    p = G.shape[2]
    with device_guard(A.device):
        n_tiles_p = triton.cdiv(p, block_p)
        n_tiles = triton.cdiv(d, block_d) * n_tiles_p
        split = n_split > 1
        if split:
            out = torch.zeros(B, n_tiles, n_split, block_d, block_p, dtype=torch.float32, device=A.device)
            rows_per = split_len(T, block_t, n_split)
        else:
            out = torch.zeros(B, n_tiles, dtype=torch.float32, device=A.device)  # (B, n_tiles)
            rows_per = T
        upcast, precision = dot_config(A.dtype, G.dtype)
        grid = (n_tiles, B, n_split)
        _direct_sq_kernel[grid](
            A, G, lengths if lengths is not None else out, out,
            T, d, p, n_tiles_p, n_tiles, n_split, rows_per,
            A.stride(0), A.stride(1), A.stride(2),
            G.stride(0), G.stride(1), G.stride(2),
            HAS_LEN=lengths is not None,
            UPCAST=upcast, PRECISION=precision, SPLIT=split,
            BLOCK_D=block_d, BLOCK_P=block_p, BLOCK_T=block_t,
            **launch_opts(num_warps, num_stages),
        )
        if not split:
            return out.sum(dim=1)  # (B,)
        return out.sum(dim=2).pow(2).sum(dim=(1, 2, 3))  # (B,): tiles summed over splits, then squared


def direct_config(B: int, T: int, d: int, p: int, dtype: torch.dtype, sms: int) -> dict:
    """Fixed launch configuration from the shapes and the SM count (no autotuning).

    - LoRA-like (min(d, p) <= 64): the narrow side is kept whole (its power of two, >= 16) and the
      wide side gets 128 columns (64 if the narrow side is 64), so the grid is cdiv(wide, 128)·B.
    - otherwise 64×64 gradient tiles.
    BLOCK_T (the reduction step) is 64 for 2-byte dtypes (8 warps), 32 for fp32 (4 warps). When B·tiles
    programs fall short of two per SM, the reduction over T is split (``n_split``, each split >= 2 BLOCK_T
    steps).
    """
    block_t = block_for(T, 16, 32 if dtype == torch.float32 else 64)
    small = min(d, p)
    if small <= 64:
        narrow = block_for(small, 16, 64)
        wide = 128 if narrow <= 32 else 64
        block_d, block_p = (narrow, wide) if d <= p else (wide, narrow)
        block_d = min(block_d, block_for(d, 16, 128))
        block_p = min(block_p, block_for(p, 16, 128))
    else:
        block_d, block_p = 64, 64
    n_tiles = triton.cdiv(d, block_d) * triton.cdiv(p, block_p)
    n_split = n_splits(B * n_tiles, triton.cdiv(T, block_t), sms)
    # 8 warps at BLOCK_T = 64: with 4, ptxas spills the unaligned LoRA-B tiles (r = 4, 8) on sm_90
    return {"block_d": block_d, "block_p": block_p, "block_t": block_t, "n_split": n_split,
            "num_warps": warps_for(block_t), "num_stages": 3}


def direct_sq(A: torch.Tensor, G: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||A_bᵀ G_b||²_F per sample, fused: the d×p product is never stored.

    Args:
        A: (B, T, d) fp32/fp16/bf16 (any strides). G: (B, T, p) fp32/fp16/bf16 (any strides);
            A and G may differ in dtype (both are then read as fp32).
        lengths: optional (B,) ints; rows t >= lengths[b] are skipped. None = all T rows.
    Returns:
        (B,) float32. fp64 inputs raise TypeError (use the torch path for fp64).
    Cost: B·T·d·p multiply-adds; reads A once per p tile and G once per d tile.
    """
    device, lengths, dtype = check_pair(A, G, lengths)
    B, T, d = A.shape
    p = G.shape[2]
    if B == 0 or T == 0 or d == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = direct_config(B, T, d, p, dtype, sm_count(device))
    log.debug("direct_sq B=%d T=%d d=%d p=%d %s", B, T, d, p, cfg)
    return direct_sq_launch(A, G, lengths, **cfg)
