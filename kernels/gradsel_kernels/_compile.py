"""Compile every launch configuration of the gradsel kernels for a CUDA target on a machine without a GPU.

    python -m gradsel_kernels._compile [--json PATH] [--md PATH] [--jobs N]

Each case runs the real launcher (``*_sq_launch`` with the configuration its public function picks, for an
H200's 132 SMs) on ``meta`` tensors of the case's shape and dtype, with the kernel replaced by a recorder;
the recorded launch (arguments, constexprs, num_warps, num_stages) is specialised by triton's own binder,
as a launch would be (integer divisibility, strides of 1), and compiled with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` (sm_90a, the H200), ptxas included. Per compiled kernel it reports ptxas's
registers and spill bytes, triton's shared memory, and whether every 2-D tile address is formed in int64.

Needs triton with its NVIDIA backend (ptxas ships with it) and TRITON_INTERPRET unset (an interpreted
``@triton.jit`` cannot be compiled). Used by tests/test_kernels_compile.py; its report is committed under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

H200_SMS = 132  # streaming multiprocessors of an H200 (the split rule's input)
H200_SMEM_PER_BLOCK = 227 * 1024  # bytes of shared memory one block may use on sm_90
TARGET = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size)


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch gradsel can make: a kernel entry, its input shapes and dtypes, and flags."""

    name: str  # short unique label
    op: str  # ghost_sq | direct_sq | embedding_sq | rowsum_sq | weighted_rowsum_sq | head_lse | head_grad
    shape: Tuple[int, ...]  # (B, T, d, p) ghost/direct; (B, T, d) embedding; (B, T, p) rows; (B, T', d, V) head
    dtypes: Tuple[torch.dtype, ...]  # dtype of each float input (A, G) / (G,) / (X, G) / (A, W)
    aligned: bool  # every inner dim a multiple of 16 (vectorised loads); False: odd dims and strides
    lengths: bool = False  # ghost/direct: per-sample lengths passed
    pad: bool = True  # embedding: a padding id
    bias: bool = False  # head: a bias
    post: str = "none"  # head: "none" | "scale"


@dataclasses.dataclass
class CompileResult:
    case: str
    kernel: str
    aligned: bool
    config: Dict[str, object]  # the launcher's configuration (blocks, n_split, warps, stages)
    constexprs: Dict[str, object]
    ok: bool
    error: Optional[str] = None
    n_regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_frame: Optional[int] = None
    shared: Optional[int] = None
    int64_tile_offsets: Optional[bool] = None
    compile_s: Optional[float] = None
    same_as: Optional[str] = None  # the case whose binary this one shares (compiled once)


def _cases() -> List[Case]:
    """Every kernel configuration gradsel launches: dtypes; aligned and odd shapes; LoRA ranks; lengths on
    and off; split (short sequences, small batches) and unsplit; mixed dtypes."""
    f32, f16, bf = torch.float32, torch.float16, torch.bfloat16
    cases: List[Case] = []
    for dt in (f32, f16, bf):
        n = str(dt).replace("torch.", "")
        cases += [
            Case(f"ghost-{n}-aligned", "ghost_sq", (8, 1024, 4096, 4096), (dt, dt), True),
            Case(f"ghost-{n}-odd", "ghost_sq", (8, 1000, 4095, 4097), (dt, dt), False),
            Case(f"ghost-{n}-split", "ghost_sq", (16, 128, 4096, 4096), (dt, dt), True),
            Case(f"direct-{n}-aligned", "direct_sq", (16, 1024, 4096, 4096), (dt, dt), True),
            Case(f"direct-{n}-odd", "direct_sq", (8, 1000, 4095, 4097), (dt, dt), False),
            Case(f"embedding-{n}-aligned", "embedding_sq", (8, 1024, 4096), (dt,), True),
            Case(f"embedding-{n}-odd", "embedding_sq", (8, 1000, 4095), (dt,), False),
            Case(f"rowsum-{n}-aligned", "rowsum_sq", (16, 1024, 4096), (dt,), True),
            Case(f"rowsum-{n}-odd", "rowsum_sq", (16, 1000, 4095), (dt,), False),
        ]
    cases += [
        # short sequences: smaller Gram blocks
        Case("ghost-bf16-T32", "ghost_sq", (64, 32, 2048, 2048), (bf, bf), True),
        Case("ghost-bf16-T16-odd", "ghost_sq", (64, 15, 2047, 2049), (bf, bf), False),
        Case("ghost-bf16-lengths", "ghost_sq", (8, 1024, 4096, 4096), (bf, bf), True, lengths=True),
        Case("ghost-bf16-lengths-odd", "ghost_sq", (8, 1000, 4095, 4097), (bf, bf), False, lengths=True),
        Case("ghost-mixed-bf16-fp32", "ghost_sq", (8, 1024, 4096, 4096), (bf, f32), True),
        Case("direct-bf16-lengths", "direct_sq", (16, 1024, 4096, 4096), (bf, bf), True, lengths=True),
        Case("direct-mixed-bf16-fp32", "direct_sq", (16, 1024, 4096, 4096), (bf, f32), True),
        Case("direct-bf16-split", "direct_sq", (2, 256, 4096, 4096 // 64), (bf, bf), True),
        Case("embedding-bf16-split", "embedding_sq", (16, 128, 2048), (bf,), True),
        Case("embedding-bf16-nopad", "embedding_sq", (8, 1024, 4096), (bf,), True, pad=False),
        Case("wrowsum-bf16-aligned", "weighted_rowsum_sq", (16, 1024, 4096), (bf, bf), True),
        Case("wrowsum-bf16-odd", "weighted_rowsum_sq", (16, 1000, 4095), (bf, bf), False),
        Case("wrowsum-mixed-fp16-fp32", "weighted_rowsum_sq", (16, 1024, 4096), (f16, f32), True),
        Case("rowsum-bf16-split", "rowsum_sq", (1, 2048, 2048), (bf,), True),
    ]
    # LoRA factors: A (d=4096 -> r) and B (r -> 4096), bf16 and fp32
    for r in (4, 8, 16, 32, 64):
        cases.append(Case(f"lora-A-r{r}-bf16", "direct_sq", (16, 1024, 4096, r), (bf, bf), r % 16 == 0))
        cases.append(Case(f"lora-B-r{r}-bf16", "direct_sq", (16, 1024, r, 4096), (bf, bf), r % 16 == 0))
    cases.append(Case("lora-A-r16-fp32", "direct_sq", (16, 1024, 4096, 16), (f32, f32), True))
    cases.append(Case("lora-A-r7-bf16-odd", "direct_sq", (16, 1000, 4095, 7), (bf, bf), False))
    # the LM head's two passes at LLM vocabularies (Llama 3: 128,256; Qwen 2.5: 151,936)
    for op in ("head_lse", "head_grad"):
        k = op.replace("_", "-")
        for dt in (f32, bf):
            n = str(dt).replace("torch.", "")
            cases += [
                Case(f"{k}-{n}-aligned", op, (8, 1024, 4096, 128256), (dt, dt), True),
                Case(f"{k}-{n}-odd", op, (3, 1000, 4095, 151935), (dt, dt), False, bias=True),
            ]
        cases += [
            Case(f"{k}-bf16-bias-scale", op, (8, 2048, 2048, 256000), (bf, bf), True, bias=True, post="scale"),
            Case(f"{k}-bf16-T1", op, (1, 1, 2048, 32000), (bf, bf), True),
        ]
    return cases


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def _recording(mod, kernel_name: str, sink: list):
    """Replace ``mod.<kernel_name>`` by a recorder of ``kernel[grid](*args, **kwargs)`` launches."""
    real = getattr(mod, kernel_name)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                sink.append((real, grid, args, kwargs))
            return launch

    setattr(mod, kernel_name, Recorder())
    try:
        yield
    finally:
        setattr(mod, kernel_name, real)


def record_launch(case: Case) -> Tuple[object, tuple, dict, Dict[str, object]]:
    """(jit function, args, kwargs, config) of the launch the public function makes for ``case``."""
    from . import _direct, _embedding, _ghost, _head, _row

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    sink: list = []
    if case.op in ("ghost_sq", "direct_sq"):
        B, T, d, p = case.shape
        A, G = _meta(B, T, d, dtype=case.dtypes[0]), _meta(B, T, p, dtype=case.dtypes[1])
        dtype = A.dtype if A.dtype == G.dtype else torch.float32
        lengths = torch.empty(B, dtype=torch.int32, device="meta") if case.lengths else None
        mod, kname = (_ghost, "_ghost_sq_kernel") if case.op == "ghost_sq" else (_direct, "_direct_sq_kernel")
        cfg = (mod.ghost_config if case.op == "ghost_sq" else mod.direct_config)(B, T, d, p, dtype, H200_SMS)
        with _recording(mod, kname, sink):
            (mod.ghost_sq_launch if case.op == "ghost_sq" else mod.direct_sq_launch)(A, G, lengths, **cfg)
    elif case.op == "embedding_sq":
        B, T, d = case.shape
        G = _meta(B, T, d, dtype=case.dtypes[0])
        ids = torch.empty(B, T, dtype=torch.int64, device="meta")
        cfg = _embedding.embedding_config(B, T, d, G.dtype, H200_SMS)
        with _recording(_embedding, "_embedding_sq_kernel", sink):
            _embedding.embedding_sq_launch(ids, G, 0 if case.pad else None, **cfg)
    elif case.op in ("head_lse", "head_grad"):
        B, Tp, d, V = case.shape
        A, W = _meta(B, Tp, d, dtype=case.dtypes[0]), _meta(V, d, dtype=case.dtypes[1])
        bias = _meta(V, dtype=case.dtypes[1]) if case.bias else None
        tgt = torch.empty(B * Tp, dtype=torch.int64, device="meta")
        coef = _meta(B * Tp, dtype=torch.float32)
        cfg = _head.head_config(B * Tp, d, V, A.dtype, grad=case.op == "head_grad")
        if case.op == "head_lse":
            with _recording(_head, "_head_lse_kernel", sink):
                _head.head_lse_launch(A, W, bias, tgt, coef, case.post, 0.5, **cfg)
        else:
            with _recording(_head, "_head_grad_kernel", sink):
                _head.head_grad_launch(A, W, bias, tgt, coef, _meta(B * Tp, dtype=torch.float32), case.post, 0.5,
                                       **cfg)
    else:
        B, T, p = case.shape
        G = _meta(B, T, p, dtype=case.dtypes[-1])
        X = _meta(B, T, p, dtype=case.dtypes[0]) if case.op == "weighted_rowsum_sq" else None
        cfg = _row.row_config(B, T, p, H200_SMS)
        with _recording(_row, "_row_sq_kernel", sink):
            _row.row_sq_launch(X, G, **cfg)
    if len(sink) != 1:
        raise RuntimeError(f"{case.name}: expected one launch, recorded {len(sink)}")
    fn, _grid, args, kwargs = sink[0]
    return fn, args, kwargs, cfg


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ADDPTR_2D = re.compile(r"tt\.addptr .*: tensor<\d+x\d+x!tt\.ptr<[^>]+>>, tensor<\d+x\d+x(i\d+)>")


def _specialize(case: Case):
    """(jit function, launch config, signature, constexprs, attrs, options) of ``case`` for sm_90a: the
    specialisation a launch makes (triton's binder: divisibility by 16, integers equal to 1)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, args, kwargs, cfg = record_launch(case)
    backend = make_backend(GPUTarget(*TARGET))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return fn, cfg, signature, constexprs, attrs, options


def compile_key(case: Case) -> str:
    """Identity of the compiled kernel: two cases with one key compile to the same binary."""
    fn, _cfg, signature, constexprs, attrs, options = _specialize(case)
    return repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted((k, repr(v)) for k, v in options.__dict__.items())))


def compile_case(case: Case) -> CompileResult:
    """Compile one case for sm_90a and read its resource use; errors are returned, not raised."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = CompileResult(case=case.name, kernel="?", aligned=case.aligned, config={}, constexprs={}, ok=False)
    try:
        fn, cfg, signature, constexprs, attrs, options = _specialize(case)
        res.kernel, res.config = fn.__name__, dict(cfg)
        res.constexprs = {fn.arg_names[k[0]]: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v))
                          for k, v in constexprs.items()}
        knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v output: registers, spills
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*TARGET),
                                    options=options.__dict__)
        res.compile_s = round(time.perf_counter() - t0, 2)
        ptxas_log = out.getvalue()
        m, s = _PTXAS_REGS.search(ptxas_log), _PTXAS_SPILL.search(ptxas_log)
        if m is None or s is None:
            raise RuntimeError("no ptxas -v output captured (a warm triton cache skips ptxas; compile_all "
                               f"uses a fresh TRITON_CACHE_DIR): {ptxas_log[-500:]!r}")
        res.n_regs = int(m.group(1))
        res.stack_frame, res.spill_stores, res.spill_loads = (int(x) for x in s.groups())
        res.shared = int(kernel.metadata.shared)
        widths = _ADDPTR_2D.findall(kernel.asm["ttir"])
        res.int64_tile_offsets = bool(widths) and all(w == "i64" for w in widths)
        res.ok = True
    except Exception as e:  # noqa: BLE001 - reported per case
        res.error = f"{type(e).__name__}: {e}"[:2000]
    return res


def compile_all(cases: Optional[List[Case]] = None, jobs: int = 1) -> List[CompileResult]:
    """Compile ``cases`` (default: every case) once per distinct kernel binary, ``jobs`` processes in
    parallel (fork; CPU only); a case sharing its binary with an earlier one gets its figures
    (``same_as``)."""
    import shutil
    import tempfile

    cases = cases if cases is not None else _cases()
    first: Dict[str, Case] = {}
    key_of: Dict[str, Optional[str]] = {}
    for c in cases:
        try:
            key_of[c.name] = compile_key(c)
        except Exception:  # noqa: BLE001 - compile_case reports it
            key_of[c.name] = None
        if key_of[c.name] is None or key_of[c.name] not in first:
            first.setdefault(key_of[c.name] or c.name, c)
    unique = list(first.values())
    # a fresh triton cache: a cache hit would skip ptxas, and with it the register and spill figures
    cache = tempfile.mkdtemp(prefix="gradsel-compile-")
    prev = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        if jobs <= 1:
            done = [compile_case(c) for c in unique]
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
                done = list(pool.map(compile_case, unique))
    finally:
        if prev is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = prev
        shutil.rmtree(cache, ignore_errors=True)
    by_name = {r.case: r for r in done}
    results = []
    for c in cases:
        if c.name in by_name:
            results.append(by_name[c.name])
            continue
        src = by_name[first[key_of[c.name]].name]
        results.append(dataclasses.replace(src, case=c.name, aligned=c.aligned, config=dict(record_launch(c)[3]),
                                           same_as=src.case))
    return results


def write_report(results: List[CompileResult], json_path: Optional[str], md_path: Optional[str]) -> None:
    import triton

    meta = {"target": "cuda sm_90a (GPUTarget('cuda', 90, 32))", "sms": H200_SMS,
            "smem_limit_bytes": H200_SMEM_PER_BLOCK, "triton": triton.__version__, "torch": torch.__version__,
            "produced_by": "python -m gradsel_kernels._compile"}
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "kernels": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    if md_path:
        lines = [
            f"# Kernel resource use on sm_90a (H200), compiled on CPU with triton {triton.__version__}",
            "",
            "Produced by `python -m gradsel_kernels._compile --json ... --md ...` (tests/test_kernels_compile.py "
            "runs the same compiles). Registers and spills from ptxas -v, shared memory from triton's metadata "
            f"(limit {H200_SMEM_PER_BLOCK} B per block); config = the launcher's choice for an H200 ({H200_SMS} SMs).",
            "",
            "| case | kernel | aligned | blocks | n_split | warps | stages | regs | spill st/ld B | smem B "
            "| int64 tiles |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            c = r.config
            blocks = "/".join(str(c[k]) for k in ("block_r", "block_v", "block_t", "block_d", "block_p", "block_k")
                              if k in c)
            if r.ok:
                lines.append(f"| {r.case} | {r.kernel} | {'yes' if r.aligned else 'no'} | {blocks} | "
                             f"{c.get('n_split', '-')} | {c.get('num_warps')} | {c.get('num_stages')} | {r.n_regs} | "
                             f"{r.spill_stores}/{r.spill_loads} | {r.shared} | "
                             f"{'yes' if r.int64_tile_offsets else 'NO'} |"
                             + (f" (binary of {r.same_as})" if r.same_as else ""))
            else:
                lines.append(f"| {r.case} | {r.kernel} | {'yes' if r.aligned else 'no'} | {blocks} | | | | "
                             f"FAILED: {(r.error or '')[:120]} | | | |")
        with open(md_path, "w") as f:
            f.write("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the per-kernel report as JSON here")
    ap.add_argument("--md", help="write the per-kernel report as a markdown table here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--only", default=None, help="compile only cases whose name contains this")
    args = ap.parse_args(argv)
    cases = [c for c in _cases() if args.only is None or args.only in c.name]
    t0 = time.perf_counter()
    results = compile_all(cases, jobs=args.jobs)
    write_report(results, args.json, args.md)
    bad = [r for r in results if not r.ok]
    for r in results:
        status = (f"regs {r.n_regs:3d} spills {r.spill_stores}/{r.spill_loads} B smem {r.shared} B "
                  f"int64 {r.int64_tile_offsets} ({r.compile_s}s)") if r.ok else f"FAILED {r.error}"
        print(f"{r.case:<28} {r.kernel:<22} {status}")
    print(f"{len(results)} cases, {len(bad)} failed, {time.perf_counter() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
