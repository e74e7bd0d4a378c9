"""Score whole datasets into a resumable score store: ``score_dataset``.

    import gradsel_core as gs
    store = gs.score_dataset(model, records, "scores/run1", batch_size=16)
    store.ids, store.norms, store.losses, store.tokens       # numpy, in the dataset's order
    store = gs.ScoreStore.open("scores/run1")                 # later, anywhere

How it works
    1. One pass over the dataset reads each record's length, id and metadata fields and hashes its
       tokens. Records are ``{"input_ids", "labels"?, "attention_mask"?, "id"?, ...}`` dicts, from a list,
       any iterable, or anything indexable with ``len()`` (e.g. an HF ``datasets.Dataset``, read by
       index without loading it all).
    2. A deterministic batch plan (``gradsel_core.data.plan_batches``): consecutive windows of
       ``shard_size`` records (default ``64 * batch_size``), sorted by length within the window and packed
       into batches of at most ``batch_size`` records and ``max_tokens`` padded tokens. Each window is
       one shard, named by its plan index.
    3. Each completed shard is written atomically; the manifest is written when every shard is there.

Resume
    Rerunning the same call after a crash or ``kill -9`` validates the shards present (checksums in
    their headers, the run key), removes partial temp files and corrupted shards (with a warning naming
    them), and scores only what is missing. Every sample is scored in the same batch as before, so the
    final store equals an uninterrupted run's bit for bit (same device and software). A directory that
    holds another model, config or dataset is refused unless ``overwrite=True``.

Multi-GPU and multi-node (``torch.distributed``)
    When ``torch.distributed`` is initialised, each rank scores a disjoint, strided part of the
    remaining shards and writes rank-tagged shard files into the shared ``out_dir``; rank 0 writes the
    manifest after a barrier, and every rank gets the store back. The result equals a one-process run
    (and the store can be resumed with any number of processes). With the CLI, one command per node::

        # one node, 8 GPUs
        torchrun --nproc_per_node 8 -m gradsel_core.cli score --model DIR --data data.jsonl --out scores/
        # two nodes (run on each; out/ on a shared file system)
        torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \\
            --rdzv_id scores1 -m gradsel_core.cli score --model DIR --data data.jsonl --out /shared/scores/

    From Python: ``dist.init_process_group("nccl")``, ``torch.cuda.set_device(local_rank)``, put the
    model on ``cuda:local_rank`` and call ``score_dataset`` on every rank with the same arguments. All
    ranks must see the same data and weights (checked: a mismatch is an error on every rank) and the
    same ``out_dir``. Ranks wait for each other at the end; raise the process group's ``timeout`` for
    very long runs with uneven ranks.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .batching import prepare_batch
from .data import as_int_array, collate, extra_fields, model_pad_id, plan_batches, PlannedShard
from .engine import GradNormEngine
from .params import ParamSpec
from .store import (
    FIELDS_FILE,
    FORMAT,
    FORMAT_VERSION,
    IDS_FILE,
    LOCK_FILE,
    MANIFEST,
    PP_PREFIX,
    ScoreStore,
    StoreConflictError,
    StoreError,
    atomic_write,
    canonical_hash,
    decode_shard,
    describe_difference,
    encode_shard,
    json_bytes,
    list_shards,
    model_fingerprint,
    read_bytes,
    read_manifest,
    remove_temp_files,
    sha256_bytes,
    shard_name,
    store_files,
    summarize,
)

log = logging.getLogger(__name__)


# -- pass 1: the data -------------------------------------------------------------------------------


@dataclass
class DataScan:
    source: Any  # indexable: source[i] -> record
    lengths: np.ndarray  # (N,) int64
    ids: List[Any]
    id_kind: str  # "int" | "str"
    fields: Dict[str, List[Any]]
    sha256: str

    def __len__(self) -> int:
        return len(self.lengths)


def _indexable(dataset: Any):
    if isinstance(dataset, (Mapping, str, bytes)):
        raise TypeError(
            f"dataset must be a sequence/iterable of records (dicts with 'input_ids') or an indexable dataset, "
            f"got {type(dataset).__name__}"
        )
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        it = iter(dataset) if hasattr(dataset, "__iter__") else (dataset[i] for i in range(n))
        return dataset, it, n
    source = list(dataset)
    return source, iter(source), len(source)


def _py_scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def scan_dataset(dataset: Any) -> DataScan:
    """Validate every record; collect lengths, ids, metadata fields and a content hash."""
    source, it, n = _indexable(dataset)
    h = hashlib.sha256()
    lengths = np.zeros(n, dtype=np.int64)
    ids: List[Any] = []
    cols: Dict[str, Dict[int, Any]] = {}
    pos = -1
    for pos, rec in enumerate(it):
        if pos >= n:
            raise ValueError(f"the dataset yielded more records than its len() = {n}")
        if not isinstance(rec, Mapping):
            raise TypeError(f"record {pos} is a {type(rec).__name__}; records must be dicts with 'input_ids'")
        if "input_ids" not in rec:
            raise ValueError(
                f"record {pos} has no 'input_ids' (keys: {sorted(rec)}); tokenize first "
                "(gradsel_core.data.encode_record) or use `gradsel score --data file.jsonl`"
            )
        ids_a = as_int_array(rec["input_ids"], f"record {pos}: input_ids")
        L = len(ids_a)
        if L == 0:
            raise ValueError(f"record {pos} has empty input_ids")
        lengths[pos] = L
        h.update(b"R")
        h.update(ids_a.tobytes())
        for key in ("labels", "attention_mask"):
            v = rec.get(key)
            if v is None:
                h.update(b"-")
                continue
            a = as_int_array(v, f"record {pos}: {key}")
            if len(a) != L:
                raise ValueError(f"record {pos}: {key} has length {len(a)}, input_ids has {L}")
            h.update(key.encode())
            h.update(a.tobytes())
        rid = _py_scalar(rec.get("id"))
        if rid is None:
            rid = pos
        elif isinstance(rid, bool) or not isinstance(rid, (int, str)):
            raise TypeError(f"record {pos}: id must be an int or a str, got {type(rid).__name__}")
        ids.append(rid)
        h.update(repr(rid).encode("utf-8"))
        for k, v in extra_fields(rec).items():
            v = _py_scalar(v)
            cols.setdefault(k, {})[pos] = v
            h.update(f"{k}={v!r}".encode("utf-8"))
    if pos + 1 != n:
        raise ValueError(f"the dataset yielded {pos + 1} records but its len() is {n}")
    kinds = {type(i) for i in ids}
    if kinds - {int, str} or len(kinds) > 1:
        first_str = next(i for i, v in enumerate(ids) if isinstance(v, str))
        first_int = next(i for i, v in enumerate(ids) if isinstance(v, int))
        raise TypeError(
            f"ids must be all ints or all strs (records without an id take their position): record {first_int} "
            f"has id {ids[first_int]!r}, record {first_str} has id {ids[first_str]!r}"
        )
    id_kind = "str" if kinds == {str} else "int"
    if len(set(ids)) != n:
        seen: Dict[Any, int] = {}
        dups = []
        for i, v in enumerate(ids):
            if v in seen:
                dups.append(f"{v!r} (records {seen[v]} and {i})")
            else:
                seen[v] = i
        raise ValueError(f"duplicate ids: {', '.join(dups[:5])}{' ...' if len(dups) > 5 else ''}")
    fields = {k: [c.get(i) for i in range(n)] for k, c in sorted(cols.items())}
    return DataScan(source, lengths, ids, id_kind, fields, h.hexdigest())


# -- distributed ------------------------------------------------------------------------------------


def _dist() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any, world: int) -> List[Any]:
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def _dir_lock(out_dir: str):
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"{out_dir} is being written by another gradsel run (it holds {LOCK_FILE}); wait for it to "
                "finish or use another directory"
            ) from None
        yield
    finally:
        os.close(fd)


# -- helpers ----------------------------------------------------------------------------------------


def _versions() -> Dict[str, str]:
    import safetensors

    from . import __version__

    out = {
        "gradsel": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": getattr(safetensors, "__version__", "?"),
        "python": platform.python_version(),
    }
    for mod in ("transformers", "peft", "datasets"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _validate_existing(out_dir: str, plan: Sequence[PlannedShard], run_key: str, warn: bool = True):
    """``{plan index: (file, bytes, tensors)}`` of the valid shards present; corrupted or foreign shard
    files and duplicates are removed (corrupted ones with a warning naming the file)."""
    found = list_shards(out_dir)
    valid: Dict[int, Tuple[str, bytes, Dict[str, np.ndarray]]] = {}
    by_index = {sh.index: sh for sh in plan}
    for idx, names in found.items():
        sh = by_index.get(idx)
        for name in names:
            path = os.path.join(out_dir, name)
            reason = None
            try:
                data = read_bytes(path)
                tensors, meta = decode_shard(data, path)
            except StoreError as e:
                reason = str(e)
            else:
                if meta.get("run_key") != run_key:
                    reason = f"{path}: written by another run (different model/config/data)"
                elif sh is None or meta.get("start") != sh.start or meta.get("stop") != sh.stop:
                    reason = f"{path}: does not match the batch plan"
                elif not np.array_equal(tensors.get("positions"), np.arange(sh.start, sh.stop)):
                    reason = f"{path}: positions do not cover [{sh.start}, {sh.stop})"
            if reason is None and idx not in valid:
                valid[idx] = (name, data, tensors)
                continue
            if reason is not None and warn:
                log.warning("%s; removing it, it will be scored again", reason)
            try:
                os.unlink(path)
            except OSError:
                pass
    return valid


def _identity(fingerprint, config, scan: DataScan) -> Dict[str, Any]:
    return {
        "model": fingerprint,
        "config": config,
        "data": {"n_records": len(scan), "sha256": scan.sha256, "id_kind": scan.id_kind},
    }


def _prepare_dir(out_dir, identity, run_key, scan, plan, resume, overwrite, versions) -> Dict[str, Any]:
    """Rank 0: conflict checks, cleanup, resume validation, side files. Returns what the ranks need."""
    os.makedirs(out_dir, exist_ok=True)
    remove_temp_files(out_dir)
    try:
        old = read_manifest(out_dir)
    except StoreError:
        if not overwrite:
            raise StoreError(
                f"{os.path.join(out_dir, MANIFEST)} is corrupted; pass overwrite=True (CLI: --overwrite) to "
                "start over in this directory"
            ) from None
        old = None
    if old is not None and not overwrite:
        old_id = {k: old.get(k) for k in ("model", "config", "data")}
        diffs = describe_difference(old_id, identity)
        if diffs:
            what = sorted({d.split(".")[0] for d in diffs})
            names = {"model": "model", "config": "scoring config", "data": "dataset"}
            raise StoreConflictError(
                f"{out_dir} already holds scores of a different {' and '.join(names[w] for w in what)} "
                f"(differs in: {', '.join(diffs[:8])}{', ...' if len(diffs) > 8 else ''}). Pass overwrite=True "
                "(CLI: --overwrite) to replace them, or choose another directory."
            )
    if overwrite or not resume:
        removed = store_files(out_dir)
        for name in removed:
            try:
                os.unlink(os.path.join(out_dir, name))
            except OSError:
                pass
        old = None
        if removed:
            log.info("%s: removed the previous store files in %s", "overwrite" if overwrite else "no resume", out_dir)
    if old is not None and old.get("complete") and resume:
        try:
            ScoreStore.open(out_dir, verify=True)
            return {"complete": True, "done": [sh.index for sh in plan]}
        except StoreError as e:
            log.warning("%s; repairing the store", e)
    valid = _validate_existing(out_dir, plan, run_key)
    ids_doc = json_bytes({"kind": scan.id_kind, "ids": scan.ids})
    files = {IDS_FILE: sha256_bytes(ids_doc)}
    atomic_write(os.path.join(out_dir, IDS_FILE), ids_doc)
    if scan.fields:
        fields_doc = json_bytes(scan.fields)
        files[FIELDS_FILE] = sha256_bytes(fields_doc)
        atomic_write(os.path.join(out_dir, FIELDS_FILE), fields_doc)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "run_key": run_key,
        **identity,
        "counts": {"records": len(scan), "shards_planned": len(plan)},
        "files": files,
        "versions": versions,
        "created": (old or {}).get("created") or _now(),
    }
    atomic_write(os.path.join(out_dir, MANIFEST), json_bytes(manifest))
    if valid:
        log.info("resuming %s: %d of %d shards already scored", out_dir, len(valid), len(plan))
    return {"complete": False, "done": sorted(valid), "files": files, "created": manifest["created"]}


def _merge(out_dir, plan, run_key, identity, scan, prep, versions, info) -> ScoreStore:
    """Rank 0, after every rank is done: pick one valid shard per plan index, write the manifest."""
    valid = _validate_existing(out_dir, plan, run_key)
    missing = [sh.index for sh in plan if sh.index not in valid]
    if missing:
        raise StoreError(f"{out_dir}: shards {missing[:10]} are missing after the run; rerun to finish them")
    parts: Dict[str, List[np.ndarray]] = {}
    entries = []
    for sh in plan:
        name, data, tensors = valid[sh.index]
        entries.append({"file": name, "index": sh.index, "start": sh.start, "count": sh.size, "sha256": sha256_bytes(data)})
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    z = np.zeros(0, dtype=np.float32)
    stats = summarize(cat.get("norms", z), cat.get("losses", z), cat.get("tokens", np.zeros(0, dtype=np.int64)))
    counts = {
        "records": len(scan),
        "shards_planned": len(plan),
        "shards": len(plan),
        "batches": sum(len(sh.batches) for sh in plan),
        **{k: stats[k] for k in ("nan_norms", "inf_norms", "nan_losses", "inf_losses", "nonfinite", "tokens")},
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "run_key": run_key,
        **identity,
        "counts": counts,
        "summary": {k: (v if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in stats.items()},
        "files": prep["files"],
        "shards": entries,
        "versions": versions,
        "run": info,
        "created": prep["created"],
        "finished": _now(),
    }
    atomic_write(os.path.join(out_dir, MANIFEST), json_bytes(manifest))
    ids_doc = {"kind": scan.id_kind, "ids": scan.ids}
    return ScoreStore.from_parts(out_dir, manifest, parts, ids_doc, scan.fields)


# -- scoring ----------------------------------------------------------------------------------------


class _Batches:
    """Collated batches of a shard, on the model's device; on CUDA the next batch is collated and
    copied in a background thread while the current one is scored."""

    def __init__(self, source, pad_id: int, device: torch.device):
        self.source, self.pad_id, self.device = source, pad_id, device
        self.pool = ThreadPoolExecutor(max_workers=1) if device.type == "cuda" else None

    def _make(self, positions: Sequence[int]) -> Dict[str, torch.Tensor]:
        batch = collate([self.source[int(p)] for p in positions], self.pad_id)
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def __call__(self, batches: Sequence[Sequence[int]]):
        if self.pool is None:
            for b in batches:
                yield b, self._make(b)
            return
        fut = self.pool.submit(self._make, batches[0]) if batches else None
        for i, b in enumerate(batches):
            batch = fut.result()
            fut = self.pool.submit(self._make, batches[i + 1]) if i + 1 < len(batches) else None
            yield b, batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _score_shard(engine: GradNormEngine, sh: PlannedShard, batches: _Batches, lengths: np.ndarray, bar, clock):
    pos, norms, losses, tokens = [], [], [], []
    pp: Dict[str, List[torch.Tensor]] = {n: [] for n in engine.params} if engine.per_param else {}
    for positions, batch in batches(sh.batches):
        res = engine.score(batch)
        pos.extend(positions)
        norms.append(res.norms)
        losses.append(res.losses)
        tokens.append(res.tokens)
        for n in pp:
            pp[n].append(res.per_param[n])
        if bar is not None:
            clock["tokens"] += int(lengths[list(positions)].sum())
            bar.update(len(positions))
            dt = max(time.perf_counter() - clock["t0"], 1e-9)
            bar.set_postfix_str(f"{clock['tokens'] / dt:,.0f} tok/s", refresh=False)
    order = np.argsort(np.asarray(pos, dtype=np.int64), kind="stable")
    out = {
        "positions": np.asarray(pos, dtype=np.int64)[order],
        "norms": torch.cat(norms).float().cpu().numpy()[order],
        "losses": torch.cat(losses).float().cpu().numpy()[order],
        "tokens": torch.cat(tokens).long().cpu().numpy()[order],
    }
    for n, v in pp.items():
        out[PP_PREFIX + n] = torch.cat(v).float().cpu().numpy()[order]
    return out


def score_dataset(
    model: nn.Module,
    dataset: Any,
    out_dir: str,
    *,
    batch_size: Optional[int] = 16,
    max_tokens: Optional[int] = None,
    params: ParamSpec = "trainable",
    backend: str = "auto",
    per_param: bool = False,
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    shard_size: Optional[int] = None,
    pad_id: Optional[int] = None,
    chunk_size: Optional[int] = None,
    loss_reduction: str = "mean",
) -> ScoreStore:
    """Score every record of ``dataset`` into the score store ``out_dir`` and return it.

    Args:
        model: the model (on its device; the batches follow the first parameter's device).
        dataset: records ``{"input_ids", "labels"?, "attention_mask"?, "id"?, ...}``: a list, an iterable
            or any indexable with ``len()`` (an HF ``datasets.Dataset``). Ids (int or str) are kept, else
            the position is the id; duplicates are an error. Other scalar fields become ``store.fields``.
        batch_size: records per batch at most (``None``: only ``max_tokens`` limits).
        max_tokens: padded tokens per batch at most (``B * T_max``).
        params, backend, per_param, chunk_size, loss_reduction: as in :class:`GradNormEngine`.
        resume: reuse valid shards of an interrupted identical run (``False``: score everything again).
        progress: tqdm bar (rank 0) with samples/s and tokens/s.
        overwrite: replace a store of another model/config/dataset in ``out_dir``.
        shard_size: records per shard, which is also the length-bucketing window (``64 * batch_size``).
        pad_id: padding id (default: the model config's ``pad_token_id``, else 0).

    NaN/inf losses and norms are stored as such and counted in ``store.meta["counts"]``.
    Under ``torch.distributed`` every rank must call this with the same arguments (see module doc).
    """
    t_start = time.perf_counter()
    rank, world = _dist()
    engine = GradNormEngine(
        model, params=params, backend=backend, per_param=per_param, chunk_size=chunk_size, loss_reduction=loss_reduction
    )
    scan = scan_dataset(dataset)
    window = shard_size if shard_size is not None else (64 * batch_size if batch_size is not None else 4096)
    plan = plan_batches(scan.lengths, batch_size, max_tokens, window, warn=rank == 0)
    device = _model_device(model)
    pad = model_pad_id(model) if pad_id is None else int(pad_id)
    if len(scan):
        probe = collate([scan.source[0]], pad)
        resolved = engine.resolve_backend(prepare_batch({k: v.to(device) for k, v in probe.items()}, lm_loss=True))
    else:
        resolved = engine.resolve_backend(None)
    config = {
        "params": params if isinstance(params, str) else "custom",
        "backend": backend,
        "backend_resolved": resolved,
        "per_param": bool(per_param),
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "shard_size": window,
        "pad_id": pad,
        "chunk_size": chunk_size,
        "loss_reduction": loss_reduction,
    }
    from .errors import UsageError
    from .integrations.fsdp import FullParams, is_sharded, unsharded_class_name

    sharded = is_sharded(engine.params)  # FSDP2: hash whole weights (one gathered at a time), as unsharded
    if sharded and resolved not in ("ghost", "triton"):
        raise UsageError(
            f"a fully_shard model is scored by the ghost engine only (backend {resolved!r} needs whole weights); "
            "use backend='auto' or 'ghost', and register a norm rule (@gradsel_core.register_norm_rule) for "
            "modules the ghost plan cannot cover")
    fingerprint = model_fingerprint(model, FullParams(engine.params) if sharded else engine.params)
    if sharded:  # fully_shard renames the class FSDP<Name>: fingerprint the model, not the wrapper
        fingerprint["class"] = unsharded_class_name(model)
    identity = _identity(fingerprint, config, scan)
    run_key = canonical_hash(identity)
    keys = _all_gather(run_key, world)
    if len(set(keys)) > 1:
        bad = [r for r, k in enumerate(keys) if k != keys[0]]
        raise RuntimeError(
            f"ranks {bad} differ from rank 0 in model weights, data or config; every rank must call "
            "score_dataset with the same model, dataset and arguments"
        )
    versions = _versions()
    out_dir = os.fspath(out_dir)

    with contextlib.ExitStack() as stack:
        prep: Any
        if rank == 0:
            try:
                if os.path.exists(out_dir) and not os.path.isdir(out_dir):
                    raise NotADirectoryError(f"out_dir {out_dir} exists and is not a directory")
                os.makedirs(out_dir, exist_ok=True)
                stack.enter_context(_dir_lock(out_dir))
                prep = _prepare_dir(out_dir, identity, run_key, scan, plan, resume, overwrite, versions)
            except Exception as e:
                _broadcast({"error": f"{type(e).__name__}: {e}"}, world)
                raise
            _broadcast(prep, world)
        else:
            prep = _broadcast(None, world)
            if "error" in prep:
                raise RuntimeError(f"rank 0 failed: {prep['error']}")

        if prep["complete"]:
            store = ScoreStore.open(out_dir, verify=False)  # rank 0 has just verified it
            if rank == 0:
                log.info("%s is complete already (%d records); nothing to score", out_dir, len(store))
            return store

        done = set(prep["done"])
        todo = [sh for sh in plan if sh.index not in done]
        mine = todo[rank::world]
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=sum(sh.size for sh in mine), unit="sample", desc="scoring" if world == 1 else f"scoring (rank 0/{world})",
                dynamic_ncols=True, smoothing=0.05,
            )
        clock = {"t0": time.perf_counter(), "tokens": 0}
        batches = _Batches(scan.source, pad, device)
        try:
            for sh in mine:
                out = _score_shard(engine, sh, batches, scan.lengths, bar, clock)
                meta = {"run_key": run_key, "index": sh.index, "start": sh.start, "stop": sh.stop, "rank": rank}
                atomic_write(os.path.join(out_dir, shard_name(sh.index, rank)), encode_shard(out, meta))
            if sharded and world > 1:  # FSDP forwards are collective: as many on every rank
                from .integrations.fsdp import pad_collective_forwards

                per_rank = [sum(len(sh.batches) for sh in todo[r::world]) for r in range(world)]
                pad_collective_forwards(engine, per_rank, rank, lambda: batches._make([0]))
        finally:
            batches.close()
            if bar is not None:
                bar.close()
        if world > 1:
            torch.distributed.barrier()

        info = {
            "world_size": world,
            "device": str(device),
            "backend_used": resolved,
            "shards_scored_last_run": len(todo),
            "elapsed_s_last_run": round(time.perf_counter() - t_start, 3),
        }
        if rank == 0:
            try:
                store = _merge(out_dir, plan, run_key, identity, scan, prep, versions, info)
            except Exception as e:
                _broadcast({"error": f"{type(e).__name__}: {e}"}, world)
                raise
            _broadcast({"ok": True}, world)
            s = store.meta["counts"]
            summ = store.summary()
            log.info(
                "scored %d records into %s (%d shards new) in %.1f s; NaN/inf: %d; norm mean %.4g, median %.4g",
                len(store), out_dir, len(todo), time.perf_counter() - t_start, s["nonfinite"],
                summ["norm_mean"], summ["norm_median"],
            )
            return store
        status = _broadcast(None, world)
        if "error" in status:
            raise RuntimeError(f"rank 0 failed to write the manifest: {status['error']}")
        return ScoreStore.open(out_dir, verify=False)
