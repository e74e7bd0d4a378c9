"""Fused Triton kernels for gradsel's per-sample norm reductions (import name: ``gradsel_kernels``).

Only kernels and their launchers live here. ``gradsel_core`` reaches them through
``gradsel_core.dispatch`` and never imports triton at its own import time.

Public functions (same names and semantics as the torch references in ``gradsel_core.dispatch``):

- ``ghost_sq(A, G, lengths=None)``: Σ_{t,s}(a_t·a_s)(g_t·g_s), tiled over upper (t, s) Gram blocks
- ``direct_sq(A, G, lengths=None)``: ||A_bᵀG_b||²_F, (d, p) tiles reduced over T in registers
- ``embedding_sq(ids, G, padding_idx=None)``: Σ_{t,s}[x_t = x_s ≠ pad](g_t·g_s)
- ``rowsum_sq(G)``: ||Σ_t g_t||²;  ``weighted_rowsum_sq(X, G)``: ||Σ_t x_t⊙g_t||²

Inputs are fp32/fp16/bf16 (any strides) on CUDA, or on CPU under ``TRITON_INTERPRET=1``; every kernel
accumulates in fp32 and returns float32 (B,). float64 inputs raise TypeError: compute them with the
torch path (``gradsel_core.dispatch`` with ``use_triton=False``). No device is queried at import time
and there is no autotuning: block sizes are fixed functions of the shapes (``*_config``).
"""
from .direct_sq import direct_sq
from .embedding_sq import embedding_sq
from .ghost_sq import ghost_sq
from .row_sq import rowsum_sq, weighted_rowsum_sq

__all__ = ["ghost_sq", "direct_sq", "embedding_sq", "rowsum_sq", "weighted_rowsum_sq"]
