"""Two-pass in-step filtering (FSDP2/DeepSpeed mode) against a plain training step and the one-backward
path, on one process, in one run.

    python benchmarks/bench_two_pass.py                   # TinyGPT d=256, T=128, B=16: full and LoRA r=8
    python benchmarks/bench_two_pass.py --device cuda     # on a GPU (bigger cases)
    python benchmarks/bench_two_pass.py --quick --out-dir /tmp/x

Each step is forward + backward(s) + ``optimizer.step()`` + ``zero_grad`` on the same batch:

* ``plain``: the batch-mean loss, ``backward()`` (1.0x, the baseline);
* ``one_backward``: ``FilteredBackward`` -- one forward, one activation backward, the kept samples'
  weight gradients written by gradsel (the default off FSDP);
* ``two_pass``: ``TwoPassFilteredBackward`` -- the same scoring backward with the graph kept, then an
  ordinary ``backward()`` of the kept samples' masked mean loss (what runs under FSDP2 / DeepSpeed).

Expected: two_pass ≈ plain + the scoring backward (an activation backward and the norms). The steps
alternate (plain, one_backward, two_pass, plain, ...) so that drift in machine load hits all of them;
each reports the median over repeats.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gradsel_core as gs  # noqa: E402
from benchmarks.bench_train_step import build, plain_step  # noqa: E402
from benchmarks.harness import (RESULTS_DIR, env_info, markdown_table, time_alternating, utc_stamp,  # noqa: E402
                                write_results)

METHODS = ("plain", "one_backward", "two_pass")


def run_case(name, d, layers, vocab, T, B, lora, repeats, ratio, device):
    base = build(d, layers, vocab, T, lora).to(device)
    models = {k: (base if k == "plain" else copy.deepcopy(base)) for k in METHODS}
    for m in models.values():
        m.train()
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    filters = {"one_backward": gs.FilteredBackward(models["one_backward"], policy="median_band", ratio=ratio),
               "two_pass": gs.TwoPassFilteredBackward(models["two_pass"], policy="median_band", ratio=ratio)}
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, vocab, (B, T), generator=g).to(device)}

    def filtered(k):
        filters[k].step(batch)
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)

    step = {"plain": lambda: plain_step(models["plain"], opts["plain"], batch),
            "one_backward": lambda: filtered("one_backward"), "two_pass": lambda: filtered("two_pass")}
    times = time_alternating(step, repeats, device=device)  # warm-up round: allocator, optimizer state, kernels
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in METHODS:
        rows.append({
            "bench": "two_pass", "case": name, "method": k, "d_model": d, "n_layer": layers, "vocab": vocab, "T": T,
            "B": B, "lora": lora, "ratio_kept": ratio, "repeats": repeats, "device": str(device),
            "median_s": med[k], "all_s": times[k], "ratio_to_plain": med[k] / med["plain"],
            "ratio_to_one_backward": med[k] / med["one_backward"], "threads": torch.get_num_threads(),
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        cases = [("quick-full", 32, 1, 128, 16, 4, False), ("quick-lora", 32, 1, 128, 16, 4, True)]
        repeats = 2
    elif device.type == "cuda":
        cases = [("tinygpt-d1024-T512-full", 1024, 8, 32000, 512, 16, False),
                 ("tinygpt-d1024-T512-lora8", 1024, 8, 32000, 512, 16, True)]
        repeats = args.repeats
    else:
        cases = [("tinygpt-d256-T128-full", 256, 4, 8192, 128, 16, False),
                 ("tinygpt-d256-T128-lora8", 256, 4, 8192, 128, 16, True)]
        repeats = args.repeats
    rows = [r for c in cases for r in run_case(*c, repeats=repeats, ratio=0.2, device=device)]
    env = env_info(str(device))
    for r in rows:
        r["env"] = env
    table = markdown_table(
        ["case", "method", "median (s)", "/ plain", "/ one_backward"],
        [[r["case"], r["method"], f"{r['median_s']:.4f}", f"{r['ratio_to_plain']:.3f}x",
          f"{r['ratio_to_one_backward']:.3f}x"] for r in rows])
    stem = f"two-pass-{utc_stamp()}" + ("-quick" if args.quick else "") + ("" if device.type == "cpu" else f"-{device.type}")
    paths = write_results(rows, args.out_dir, stem, meta={"script": "bench_two_pass.py"}, markdown=table)
    print(table)
    print(f"results: {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
