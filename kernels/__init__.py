"""Fused Triton kernels for gradsel's per-sample norm reductions (import name: ``gradsel_kernels``).

Only kernels and their launchers live here. ``gradsel_core`` reaches them through
``gradsel_core.dispatch`` and never imports triton at its own import time.
"""
