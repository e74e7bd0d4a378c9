"""Fused Triton kernels for gradsel's per-sample norm reductions (import name: ``gradsel_kernels``).

Only kernels and their launchers live here. ``gradsel_core`` reaches them through
``gradsel_core.dispatch``. Importing this package never imports triton: the public functions below are
thin entry points that import their kernel module (and triton) on the first call, so a machine without
triton can import the package, and only a launch says what is missing.

Public functions (same names and semantics as the torch references in ``gradsel_core.dispatch``):

- ``ghost_sq(A, G, lengths=None)``: Σ_{t,s}(a_t·a_s)(g_t·g_s), tiled over upper (t, s) Gram blocks
- ``direct_sq(A, G, lengths=None)``: ||A_bᵀG_b||²_F, (d, p) tiles reduced over T in registers
- ``embedding_sq(ids, G, padding_idx=None)``: Σ_{t,s}[x_t = x_s ≠ pad](g_t·g_s)
- ``rowsum_sq(G)``: ||Σ_t g_t||²;  ``weighted_rowsum_sq(X, G)``: ||Σ_t x_t⊙g_t||²
- ``head_lse(A, W, bias, target, coef)`` / ``head_grad(..., lse)``: the fused LM head's two passes (online
  log-sum-exp and token losses; the gradient at the head's input), never forming (B, T', V)

Inputs are fp32/fp16/bf16 (any strides) on CUDA (any device: every launch runs under that device's
context and current stream), or on CPU under ``TRITON_INTERPRET=1``; every kernel accumulates in fp32 and
returns float32 (B,). float64 inputs raise TypeError: compute them with the torch path
(``gradsel_core.dispatch`` with ``use_triton=False``). No device is queried at import time and there is
no autotuning: block sizes are fixed functions of the shapes and of the device's SM count (``*_config``).

Implementation modules: ``_ghost``, ``_direct``, ``_embedding``, ``_row``, ``_head`` (kernels, launchers, configs),
``_utils`` (checks, block and split rules, the device guard) and ``_compile`` (compiles every launch
configuration for sm_90a without a GPU: ``python -m gradsel_kernels._compile``).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional

import torch

__all__ = ["ghost_sq", "direct_sq", "embedding_sq", "rowsum_sq", "weighted_rowsum_sq", "head_lse", "head_grad",
           "load"]

# kernel module of each public function
_MODULE_OF = {
    "ghost_sq": "_ghost",
    "direct_sq": "_direct",
    "embedding_sq": "_embedding",
    "rowsum_sq": "_row",
    "weighted_rowsum_sq": "_row",
    "head_lse": "_head",
    "head_grad": "_head",
}


def _module(name: str) -> ModuleType:
    """Import one kernel module (this imports triton); ImportError saying what to install otherwise."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        raise ImportError(
            f"gradsel_kernels needs triton to launch a kernel ({e}). Install it with "
            "pip install 'gradsel[triton]' (CUDA torch wheels ship it), or use the torch path "
            "(GradNormEngine(backend='ghost'), or use_triton=False in gradsel_core.dispatch)"
        ) from e


def load() -> Dict[str, ModuleType]:
    """Import every kernel module now (and triton); ``{module name: module}``. Raises ImportError (or
    whatever a broken triton install raises) when the kernels cannot be used on this machine."""
    return {m: _module(m) for m in sorted(set(_MODULE_OF.values()))}


def ghost_sq(A: torch.Tensor, G: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) per sample = ||A_bᵀ G_b||²_F. See ``gradsel_kernels._ghost.ghost_sq``."""
    return _module("_ghost").ghost_sq(A, G, lengths)


def direct_sq(A: torch.Tensor, G: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||A_bᵀ G_b||²_F per sample, fused. See ``gradsel_kernels._direct.direct_sq``."""
    return _module("_direct").direct_sq(A, G, lengths)


def embedding_sq(ids: torch.Tensor, G: torch.Tensor, padding_idx: Optional[int] = None) -> torch.Tensor:
    """Σ_{t,s} [x_t = x_s ≠ pad] (g_t·g_s) per sample. See ``gradsel_kernels._embedding.embedding_sq``."""
    return _module("_embedding").embedding_sq(ids, G, padding_idx)


def rowsum_sq(G: torch.Tensor) -> torch.Tensor:
    """||Σ_t g_t||² per sample. See ``gradsel_kernels._row.rowsum_sq``."""
    return _module("_row").rowsum_sq(G)


def weighted_rowsum_sq(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """||Σ_t x_t ⊙ g_t||² per sample. See ``gradsel_kernels._row.weighted_rowsum_sq``."""
    return _module("_row").weighted_rowsum_sq(X, G)


def head_lse(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
             coef: torch.Tensor, post: str = "none", value: float = 1.0):
    """(lse, tok) (B, T') of the LM head's chunk loop, pass 1. See ``gradsel_kernels._head.head_lse``."""
    return _module("_head").head_lse(A, W, bias, target, coef, post, value)


def head_grad(A: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
              coef: torch.Tensor, lse: torch.Tensor, post: str = "none", value: float = 1.0) -> torch.Tensor:
    """Σ_v G_v w_v (B, T', d), pass 2 of the LM head's chunk loop. See ``gradsel_kernels._head.head_grad``."""
    return _module("_head").head_grad(A, W, bias, target, coef, lse, post, value)
