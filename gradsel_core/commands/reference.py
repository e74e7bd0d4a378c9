"""``gradsel reference``: the mean per-sample gradient over reference data, for alignment scores.

    gradsel reference --model DIR|tiny --data safety.jsonl --out ref.safetensors [--params trainable|lora|all]
                      [--batch-size 16] [--max-length N]

The records are read as ``gradsel score`` reads them (``text``, ``prompt`` + ``response``, chat ``messages``;
the loss covers the response). The file holds r = (1/N) Σ_i ∇θ L_i over the chosen parameters, with the
model's fingerprint, so ``gradsel score --reference ref.safetensors`` refuses another model's reference.
"""
from __future__ import annotations

import argparse
import os

from ..fileio import atomic_path
from .score import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model or PEFT adapter directory, or 'tiny'")
    p.add_argument("--data", required=True, help="JSONL reference data (e.g. refusals to harmful prompts)")
    p.add_argument("--out", required=True, help="the reference file to write (.safetensors)")
    p.add_argument("--params", default="trainable", choices=("trainable", "lora", "all"),
                   help="parameters the gradient is taken over (must match `gradsel score --params`)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="records per batch")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate records to this many tokens (default: the model's max positions, else 1024)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"),
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import collate, encode_records, iter_jsonl, load_model_and_tokenizer, model_max_length, model_pad_id
    from ..errors import UsageError
    from ..reference import reference_gradient

    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a directory; give a file name such as ref.safetensors")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out!r}: the folder {parent!r} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    records = encode_records(iter_jsonl(args.data), tok, args.max_length or model_max_length(model))
    if not records:
        raise UsageError(f"--data {args.data!r} holds no record")
    pad = model_pad_id(model)
    batches = ({k: v.to(device) for k, v in collate(records[i:i + args.batch_size], pad).items()}
               for i in range(0, len(records), args.batch_size))
    ref = reference_gradient(model, batches, params=args.params,
                             meta={"data": os.path.basename(args.data), "model": args.model, "params": args.params})
    with atomic_path(args.out) as tmp:
        ref.save(tmp)
    print(f"reference over {ref.count} records, {len(ref)} tensors, norm {ref.norm():.4g} -> {args.out}")
    return 0
