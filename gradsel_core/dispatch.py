"""The one dispatch point between the ghost rules and the norm reductions.

Each reduction has a torch implementation here (the reference, and the CPU path) and a fused Triton
kernel in ``gradsel_kernels``. ``use_triton=True`` routes to the kernel; triton is imported only then,
never at ``gradsel_core`` import time. All functions return fp32 (fp64 for fp64 inputs) tensors (B,).

Shapes: A (B, T, d) layer inputs, G (B, T, p) output gradients, ids (B, T) token ids.
Rows of G at padded positions are zero (the loss masks them), so no mask is needed for exactness.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Optional

import torch

log = logging.getLogger(__name__)

# elements of fp32 scratch one chunk of a reduction may hold (≈256 MiB)
CHUNK_ELEMS = 64 * 1024 * 1024


def _acc(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _chunks(B: int, per_sample_elems: int):
    step = max(1, CHUNK_ELEMS // max(1, per_sample_elems))
    for s in range(0, B, step):
        yield slice(s, min(B, s + step))


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``), e.g. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels_problem() -> Optional[str]:
    """Why the fused kernels cannot be used here (None when they can), checked once per process:
    triton installed, and ``gradsel_kernels`` with its kernel modules importable. A failure is logged
    once, as one warning."""
    if not _triton_importable():
        problem = "triton is not installed (pip install 'gradsel[triton]')"
    else:
        try:
            import gradsel_kernels  # noqa: WPS433 (deferred on purpose: its kernels import triton)

            gradsel_kernels.load()
            problem = None
        except Exception as e:  # noqa: BLE001 - any failure (missing package, broken triton) means: torch path
            problem = (f"gradsel_kernels does not import ({type(e).__name__}: {e}); install gradsel "
                       "(pip install -e . from the repository root) so that the kernels are importable")
    if problem is not None:
        log.warning("fused Triton kernels unavailable: %s. Scoring uses the exact torch path instead "
                    "(same numbers, slower).", problem)
    return problem


def triton_usable(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (checked per call, never at import): a CUDA
    device (or any device under ``TRITON_INTERPRET=1``), and triton plus ``gradsel_kernels`` importable.
    When they are not importable, this says so once with a warning and returns False (torch path)."""
    device = torch.device(device)
    if not (device.type == "cuda" or interpreting()):
        return False
    return _kernels_problem() is None


def _use_kernels(use_triton: bool, *ts: torch.Tensor) -> bool:
    """Route to the kernels only where they run: fp64 inputs stay on the torch path (the kernels
    accumulate in fp32 and refuse fp64)."""
    return use_triton and all(t.dtype != torch.float64 for t in ts if t.is_floating_point())


def _kernels():
    """The ``gradsel_kernels`` package; ImportError saying what to do when it is not installed."""
    try:
        import gradsel_kernels  # noqa: WPS433 (deferred on purpose)
    except ImportError as e:
        raise ImportError(
            f"backend='triton' needs the gradsel_kernels package ({e}): install gradsel "
            "(pip install -e . from the repository root), or use backend='ghost' (the exact torch path)"
        ) from e
    return gradsel_kernels


# -- reductions -----------------------------------------------------------------------------------


# Gram blocks: below 2 blocks the full T×T products are cheaper than the loop over blocks
GRAM_BLOCK = 64


def ghost_sq(A: torch.Tensor, G: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A Aᵀ, G Gᵀ⟩_F per sample: the Gram form of ||Gᵀ A||²_F.

    Cost B·T²·(d+p) time, B·T² memory (chunked over samples). Both Grams are symmetric, so for T ≥ 2
    blocks only the upper-triangular (t, s) blocks are formed and off-diagonal ones counted twice:
    nb(nb+1)/2 of nb² block products (3/4 of the work at T = 128, 9/16 at T = 512)."""
    if A.shape[1] == 0:  # no rows (an expert no token of this batch was routed to)
        return torch.zeros(A.shape[0], dtype=_acc(A, G), device=A.device)
    if _use_kernels(use_triton, A, G):
        return _kernels().ghost_sq(A, G)
    acc = _acc(A, G)
    B, T, _ = A.shape
    out = torch.zeros(B, dtype=acc, device=A.device)
    blk = T if T < 2 * GRAM_BLOCK else GRAM_BLOCK
    for sl in _chunks(B, 2 * T * blk):
        a, g = A[sl].to(acc), G[sl].to(acc)  # (b, T, d), (b, T, p)
        for i in range(0, T, blk):
            a_i, g_i = a[:, i:i + blk], g[:, i:i + blk]  # (b, blk, d), (b, blk, p)
            for j in range(i, T, blk):
                aa = torch.bmm(a_i, a[:, j:j + blk].transpose(1, 2))  # (b, blk, blk)
                gg = torch.bmm(g_i, g[:, j:j + blk].transpose(1, 2))  # (b, blk, blk)
                part = (aa * gg).sum(dim=(1, 2))  # (b,)
                out[sl] += part if i == j else 2 * part
    return out


def direct_sq(A: torch.Tensor, G: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    """||A_bᵀ G_b||²_F per sample: the direct form. Cost B·T·d·p time, d·p memory per sample in a chunk.

    The product is formed with the wider of d and p as its last (output column) dimension: ||Aᵀ G|| = ||Gᵀ A||,
    and a batched GEMM with 8 output columns (a LoRA A factor's rank) ran at half the speed of the same product
    transposed on CPU BLAS (an ad-hoc timing at B 16, T 128, d 1,024, p 8: 0.46 vs 0.88 ms)."""
    if A.shape[1] == 0:
        return torch.zeros(A.shape[0], dtype=_acc(A, G), device=A.device)
    if _use_kernels(use_triton, A, G):
        return _kernels().direct_sq(A, G)
    acc = _acc(A, G)
    B, _, d = A.shape
    p = G.shape[-1]
    out = torch.empty(B, dtype=acc, device=A.device)
    for sl in _chunks(B, d * p):
        a, g = A[sl].to(acc), G[sl].to(acc)  # (b, T, d), (b, T, p)
        grad = torch.bmm(g.transpose(1, 2), a) if p < d else torch.bmm(a.transpose(1, 2), g)  # (b, p, d) | (b, d, p)
        out[sl] = grad.flatten(1).pow(2).sum(dim=1)
    return out


def embedding_sq(
    ids: torch.Tensor, G: torch.Tensor, padding_idx: Optional[int] = None, use_triton: bool = False
) -> torch.Tensor:
    """Σ_{t,s} [x_t = x_s ≠ pad] (g_t·g_s) = Σ_v ||Σ_{t: x_t = v} g_t||² per sample.

    Torch path: segment sums over (sample, id) pairs, O(B·T·d), no T×T and no V×d buffer."""
    if _use_kernels(use_triton, G):
        return _kernels().embedding_sq(ids, G, padding_idx)
    acc = _acc(G)
    B, T = ids.shape
    d = G.shape[-1]
    g = G.reshape(B * T, d).to(acc)  # (B*T, d)
    ids = ids.reshape(B, T).long()
    if padding_idx is not None:
        g = g * (ids.reshape(-1) != padding_idx).unsqueeze(1).to(acc)
    vocab = int(ids.max().item()) + 1 if ids.numel() else 1
    key = ids + torch.arange(B, device=ids.device).unsqueeze(1) * vocab  # (B, T): unique per (sample, id)
    uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
    seg = torch.zeros(uniq.shape[0], d, dtype=acc, device=G.device).index_add_(0, inv, g)  # (U, d)
    out = torch.zeros(B, dtype=acc, device=G.device)
    return out.index_add_(0, torch.div(uniq, vocab, rounding_mode="floor"), seg.pow(2).sum(1))


def rowsum_sq(G: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    """||Σ_t g_t||² per sample (bias, LayerNorm β)."""
    if _use_kernels(use_triton, G):
        return _kernels().rowsum_sq(G)
    return G.to(_acc(G)).sum(dim=1).pow(2).sum(dim=1)


def weighted_rowsum_sq(X: torch.Tensor, G: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    """||Σ_t x_t ⊙ g_t||² per sample (LayerNorm γ, RMSNorm w with X = x̂)."""
    if _use_kernels(use_triton, X, G):
        return _kernels().weighted_rowsum_sq(X, G)
    acc = _acc(X, G)
    return (X.to(acc) * G.to(acc)).sum(dim=1).pow(2).sum(dim=1)


# -- the fused LM head ----------------------------------------------------------------------------

# The head kernels are exact (tests/test_kernels_head.py) but not yet timed on a GPU: head_grad recomputes the
# logits once per block of 64 or 128 columns of d ((1 + ⌈d/BLOCK_D⌉)·N·V·d multiply-adds against the torch
# loop's 2·N·V·d on cuBLAS), so they are used only when this is switched on, until benchmarks show where
# they pay.
HEAD_KERNELS = False


def head_loss_grad(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                   coef: torch.Tensor, post: str, value: float, use_triton: bool = False):
    """The fused head's token losses and input gradient by the Triton kernels (``gradsel_kernels.head_lse`` /
    ``head_grad``), or None where they do not apply, and the caller keeps its torch chunk loop: not asked
    (``use_triton`` False), ``HEAD_KERNELS`` off (the default), not a CUDA device (nor the interpreter), fp64,
    mixed dtypes, or soft-capping.

    A (B, T', d) head input; W (V, d); bias (V,) or None; target (B, T') (-100 ignored); coef (B, T').
    Returns (lse (B, T'), tok (B, T'), grad (B, T', d)), fp32."""
    if not HEAD_KERNELS or post not in ("none", "scale") or not _use_kernels(use_triton, A, W):
        return None
    if W.dtype != A.dtype or (bias is not None and bias.dtype != A.dtype):
        return None
    if not triton_usable(A.device):
        return None
    K = _kernels()
    lse, tok = K.head_lse(A, W, bias, target, coef, post, value)
    return lse, tok, K.head_grad(A, W, bias, target, coef, lse, post, value)
