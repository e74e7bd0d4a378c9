"""ghost_sq: Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A_b A_bᵀ, G_b G_bᵀ⟩_F per sample, the Gram ("ghost") form of
||G_bᵀ A_b||²_F, fused and tiled over (t, s) blocks of the T×T Gram.

Three layers: ``_ghost_sq_kernel`` (Triton), ``ghost_sq_launch`` (grid, strides, block sizes, the split
reduction), ``ghost_sq`` (checks, the entry point behind ``gradsel_kernels.ghost_sq``).

Short sequences give few (sample, block pair) programs; then the column loops are split across
``n_split`` programs, each writing its partial (BLOCK_T, BLOCK_T) Gram blocks of A and G to scratch, and a
second, fixed-order reduction sums the partials per block before the products are formed.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (block_for, check_pair, device_guard, dot_acc, dot_config, launch_opts, n_splits, sm_count,
                     split_len, upper_pairs, warps_for)

log = logging.getLogger(__name__)


@triton.jit
def _ghost_sq_kernel(
    A_ptr,  # (B, T, d) layer inputs, fp32/fp16/bf16, any strides
    G_ptr,  # (B, T, p) output gradients, fp32/fp16/bf16, any strides
    pairs_ptr,  # (n_pairs, 2) int32 contiguous: (t_block, s_block) with s_block >= t_block
    len_ptr,  # (B,) int32 rows to use per sample (read only when HAS_LEN)
    out_ptr,  # SPLIT: (B, n_pairs, n_split, 2, BT, BT) fp32 Gram partials; else (B, n_pairs) fp32; zeroed
    T,  # rows per sample
    d,  # columns of A
    p,  # columns of G
    n_pairs,  # number of (t_block, s_block) pairs = n_blocks·(n_blocks+1)/2
    n_split,  # programs per block pair (grid axis 2)
    cols_a,  # columns of A per split (a multiple of BLOCK_K; d when unsplit)
    cols_g,  # columns of G per split (a multiple of BLOCK_K; p when unsplit)
    stride_ab, stride_at, stride_ad,  # A strides (elements) over B, T, d
    stride_gb, stride_gt, stride_gp,  # G strides (elements) over B, T, p
    HAS_LEN: tl.constexpr,  # rows >= lengths[b] are skipped (treated as zero)
    UPCAST_A: tl.constexpr, PREC_A: tl.constexpr,  # dot config of the A Gram (see _utils.dot_config)
    UPCAST_G: tl.constexpr, PREC_G: tl.constexpr,  # dot config of the G Gram
    SPLIT: tl.constexpr,  # write the partial Gram blocks (n_split > 1) instead of the block's value
    BLOCK_T: tl.constexpr,  # rows per Gram block (both t and s)
    BLOCK_K: tl.constexpr,  # columns of A / G per step of the inner-product loops
):
    """One program = one sample b, one upper-triangular block pair (I, J), J >= I, of the T×T Gram, and
    one split c of the columns. Unsplit (one split holding every column):

        out[b, (I, J)] = w_IJ · Σ_{t∈I, s∈J} (a_t·a_s)(g_t·g_s),   w_IJ = 1 if I == J else 2

    Σ over all pairs = Σ_{t,s} (a_t·a_s)(g_t·g_s) by the symmetry of both Grams. SPLIT: the program
    writes its two partial Gram blocks (Σ over its columns of a_t·a_s and of g_t·g_s) instead; the
    launcher sums them over c and then forms the products. The Gram blocks live in registers; no T×T
    buffer is written. fp32 accumulation; offsets in int64.
    """
    pid_pair = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tb = tl.load(pairs_ptr + 2 * pid_pair)
    sb = tl.load(pairs_ptr + 2 * pid_pair + 1)
    n_rows = T
    if HAS_LEN:
        n_rows = tl.minimum(tl.load(len_ptr + b), T)
    t0 = tb * BLOCK_T
    s0 = sb * BLOCK_T
    if s0 >= n_rows:  # s0 >= t0: the whole (I, J) block is padding (out stays zero)
        return

    offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BT,) rows of block I
    offs_s = (s0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BT,) rows of block J
    mask_t = offs_t < n_rows
    mask_s = offs_s < n_rows
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # (BK,)

    # A Gram block over this split's columns: (a_t·a_s) for t∈I, s∈J
    a_base = A_ptr + b * stride_ab
    gram_a = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # (BT, BT)
    ka = split * cols_a
    for k0 in range(ka, tl.minimum(d, ka + cols_a), BLOCK_K):
        kk = k0 + offs_k  # (BK,) int64
        mk = kk < d
        a_t = tl.load(a_base + offs_t[:, None] * stride_at + kk[None, :] * stride_ad,
                      mask=mask_t[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        a_s = tl.load(a_base + offs_s[:, None] * stride_at + kk[None, :] * stride_ad,
                      mask=mask_s[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        gram_a = dot_acc(a_t, tl.trans(a_s), gram_a, UPCAST_A, PREC_A)  # (BT, BT)

    # G Gram block over this split's columns: (g_t·g_s) for t∈I, s∈J
    g_base = G_ptr + b * stride_gb
    gram_g = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # (BT, BT)
    kg = split * cols_g
    for k0 in range(kg, tl.minimum(p, kg + cols_g), BLOCK_K):
        kk = k0 + offs_k  # (BK,) int64
        mk = kk < p
        g_t = tl.load(g_base + offs_t[:, None] * stride_gt + kk[None, :] * stride_gp,
                      mask=mask_t[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        g_s = tl.load(g_base + offs_s[:, None] * stride_gt + kk[None, :] * stride_gp,
                      mask=mask_s[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        gram_g = dot_acc(g_t, tl.trans(g_s), gram_g, UPCAST_G, PREC_G)  # (BT, BT)

    if SPLIT:
        # partial Gram blocks to scratch: out[b, pair, split, 0 | 1] (BT, BT) each
        offs_blk = (tl.arange(0, BLOCK_T)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]).to(tl.int64)  # (BT, BT)
        base = out_ptr + ((b * n_pairs + pid_pair) * n_split + split) * (2 * BLOCK_T * BLOCK_T)
        tl.store(base + offs_blk, gram_a)
        tl.store(base + BLOCK_T * BLOCK_T + offs_blk, gram_g)
    else:
        # epilogue: <Gram_A, Gram_G> over the block, doubled off the diagonal
        val = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)  # scalar
        w = tl.where(tb == sb, 1.0, 2.0)
        tl.store(out_ptr + b * n_pairs + pid_pair, val * w)


def ghost_sq_launch(
    A: torch.Tensor,
    G: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    block_t: int = 64,
    block_k: int = 64,
    n_split: int = 1,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Launch ``_ghost_sq_kernel`` on checked inputs; returns fp32 (B,). ``lengths``: int32 (B,) or None.

    Strided inputs are read in place (strides are passed), no copy. ``n_split`` > 1 splits the column
    loops over that many programs per block pair (partial Grams in scratch, reduced here in a fixed
    order). Runs under the inputs' CUDA device (and so on its current stream)."""
    B, T, d = A.shape
    p = G.shape[2]
    with device_guard(A.device):
        n_blocks = triton.cdiv(T, block_t)
        pairs = upper_pairs(n_blocks, A.device)  # (n_pairs, 2)
        n_pairs = pairs.shape[0]
        split = n_split > 1
        if split:
            out = torch.zeros(B, n_pairs, n_split, 2, block_t, block_t, dtype=torch.float32, device=A.device)
            cols_a, cols_g = split_len(d, block_k, n_split), split_len(p, block_k, n_split)
        else:
            out = torch.zeros(B, n_pairs, dtype=torch.float32, device=A.device)  # (B, n_pairs)
            cols_a, cols_g = d, p
        up_a, prec_a = dot_config(A.dtype)
        up_g, prec_g = dot_config(G.dtype)
        grid = (n_pairs, B, n_split)
        _ghost_sq_kernel[grid](
            A, G, pairs, lengths if lengths is not None else pairs, out,
            T, d, p, n_pairs, n_split, cols_a, cols_g,
            A.stride(0), A.stride(1), A.stride(2),
            G.stride(0), G.stride(1), G.stride(2),
            HAS_LEN=lengths is not None,
            UPCAST_A=up_a, PREC_A=prec_a, UPCAST_G=up_g, PREC_G=prec_g,
            SPLIT=split, BLOCK_T=block_t, BLOCK_K=block_k,
            **launch_opts(num_warps, num_stages),
        )
        if not split:
            return out.sum(dim=1)  # (B,)
        gram = out.sum(dim=2)  # (B, n_pairs, 2, BT, BT): the splits' partials, summed in a fixed order
        val = (gram[:, :, 0] * gram[:, :, 1]).sum(dim=(2, 3))  # (B, n_pairs)
        w = torch.where(pairs[:, 0] == pairs[:, 1], 1.0, 2.0).to(val)  # (n_pairs,)
        return (val * w).sum(dim=1)  # (B,)


def ghost_config(B: int, T: int, d: int, p: int, dtype: torch.dtype, sms: int) -> dict:
    """Fixed launch configuration from the shapes and the SM count (no autotuning, so it also runs
    interpreted).

    BLOCK_T = 64 (two (64, 64) fp32 Gram blocks in registers, 8 warps), down to 16 for short sequences;
    BLOCK_K = 64 for 2-byte dtypes, 32 for fp32 (the same tile bytes). When B·n_pairs programs fall
    short of two per SM, the column loops are split (``n_split``, each split >= 2 BLOCK_K steps)."""
    block_t = block_for(T, 16, 64)
    block_k = block_for(max(d, p), 16, 64 if dtype != torch.float32 else 32)
    nb = triton.cdiv(T, block_t)
    n_split = n_splits(B * nb * (nb + 1) // 2, triton.cdiv(max(d, p), block_k), sms)
    return {"block_t": block_t, "block_k": block_k, "n_split": n_split, "num_warps": warps_for(block_t),
            "num_stages": 2}


def ghost_sq(A: torch.Tensor, G: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) per sample = ||A_bᵀ G_b||²_F, without forming d×p or T×T.

    Args:
        A: (B, T, d) fp32/fp16/bf16 layer inputs (any strides).
        G: (B, T, p) fp32/fp16/bf16 output gradients (any strides).
        lengths: optional (B,) ints; rows t >= lengths[b] are skipped (padding). None = all T rows.
    Returns:
        (B,) float32. fp64 inputs raise TypeError (use the torch path for fp64).
    Cost: B·T²·(d+p)/2 multiply-adds (symmetry halves it), B·n_pairs fp32 partials of memory (split:
    B·n_pairs·n_split·2·BLOCK_T² fp32, bounded by about 2·SMs·2·BLOCK_T²).
    """
    device, lengths, dtype = check_pair(A, G, lengths)
    B, T, d = A.shape
    p = G.shape[2]
    if B == 0 or T == 0 or d == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = ghost_config(B, T, d, p, dtype, sm_count(device))
    log.debug("ghost_sq B=%d T=%d d=%d p=%d %s", B, T, d, p, cfg)
    return ghost_sq_launch(A, G, lengths, **cfg)
