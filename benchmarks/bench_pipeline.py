"""Throughput of the dataset pipeline (``score_dataset``) against the bare engine.

    python benchmarks/bench_pipeline.py                    # defaults: 512 records, TinyGPT d=64 L=2
    python benchmarks/bench_pipeline.py --n 2048 --d-model 256 --layers 4 --device cuda

Same model, same records, same batch size. Three timings, each the median over ``--repeats`` rounds
(after a warm-up; the three run interleaved in every round, so load drift hits them alike):

* ``engine_s``: ``GradNormEngine.score`` over pre-made batches, already collated and on the device,
  with exactly the pipeline's batch plan (same compositions, same padding) - pure scoring;
* ``pipeline_s``: ``score_dataset(model, records, tmpdir, overwrite=True)`` - the dataset scan and
  hashing, the model fingerprint, collation, host-to-device copies, scoring, the safetensors shards,
  checksums and the manifest;
* ``engine_naive_s`` (information): the engine on consecutive unbucketed batches of the same size.

``ratio = engine_s / pipeline_s`` is the pipeline's throughput as a fraction of the engine's (target
>= 0.9). A row goes to ``benchmarks/results/pipeline-<UTC timestamp>.json`` (and ``.csv``) with the
environment (torch version, device, timestamp, ...), the shapes and the ratio.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:  # the shared harness: timing medians, environment info, result files
    from benchmarks import harness
except Exception:  # noqa: BLE001 - keep the script usable on its own
    harness = None

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int, device: str) -> Dict[str, Any]:
    if harness is not None:
        return harness.time_fn(fn, repeats=repeats, warmup=warmup, device=device)
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "all_s": times, "repeats": repeats, "warmup": warmup}


def env_info(device: str) -> Dict[str, Any]:
    if harness is not None:
        return harness.env_info(device)
    dev = torch.device(device)
    return {
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def stamp() -> str:
    return harness.utc_stamp() if harness is not None else _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="records")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gradsel_core import GradNormEngine
    from gradsel_core.data import collate, plan_batches
    from gradsel_core.models import TinyGPT, TinyGPTConfig
    from gradsel_core.scoring import score_dataset

    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(
        vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers, n_head=args.heads, max_seq_len=args.max_len,
    )).to(args.device)
    rng = np.random.default_rng(0)
    records = [
        {"input_ids": rng.integers(1, args.vocab, int(rng.integers(args.min_len, args.max_len + 1))).tolist()}
        for _ in range(args.n)
    ]
    lengths = [len(r["input_ids"]) for r in records]

    backend = args.backend
    engine = GradNormEngine(model, backend=backend)
    plan = plan_batches(lengths, args.batch_size, args.max_tokens)
    planned = [collate([records[p] for p in b], 0) for sh in plan for b in sh.batches]
    try:
        resolved = engine.score({k: v.to(args.device) for k, v in planned[0].items()}).backend
    except (ImportError, NotImplementedError) as e:  # "auto" before the ghost backend exists
        print(f"backend {backend!r} unavailable ({e}); using vmap")
        backend, engine = "vmap", GradNormEngine(model, backend="vmap")
        resolved = "vmap"
    planned = [{k: v.to(args.device) for k, v in b.items()} for b in planned]
    naive = [
        {k: v.to(args.device) for k, v in collate(records[i : i + args.batch_size], 0).items()}
        for i in range(0, args.n, args.batch_size)
    ]

    def run_engine(batches):
        def fn():
            for b in batches:
                engine.score(b)
        return fn

    tmp = tempfile.mkdtemp(prefix="gradsel-bench-pipeline-")

    def run_pipeline():
        score_dataset(model, records, os.path.join(tmp, "store"), batch_size=args.batch_size, max_tokens=args.max_tokens,
                      backend=backend, overwrite=True, progress=False)

    # interleaved (engine, pipeline, naive) rounds, so load drift on a shared machine hits all three alike
    fns = {"engine": run_engine(planned), "pipeline": run_pipeline, "naive": run_engine(naive)}
    for fn in fns.values():
        time_fn(fn, 1, args.warmup, args.device)  # warm-up
    runs: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            runs[k] += time_fn(fn, 1, 0, args.device)["all_s"]
    t_engine, t_pipe, t_naive = (
        {"median_s": statistics.median(runs[k]), "all_s": runs[k]} for k in ("engine", "pipeline", "naive")
    )
    ratio = t_engine["median_s"] / t_pipe["median_s"]
    padded = sum(int(b["input_ids"].numel()) for b in planned)
    padded_naive = sum(int(b["input_ids"].numel()) for b in naive)
    env = env_info(args.device)
    row = {
        "bench": "pipeline",
        "case": f"tinygpt-d{args.d_model}-L{args.layers}-n{args.n}-B{args.batch_size}",
        "ratio": ratio,
        "target": 0.9,
        "meets_target": ratio >= 0.9,
        "engine_s": t_engine["median_s"],
        "pipeline_s": t_pipe["median_s"],
        "engine_naive_s": t_naive["median_s"],
        "engine_all_s": t_engine["all_s"],
        "pipeline_all_s": t_pipe["all_s"],
        "engine_samples_per_s": args.n / t_engine["median_s"],
        "pipeline_samples_per_s": args.n / t_pipe["median_s"],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "backend": backend,
        "backend_resolved": resolved,
        "shapes": {
            "n_records": args.n, "len_min": min(lengths), "len_max": max(lengths), "tokens": sum(lengths),
            "batch_size": args.batch_size, "max_tokens": args.max_tokens, "batches": len(planned),
            "padded_tokens_bucketed": padded, "padded_tokens_naive": padded_naive,
            "vocab": args.vocab, "d_model": args.d_model, "n_layer": args.layers, "n_head": args.heads,
        },
        "torch_version": torch.__version__,
        "device": args.device,
        "timestamp": env.get("timestamp"),
        "env": env,
    }
    name = f"pipeline-{stamp()}"
    if harness is not None:
        paths = harness.write_results([row], args.out, name, meta=env)
        path = paths["json"]
    else:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / f"{name}.json"
        path.write_text(json.dumps({"meta": env, "rows": [row]}, indent=1, default=str))
    print(
        f"engine {t_engine['median_s']:.3f}s  pipeline {t_pipe['median_s']:.3f}s  ratio {ratio:.3f} "
        f"(target >= 0.9)  naive-batch engine {t_naive['median_s']:.3f}s  backend {resolved}  -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
