"""Token-budget batching (issue #24 item 2): ``score_dataset`` samples/s on short and long records with the
built-in tiny model (``--model tiny``: TinyGPT d64, 2 layers), batches of at most 16 records (the old
default) against token budgets (``max_tokens``, no record cap), each beside a plain forward+backward over
the same batches in the same run.

    python benchmarks/bench_batching.py
    python benchmarks/bench_batching.py --quick --out-dir /tmp/x

Short records have 30-50 tokens (about the T = 41 of the issue), long ones 450-510. One thread; each
configuration's score and plain runs alternate, ``--repeats`` rounds, medians. The machine is a shared
2-core CPU: wall times are noisy, so process CPU seconds are reported too.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gradsel_core as gs  # noqa: E402
from benchmarks.harness import RESULTS_DIR, env_info, markdown_table, utc_stamp, write_results  # noqa: E402
from gradsel_core.batching import per_sample_losses, prepare_batch  # noqa: E402
from gradsel_core.data import collate, plan_batches, tiny_model  # noqa: E402

CONFIGS = {"batch_size=16": dict(batch_size=16, max_tokens=None)}
for _budget in (1024, 2048, 4096, 8192):
    CONFIGS[f"max_tokens={_budget}"] = dict(batch_size=None, max_tokens=_budget)


def make_records(n: int, lo: int, hi: int, seed: int):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 256, int(rng.integers(lo, hi + 1))).tolist()} for _ in range(n)]


def plain_pass(model, records, plan, pad):
    """A plain forward + batch-mean loss + backward over every batch of ``plan``."""
    for sh in plan:
        for b in sh.batches:
            batch = collate([records[i] for i in b], pad)
            p = prepare_batch(batch, lm_loss=True)
            losses, _ = per_sample_losses(model(**p.model_inputs), p, None, "mean")
            losses.mean().backward()
            model.zero_grad(set_to_none=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--short", type=int, default=2048, help="short records (30-50 tokens)")
    ap.add_argument("--long", type=int, default=192, help="long records (450-510 tokens)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_model()
    pad = model.config.pad_token_id
    sizes = {"short": (256, 30, 50), "long": (32, 450, 510)} if args.quick else {"short": (args.short, 30, 50),
                                                                               "long": (args.long, 450, 510)}
    repeats = 1 if args.quick else args.repeats
    rows = []
    stem = f"batching-{utc_stamp()}"
    meta = {**env_info(), "repeats": repeats, "threads": 1, "model": "tiny (TinyGPT d64 L2, byte vocab)",
            "sizes": sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (n, lo, hi) in sizes.items():
            records = make_records(n, lo, hi, seed=len(kind))
            lengths = [len(r["input_ids"]) for r in records]
            for name, cfg in CONFIGS.items():
                window = 64 * cfg["batch_size"] if cfg["batch_size"] else 4096
                plan = plan_batches(lengths, cfg["batch_size"], cfg["max_tokens"], window, warn=False)
                n_batches = sum(len(sh.batches) for sh in plan)
                times = {"score": [], "plain": [], "score_cpu": [], "plain_cpu": []}
                for r in range(repeats + 1):  # round 0: warm-up
                    for what in ("score", "plain"):
                        gc.collect()
                        t0, c0 = time.perf_counter(), time.process_time()
                        if what == "score":
                            gs.score_dataset(model, records, f"{tmp}/{kind}-{name}", progress=False, overwrite=True,
                                             resume=False, **cfg)
                        else:
                            plain_pass(model, records, plan, pad)
                        if r:
                            times[what].append(time.perf_counter() - t0)
                            times[what + "_cpu"].append(time.process_time() - c0)
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append({"records": kind, "n": n, "config": name, "batches": n_batches,
                             "mean_batch": n / n_batches, "score_s": med["score"], "plain_s": med["plain"],
                             "score_cpu_s": med["score_cpu"], "plain_cpu_s": med["plain_cpu"],
                             "samples_per_s": n / med["score"], "samples_per_cpu_s": n / med["score_cpu"],
                             "x_plain": med["score"] / med["plain"], "all": times})
                write_results(rows, args.out_dir, stem, {**meta, "partial": True})  # a cut-short run keeps its rows
                print(f"{kind:5s} {name:16s} B~{n / n_batches:6.1f}  {n / med['score']:8.1f} samples/s "
                      f"({n / med['score_cpu']:8.1f} per CPU s)  {med['score'] / med['plain']:.2f}x plain", flush=True)
    for r in rows:
        base = next(b for b in rows if b["records"] == r["records"] and b["config"] == "batch_size=16")
        r["speedup_vs_b16"] = r["samples_per_s"] / base["samples_per_s"]
        r["speedup_vs_b16_cpu"] = r["samples_per_cpu_s"] / base["samples_per_cpu_s"]
    md = markdown_table(
        ["records", "config", "mean B", "samples/s", "per CPU s", "vs B=16 (wall)", "vs B=16 (CPU)", "x plain fwd+bwd"],
        [[r["records"], r["config"], f"{r['mean_batch']:.1f}", f"{r['samples_per_s']:.0f}",
          f"{r['samples_per_cpu_s']:.0f}", f"{r['speedup_vs_b16']:.2f}x", f"{r['speedup_vs_b16_cpu']:.2f}x",
          f"{r['x_plain']:.2f}x"] for r in rows])
    md += (f"\n\n{meta['timestamp']}, {meta['cpu']} ({meta['cpu_count']} cores, shared with other jobs: noisy), "
           f"torch {meta['torch_version']}, 1 thread, median of {repeats} alternating rounds.\n")
    paths = write_results(rows, args.out_dir, stem, meta, markdown=md)
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
