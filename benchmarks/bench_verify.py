"""The one-off cost of the first-batch check (``GradNormEngine(verify=True)``): the first ``score`` of a fresh
engine with the check, against one without it and a plain forward+backward, in one run.

    python benchmarks/bench_verify.py            # TinyGPT d=256, 4 layers, T=128, B=16, full parameters
    python benchmarks/bench_verify.py --quick --out-dir /tmp/x

The check runs the per-sample reference (one forward and backward of a single sample) on three distinct samples
of the first batch (differing in length where the batch allows), so its cost is about 3/B of a per-sample loop,
plus a snapshot of the buffers; later batches pay nothing. (``filtered_backward`` on a model in train mode pays
one eval-mode ghost score of the first batch on top, to check the path with dropout off.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gradsel_core as gs  # noqa: E402
from benchmarks.bench_train_step import build  # noqa: E402
from benchmarks.harness import (RESULTS_DIR, env_info, markdown_table, time_alternating, utc_stamp,  # noqa: E402
                                write_results)
from gradsel_core.batching import per_sample_losses, prepare_batch  # noqa: E402

METHODS = ("plain", "first score, verify=False", "first score, verify=True")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d, L, V, T, B = (32, 1, 64, 16, 4) if args.quick else (256, 4, 8192, 128, 16)
    repeats = 2 if args.quick else args.repeats
    model = build(d, L, V, T, lora=False)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))}

    def plain():
        p = prepare_batch(batch, lm_loss=True)
        per_sample_losses(model(**p.model_inputs), p, None, "mean")[0].mean().backward()
        model.zero_grad(set_to_none=True)

    step = {METHODS[0]: plain,
            METHODS[1]: lambda: gs.GradNormEngine(model, backend="ghost", verify=False).score(batch),
            METHODS[2]: lambda: gs.GradNormEngine(model, backend="ghost", verify=True).score(batch)}
    times = time_alternating(step, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    case = f"tinygpt-d{d}-L{L}-T{T}-B{B}-full"
    rows = [{"case": case, "method": k, "median_s": med[k], "ratio_to_plain": med[k] / med[METHODS[0]],
             "all_s": times[k]} for k in METHODS]
    extra = med[METHODS[2]] - med[METHODS[1]]
    md = markdown_table(["case", "method", "median s", "x plain"],
                        [[case, r["method"], f"{r['median_s']:.3f}", f"{r['ratio_to_plain']:.2f}x"] for r in rows])
    md += (f"\n\nThe check's one-off cost: {extra:.3f} s = {extra / med[METHODS[0]]:.2f}x a plain forward+backward "
           f"of the batch, {extra / med[METHODS[1]]:.2f}x one ghost score; paid on the first batch only.\n")
    paths = write_results(rows, args.out_dir, f"verify-{utc_stamp()}", {**env_info(), "repeats": repeats}, markdown=md)
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
