"""``gradsel score-demo``: score the built-in TinyGPT on generated token data and print the norms."""
from __future__ import annotations

import argparse

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import gradsel_core as gs

    torch.manual_seed(args.seed)
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=256, d_model=64, n_layer=2, max_seq_len=args.seq_len))
    ids = torch.randint(0, 256, (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    lengths = torch.randint(2, args.seq_len + 1, (args.batch_size,))
    mask[torch.arange(args.seq_len)[None] >= lengths[:, None]] = 0  # right padding, variable lengths
    res = gs.GradNormEngine(model, backend=args.backend).score({"input_ids": ids, "attention_mask": mask})
    print(f"backend={res.backend}  B={args.batch_size}  T={args.seq_len}")
    print(f"{'sample':>6} {'tokens':>6} {'loss':>8} {'grad_norm':>10}")
    for i in range(len(res)):
        print(f"{i:>6} {int(res.tokens[i]):>6} {float(res.losses[i]):>8.4f} {float(res.norms[i]):>10.4f}")
    return 0
