"""``gradsel reference``: the mean per-sample gradient over reference data, for alignment scores.

    gradsel reference --model DIR|ORG/NAME|tiny --data safety.jsonl --out ref.safetensors
                      [--params trainable|lora|all] [--batch-size 16] [--max-length N] [--dtype ...]
                      [--device DEV] [--revision REV] [--trust-remote-code] [--no-progress] [--json]

The records are read as ``gradsel score`` reads them (``text``, ``prompt`` + ``response``, chat ``messages``;
the loss covers the response). The file holds r = (1/N) Σ_i ∇θ L_i over the chosen parameters, with the
model's fingerprint, so ``gradsel score --reference ref.safetensors`` refuses another model's reference.
"""
from __future__ import annotations

import argparse
import os

from ..fileio import atomic_path
from .score import add_input_arguments, add_model_arguments, positive_int, read_records


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="reference data (e.g. refusals to harmful prompts): JSONL, a .parquet file or a "
                        "datasets.save_to_disk folder")
    add_input_arguments(p)
    p.add_argument("--out", required=True, help="the reference file to write (.safetensors)")
    p.add_argument("--params", default="trainable", choices=("trainable", "lora", "all"),
                   help="parameters the gradient is taken over (must match `gradsel score --params`)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="records per batch")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate records to this many tokens (default: the model's max positions, else 1024)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"),
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object (what the summary line says) on stdout")


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..data import (check_device, collate, encode_records, has_targets, load_model_and_tokenizer, model_max_length,
                        model_pad_id)
    from ..errors import UsageError
    from ..reference import reference_gradient

    # every check that needs no model comes first: nothing is computed for an output that cannot be written
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a directory; give a file name such as ref.safetensors")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out!r}: the folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(args.out) and not os.access(args.out, os.W_OK)):
        raise UsageError(f"--out {args.out!r}: cannot write there ({parent} is not writable); choose a writable place")
    check_device(args.device)
    show = not args.no_progress and not args.json
    raw = read_records(args, progress=show)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device, revision=args.revision,
                                          trust_remote_code=args.trust_remote_code)
    records = encode_records(raw, tok, args.max_length or model_max_length(model))
    if not records:
        raise UsageError(f"--data {args.data!r} holds no record")
    if not any(has_targets(r["labels"]) for r in records):
        raise UsageError(f"--data {args.data}: none of its {len(records)} records has a target token (a response, an "
                         "assistant turn or a text longer than one token), so the reference would be zero and every "
                         "cosine 0; give records with responses")
    pad = model_pad_id(model)
    starts = range(0, len(records), args.batch_size)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), unit="sample", desc="reference gradient", dynamic_ncols=True, smoothing=0.05)

    def batches():
        for i in starts:
            chunk = records[i:i + args.batch_size]
            yield {k: v.to(device) for k, v in collate(chunk, pad).items()}
            if bar is not None:
                bar.update(len(chunk))

    try:
        ref = reference_gradient(model, batches(), params=args.params,
                                 meta={"data": os.path.basename(args.data), "model": args.model, "params": args.params})
    finally:
        if bar is not None:
            bar.close()
    norm = float(ref.norm())
    if norm == 0.0:
        raise UsageError(f"--data {args.data}: the mean gradient over its {ref.count} records is exactly zero (no "
                         f"--params {args.params} parameter gets a gradient), so every cosine would be 0; nothing written")
    with atomic_path(args.out, error=lambda e: UsageError(
            f"--out {args.out}: cannot write there ({e.strerror or e}); choose a writable place")) as tmp:
        ref.save(tmp)
    if args.json:
        print(json.dumps({"out": args.out, "records": ref.count, "tensors": len(ref), "norm": norm,
                          "fingerprint": ref.fingerprint, "params": args.params}, allow_nan=False))
    else:
        print(f"reference over {ref.count} records, {len(ref)} tensors, norm {norm:.4g} -> {args.out}")
    return 0
