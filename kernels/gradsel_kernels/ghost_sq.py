"""ghost_sq: Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A_b A_bᵀ, G_b G_bᵀ⟩_F per sample, the Gram ("ghost") form of
||G_bᵀ A_b||²_F, fused and tiled over (t, s) blocks of the T×T Gram.

Three layers: ``_ghost_sq_kernel`` (Triton), ``ghost_sq_launch`` (grid, strides, block sizes),
``ghost_sq`` (checks, the public entry point used by ``gradsel_core.dispatch``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import block_for, check_pair, dot_acc, dot_config, launch_opts, upper_pairs

log = logging.getLogger(__name__)


@triton.jit
def _ghost_sq_kernel(
    A_ptr,  # (B, T, d) layer inputs, fp32/fp16/bf16, any strides
    G_ptr,  # (B, T, p) output gradients, fp32/fp16/bf16, any strides
    pairs_ptr,  # (n_pairs, 2) int32 contiguous: (t_block, s_block) with s_block >= t_block
    len_ptr,  # (B,) int32 rows to use per sample (read only when HAS_LEN)
    part_ptr,  # (B, n_pairs) fp32 contiguous, zero-initialised: one partial per (sample, block pair)
    T,  # rows per sample
    d,  # columns of A
    p,  # columns of G
    n_pairs,  # number of (t_block, s_block) pairs = n_blocks·(n_blocks+1)/2
    stride_ab, stride_at, stride_ad,  # A strides (elements) over B, T, d
    stride_gb, stride_gt, stride_gp,  # G strides (elements) over B, T, p
    HAS_LEN: tl.constexpr,  # rows >= lengths[b] are skipped (treated as zero)
    UPCAST_A: tl.constexpr, PREC_A: tl.constexpr,  # dot config of the A Gram (see _utils.dot_config)
    UPCAST_G: tl.constexpr, PREC_G: tl.constexpr,  # dot config of the G Gram
    BLOCK_T: tl.constexpr,  # rows per Gram block (both t and s)
    BLOCK_K: tl.constexpr,  # columns of A / G per step of the inner-product loops
):
    """One program = one sample b and one upper-triangular block pair (I, J), J >= I, of the T×T Gram:

        part[b, (I, J)] = w_IJ · Σ_{t∈I, s∈J} (a_t·a_s)(g_t·g_s),   w_IJ = 1 if I == J else 2

    Σ over all pairs = Σ_{t,s} (a_t·a_s)(g_t·g_s) by the symmetry of both Grams. The (BLOCK_T, BLOCK_T)
    Gram blocks live in registers only; no T×T buffer is written. fp32 accumulation throughout.
    """
    pid_pair = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tb = tl.load(pairs_ptr + 2 * pid_pair)
    sb = tl.load(pairs_ptr + 2 * pid_pair + 1)
    n_rows = T
    if HAS_LEN:
        n_rows = tl.minimum(tl.load(len_ptr + b), T)
    t0 = tb * BLOCK_T
    s0 = sb * BLOCK_T
    if s0 >= n_rows:  # s0 >= t0: the whole (I, J) block is padding
        return

    offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BT,) rows of block I
    offs_s = (s0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BT,) rows of block J
    mask_t = offs_t < n_rows
    mask_s = offs_s < n_rows
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)

    # A Gram block: (a_t·a_s) for t∈I, s∈J
    a_base = A_ptr + b * stride_ab
    gram_a = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # (BT, BT)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k  # (BK,)
        mk = kk < d
        a_t = tl.load(a_base + offs_t[:, None] * stride_at + kk[None, :] * stride_ad,
                      mask=mask_t[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        a_s = tl.load(a_base + offs_s[:, None] * stride_at + kk[None, :] * stride_ad,
                      mask=mask_s[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        gram_a = dot_acc(a_t, tl.trans(a_s), gram_a, UPCAST_A, PREC_A)  # (BT, BT)

    # G Gram block: (g_t·g_s) for t∈I, s∈J
    g_base = G_ptr + b * stride_gb
    gram_g = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # (BT, BT)
    for k0 in range(0, p, BLOCK_K):
        kk = k0 + offs_k  # (BK,)
        mk = kk < p
        g_t = tl.load(g_base + offs_t[:, None] * stride_gt + kk[None, :] * stride_gp,
                      mask=mask_t[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        g_s = tl.load(g_base + offs_s[:, None] * stride_gt + kk[None, :] * stride_gp,
                      mask=mask_s[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        gram_g = dot_acc(g_t, tl.trans(g_s), gram_g, UPCAST_G, PREC_G)  # (BT, BT)

    # epilogue: <Gram_A, Gram_G> over the block, doubled off the diagonal
    val = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)  # scalar
    w = tl.where(tb == sb, 1.0, 2.0)
    tl.store(part_ptr + b * n_pairs + pid_pair, val * w)


def ghost_sq_launch(
    A: torch.Tensor,
    G: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    block_t: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Launch ``_ghost_sq_kernel`` on checked inputs; returns fp32 (B,). ``lengths``: int32 (B,) or None.

    Strided inputs are read in place (strides are passed), no copy."""
    B, T, d = A.shape
    p = G.shape[2]
    n_blocks = triton.cdiv(T, block_t)
    pairs = upper_pairs(n_blocks, A.device)  # (n_pairs, 2)
    n_pairs = pairs.shape[0]
    part = torch.zeros(B, n_pairs, dtype=torch.float32, device=A.device)  # (B, n_pairs)
    up_a, prec_a = dot_config(A.dtype)
    up_g, prec_g = dot_config(G.dtype)
    grid = (n_pairs, B)
    _ghost_sq_kernel[grid](
        A, G, pairs, lengths if lengths is not None else part, part,
        T, d, p, n_pairs,
        A.stride(0), A.stride(1), A.stride(2),
        G.stride(0), G.stride(1), G.stride(2),
        HAS_LEN=lengths is not None,
        UPCAST_A=up_a, PREC_A=prec_a, UPCAST_G=up_g, PREC_G=prec_g,
        BLOCK_T=block_t, BLOCK_K=block_k,
        **launch_opts(num_warps, num_stages),
    )
    return part.sum(dim=1)  # (B,)


def ghost_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """Fixed block sizes from the shapes (one config; no autotuning, so it also runs interpreted).

    BLOCK_T = 64 (two (64, 64) fp32 Gram blocks in registers), down to 16 for short sequences;
    BLOCK_K = 64 for 2-byte dtypes, 32 for fp32 (the same tile bytes)."""
    block_t = block_for(T, 16, 64)
    block_k = block_for(max(d, p), 16, 64 if dtype != torch.float32 else 32)
    return {"block_t": block_t, "block_k": block_k, "num_warps": 4, "num_stages": 2}


def ghost_sq(A: torch.Tensor, G: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) per sample = ||A_bᵀ G_b||²_F, without forming d×p or T×T.

    Args:
        A: (B, T, d) fp32/fp16/bf16 layer inputs (any strides).
        G: (B, T, p) fp32/fp16/bf16 output gradients (any strides).
        lengths: optional (B,) ints; rows t >= lengths[b] are skipped (padding). None = all T rows.
    Returns:
        (B,) float32. fp64 inputs raise TypeError (use the torch path for fp64).
    Cost: B·T²·(d+p)/2 multiply-adds (symmetry halves it), B·n_pairs fp32 partials of memory.
    """
    device, lengths, dtype = check_pair(A, G, lengths)
    B, T, d = A.shape
    p = G.shape[2]
    if B == 0 or T == 0 or d == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = ghost_config(T, d, p, dtype)
    log.debug("ghost_sq B=%d T=%d d=%d p=%d %s", B, T, d, p, cfg)
    return ghost_sq_launch(A, G, lengths, **cfg)
