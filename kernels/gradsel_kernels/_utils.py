"""Shared helpers of the gradsel kernels: input checks, block-size and split rules, the device guard and
the fp32-accumulating dot.

Nothing here queries a device at import time (the SM count is read at launch, once per device); whether
Triton interprets (``TRITON_INTERPRET=1``) is read from the environment at call time.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# dtypes the kernels read; every kernel accumulates in fp32 and returns fp32
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (read per call, never cached)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_for(n: int, lo: int = 16, hi: int = 64) -> int:
    """The smallest power of two >= n, clamped to [lo, hi] (tl.dot needs every dim >= 16)."""
    return max(lo, min(hi, next_pow2(n)))


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    """Raise a clear error for a tensor a kernel cannot read."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype == torch.float64:
        raise TypeError(
            f"{name} is float64: the Triton kernels read fp32/fp16/bf16 and accumulate in fp32; "
            "compute fp64 inputs with the torch path (gradsel_core.dispatch with use_triton=False)"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")


def check_device(*named: Tuple[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device runnable: CUDA, or any device when interpreting."""
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
            "triton to run them on CPU tensors in interpreter mode, or use the torch path"
        )
    return device


def check_lengths(lengths: Optional[torch.Tensor], B: int, T: int, device: torch.device) -> Optional[torch.Tensor]:
    """``lengths`` (B,) ints as a contiguous int32 tensor on ``device``, clamped to [0, T]; None stays None."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    return lengths.clamp(0, T).to(torch.int32).contiguous()


def check_pair(A: torch.Tensor, G: torch.Tensor, lengths: Optional[torch.Tensor]):
    """Validate the (A (B, T, d), G (B, T, p), lengths) inputs of the Linear-like kernels.

    Returns (device, lengths checked, compute dtype: the common dtype, or fp32 when they differ)."""
    check_float("A", A, 3)
    check_float("G", G, 3)
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} must agree on (B, T)")
    device = check_device(("A", A), ("G", G))
    lengths = check_lengths(lengths, A.shape[0], A.shape[1], device)
    return device, lengths, (A.dtype if A.dtype == G.dtype else torch.float32)


def dot_config(*dtypes: torch.dtype) -> Tuple[bool, Optional[str]]:
    """(UPCAST, PRECISION) for ``dot_acc`` on tiles of these dtypes.

    UPCAST: convert the tiles to fp32 before tl.dot. Needed when the operands' dtypes differ (tl.dot
    wants one dtype), and for bf16 under the interpreter, whose tl.dot multiplies the raw uint16 bit
    patterns of bf16 (a Triton interpreter limitation). The upcast is exact: bf16/fp16 values are fp32
    values, and the GPU's bf16 dot also forms exact products and accumulates in fp32.
    PRECISION: "ieee" whenever the dot reads fp32 (full fp32 products, no TF32 rounding: the norms are
    meant to be exact); None (the backend default) for fp16/bf16 operands, where it does not apply.
    """
    same = all(dt == dtypes[0] for dt in dtypes)
    upcast = (not same) or (interpreting() and torch.bfloat16 in dtypes)
    fp32_dot = upcast or dtypes[0] == torch.float32
    return upcast, ("ieee" if fp32_dot else None)


@functools.lru_cache(maxsize=64)
def _pairs_cpu(n_blocks: int) -> torch.Tensor:
    return torch.triu_indices(n_blocks, n_blocks).t().contiguous().to(torch.int32)


_PAIRS_DEV: dict = {}


def upper_pairs(n_blocks: int, device: torch.device) -> torch.Tensor:
    """(n_pairs, 2) int32 (row block, col block) with col >= row: the upper triangle of a block Gram.

    n_pairs = n_blocks·(n_blocks+1)/2; cached per (n_blocks, device)."""
    key = (n_blocks, str(device))
    table = _PAIRS_DEV.get(key)
    if table is None:
        table = _pairs_cpu(n_blocks).to(device)
        if len(_PAIRS_DEV) > 256:
            _PAIRS_DEV.clear()
        _PAIRS_DEV[key] = table
    return table


# SM count assumed when there is no CUDA device to ask (the interpreter): small, so that CPU tests run the
# split paths of the launchers as well as the unsplit ones
INTERPRET_SM_COUNT = 4


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried at launch, cached per device index);
    ``INTERPRET_SM_COUNT`` for non-CUDA devices (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRET_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def n_splits(programs: int, steps: int, sms: int, min_steps: int = 2) -> int:
    """How many programs share one unit of work (its loop of ``steps`` steps) so that the grid reaches
    about two waves (2 programs per SM); 1 when ``programs`` already does. Each split keeps at least
    ``min_steps`` steps of the loop. The partial results are combined in a fixed order (no atomics)."""
    target = 2 * max(1, sms)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, max(1, programs)), steps // max(1, min_steps)))


def split_len(n: int, block: int, n_split: int) -> int:
    """Length of each split of a loop over ``n`` in steps of ``block``: a multiple of ``block``."""
    return block * triton.cdiv(triton.cdiv(n, block), n_split)


def device_guard(device: torch.device):
    """Context for one launch: CUDA tensors launch under their own device (Triton launches on the current
    device and its current stream, so a tensor on cuda:1 needs cuda:1 current); a no-op otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def warps_for(block_t: int) -> int:
    """num_warps of the Gram kernels: 8 for 64-row blocks (with 4, unaligned shapes spill registers)."""
    return 8 if block_t >= 64 else 4


def launch_opts(num_warps: int, num_stages: int) -> dict:
    """Launch options for real GPUs (the interpreter ignores them; passed anyway for one code path)."""
    return {"num_warps": num_warps, "num_stages": num_stages}


@triton.jit
def dot_acc(x, y, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x @ y with fp32 accumulation.

    x (M, K), y (K, N), acc (M, N) fp32. UPCAST converts x and y to fp32 first (mixed dtypes, or bf16
    under the interpreter); PRECISION is tl.dot's input_precision ("ieee" for fp32 operands)."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PRECISION)
