"""The cost of alignment scores: scoring with a reference gradient against norms-only scoring and a plain
forward+backward of the same batch, in one run.

    python benchmarks/bench_reference.py                 # TinyGPT d=256, 4 layers, T=128, B=16: full and LoRA r=8
    python benchmarks/bench_reference.py --quick --out-dir /tmp/x

Rows, alternated so that drift in machine load hits all of them (median over repeats):

* ``plain``: forward, batch-mean loss, backward (1.0x);
* ``norms``: ``GradNormEngine(backend="ghost").score(batch)``;
* ``norms+ref``: the same with ``reference=`` one reference gradient (dots and cosines too);
* ``norms+4ref``: four references at once.

Each Linear use pays one forward-sized product A Vᵀ per reference (Σ_t δ_tᵀ V a_t), so with full parameters
a reference costs about one forward of matmuls; with LoRA the products are r-sized.
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

METHODS = ("plain", "norms", "norms+ref", "norms+4ref")


def run_case(name, d, layers, vocab, T, B, lora, repeats):
    model = build(d, layers, vocab, T, lora)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, vocab, (B, T), generator=g)}
    ref_batch = {"input_ids": torch.randint(0, vocab, (B, T), generator=g)}
    refs = [gs.reference_gradient(model, [ref_batch], fingerprint=False)]
    refs += [{n: t * (k + 2) for n, t in refs[0].items()} for k in range(3)]
    engine = gs.GradNormEngine(model, backend="ghost")

    def plain():
        p = prepare_batch(batch, lm_loss=True)
        losses, _ = per_sample_losses(model(**p.model_inputs), p, None, "mean")
        losses.mean().backward()
        model.zero_grad(set_to_none=True)

    step = {"plain": plain, "norms": lambda: engine.score(batch),
            "norms+ref": lambda: engine.score(batch, reference=refs[0]),
            "norms+4ref": lambda: engine.score(batch, reference=refs)}
    times = time_alternating(step, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    # exactness of the timed path, against the loop on two samples
    two = {"input_ids": batch["input_ids"][:2]}
    exact = gs.GradNormEngine(model, backend="loop").score(two, reference=refs[0]).dots
    got = engine.score(two, reference=refs[0]).dots
    err = float((got - exact).abs().max() / exact.abs().max().clamp(min=1e-12))
    return [{"case": name, "method": k, "median_s": med[k], "ratio_to_plain": med[k] / med["plain"],
             "ratio_to_norms": med[k] / med["norms"], "all_s": times[k], "dots_rel_err_vs_loop": err}
            for k in METHODS]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        cases = [("tinygpt-d32-T16-B4-full", 32, 1, 64, 16, 4, False)]
        repeats = 2
    else:
        cases = [("tinygpt-d256-L4-T128-B16-full", 256, 4, 8192, 128, 16, False),
                 ("tinygpt-d256-L4-T128-B16-lora8", 256, 4, 8192, 128, 16, True)]
        repeats = args.repeats
    rows = []
    for c in cases:
        rows += run_case(*c, repeats=repeats)
    md = markdown_table(["case", "method", "median s", "x plain", "x norms-only", "dots err vs loop"],
                        [[r["case"], r["method"], f"{r['median_s']:.3f}", f"{r['ratio_to_plain']:.2f}x",
                          f"{r['ratio_to_norms']:.2f}x", f"{r['dots_rel_err_vs_loop']:.1e}"] for r in rows])
    meta = {**env_info(), "repeats": repeats, "threads": args.threads}
    paths = write_results(rows, args.out_dir, f"reference-{utc_stamp()}", meta, markdown=md)
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
