"""``gradsel score``: score a dataset (JSONL, Parquet or a datasets folder) into a resumable score store.

    gradsel score --model DIR|ORG/NAME|tiny --data data.jsonl|data.parquet|DATASET_DIR|- --out scores/ [--params trainable|lora|all]
                  [--backend auto|loop|vmap|ghost|triton] [--max-tokens 4096] [--batch-size N] [--max-length N]
                  [--shard-size N] [--per-param] [--reference REF.safetensors ...]
                  [--dtype auto|float32|bfloat16|float16|float64] [--device DEV] [--revision REV]
                  [--trust-remote-code] [--max-line-bytes N] [--allow-special-files] [--no-resume]
                  [--overwrite] [--no-progress] [--json] [--dry-run] [--no-fused-head] [--fsdp] [--dist-timeout MIN]

``--model DIR`` is a local HF causal-LM directory or a PEFT adapter directory; ``--model org/name`` a Hugging
Face Hub id (the local HF cache, offline with ``HF_HUB_OFFLINE=1``, downloaded otherwise; an adapter's base
may be a Hub id too); ``--model tiny`` is the built-in TinyGPT with the
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


MODEL_HELP = ("local HF model or PEFT adapter directory, a Hugging Face Hub id (org/name: the HF cache, offline "
              "with HF_HUB_OFFLINE=1, else downloaded), or 'tiny'")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --revision, --trust-remote-code (score, reference)."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model (default: main)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own Python code (only for repositories you trust)")


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """--max-line-bytes, --allow-special-files (every command reading JSONL)."""
    from ..jsonl import DEFAULT_MAX_LINE_BYTES

    p.add_argument("--max-line-bytes", type=positive_int, default=DEFAULT_MAX_LINE_BYTES, metavar="N",
                   help="refuse a JSONL line longer than this many bytes")
    p.add_argument("--allow-special-files", action="store_true",
                   help="read --data from a FIFO or device too (default: regular files, or '-' for standard input)")


def read_progress(path: str, enabled: bool, desc: str = "reading and tokenizing"):
    """``(callback, close)``: a tqdm bar over the bytes of ``path`` (rates, ETA) fed by ``iter_jsonl``'s
    ``progress``; no bar when disabled or for standard input."""
    if not enabled or path == "-":
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               dynamic_ncols=True, mininterval=0.5, leave=False)
    return bar.update, bar.close


def read_records(args: argparse.Namespace, progress: bool):
    """The records of ``--data`` (JSONL, Parquet or a datasets folder: :func:`gradsel_core.sources.iter_records`)
    as an iterator (with a reading bar for JSONL); refuses an empty input up front."""
    import itertools

    from ..errors import UsageError
    from ..sources import data_kind, iter_records

    box: list = []
    it = iter_records(args.data, max_line_bytes=args.max_line_bytes, allow_special=args.allow_special_files,
                      progress=lambda n: box[0](n) if box and box[0] else None)  # checks the file now
    update, close = read_progress(args.data, progress and data_kind(args.data) == "jsonl")
    box.append(update)
    first = next(it, None)
    if first is None:
        close()
        raise UsageError(f"--data {args.data} holds no record (empty, or blank lines only); nothing to score")
    if data_kind(args.data) == "jsonl" and args.data != "-" and os.path.isfile(args.data):
        # a JSONL file is read window by window with byte offsets: a rerun checks finished windows by their
        # bytes, and each torchrun rank parses only its own windows (gradsel_core.windows)
        from ..windows import JsonlFile

        close()
        it.close()
        return JsonlFile(args.data, max_line_bytes=args.max_line_bytes)

    def records():
        try:
            yield from itertools.chain([first], it)
        finally:
            close()

    return records()


def check_backend(backend: str, device: str) -> None:
    """``--backend triton`` needs a CUDA device and the kernels; refused before any work otherwise."""
    from ..errors import UsageError

    if backend != "triton":
        return
    from ..dispatch import _kernels_problem, interpreting

    if not (str(device).startswith("cuda") or interpreting()):
        raise UsageError(f"--backend triton runs on CUDA devices only (--device is {device}); use --backend auto "
                         "(the exact torch path here)")
    problem = _kernels_problem()
    if problem is not None:
        raise UsageError(f"--backend triton: {problem}; or use --backend auto")


def cli_words(e: BaseException) -> BaseException:
    """The same error with the Python API's argument names replaced by the CLI's flags."""
    msg = str(e)
    new = (msg.replace("pass overwrite=True (CLI: --overwrite)", "pass --overwrite")
           .replace("Pass overwrite=True (CLI: --overwrite)", "Pass --overwrite")
           .replace("overwrite=True (CLI: --overwrite)", "--overwrite")
           .replace("out_dir ", "--out "))
    if new == msg:
        return e
    try:
        return type(e)(new)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments: keep it as it was
        return e


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data import DEFAULT_MAX_TOKENS

    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="JSONL, a .parquet file or a datasets.save_to_disk folder of records: {text}, "
                        "{prompt, response}, chat {messages} or {input_ids}, optional id and metadata; "
                        "'-' reads JSONL from standard input")
    add_input_arguments(p)
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
    p.add_argument("--no-fused-head", action="store_true",
                   help="score the LM head through full logits instead of the fused chunked head (on by default from "
                        "vocabulary 2,048 with a frozen head, 4,096 with a trainable one, when the batch's "
                        "logits are large; exact either way)")
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
    p.add_argument("--json", action="store_true", help="print one JSON object (what the summary line says) on stdout")
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing: print the records, tokens and batches, the store's identity and what --out "
                        "holds, and a time estimate from a few timed batches")
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

    from ..sources import data_kind, hub_dataset

    if data != "-" and os.path.isdir(data):  # "-": standard input
        data_kind(data)  # a saved dataset folder passes; any other directory is refused, naming it
    if data != "-" and not os.path.exists(data) and hub_dataset(data) is None:  # a Hub dataset id: read later
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


def summary_dict(store, elapsed: float) -> dict:
    """What :func:`summary_line` says, as JSON values."""
    from .select import jsonable

    s = store.summary()
    run = getattr(store, "run", None) or {}
    out = {"store": store.path, "records": len(store), "records_scored": int(run.get("records_scored", len(store))),
           "tokens_scored": int(run.get("tokens_scored", 0)), "elapsed_s": round(elapsed, 3),
           "scoring_s": run.get("scoring_s"), "backend": run.get("backend_used"), "coverage": run.get("coverage"),
           "nonfinite": s["nonfinite"], "norm_mean": s["norm_mean"], "norm_median": s["norm_median"],
           "tokens": s["tokens"], "run_key": store.meta.get("run_key")}
    cos = getattr(store, "cosines", None)
    if cos is not None and len(cos):
        import numpy as np

        c = cos if cos.ndim == 1 else cos[:, 0]
        fin = c[np.isfinite(c)]
        out["cosine_median"] = float(np.median(fin)) if len(fin) else None
        out["opposed"] = int((fin < 0).sum())
    return jsonable(out)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..data import check_device, load_model_and_tokenizer
    from ..errors import GradselError
    from ..scoring import score_dataset

    t0 = time.perf_counter()
    check_paths(args.data, args.out)
    check_device(args.device)
    initialised, local = _init_distributed(args.dist_timeout)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    try:
        device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        check_backend(args.backend, device)
        records = read_records(args, progress=not args.no_progress and rank == 0)
        # errors propagate to the CLI's one error style (`gradsel score: error: ...`, exit 2)
        if args.fsdp:  # read on rank 0, sharded over the ranks (integrations/fsdp.py)
            from ..integrations.fsdp import load_sharded

            model, tok = load_sharded(args.model, dtype=args.dtype)
        else:
            model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device, revision=args.revision,
                                                  trust_remote_code=args.trust_remote_code)
        reference = None
        if args.reference:
            from ..reference import ReferenceGradient

            refs = [ReferenceGradient.load(path, device=device) for path in args.reference]
            reference = refs[0] if len(refs) == 1 else refs
        try:
            result = score_dataset(  # the Python API's path: tokenizer= encodes the JSONL records
                model, records, args.out, tokenizer=tok, max_length=args.max_length,
                batch_size=args.batch_size, max_tokens=args.max_tokens, params=args.params, backend=args.backend,
                per_param=args.per_param, resume=not args.no_resume, progress=not args.no_progress and not args.json,
                overwrite=args.overwrite, shard_size=args.shard_size, reference=reference, dry_run=args.dry_run,
                fused_head=False if args.no_fused_head else None,
            )
        except GradselError as e:
            raise cli_words(e) from None
        if rank == 0:
            if args.dry_run:
                d = result.as_dict()
                if args.json:
                    print(json.dumps(d, allow_nan=False))
                else:
                    est = "no batch to time" if d["estimate_s"] is None else (
                        f"about {d['estimate_s']:.1f} s (from {d['timed_batches']} timed batch{'es' if d['timed_batches'] != 1 else ''}, "
                        "this device)")
                    print(f"dry run: {d['records']} records, {d['tokens']:,} tokens ({d['padded_tokens']:,} padded) in "
                          f"{d['batches']} batches, {d['shards']} shard(s); backend {d['backend']}; scoring would take "
                          f"{est}; run key {d['run_key'][:16]}; --out {d['out_dir']}: {d['out_state']}")
            elif args.json:
                print(json.dumps(summary_dict(result, time.perf_counter() - t0), allow_nan=False))
            else:
                print(summary_line(result, time.perf_counter() - t0))
        return 0
    finally:
        if initialised:
            torch.distributed.destroy_process_group()
