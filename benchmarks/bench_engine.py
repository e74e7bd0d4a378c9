"""Time gradsel's backends against a plain forward+backward of the same batch, in one run.

    python benchmarks/bench_engine.py                                # TinyGPT d=256, 4 layers, T=128, B=16
    python benchmarks/bench_engine.py --model gpt2 --params lora --T 256
    python benchmarks/bench_engine.py --quick                        # tiny smoke run (used by tests)
    python benchmarks/bench_engine.py --model mixtral --d 128 --vocab 4096   # mixture of experts (grouped_mm)
    python benchmarks/bench_engine.py --model opt --d 128 --vocab 4096       # (B·T, d) rows before fc1/fc2

Rows (methods): ``plain`` (forward, batch MEAN of the per-sample losses, backward: 1.0x), gradsel
``loop``, ``vmap``, ``ghost`` and ``auto`` (``GradNormEngine(model, params="trainable", backend=...)
.score(batch)``). Each method runs in its own fresh process by default (``--isolate process``), so its
CPU peak memory can be measured; see ``benchmarks/harness.py`` for exactly what time and memory mean.
Every method's norms are checked against the loop (max relative error). A method that fails is recorded
with ``status`` "error"/"unsupported" and its ``reason``.

Results: ``<out-dir>/engine-<UTC timestamp>.json/.csv/.md`` - versions, device, shapes, median of the
repeats, ratio to plain, peak memory and its ratio, max relative error vs the loop.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness as H  # noqa: E402

import torch  # noqa: E402

METHODS = ["plain", "loop", "vmap", "ghost", "auto"]
LABELS = {
    "plain": "plain fwd+bwd (mean loss)",
    "loop": "gradsel loop",
    "vmap": "gradsel vmap",
    "ghost": "gradsel ghost",
    "auto": "gradsel auto",
}
REGISTRY = dict(H.GRADSEL_METHODS)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: TinyGPT d=32, 1 layer, vocab 64, T=16, B=4")
    ap.add_argument("--model", choices=["tinygpt", "gpt2", "mixtral", "mixtral-eager", "opt"], default="tinygpt")
    ap.add_argument("--params", choices=["full", "lora"], default="full")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--d", type=int, default=None, help="d_model (default 256; --quick 32)")
    ap.add_argument("--layers", type=int, default=None, help="(default 4; --quick 1)")
    ap.add_argument("--heads", type=int, default=None, help="(default d/64, at least 1; --quick 2)")
    ap.add_argument("--vocab", type=int, default=None, help="(default 8192; --quick 64)")
    ap.add_argument("--T", type=int, default=None, help="sequence length (default 128; --quick 16)")
    ap.add_argument("--B", type=int, default=None, help="batch size (default 16; --quick 4)")
    ap.add_argument("--dtype", default="float32")
    H.add_run_args(ap, METHODS, "method", "engine")
    args = ap.parse_args(argv)

    q = args.quick
    d = args.d or (32 if q else 256)
    spec = H.CaseSpec(
        model=args.model, d_model=d, n_layer=args.layers or (1 if q else 4),
        n_head=args.heads or (2 if q else max(1, d // 64)), vocab=args.vocab or (64 if q else 8192),
        T=args.T or (16 if q else 128), B=args.B or (4 if q else 16), params=args.params, lora_r=args.lora_r,
        dtype=args.dtype,
    )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in REGISTRY]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {list(REGISTRY)}")
    repeats = args.repeats or (2 if q else 5)
    isolate = args.isolate or ("none" if q else "process")
    threads = args.threads or (1 if q else None)
    if threads:
        torch.set_num_threads(threads)
    env = H.env_info(device)
    print(f"bench_engine: {spec.name} x {methods} on {env['device_name']} ({env['torch_threads']} threads), "
          f"repeats={repeats}, warmup={args.warmup}, isolate={isolate}")
    rows = H.run_case(
        spec, methods, REGISTRY, __file__, bench="engine", device=device, repeats=repeats, warmup=args.warmup,
        isolate=isolate, timeout=args.timeout, threads=threads, ref_samples=args.ref_samples, env=env,
    )
    md = H.summary_markdown(rows, METHODS, LABELS)
    stem = f"engine-{H.utc_stamp()}{'-quick' if q else ''}"
    meta = {"bench": "engine", "argv": sys.argv if argv is None else argv, "env": env, "methods": methods,
            "cases": [spec.name], "repeats": repeats, "warmup": args.warmup, "isolate": isolate}
    return H.finish(rows, args.out_dir, stem, meta, md)


if __name__ == "__main__":
    H.worker_entry(REGISTRY)
    main()
