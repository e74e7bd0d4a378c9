"""``gradsel score``: score a JSONL dataset into a resumable score store.

    gradsel score --model DIR|tiny --data data.jsonl --out scores/ [--params trainable|lora|all]
                  [--backend auto] [--batch-size 16] [--max-tokens N] [--max-length N]
                  [--no-resume] [--overwrite]

``--model DIR`` is a local HF causal-LM directory, or a PEFT adapter directory whose
``base_model_name_or_path`` is a local directory; ``--model tiny`` is the built-in TinyGPT with the
byte-level tokenizer (``gradsel_core.data.ByteTokenizer``). JSONL records carry ``text`` or ``prompt`` +
``response`` (loss on the response only), an optional ``id`` and optional metadata fields (``task``...).

Rerun the same command after an interruption to finish the job. Under ``torchrun`` every process scores a
share (NCCL on GPUs, one GPU per process; gloo on CPU):
``torchrun --nproc_per_node 8 -m gradsel_core.cli score --model DIR --data d.jsonl --out scores/``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

BACKEND_CHOICES = ("auto", "loop", "vmap", "ghost", "triton")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model or PEFT adapter directory, or 'tiny'")
    p.add_argument("--data", required=True, help="JSONL: {text} or {prompt, response}, optional id and metadata")
    p.add_argument("--out", required=True, help="score store directory (created; resumable)")
    p.add_argument("--params", default="trainable", choices=("trainable", "lora", "all"),
                   help="parameters the norm is taken over (default: trainable)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="engine backend (default: auto)")
    p.add_argument("--batch-size", type=int, default=16, help="records per batch at most (default 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="padded tokens per batch at most (B * T_max)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate records to this many tokens (default: the model's max positions, else 1024)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="records per shard and length-bucketing window (default 64 * batch size)")
    p.add_argument("--per-param", action="store_true", help="also store each parameter's squared norm")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"),
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None,
                   help="device (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--no-resume", action="store_true", help="score everything again instead of resuming")
    p.add_argument("--overwrite", action="store_true", help="replace a store of another model/config/data in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model over the ranks with FSDP2 fully_shard, one decoder layer "
                        "at a time (a model larger than one device); rank 0 reads the checkpoint, the others "
                        "get their shards from it")
    p.add_argument("--dist-timeout", type=float, default=120.0,
                   help="minutes ranks wait for each other under torchrun (default 120)")


def _init_distributed(timeout_min: float = 120.0):
    """Initialise torch.distributed when started by torchrun (WORLD_SIZE > 1); returns (we_did_it, local_rank)."""
    import datetime

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False, local
    timeout = datetime.timedelta(minutes=timeout_min)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True, local


def summary_line(store, elapsed: float) -> str:
    s = store.summary()
    rate = s["count"] / elapsed if elapsed > 0 else float("nan")
    return (
        f"scored {s['count']} records in {elapsed:.1f} s ({rate:.1f} samples/s) -> {store.path} | "
        f"NaN/inf: {s['nonfinite']} | norm mean {s['norm_mean']:.4g} median {s['norm_median']:.4g} | "
        f"target tokens {s['tokens']}"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import encode_records, iter_jsonl, load_model_and_tokenizer, model_max_length
    from ..scoring import score_dataset
    from ..store import StoreConflictError, StoreError

    t0 = time.perf_counter()
    initialised, local = _init_distributed(args.dist_timeout)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    try:
        device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        try:
            if args.fsdp:  # read on rank 0, sharded over the ranks (integrations/fsdp.py)
                from ..integrations.fsdp import load_sharded

                model, tok = load_sharded(args.model, dtype=args.dtype)
            else:
                model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
            max_length = args.max_length or model_max_length(model)
            records = encode_records(iter_jsonl(args.data), tok, max_length, compact=True)
            store = score_dataset(
                model, records, args.out,
                batch_size=args.batch_size, max_tokens=args.max_tokens, params=args.params, backend=args.backend,
                per_param=args.per_param, resume=not args.no_resume, progress=not args.no_progress,
                overwrite=args.overwrite, shard_size=args.shard_size,
            )
        except (StoreConflictError, StoreError, FileNotFoundError, ValueError, TypeError) as e:
            print(f"gradsel score: error: {e}", file=sys.stderr)
            return 2
        if rank == 0:
            print(summary_line(store, time.perf_counter() - t0))
        return 0
    finally:
        if initialised:
            torch.distributed.destroy_process_group()
