"""GPU benchmark of gradsel's fused Triton kernels and of end-to-end scoring.

    python benchmarks/bench_kernels.py            # kernels + end-to-end (about 3-5 min on an H200)
    python benchmarks/bench_kernels.py --quick    # fewer cases and repeats
    python benchmarks/bench_kernels.py --check    # correctness of every kernel vs torch on CUDA only

Needs CUDA; without it the script says so and exits with code 2.

What it measures (all on one GPU, in one run):
* ceilings: device-to-device copy bandwidth (a 2 GiB ``copy_``, bytes read + written) and bf16 tensor-core
  rate (an 8192³ bf16 matmul);
* each kernel of ``gradsel_kernels`` against its torch reference in ``gradsel_core.dispatch``: median time
  (CUDA events, L2 flushed before each call), achieved GB/s over the compulsory bytes (each input read
  once) and TFLOP/s over the kernel's nominal flops, as fractions of the ceilings, and the max relative
  error of the kernel vs the torch path on the fp32 upcast;
* end to end: ``GradNormEngine(model, backend=...).score(batch)`` for backends triton / ghost (/ vmap
  where it fits) against a plain forward+backward of the mean per-sample loss (ratio_to_plain), for
  TinyGPT sizes and a Llama-style ~1.1B config (random init, bf16, T=1024), full parameters and LoRA
  (peft). Every end-to-end case is wrapped: a failure is recorded in the results, never fatal.

Results: ``benchmarks/results/gpu-<UTC timestamp>.json`` ({"meta": env + ceilings, "rows": [...]}),
rewritten after every case so a timeout keeps what was measured; copied to ``$OUT`` when set.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# a source checkout without `pip install -e .`: gradsel_kernels lives in kernels/ (no package there)
import importlib.util  # noqa: E402

if importlib.util.find_spec("gradsel_kernels") is None:
    sys.path.insert(1, str(REPO_ROOT / "kernels"))

import torch  # noqa: E402

try:  # the shared harness (environment info, the plain baseline, TinyGPT cases)
    from benchmarks import harness
except Exception:  # noqa: BLE001 - keep this script usable on its own
    harness = None

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------
# environment, timing, results
# ------------------------------------------------------------------------------------------------
def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def env_meta() -> Dict[str, Any]:
    meta: Dict[str, Any] = {}
    if harness is not None:
        try:
            meta.update(harness.env_info("cuda"))
        except Exception as e:  # noqa: BLE001
            meta["harness_env_error"] = repr(e)
    import triton

    meta.update(
        torch_version=torch.__version__,
        triton_version=triton.__version__,
        cuda_version=torch.version.cuda,
        device_name=torch.cuda.get_device_name(0),
        device_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        python=platform.python_version(),
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return meta


class Results:
    """Rows plus meta, rewritten to one JSON file after every add (and copied to $OUT when set)."""

    def __init__(self, out_dir: Path, meta: Dict[str, Any]):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"gpu-{utc_stamp()}.json"
        self.meta = meta
        self.rows: List[Dict[str, Any]] = []

    def add(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str))
        out = os.environ.get("OUT")
        if out:
            try:
                Path(out).mkdir(parents=True, exist_ok=True)
                shutil.copy(self.path, Path(out) / self.path.name)
            except OSError as e:
                print(f"warning: could not copy results to $OUT: {e}", file=sys.stderr)


_L2_FLUSH: Optional[torch.Tensor] = None


def flush_l2() -> None:
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _L2_FLUSH.zero_()


def cuda_time(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2, flush: bool = True) -> Dict[str, Any]:
    """Median seconds of ``fn()`` over ``repeats`` calls timed with CUDA events (L2 flushed before each)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if flush:
            flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": times, "repeats": repeats}


def measure_ceilings(quick: bool) -> Dict[str, Any]:
    """Copy bandwidth and bf16 matmul rate measured now, on this device."""
    n = (512 if quick else 2048) * 1024 * 1024 // 4  # fp32 elements: 0.5 / 2 GiB
    x = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), repeats=10, warmup=3, flush=False)["median_s"]  # noqa: F821 (x, y deleted after)
    copy_gbps = 2 * x.numel() * 4 / t / 1e9
    del x, y
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, repeats=10, warmup=3, flush=False)["median_s"]  # noqa: F821 (a, b deleted after)
    tflops = 2 * m**3 / t / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbps, "bf16_matmul_TFLOPs": tflops, "copy_bytes": n * 4, "matmul_n": m}


# ------------------------------------------------------------------------------------------------
# kernels vs torch
# ------------------------------------------------------------------------------------------------
def _esize(dt: torch.dtype) -> int:
    return torch.tensor([], dtype=dt).element_size()


def kernel_cases(quick: bool) -> List[Dict[str, Any]]:
    """(op, shape, dtype) cases with the kernel's nominal flops and compulsory bytes."""
    bf = torch.bfloat16
    cases = []

    def add(op, dtype, flops, nbytes, **shape):
        cases.append({"op": op, "dtype": dtype, "shape": shape, "flops": flops, "bytes": nbytes})

    big = [(8, 1024, 2048, 2048)] if quick else [(8, 1024, 2048, 2048), (4, 2048, 4096, 4096), (8, 512, 2048, 8192)]
    for B, T, d, p in big:
        e = _esize(bf)
        # ghost: upper triangle only -> B·T²·(d+p) flops (a multiply-add = 2 flops, half the Gram)
        add("ghost_sq", bf, B * T * T * (d + p), B * T * (d + p) * e, B=B, T=T, d=d, p=p)
        add("direct_sq", bf, 2 * B * T * d * p, B * T * (d + p) * e, B=B, T=T, d=d, p=p)
    # short sequences / small batches: few (sample, block) programs, so the launchers split the loops
    B, T, d, p = 16, 128, 4096, 4096
    add("ghost_sq", bf, B * T * T * (d + p), B * T * (d + p) * 2, B=B, T=T, d=d, p=p)
    B, T, d, r = 2, 256, 4096, 16
    add("direct_sq", bf, 2 * B * T * d * r, B * T * (d + r) * 2, B=B, T=T, d=d, p=r)
    if not quick:
        add("embedding_sq", bf, None, 16 * 128 * (2048 * 2 + 8), B=16, T=128, d=2048, vocab=32000)
        add("rowsum_sq", bf, 2 * 1 * 2048 * 2048, 1 * 2048 * 2048 * 2, B=1, T=2048, p=2048)
    # the LM head (p = vocab) in ghost form
    B, T, d, V = (4, 1024, 2048, 32000)
    add("ghost_sq", bf, B * T * T * (d + V), B * T * (d + V) * 2, B=B, T=T, d=d, p=V)
    # LoRA factors: A (input d=4096 -> r), B (input r -> 4096)
    for r in ((16,) if quick else (8, 16, 64)):
        B, T, d = 8, 1024, 4096
        add("direct_sq", bf, 2 * B * T * d * r, B * T * (d + r) * 2, B=B, T=T, d=d, p=r)
        add("direct_sq", bf, 2 * B * T * d * r, B * T * (d + r) * 2, B=B, T=T, d=r, p=d)
    add("direct_sq", torch.float32, 2 * 8 * 512 * 1024 * 1024, 8 * 512 * 2048 * 4, B=8, T=512, d=1024, p=1024)
    B, T, d = 8, 1024, 2048
    add("embedding_sq", bf, None, B * T * (d * 2 + 8), B=B, T=T, d=d, vocab=32000)
    for B, T, p in [(8, 1024, 4096)] + ([] if quick else [(16, 2048, 2048)]):
        add("rowsum_sq", bf, 2 * B * T * p, B * T * p * 2, B=B, T=T, p=p)
        add("weighted_rowsum_sq", bf, 3 * B * T * p, 2 * B * T * p * 2, B=B, T=T, p=p)
    return cases


def make_inputs(case: Dict[str, Any]) -> tuple:
    s, dt = case["shape"], case["dtype"]
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    if case["op"] in ("ghost_sq", "direct_sq"):
        A = torch.randn(s["B"], s["T"], s["d"], device=dev, generator=g).to(dt)
        G = torch.randn(s["B"], s["T"], s["p"], device=dev, generator=g).to(dt)
        return (A, G)
    if case["op"] == "embedding_sq":
        ids = torch.randint(0, s["vocab"], (s["B"], s["T"]), device=dev, generator=g)
        G = torch.randn(s["B"], s["T"], s["d"], device=dev, generator=g).to(dt)
        return (ids, G, 0)
    G = torch.randn(s["B"], s["T"], s["p"], device=dev, generator=g).to(dt)
    if case["op"] == "rowsum_sq":
        return (G,)
    X = torch.randn(s["B"], s["T"], s["p"], device=dev, generator=g).to(dt)
    return (X, G)


def _upcast(args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def launch_config(op: str, args: tuple) -> Dict[str, Any]:
    """The launch configuration (blocks, n_split, warps) the kernel picks for these inputs on this GPU."""
    from gradsel_kernels import _direct, _embedding, _ghost, _row, _utils

    if op == "embedding_sq":
        G = args[1]
        return _embedding.embedding_config(*G.shape[:2], G.shape[2], G.dtype, _utils.sm_count(G.device))
    G = args[-1]
    sms = _utils.sm_count(G.device)
    if op in ("rowsum_sq", "weighted_rowsum_sq"):
        return _row.row_config(*G.shape, sms)
    A = args[0]
    dtype = A.dtype if A.dtype == G.dtype else torch.float32
    fn = _ghost.ghost_config if op == "ghost_sq" else _direct.direct_config
    return fn(*A.shape, G.shape[2], dtype, sms)


def bench_kernel(case: Dict[str, Any], ceil: Dict[str, Any], repeats: int, check_only: bool) -> Dict[str, Any]:
    import gradsel_kernels as K
    from gradsel_core import dispatch as D

    op = case["op"]
    row: Dict[str, Any] = {
        "kind": "kernel", "op": op, "dtype": str(case["dtype"]).replace("torch.", ""), "shape": case["shape"],
        "flops": case["flops"], "bytes": case["bytes"], "status": "ok",
    }
    try:
        args = make_inputs(case)
        kfn, tfn = getattr(K, op), getattr(D, op)
        row["config"] = launch_config(op, args)
        out = kfn(*args)
        ref = tfn(*_upcast(args))  # torch reference on the fp32 upcast
        torch.cuda.synchronize()
        row["max_rel_err"] = rel_err(out, ref)
        row["matches"] = row["max_rel_err"] <= (1e-3 if case["dtype"] != torch.float32 else 1e-4)
        if check_only:
            return row
        tk = cuda_time(lambda: kfn(*args), repeats=repeats)
        tt = cuda_time(lambda: tfn(*args), repeats=repeats)  # the torch path as dispatch runs it (native dtype in)
        row.update(triton_s=tk["median_s"], torch_s=tt["median_s"], speedup_vs_torch=tt["median_s"] / tk["median_s"])
        row["triton_GBps"] = case["bytes"] / tk["median_s"] / 1e9
        row["frac_copy_bw"] = row["triton_GBps"] / ceil["copy_GBps"]
        if case["flops"]:
            row["triton_TFLOPs"] = case["flops"] / tk["median_s"] / 1e12
            row["torch_TFLOPs"] = case["flops"] / tt["median_s"] / 1e12
            row["frac_bf16_tc"] = row["triton_TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
    except Exception as e:  # noqa: BLE001 - record and go on
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:800], traceback=traceback.format_exc()[-3000:])
    finally:
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_LORA_TARGETS = ["qkv", "proj", "fc", "fc_out"]


def _randomize_lora_b(model: torch.nn.Module) -> None:
    """peft starts lora_B at 0 (all lora_A per-sample grads exactly 0); give it small random values."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)


def _apply_lora(model: torch.nn.Module, targets: List[str], r: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, bias="none")
    model = get_peft_model(model, cfg)
    _randomize_lora_b(model)
    return model


def build_llama(T: int, lora: bool, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A Llama-style ~1.1B config (Llama-3.2-1B shapes, 32k vocab, untied), random init on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(T, 2048),
        tie_word_embeddings=False, use_cache=False,
    )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device="cuda", dtype=dtype)
    if lora:
        model = _apply_lora(model, LLAMA_LORA_TARGETS, 16)
    return model


def build_tiny(d: int, L: int, V: int, T: int, lora: bool, dtype: torch.dtype) -> torch.nn.Module:
    from gradsel_core.models import TinyGPT, TinyGPTConfig

    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=V, d_model=d, n_layer=L, n_head=max(1, d // 64), max_seq_len=T))
    if lora:
        model = _apply_lora(model, TINY_LORA_TARGETS, 8)
    return model.to(device="cuda", dtype=dtype)


def e2e_cases(quick: bool) -> List[Dict[str, Any]]:
    cases = [
        # the peer-figure configuration of norm-math.md (fp32), then a GPT-2-small-like one in bf16
        {"name": "tinygpt-d256-L4-T128-B16", "kind": "tiny", "d": 256, "L": 4, "V": 8192, "T": 128, "B": 16,
         "dtype": torch.float32, "backends": ["triton", "ghost", "vmap"]},
        {"name": "tinygpt-d768-L12-T512-B8", "kind": "tiny", "d": 768, "L": 12, "V": 32000, "T": 512, "B": 8,
         "dtype": torch.bfloat16, "backends": ["triton", "ghost"] + ([] if quick else ["vmap"])},
        {"name": "llama1b-T1024-B4", "kind": "llama", "V": 32000, "T": 1024, "B": 4, "dtype": torch.bfloat16,
         "backends": ["triton", "ghost"]},
    ]
    out = []
    for c in cases:
        for lora in (False, True):
            out.append(dict(c, lora=lora, name=c["name"] + ("-lora" if lora else "-full")))
    return out


def _plain_step(model: torch.nn.Module, batch: Dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    if harness is not None and hasattr(harness, "plain_step"):
        harness.plain_step(model, batch, labels)
        return
    from gradsel_core.batching import causal_lm_losses, extract_logits

    model.zero_grad(set_to_none=True)
    causal_lm_losses(extract_logits(model(**batch)), labels)[0].mean().backward()


def bench_e2e(case: Dict[str, Any], repeats: int, results: "Results") -> None:
    """Plain fwd+bwd, then each backend; one row per (case, method), errors recorded."""
    import gradsel_core as gs
    from gradsel_core.batching import prepare_batch

    base = {"kind": "e2e", "case": case["name"], "lora": case["lora"], "dtype": str(case["dtype"]).replace("torch.", ""),
            "B": case["B"], "T": case["T"]}
    model = None
    try:
        if case["kind"] == "llama":
            model = build_llama(case["T"], case["lora"], case["dtype"])
        else:
            model = build_tiny(case["d"], case["L"], case["V"], case["T"], case["lora"], case["dtype"])
        vocab = case["V"]
        g = torch.Generator(device="cuda").manual_seed(1)
        batch = {"input_ids": torch.randint(0, vocab, (case["B"], case["T"]), device="cuda", generator=g)}
        labels = prepare_batch(batch, lm_loss=True).labels
        n_total = sum(p.numel() for p in model.parameters())
        n_scored = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base.update(n_params_total=n_total, n_params_scored=n_scored)
    except Exception as e:  # noqa: BLE001
        results.add(dict(base, method="build", status="error", error=f"{type(e).__name__}: {e}"[:800],
                         traceback=traceback.format_exc()[-3000:]))
        return
    plain_s = None
    norms: Dict[str, torch.Tensor] = {}
    for method in ["plain"] + case["backends"]:
        row = dict(base, method=method, status="ok")
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            mem0 = torch.cuda.memory_allocated()
            if method == "plain":
                fn = lambda: _plain_step(model, batch, labels)  # noqa: E731, F821 (model deleted after the loop)
            else:
                engine = gs.GradNormEngine(model, params="trainable", backend=method)
                fn = lambda: norms.__setitem__(method, engine.score(batch).norms)  # noqa: E731
            t = cuda_time(fn, repeats=repeats, warmup=1, flush=False)
            row.update(median_s=t["median_s"], all_s=t["all_s"],
                       peak_mem_bytes=torch.cuda.max_memory_allocated() - mem0)
            if method == "plain":
                plain_s = t["median_s"]
                model.zero_grad(set_to_none=True)
            row["ratio_to_plain"] = t["median_s"] / plain_s if plain_s else None
            if method != "plain" and "ghost" in norms and method in norms and method != "ghost":
                row["max_rel_err_vs_ghost"] = rel_err(norms[method], norms["ghost"])
        except Exception as e:  # noqa: BLE001 - a benchmark records every failure
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:800], traceback=traceback.format_exc()[-3000:])
        results.add(row)
        print(f"  {case['name']:<32} {method:<7} {row['status']:<6} "
              + (f"{row['median_s'] * 1e3:9.2f} ms  x{row['ratio_to_plain'] or 0:.2f}" if row.get("median_s") else
                 row.get("error", "")[:120]), flush=True)
    # triton vs ghost agreement once both ran (ghost runs after triton in the list)
    if "triton" in norms and "ghost" in norms:
        for r in results.rows:
            if r.get("case") == case["name"] and r.get("method") == "triton":
                r["max_rel_err_vs_ghost"] = rel_err(norms["triton"], norms["ghost"])
        results.flush()
    del model
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    ap.add_argument("--check", action="store_true", help="only check every kernel against torch on CUDA")
    ap.add_argument("--skip-e2e", action="store_true", help="kernels only")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: CUDA is not available on this machine; the Triton kernel benchmark needs an NVIDIA "
              "GPU (the kernels' CPU tests run in interpreter mode: pytest tests/test_kernels.py).", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels: unset TRITON_INTERPRET to benchmark compiled kernels.", file=sys.stderr)
        return 2

    repeats = args.repeats or (5 if args.quick else 10)
    meta = env_meta()
    print(f"device: {meta['device_name']}  torch {meta['torch_version']}  triton {meta['triton_version']}", flush=True)
    results = Results(Path(args.out_dir), meta)
    ceil = {"copy_GBps": None, "bf16_matmul_TFLOPs": None}
    if not args.check:
        ceil = measure_ceilings(args.quick)
        meta["ceilings"] = ceil
        print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s",
              flush=True)
        results.flush()

    n_bad = 0
    for case in kernel_cases(args.quick):
        row = bench_kernel(case, ceil, repeats, args.check)
        results.add(row)
        n_bad += row["status"] != "ok" or not row.get("matches", False)
        shape = ",".join(f"{k}={v}" for k, v in case["shape"].items())
        if row["status"] != "ok":
            print(f"  {case['op']:<20} {shape:<40} ERROR {row['error'][:200]}", flush=True)
        elif args.check:
            print(f"  {case['op']:<20} {shape:<40} rel err {row['max_rel_err']:.1e} {'ok' if row['matches'] else 'MISMATCH'}")
        else:
            tf = f"{row['triton_TFLOPs']:7.1f} TFLOP/s ({row['frac_bf16_tc']:.0%})" if "triton_TFLOPs" in row else ""
            print(f"  {case['op']:<20} {shape:<40} {row['triton_s'] * 1e3:8.3f} ms  x{row['speedup_vs_torch']:5.2f} vs torch"
                  f"  {row['triton_GBps']:7.0f} GB/s ({row['frac_copy_bw']:.0%})  {tf}  err {row['max_rel_err']:.1e}",
                  flush=True)

    if not (args.check or args.skip_e2e):
        for case in e2e_cases(args.quick):
            bench_e2e(case, 3 if args.quick else 5, results)
    results.flush()
    print(f"results: {results.path}")
    if n_bad:
        print(f"bench_kernels: {n_bad} kernel case(s) failed or mismatched torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
