"""head_lse / head_grad: the fused LM head's chunk loop (gradsel_core/ghost/head.py) on CUDA, never holding
the (B, T', V) logits or their gradient.

For the head input at the predicting positions A (B, T', d), the head weight W (V, d), an optional bias
(V,), targets (B, T') (-100 = not counted) and per-token coefficients c (B, T') (d(Σ_b L_b)/d(token loss)):

    z_{bt,v} = post(round(a_bt · w_v + bias_v))                       logits of vocabulary column v
    lse_bt   = log Σ_v exp(z_{bt,v})                                  online over vocabulary blocks
    tok_bt   = c_bt · (lse_bt − z_{bt,target}) if target ≠ -100 else 0
    G_{bt,v} = c_bt · post'(·) · (exp(z_{bt,v} − lse_bt) − [v = target_bt])
    grad_bt  = Σ_v G_{bt,v} w_v                                       the gradient at the head's input

``round`` rounds the logits to the model's dtype (A's dtype), as the model's own head (and the torch chunk
loop, ``HeadCore.logits``) computes them; post is the identity or a logit scale (z = s·y, post' = s).
Final-logit soft-capping is not done here: the caller keeps the torch path for it.

Two kernels, one per pass of the torch chunk loop:

* ``_head_lse_kernel``: one program = one block of BLOCK_R rows (flattened (b, t)); it loops over the
  vocabulary in blocks of BLOCK_V, forming each (BLOCK_R, BLOCK_V) logit tile from BLOCK_K-column steps
  over d, and carries the running max, the running sum of exp and the target's logit per row.
* ``_head_grad_kernel``: one program = one block of rows and one block of BLOCK_D columns of d; it
  recomputes the logit tile of every vocabulary block (the whole d loop), forms G's tile from the stored
  lse, and accumulates G_tile @ W[v block, d block] in fp32 registers. The logits are recomputed once per
  d block (cost: ⌈d/BLOCK_D⌉·N·V·d multiply-adds for the logits, N·V·d for grad; BLOCK_D: see
  ``head_config``), the price of never writing G.

Layers: the two kernels, ``head_lse_launch`` / ``head_grad_launch`` (grid, strides, blocks), and
``head_lse`` / ``head_grad`` (checks, the entry points behind ``gradsel_kernels``). Accumulation in fp32,
offsets in int64; fp64 inputs raise TypeError (the torch path does fp64).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import block_for, check_device, check_float, device_guard, dot_acc, dot_config, launch_opts

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the token cross-entropy's ignored label (gradsel_core.batching.IGNORE_INDEX)
_IGNORE = tl.constexpr(IGNORE_INDEX)  # the same, readable inside @triton.jit


@triton.jit
def _logit_tile(
    a_ptrs_row,  # (BR, 1) pointers to each row's first element of A (row offsets already applied)
    W_ptr, bias_ptr,
    offs_v,  # (BV,) int64 vocabulary columns of this tile
    mask_r,  # (BR,) rows in range
    mask_v,  # (BV,) columns in range
    d, stride_ad, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, POST_SCALE: tl.constexpr, value,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """z (BR, BV) fp32: post(round(A_rows W_vᵀ + bias_v)); columns outside V are -inf."""
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # (BK,)
    y = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)  # (BR, BV)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k  # (BK,)
        mk = kk < d
        a = tl.load(a_ptrs_row + kk[None, :] * stride_ad, mask=mask_r[:, None] & mk[None, :], other=0.0)  # (BR, BK)
        w = tl.load(W_ptr + offs_v[None, :] * stride_wv + kk[:, None] * stride_wd,
                    mask=mask_v[None, :] & mk[:, None], other=0.0)  # (BK, BV) = W_vᵀ
        y = dot_acc(a, w, y, UPCAST, PREC)
    if ROUND:  # the model's head returns its logits in its own dtype
        y = y.to(a_ptrs_row.dtype.element_ty).to(tl.float32)
    if HAS_BIAS:
        bv = tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)  # (BV,)
        y = y + bv[None, :]
        if ROUND:
            y = y.to(a_ptrs_row.dtype.element_ty).to(tl.float32)
    if POST_SCALE:
        y = y * value
    return tl.where(mask_v[None, :], y, float("-inf"))


@triton.jit
def _head_lse_kernel(
    A_ptr,  # (B, T', d) head input at the predicting positions, fp32/fp16/bf16, any strides
    W_ptr,  # (V, d) head weight, any strides
    bias_ptr,  # (V,) head bias, contiguous (read only when HAS_BIAS)
    tgt_ptr,  # (N,) int64 contiguous, N = B·T': the target of each row, -100 = not counted
    coef_ptr,  # (N,) fp32 contiguous: the token loss's coefficient c_bt
    lse_ptr,  # (N,) fp32 out: log Σ_v exp(z_v)
    tok_ptr,  # (N,) fp32 out: c_bt (lse − z_target), 0 for -100
    N, Tp, d, V,  # rows (B·T'), rows per sample, head input width, vocabulary
    stride_ab, stride_at, stride_ad,  # A strides (elements) over B, T', d
    stride_wv, stride_wd,  # W strides over V, d
    value,  # the logit scale (read only when POST_SCALE)
    HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, POST_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,  # dot config of the logit tile (see _utils.dot_config)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary columns per logit tile
    BLOCK_K: tl.constexpr,  # columns of d per step of the logit dot
):
    """One program = rows [r0, r0 + BLOCK_R): online log-sum-exp over vocabulary blocks,
    m' = max(m, max_v z_v), s' = s·exp(m − m') + Σ_v exp(z_v − m'), lse = m + log s; and the target's logit."""
    pid = tl.program_id(0)
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BR,)
    mask_r = offs_r < N
    b = offs_r // Tp
    t = offs_r % Tp
    a_rows = A_ptr + (b * stride_ab + t * stride_at)[:, None]  # (BR, 1)
    tgt = tl.load(tgt_ptr + offs_r, mask=mask_r, other=_IGNORE)  # (BR,) int64
    coef = tl.load(coef_ptr + offs_r, mask=mask_r, other=0.0)  # (BR,)
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # (BV,)
        mask_v = offs_v < V
        z = _logit_tile(a_rows, W_ptr, bias_ptr, offs_v, mask_r, mask_v, d, stride_ad, stride_wv, stride_wd,
                        HAS_BIAS, ROUND, POST_SCALE, value, UPCAST, PREC, BLOCK_R, BLOCK_V, BLOCK_K)  # (BR, BV)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # (BR,) finite: every tile has a column < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        hit = offs_v[None, :] == tgt[:, None]  # (BR, BV)
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    lse = m + tl.log(s)  # (BR,)
    tok = tl.where(tgt != _IGNORE, lse - zt, 0.0) * coef
    tl.store(lse_ptr + offs_r, lse, mask=mask_r)
    tl.store(tok_ptr + offs_r, tok, mask=mask_r)


@triton.jit
def _head_grad_kernel(
    A_ptr,  # (B, T', d) head input, fp32/fp16/bf16, any strides
    W_ptr,  # (V, d) head weight, any strides
    bias_ptr,  # (V,) head bias, contiguous (read only when HAS_BIAS)
    tgt_ptr,  # (N,) int64 contiguous targets, -100 = not counted
    coef_ptr,  # (N,) fp32 contiguous coefficients c_bt
    lse_ptr,  # (N,) fp32 contiguous: head_lse's log-sum-exp
    out_ptr,  # (N, d) fp32 contiguous out: Σ_v G_{r,v} w_v
    N, Tp, d, V,  # rows (B·T'), rows per sample, head input width, vocabulary
    stride_ab, stride_at, stride_ad,  # A strides over B, T', d
    stride_wv, stride_wd,  # W strides over V, d
    value,  # the logit scale (read only when POST_SCALE)
    HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, POST_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,  # dot config of the logit tile
    PREC_G: tl.constexpr,  # tl.dot precision of G (fp32) @ W (upcast to fp32): "ieee"
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary columns per tile
    BLOCK_K: tl.constexpr,  # columns of d per step of the logit dot
    BLOCK_D: tl.constexpr,  # columns of d of the output per program (grid axis 1)
):
    """One program = rows [r0, r0 + BLOCK_R) × output columns [d0, d0 + BLOCK_D):
    out[r, d0:d0+BD] = Σ_vblocks G_tile (BR, BV) @ W[vblock, d0:d0+BD], G = c·post'·(softmax − onehot)."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BR,)
    mask_r = offs_r < N
    b = offs_r // Tp
    t = offs_r % Tp
    a_rows = A_ptr + (b * stride_ab + t * stride_at)[:, None]  # (BR, 1)
    tgt = tl.load(tgt_ptr + offs_r, mask=mask_r, other=_IGNORE)  # (BR,)
    coef = tl.load(coef_ptr + offs_r, mask=mask_r, other=0.0)  # (BR,)
    lse = tl.load(lse_ptr + offs_r, mask=mask_r, other=0.0)  # (BR,)
    if POST_SCALE:
        coef = coef * value
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # (BD,)
    mask_d = offs_d < d
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)  # (BR, BD)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # (BV,)
        mask_v = offs_v < V
        z = _logit_tile(a_rows, W_ptr, bias_ptr, offs_v, mask_r, mask_v, d, stride_ad, stride_wv, stride_wd,
                        HAS_BIAS, ROUND, POST_SCALE, value, UPCAST, PREC, BLOCK_R, BLOCK_V, BLOCK_K)  # (BR, BV)
        g = tl.exp(z - lse[:, None])  # (BR, BV) softmax; 0 outside V
        g = g - tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
        g = tl.where(mask_r[:, None], g * coef[:, None], 0.0)
        w = tl.load(W_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BV, BD)
        acc = tl.dot(g, w, acc, input_precision=PREC_G)
    tl.store(out_ptr + offs_r[:, None] * d + offs_d[None, :], acc, mask=mask_r[:, None] & mask_d[None, :])


def _common(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], post: str, value: float) -> dict:
    """The constexprs and scalars both kernels share."""
    up, prec = dot_config(A.dtype, W.dtype)
    return {"HAS_BIAS": bias is not None, "ROUND": A.dtype != torch.float32, "POST_SCALE": post == "scale",
            "UPCAST": up, "PREC": prec, "value": float(value)}


def head_lse_launch(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                    coef: torch.Tensor, post: str = "none", value: float = 1.0, block_r: int = 64,
                    block_v: int = 64, block_k: int = 32, num_warps: int = 8,
                    num_stages: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_head_lse_kernel`` on checked inputs: (lse, tok), fp32 (B, T') each. ``target`` (N,) int64 and
    ``coef`` (N,) fp32 contiguous (N = B·T')."""
    B, Tp, d = A.shape
    V = W.shape[0]
    N = B * Tp
    with device_guard(A.device):
        lse = torch.empty(N, dtype=torch.float32, device=A.device)
        tok = torch.empty(N, dtype=torch.float32, device=A.device)
        grid = (triton.cdiv(N, block_r),)
        _head_lse_kernel[grid](
            A, W, bias if bias is not None else coef, target, coef, lse, tok,
            N, Tp, d, V,
            A.stride(0), A.stride(1), A.stride(2), W.stride(0), W.stride(1),
            BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_K=block_k, **_common(A, W, bias, post, value),
            **launch_opts(num_warps, num_stages),
        )
    return lse.view(B, Tp), tok.view(B, Tp)


def head_grad_launch(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                     coef: torch.Tensor, lse: torch.Tensor, post: str = "none", value: float = 1.0,
                     block_r: int = 64, block_v: int = 64, block_k: int = 32, block_d: int = 64,
                     num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """Launch ``_head_grad_kernel``: Σ_v G_v w_v, fp32 (B, T', d). ``lse`` (N,) fp32 contiguous."""
    B, Tp, d = A.shape
    V = W.shape[0]
    N = B * Tp
    with device_guard(A.device):
        out = torch.empty(N, d, dtype=torch.float32, device=A.device)  # (N, d)
        grid = (triton.cdiv(N, block_r), triton.cdiv(d, block_d))
        _head_grad_kernel[grid](
            A, W, bias if bias is not None else coef, target, coef, lse, out,
            N, Tp, d, V,
            A.stride(0), A.stride(1), A.stride(2), W.stride(0), W.stride(1),
            PREC_G="ieee", BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_K=block_k, BLOCK_D=block_d,
            **_common(A, W, bias, post, value), **launch_opts(num_warps, num_stages),
        )
    return out.view(B, Tp, d)


def head_config(N: int, d: int, V: int, dtype: torch.dtype, grad: bool = False) -> dict:
    """Fixed launch configuration (no autotuning, so it also runs interpreted): BLOCK_R = 64 rows (down to
    16 for few rows), BLOCK_V = 64, BLOCK_K = 32 for fp32 and 64 for 2-byte dtypes (16 minimum, for small
    d); 8 warps for 64-row blocks, else 4. ``grad`` (head_grad): BLOCK_D = 128 for 2-byte dtypes when d is a
    multiple of 16, else 64 (the (BLOCK_R, BLOCK_D) fp32 accumulator lives in registers: on sm_90, 256
    columns spill, and 128 spills in fp32 and on odd d); fewer d blocks = fewer recomputations of the logits."""
    block_r = block_for(N, 16, 64)
    cfg = {"block_r": block_r, "block_v": block_for(V, 16, 64),
           "block_k": block_for(d, 16, 32 if dtype == torch.float32 else 64),
           "num_warps": 8 if block_r >= 64 else 4, "num_stages": 2}
    if grad:
        cfg["block_d"] = block_for(d, 16, 128 if dtype != torch.float32 and d % 16 == 0 else 64)
    return cfg


def _check(A, W, bias, target, coef, post):
    """Validate the head inputs; (device, target (N,) int64, coef (N,) fp32), both contiguous."""
    check_float("A", A, 3)
    check_float("W", W, 2)
    if bias is not None:
        check_float("bias", bias, 1)
    if W.shape[1] != A.shape[2]:
        raise ValueError(f"W {tuple(W.shape)} must have A's width {A.shape[2]} as its second dim")
    if bias is not None and bias.shape != (W.shape[0],):
        raise ValueError(f"bias must have shape ({W.shape[0]},), got {tuple(bias.shape)}")
    if target.shape != A.shape[:2] or coef.shape != A.shape[:2]:
        raise ValueError(f"target {tuple(target.shape)} and coef {tuple(coef.shape)} must be (B, T') = "
                         f"{tuple(A.shape[:2])}")
    if post not in ("none", "scale"):
        raise ValueError(f"post={post!r}: the head kernels do the identity and a logit scale; compute soft-capped "
                         "heads with the torch chunk loop (gradsel_core.ghost.head)")
    named = [("A", A), ("W", W), ("target", target), ("coef", coef)] + ([("bias", bias)] if bias is not None else [])
    device = check_device(*named)
    tgt = target.reshape(-1).to(torch.int64).contiguous()
    bad = (tgt != IGNORE_INDEX) & ((tgt < 0) | (tgt >= W.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"target holds ids outside [0, {W.shape[0]}) other than {IGNORE_INDEX}: "
                         f"{tgt[bad][:5].tolist()}")
    return device, tgt, coef.reshape(-1).to(torch.float32).contiguous()


def head_lse(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
             coef: torch.Tensor, post: str = "none", value: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of the head's chunk loop: (lse, tok) fp32 (B, T') each; the per-sample loss is tok.sum(1).

    Args:
        A: (B, T', d) fp32/fp16/bf16 head input at the predicting positions (any strides).
        W: (V, d) head weight; bias: (V,) or None.
        target: (B, T') ints, -100 = not counted; coef: (B, T') the token losses' coefficients.
        post: "none" or "scale" (z = value·y).
    Cost: N·V·d multiply-adds, N = B·T'; memory O(N)."""
    _, tgt, cf = _check(A, W, bias, target, coef, post)
    B, Tp, d = A.shape
    if B * Tp == 0:
        z = torch.zeros(B, Tp, dtype=torch.float32, device=A.device)
        return z, z.clone()
    cfg = head_config(B * Tp, d, W.shape[0], A.dtype)
    log.debug("head_lse B=%d T'=%d d=%d V=%d %s", B, Tp, d, W.shape[0], cfg)
    return head_lse_launch(A, W, bias, tgt, cf, post, value, **cfg)


def head_grad(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
              coef: torch.Tensor, lse: torch.Tensor, post: str = "none", value: float = 1.0) -> torch.Tensor:
    """Pass 2 of the head's chunk loop: Σ_v G_{bt,v} w_v, fp32 (B, T', d), from ``head_lse``'s ``lse`` (B, T').
    Same arguments as ``head_lse``. Cost: (1 + ⌈d/BLOCK_D⌉)·N·V·d multiply-adds (BLOCK_D: see ``head_config``);
    memory O(N·d)."""
    _, tgt, cf = _check(A, W, bias, target, coef, post)
    B, Tp, d = A.shape
    if lse.shape != (B, Tp):
        raise ValueError(f"lse must be (B, T') = {(B, Tp)}, got {tuple(lse.shape)}")
    if B * Tp == 0 or d == 0:
        return torch.zeros(B, Tp, d, dtype=torch.float32, device=A.device)
    cfg = head_config(B * Tp, d, W.shape[0], A.dtype, grad=True)
    log.debug("head_grad B=%d T'=%d d=%d V=%d %s", B, Tp, d, W.shape[0], cfg)
    return head_grad_launch(A, W, bias, tgt, cf, lse.reshape(-1).to(torch.float32).contiguous(), post, value,
                            **cfg)
