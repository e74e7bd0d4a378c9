"""``gradsel score``: score a JSONL dataset into a resumable score store.

    gradsel score --model DIR|tiny --data data.jsonl --out scores/ [--params trainable|lora|all]
                  [--backend auto] [--max-tokens N] [--batch-size N] [--max-length N]
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
import time

BACKEND_CHOICES = ("auto", "loop", "vmap", "ghost", "triton")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data import DEFAULT_MAX_TOKENS

    p.add_argument("--model", required=True, help="local HF model or PEFT adapter directory, or 'tiny'")
    p.add_argument("--data", required=True,
                   help="JSONL: {text}, {prompt, response} or chat {messages}, optional id and metadata")
    p.add_argument("--out", required=True, help="score store directory (created; resumable)")
    p.add_argument("--params", default="trainable", choices=("trainable", "lora", "all"),
                   help="parameters the norm is taken over (default: trainable)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="engine backend (default: auto)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="records per batch at most (default: no record cap, the token budget sizes batches)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help=f"padded tokens per batch at most, B * T_max (default {DEFAULT_MAX_TOKENS} when --batch-size "
                        "is not given either). Records are sorted by length within each window and packed up to "
                        "this budget, so short records get large batches and long ones small: chosen by "
                        "benchmarks/bench_batching.py on the tiny model (see the README)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate records to this many tokens, >= 1 (default: the model's max positions, else 1024)")
    p.add_argument("--shard-size", type=positive_int, default=None,
                   help="records per shard and length-bucketing window (default 64 * batch size, else 4096)")
    p.add_argument("--per-param", action="store_true", help="also store each parameter's squared norm")
    p.add_argument("--reference", action="append", default=None, metavar="REF.safetensors",
                   help="also store each record's dot and cosine with this reference gradient (`gradsel "
                        "reference`); repeat for several")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"),
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None,
                   help="device (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--no-resume", action="store_true", help="score everything again instead of resuming")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store of another model/config/data in --out; also allows a non-empty directory "
                        "that is not a store (gradsel adds its files and never touches the others)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model over the ranks with FSDP2 fully_shard, one decoder layer "
                        "at a time (a model larger than one device); rank 0 reads the checkpoint, the others "
                        "get their shards from it")
    p.add_argument("--dist-timeout", type=float, default=120.0,
                   help="minutes ranks wait for each other under torchrun")


def _env_int(name: str, default: int, minimum: int) -> int:
    from ..errors import UsageError

    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or v < minimum:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer >= {minimum}; unset it, or start "
                         "the command with torchrun, which sets it")
    return v


def _init_distributed(timeout_min: float = 120.0):
    """Initialise torch.distributed when started by torchrun (WORLD_SIZE > 1); returns (we_did_it, local_rank)."""
    import datetime

    import torch
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1, 1)
    local = _env_int("LOCAL_RANK", 0, 0)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False, local
    timeout = datetime.timedelta(minutes=timeout_min)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True, local


def check_paths(data: str, out: str) -> None:
    """Fail fast, before the model is loaded, on a ``--data`` that is not a file and an ``--out`` that is a
    file or not writable."""
    from ..errors import UsageError

    if os.path.isdir(data):
        raise UsageError(f"--data {data} is a directory; give a JSONL file (one JSON object per line)")
    if not os.path.exists(data):
        raise UsageError(f"--data {data}: no such file")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a directory; give a directory for the score store")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"--out {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == os.path.abspath(out) else f"cannot be created ({probe} is not writable)"
        raise UsageError(f"--out {out} {what}; choose a writable directory")


def summary_line(store, elapsed: float) -> str:
    """One line: records scored by this run and in the store, the time, samples/s and tokens/s (over this
    run's records; none for a run that had nothing to do), NaN/inf count and the norm mean and median."""
    s = store.summary()
    run = getattr(store, "run", None) or {}
    total = len(store)
    new = int(run.get("records_scored", total))
    earlier = total - new
    if new == 0:
        head = f"nothing to score: all {total} records were scored by an earlier run (checked in {elapsed:.1f} s)"
    else:
        t = float(run.get("scoring_s") or 0.0)
        rates = (f"{new / t:.1f} samples/s, {run.get('tokens_scored', 0) / t:,.0f} tokens/s" if t > 0
                 else "too fast to time")
        head = (f"scored {new} records{f' (+{earlier} from an earlier run)' if earlier else ''} in {elapsed:.1f} s "
                f"(scoring {t:.1f} s: {rates})")
    line = (
        f"{head} -> {store.path} | {total} records in the store | NaN/inf: {s['nonfinite']} | "
        f"norm mean {s['norm_mean']:.4g} median {s['norm_median']:.4g} | target tokens {s['tokens']}"
    )
    if new and run.get("coverage"):
        line += f" | {run['coverage']}"
    cos = getattr(store, "cosines", None)
    if cos is not None and len(cos):
        import numpy as np

        c = cos if cos.ndim == 1 else cos[:, 0]
        fin = c[np.isfinite(c)]
        if len(fin):
            line += (f" | cosine with the reference{' 1' if cos.ndim > 1 else ''}: median {np.median(fin):.3g}, "
                     f"{int((fin < 0).sum())} opposed (< 0)")
    return line


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import iter_jsonl, load_model_and_tokenizer
    from ..scoring import score_dataset

    t0 = time.perf_counter()
    check_paths(args.data, args.out)
    initialised, local = _init_distributed(args.dist_timeout)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    try:
        device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        # errors propagate to the CLI's one error style (`gradsel score: error: ...`, exit 2)
        if args.fsdp:  # read on rank 0, sharded over the ranks (integrations/fsdp.py)
            from ..integrations.fsdp import load_sharded

            model, tok = load_sharded(args.model, dtype=args.dtype)
        else:
            model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
        reference = None
        if args.reference:
            from ..reference import ReferenceGradient

            refs = [ReferenceGradient.load(path, device=device) for path in args.reference]
            reference = refs[0] if len(refs) == 1 else refs
        store = score_dataset(  # the Python API's path: tokenizer= encodes the JSONL records
            model, iter_jsonl(args.data), args.out, tokenizer=tok, max_length=args.max_length,
            batch_size=args.batch_size, max_tokens=args.max_tokens, params=args.params, backend=args.backend,
            per_param=args.per_param, resume=not args.no_resume, progress=not args.no_progress,
            overwrite=args.overwrite, shard_size=args.shard_size, reference=reference,
        )
        if rank == 0:
            print(summary_line(store, time.perf_counter() - t0))
        return 0
    finally:
        if initialised:
            torch.distributed.destroy_process_group()
