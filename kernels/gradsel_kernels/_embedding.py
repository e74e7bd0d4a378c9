"""embedding_sq: Σ_{t,s} [x_t = x_s ≠ pad] (g_t·g_s) = Σ_v ||Σ_{t: x_t = v} g_t||² per sample, the squared
norm of an Embedding's per-sample gradient Σ_t e_{x_t} g_tᵀ, without a V×d or T×T buffer.

Method: sort each sample's ids (torch.sort; the kernel gathers G rows through the permutation), then
run the block-Gram of ``ghost_sq`` over upper-triangular (t, s) block pairs with the id-equality mask
in place of the A Gram. After sorting, equal ids are contiguous, so a block pair (I, J), J > I, can
hold a match only if max id of I == min id of J: every other off-diagonal pair exits after two scalar
loads. Typical cost ≈ B·T·BLOCK_T·d (diagonal and touching pairs), worst case (one long run of
one id) B·T²·d/2.

The result is linear in the G Gram, so when there are few (sample, block pair) programs the column loop
is split over ``n_split`` programs that each write one scalar partial; the launcher sums them.

Three layers: ``_embedding_sq_kernel`` (Triton), ``embedding_sq_launch``, ``embedding_sq`` (the entry point
behind ``gradsel_kernels.embedding_sq``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (block_for, check_device, check_float, device_guard, dot_acc, dot_config, launch_opts, n_splits,
                     sm_count, split_len, upper_pairs, warps_for)

log = logging.getLogger(__name__)


@triton.jit
def _embedding_sq_kernel(
    ids_ptr,  # (B, T) int64 contiguous: each sample's ids sorted ascending
    perm_ptr,  # (B, T) int64 contiguous: perm[b, i] = row of G holding sorted id i
    G_ptr,  # (B, T, d) output gradients of the embedding, fp32/fp16/bf16, any strides
    pairs_ptr,  # (n_pairs, 2) int32 contiguous: (t_block, s_block) with s_block >= t_block
    part_ptr,  # (B, n_pairs, n_split) fp32 contiguous, zeroed: one partial per (sample, block pair, split)
    T,  # ids per sample
    d,  # embedding dim (columns of G)
    n_pairs,  # number of block pairs
    n_split,  # programs per block pair (grid axis 2), each over cols columns of G
    cols,  # columns of G per split (a multiple of BLOCK_K; d when unsplit)
    pad_id,  # padding id (used only when HAS_PAD)
    stride_gb, stride_gt, stride_gd,  # G strides (elements) over B, T, d
    HAS_PAD: tl.constexpr,  # positions whose id == pad_id contribute nothing
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,  # dot config (see _utils.dot_config)
    BLOCK_T: tl.constexpr,  # sorted positions per block
    BLOCK_K: tl.constexpr,  # columns of G per inner-product step
):
    """One program = one sample b, one block pair (I, J), J >= I, of sorted positions and one split c of
    the columns (k ∈ c):

        part[b, (I, J), c] = w_IJ · Σ_{i∈I, j∈J} [y_i = y_j ≠ pad] Σ_{k∈c} g_{π(i),k} g_{π(j),k}
        w_IJ = 1 if I == J else 2

    with y the sorted ids and π the sorting permutation. Sum over pairs and splits =
    Σ_{t,s}[x_t = x_s ≠ pad](g_t·g_s). Offsets in int64.
    """
    pid_pair = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tb = tl.load(pairs_ptr + 2 * pid_pair)
    sb = tl.load(pairs_ptr + 2 * pid_pair + 1)
    t0 = tb * BLOCK_T
    s0 = sb * BLOCK_T
    ids_base = ids_ptr + b * T
    perm_base = perm_ptr + b * T
    # sorted ids: pair (I, J), J > I, can match only where the runs touch
    hi_t = tl.load(ids_base + tl.minimum(t0 + BLOCK_T, T) - 1)  # max id of block I
    lo_s = tl.load(ids_base + s0)  # min id of block J
    if (hi_t != lo_s) & (tb != sb):
        return

    offs_t = t0 + tl.arange(0, BLOCK_T)  # (BT,) sorted positions of block I
    offs_s = s0 + tl.arange(0, BLOCK_T)  # (BT,)
    mask_t = offs_t < T
    mask_s = offs_s < T
    id_t = tl.load(ids_base + offs_t, mask=mask_t, other=0)  # (BT,)
    id_s = tl.load(ids_base + offs_s, mask=mask_s, other=0)  # (BT,)
    row_t = tl.load(perm_base + offs_t, mask=mask_t, other=0)  # (BT,) rows of G
    row_s = tl.load(perm_base + offs_s, mask=mask_s, other=0)  # (BT,)
    match = (id_t[:, None] == id_s[None, :]) & mask_t[:, None] & mask_s[None, :]  # (BT, BT)
    if HAS_PAD:
        match = match & (id_t[:, None] != pad_id)

    g_base = G_ptr + b * stride_gb
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # (BK,)
    gram = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # (BT, BT): g_{π(i)}·g_{π(j)} over the split
    k_lo = split * cols
    for k0 in range(k_lo, tl.minimum(d, k_lo + cols), BLOCK_K):
        kk = k0 + offs_k  # (BK,) int64
        mk = kk < d
        g_t = tl.load(g_base + row_t[:, None] * stride_gt + kk[None, :] * stride_gd,
                      mask=mask_t[:, None] & mk[None, :], other=0.0)  # (BT, BK) gathered rows
        g_s = tl.load(g_base + row_s[:, None] * stride_gt + kk[None, :] * stride_gd,
                      mask=mask_s[:, None] & mk[None, :], other=0.0)  # (BT, BK)
        gram = dot_acc(g_t, tl.trans(g_s), gram, UPCAST, PRECISION)  # (BT, BT)

    val = tl.sum(tl.sum(tl.where(match, gram, 0.0), axis=1), axis=0)  # scalar
    w = tl.where(tb == sb, 1.0, 2.0)
    tl.store(part_ptr + (b * n_pairs + pid_pair) * n_split + split, val * w)


def embedding_sq_launch(
    ids: torch.Tensor,
    G: torch.Tensor,
    padding_idx: Optional[int] = None,
    block_t: int = 64,
    block_k: int = 64,
    n_split: int = 1,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Sort ids per sample and launch ``_embedding_sq_kernel``; ids (B, T) ints, G (B, T, d). fp32 (B,).

    ``n_split`` > 1 splits the column loop over that many programs per block pair. Runs under G's CUDA
    device (and so on its current stream)."""
    B, T, d = G.shape
    with device_guard(G.device):
        sorted_ids, perm = torch.sort(ids.long(), dim=1)  # (B, T), (B, T) int64 contiguous
        n_blocks = triton.cdiv(T, block_t)
        pairs = upper_pairs(n_blocks, G.device)  # (n_pairs, 2)
        n_pairs = pairs.shape[0]
        part = torch.zeros(B, n_pairs, n_split, dtype=torch.float32, device=G.device)  # (B, n_pairs, n_split)
        upcast, precision = dot_config(G.dtype)
        grid = (n_pairs, B, n_split)
        _embedding_sq_kernel[grid](
            sorted_ids, perm, G, pairs, part,
            T, d, n_pairs, n_split, split_len(d, block_k, n_split) if n_split > 1 else d,
            int(padding_idx) if padding_idx is not None else 0,
            G.stride(0), G.stride(1), G.stride(2),
            HAS_PAD=padding_idx is not None,
            UPCAST=upcast, PRECISION=precision,
            BLOCK_T=block_t, BLOCK_K=block_k,
            **launch_opts(num_warps, num_stages),
        )
        return part.sum(dim=(1, 2))  # (B,) fixed order


def embedding_config(B: int, T: int, d: int, dtype: torch.dtype, sms: int) -> dict:
    """Fixed launch configuration: BLOCK_T = 64 (16 minimum; 8 warps at 64), BLOCK_K = 64 for 2-byte
    dtypes, 32 for fp32; the column loop split over ``n_split`` programs when B·n_pairs programs fall
    short of two per SM."""
    block_t = block_for(T, 16, 64)
    block_k = block_for(d, 16, 64 if dtype != torch.float32 else 32)
    nb = triton.cdiv(T, block_t)
    return {
        "block_t": block_t,
        "block_k": block_k,
        "n_split": n_splits(B * nb * (nb + 1) // 2, triton.cdiv(d, block_k), sms),
        "num_warps": warps_for(block_t),
        # 3 stages: with 2, triton 3.6's ptxas spills 16 B on fp32 with unaligned rows (sm_90)
        "num_stages": 3,
    }


def embedding_sq(ids: torch.Tensor, G: torch.Tensor, padding_idx: Optional[int] = None) -> torch.Tensor:
    """Σ_{t,s} [x_t = x_s ≠ pad] (g_t·g_s) per sample.

    Args:
        ids: (B, T) integer token ids (or (1, T), broadcast over B, e.g. HF position_ids).
        G: (B, T, d) fp32/fp16/bf16 gradients w.r.t. the embedding output (any strides).
        padding_idx: positions with this id get no gradient (nn.Embedding's padding_idx); None = none.
            Pass the module's stored ``padding_idx`` (nn.Embedding keeps it non-negative).
    Returns:
        (B,) float32. fp64 G raises TypeError (use the torch path for fp64).
    """
    check_float("G", G, 3)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"ids must be a 2-D (B, T) tensor, got {getattr(ids, 'shape', type(ids))}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    B, T, d = G.shape
    if ids.shape != (B, T):
        if ids.shape == (1, T):
            ids = ids.expand(B, T)
        else:
            raise ValueError(f"ids {tuple(ids.shape)} must be (B, T) = ({B}, {T}) or (1, T)")
    device = check_device(("G", G), ("ids", ids))
    if B == 0 or T == 0 or d == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = embedding_config(B, T, d, G.dtype, sm_count(device))
    log.debug("embedding_sq B=%d T=%d d=%d pad=%s %s", B, T, d, padding_idx, cfg)
    return embedding_sq_launch(ids, G, padding_idx, **cfg)
