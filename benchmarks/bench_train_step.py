"""A filtered training step (score + per-batch policy + masked update, then optimizer.step) against a plain
training step (forward, backward of the batch-mean loss, optimizer.step) on the same batch, in one run.

    python benchmarks/bench_train_step.py                 # TinyGPT d=256, T=128, B=16: full and LoRA r=8
    python benchmarks/bench_train_step.py --quick --out-dir /tmp/x

Target on a 2-core CPU: filtered ≤ 1.1× plain. For comparison (published, GPU): the paper's selection
adds about 51% training time; Book-Keeping runs at 0.80–0.87× non-private throughput (≈1.2×); a
fused-Triton Opacus fork 1.11×. The steps alternate (plain, filtered, filtered with ``fused_head=False``,
plain, ...) so that drift in machine load hits all; each reports the median over repeats.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gradsel_core as gs  # noqa: E402
from benchmarks.harness import RESULTS_DIR, env_info, markdown_table, utc_stamp, write_results  # noqa: E402
from gradsel_core.batching import per_sample_losses, prepare_batch  # noqa: E402
from gradsel_core.trainer import LoRAConfig, apply_lora  # noqa: E402


def build(d: int, layers: int, vocab: int, T: int, lora: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=vocab, d_model=d, n_layer=layers,
                                                      n_head=max(1, d // 64), max_seq_len=T))
    if lora:
        model = apply_lora(model, LoRAConfig(r=8, use_peft=True))
    return model


def plain_step(model, opt, batch):
    prepared = prepare_batch(batch, lm_loss=True)
    losses, _ = per_sample_losses(model(**prepared.model_inputs), prepared, None, "mean")
    losses.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_case(name, d, layers, vocab, T, B, lora, repeats, ratio):
    base = build(d, layers, vocab, T, lora)
    models = {"plain": base, "filtered": copy.deepcopy(base), "filtered_unfused": copy.deepcopy(base)}
    for m in models.values():
        m.train()
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    fb = gs.FilteredBackward(models["filtered"], policy="median_band", ratio=ratio)
    # the same step with the LM head through full logits (fused_head=False): what auto's fused head changes
    fb_unfused = gs.FilteredBackward(models["filtered_unfused"], policy="median_band", ratio=ratio, fused_head=False)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, vocab, (B, T), generator=g)}
    step = {
        "plain": lambda: plain_step(models["plain"], opts["plain"], batch),
        "filtered": lambda: (fb.step(batch), opts["filtered"].step(), opts["filtered"].zero_grad(set_to_none=True)),
        "filtered_unfused": lambda: (fb_unfused.step(batch), opts["filtered_unfused"].step(),
                                     opts["filtered_unfused"].zero_grad(set_to_none=True)),
    }
    for k in step:  # warm-up (allocator, optimizer state)
        step[k]()
    times = {k: [] for k in step}
    for _ in range(repeats):
        for k in ("plain", "filtered", "filtered_unfused"):
            gc.collect()
            t0 = time.perf_counter()
            step[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "case": name, "d_model": d, "n_layer": layers, "vocab": vocab, "T": T, "B": B, "lora": lora, "ratio_kept": ratio,
        "repeats": repeats, "plain_median_s": med["plain"], "filtered_median_s": med["filtered"],
        "ratio_to_plain": med["filtered"] / med["plain"], "plain_all_s": times["plain"],
        "filtered_all_s": times["filtered"], "threads": torch.get_num_threads(),
        "head": fb.engine.ghost.head_status, "filtered_unfused_median_s": med["filtered_unfused"],
        "unfused_ratio_to_plain": med["filtered_unfused"] / med["plain"], "filtered_unfused_all_s": times["filtered_unfused"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.quick:
        cases = [("tiny-full", 32, 1, 128, 16, 4, False), ("tiny-lora", 32, 1, 128, 16, 4, True)]
        repeats = 2
    else:
        cases = [("tinygpt-d256-T128-full", 256, 4, 8192, 128, 16, False),
                 ("tinygpt-d256-T128-lora8", 256, 4, 8192, 128, 16, True)]
        repeats = args.repeats
    rows = [run_case(*c, repeats=repeats, ratio=0.2) for c in cases]
    env = env_info("cpu")
    for r in rows:
        r["env"] = env
    table = markdown_table(["case", "plain (s, median)", "filtered (s, median)", "filtered / plain",
                            "filtered, fused_head=False / plain", "head (filtered)"],
                           [[r["case"], f"{r['plain_median_s']:.3f}", f"{r['filtered_median_s']:.3f}",
                             f"{r['ratio_to_plain']:.3f}x", f"{r['unfused_ratio_to_plain']:.3f}x", r["head"][:48]]
                            for r in rows])
    paths = write_results(rows, args.out_dir, f"train-step-{utc_stamp()}", meta={"script": "bench_train_step.py"},
                          markdown=table)
    print(table)
    print(f"results: {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
