"""Score whole datasets into a resumable score store: ``score_dataset``.

    import gradsel_core as gs
    store = gs.score_dataset(model, records, "scores/run1")  # batches sized by a token budget
    store.ids, store.norms, store.losses, store.tokens       # numpy, in the dataset's order
    store = gs.ScoreStore.open("scores/run1")                 # later, anywhere

How it works: streaming, one window at a time (issue #24)
    The dataset is read in *windows* of ``shard_size`` consecutive records (default ``64 * batch_size``,
    4096 without ``batch_size``; :mod:`gradsel_core.windows`). Each window is read, tokenized (with
    ``tokenizer``), validated (token ids inside the vocabulary, ids and int fields within 64 bits, errors
    naming the record), planned (``gradsel_core.data.plan_batches``: sorted by length within the window,
    packed into batches of at most ``batch_size`` records and ``max_tokens`` padded tokens), scored, and
    written atomically as shard ``s`` with its per-record columns (ids, metadata fields, each raw record's
    content digest) and its *window hash*; then it is dropped. Memory holds one window, never the dataset
    (records are records, a list, any iterable, an HF ``Dataset`` or streaming ``IterableDataset``; a
    JSONL file given as :class:`gradsel_core.windows.JsonlFile`, as ``gradsel score`` does). When every
    window is scored, rank 0 assembles the columns file from the shards (ids checked for one kind and no
    duplicate across windows, errors naming both records) and writes the manifest, which holds the record
    count, the id kind and a chain hash of the window hashes (``data.sha256``). That end of the run is
    O(window) in memory too: the shards are read one at a time, their columns appended to spool files and the
    columns file written from them in chunks; what it holds whole is 8 bytes a record, twice, one after the
    other (the finite norms for the summary's exact median, then one key per id for the duplicate check). The
    store returned is opened lazily (``ScoreStore.open``): no column is read until it is used. Peak RSS of a
    whole ``gradsel score`` process, 10k to 1M records: see ``benchmarks/bench_scale.py --stream``.

Data identity
    The run key (in every shard) covers the model, the scoring config and how the records are made (the
    tokenizer's fingerprint and ``max_length``), not the records: those are identified per window. The
    window hash is the sha256 of the window's raw record digests (:func:`gradsel_core.jsonl.record_digest`:
    the same record read from JSONL, Parquet or a datasets folder hashes the same) when the run tokenizes,
    else of the given tokens, labels, masks, ids and fields. A JSONL window also stores its byte range in
    the file and the sha256 of those bytes. On read, a shard must carry the window hash the manifest lists
    for it (a shard copied from another store of the same model is refused, and ``gradsel repair`` removes
    it so the rerun rescores it).

Resume and rerun
    Rerunning the same call after a crash or ``kill -9`` validates the shards present (checksums, the run
    key, window layout), removes partial temp files and corrupted shards (with a warning naming them), and
    streams the dataset again: a finished window is *checked, not tokenized* (JSONL: by reading its stored
    byte range and comparing the sha256, no JSON parsing; a byte difference falls back to the content
    hash, so reformatting is no change; other inputs: by hashing the raw records), then the unfinished
    windows are scored. Why not trust the file's size and mtime: an edit that keeps both (or a copy that
    sets them) would go unnoticed, and "never a wrong number" means an edited record is refused; hashing
    the bytes costs about a second per GB. A window whose records changed is refused with a
    ``StoreConflictError`` naming the window, its record range and (with digests) the first record that
    differs and its id; so are records added to or removed from a complete store. Every sample is scored
    in the same batch as before, so the final store equals an uninterrupted run's, and on CPU its shard
    files are byte-identical (tested). A directory that holds another model or config (per the manifest
    or any shard) is refused unless ``overwrite=True``; so is a non-empty directory that is not a store.
    A bad record is found when its window is read: the windows before it are already written (and kept
    for a resume); its own window is never written. Before the first window, one record is read and
    tokenized to resolve the backend (so a rerun tokenizes exactly one record).

Multi-GPU and multi-node (``torch.distributed``)
    When ``torch.distributed`` is initialised, window ``s`` belongs to rank ``s % world``: each rank reads,
    tokenizes, checks and scores only its own windows (an indexable dataset is read by index and a JSONL
    file's other windows are only counted, not parsed; a one-pass iterable is read past by every rank) and
    writes rank-tagged shard files into the shared ``out_dir``; rank 0 assembles the store after a barrier,
    and every rank gets the store back. Ranks check that they saw the same record count and the same run
    key; that they saw the same records is not checked across ranks (each hashes only its own windows).
    With FSDP (collective forwards) the ranks agree before each batch whether one still has work, and a
    rank without one runs a padding forward. The result equals a one-process run
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
import itertools
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

from .batching import IGNORE_INDEX, prepare_batch
from .data import (DEFAULT_MAX_TOKENS, as_int_array, check_record_values, collate, extra_fields, model_pad_id,
                   plan_batches, PlannedShard)
from .engine import GradNormEngine
from .windows import WINDOW_SCHEME
from .errors import UsageError
from .params import ParamSpec
from .store import (
    COLUMNS_FILE,
    FIELDS_FILE,
    IDENTITY_KEYS,
    IDS_FILE,
    LAYOUT_KEYS,
    MANIFEST,
    MARKER,
    PP_PREFIX,
    FORMAT_VERSION,
    ScoreStore,
    StoreConflictError,
    StoreError,
    atomic_write,
    build_manifest,
    canonical_hash,
    classify_dir,
    decode_shard,
    conflict_message,
    dir_lock,
    encode_shard,
    json_bytes,
    marker_bytes,
    model_fingerprint,
    now,
    read_manifest,
    remove_temp_files,
    scan_shard_files,
    sha256_bytes,
    shard_name,
    write_side_files,
    store_files,
    SHARD_RE,
    TMP_PREFIX,
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
    record_sha256: Optional[List[str]] = None  # each raw record's content hash (records read from JSON)

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


def _record_iter(dataset: Any):
    """One pass over the records of ``dataset`` without collecting them (a streaming ``IterableDataset``
    stays streaming); the same type check as :func:`_indexable`."""
    if isinstance(dataset, (Mapping, str, bytes)) or (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return _indexable(dataset)[1]  # refuses a mapping or a string; reads an indexable as before
    return iter(dataset)


def _py_scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _check_vocab(a: np.ndarray, vocab: Optional[int], what: str, labels: bool = False) -> None:
    """Refuse token ids outside ``[0, vocab)`` (labels may also be -100), naming ``what`` and the vocab."""
    if vocab is None or not a.size:
        return
    bad = (a < 0) | (a >= vocab)
    if labels:
        bad &= a != IGNORE_INDEX
    if bad.any():
        j = int(np.argmax(bad))
        raise UsageError(
            f"{what}[{j}] = {int(a[j])} is outside the model's vocabulary [0, {vocab})"
            f"{' (and is not -100)' if labels else ''}; are the tokenizer and the model the same family?"
        )


def scan_dataset(dataset: Any, vocab: Optional[int] = None, label_vocab: Optional[int] = None,
                 seq2seq: bool = False, offset: int = 0) -> DataScan:
    """Validate every record (token ids inside ``[0, vocab)`` when given; labels inside
    ``[0, label_vocab)`` or -100; ids and int fields within 64 bits); collect lengths, ids, metadata fields
    and a content hash. Errors name the record (its position and id). ``offset``: the position of the first
    record (a window of a stream: positions name records, and are the ids of records without one)."""
    source, it, n = _indexable(dataset)
    h = hashlib.sha256()
    lengths = np.zeros(n, dtype=np.int64)
    ids: List[Any] = []
    cols: Dict[str, Dict[int, Any]] = {}
    k = -1
    for k, rec in enumerate(it):
        pos = k + offset
        if k >= n:
            raise ValueError(f"the dataset yielded more records than its len() = {n}")
        if not isinstance(rec, Mapping):
            raise TypeError(f"record {pos} is a {type(rec).__name__}; records must be dicts with 'input_ids'")
        if "input_ids" not in rec:
            raise ValueError(
                f"record {pos} has no 'input_ids' (keys: {sorted(rec)}); pass tokenizer= to score_dataset to "
                "tokenize 'text', 'prompt' + 'response' or 'messages' records, or use `gradsel score --data file.jsonl`"
            )
        rid = rec.get("id")
        where = f"record {pos}" + (f" (id {rid!r})" if isinstance(rid, (int, str, np.integer)) else "")
        check_record_values(rec, where)
        ids_a = as_int_array(rec["input_ids"], f"{where}: input_ids")
        L = len(ids_a)
        if L == 0:
            raise UsageError(f"{where} has empty input_ids (T = 0); drop it or give it at least one token")
        _check_vocab(ids_a, vocab, f"{where}: input_ids")
        lengths[k] = L
        h.update(b"R")
        h.update(ids_a.tobytes())
        for key in ("labels", "attention_mask"):
            v = rec.get(key)
            if v is None:
                h.update(b"-")
                continue
            a = as_int_array(v, f"{where}: {key}")
            if len(a) != L and not (seq2seq and key == "labels"):  # seq2seq: the decoder's own length
                raise UsageError(f"{where}: {key} has length {len(a)}, input_ids has {L}")
            if key == "labels":
                _check_vocab(a, label_vocab if label_vocab is not None else vocab, f"{where}: labels", labels=True)
            h.update(key.encode())
            h.update(a.tobytes())
        rid = _py_scalar(rec.get("id"))
        if rid is None:
            rid = pos
        elif isinstance(rid, bool) or not isinstance(rid, (int, str)):
            raise TypeError(f"record {pos}: id must be an int or a str, got {type(rid).__name__}")
        ids.append(rid)
        h.update(repr(rid).encode("utf-8"))
        for key, v in extra_fields(rec).items():
            v = _py_scalar(v)
            cols.setdefault(key, {})[k] = v
            h.update(f"{key}={v!r}".encode("utf-8"))
    if k + 1 != n:
        raise ValueError(f"the dataset yielded {k + 1} records but its len() is {n}")
    kinds = {type(i) for i in ids}
    if kinds - {int, str} or len(kinds) > 1:
        first_str = next(i for i, v in enumerate(ids) if isinstance(v, str))
        first_int = next(i for i, v in enumerate(ids) if isinstance(v, int))
        raise TypeError(
            f"ids must be all ints or all strs (records without an id take their position): record {first_int + offset} "
            f"has id {ids[first_int]!r}, record {first_str + offset} has id {ids[first_str]!r}"
        )
    id_kind = "str" if kinds == {str} else "int"
    if len(set(ids)) != n:
        seen: Dict[Any, int] = {}
        dups = []
        for i, v in enumerate(ids):
            if v in seen:
                dups.append(f"{v!r} (records {seen[v] + offset} and {i + offset})")
            else:
                seen[v] = i
        raise ValueError(f"duplicate ids: {', '.join(dups[:5])}{' ...' if len(dups) > 5 else ''}")
    fields = {key: [c.get(i) for i in range(n)] for key, c in sorted(cols.items())}
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


def _model_vocab(model: nn.Module) -> Tuple[Optional[int], Optional[int]]:
    """``(input vocab, output vocab)`` of a language model (embedding rows, LM-head rows; else the
    config's ``vocab_size``); ``None`` when the model does not say."""
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None) if cfg is not None else None
    v = v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    vin, vout = v, v
    with contextlib.suppress(Exception):
        e = model.get_input_embeddings()
        if isinstance(e, nn.Embedding):
            vin = e.num_embeddings
    with contextlib.suppress(Exception):
        o = model.get_output_embeddings()
        if isinstance(o, nn.Linear):
            vout = o.out_features
    return vin, vout


def _open_out_dir(out_dir: str, overwrite: bool) -> None:
    """Checks before the lock is taken: ``out_dir`` is a directory (created when missing) that is empty,
    a store, or (with ``overwrite``) a directory whose files do not clash with the store's."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"out_dir {out_dir} exists and is not a directory; give a directory for the score store")
    kind, others = classify_dir(out_dir)
    if kind == "foreign":
        listing = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        if not overwrite:
            raise StoreConflictError(
                f"{out_dir} is not empty and is not a gradsel score store (it holds {listing}); choose a new or "
                "empty directory, or pass overwrite=True (CLI: --overwrite) to put the store's files next to them "
                "(gradsel never touches files it did not create)"
            )
        clash = [n for n in others if n in (MANIFEST, IDS_FILE, FIELDS_FILE, COLUMNS_FILE) or SHARD_RE.match(n) or n.startswith(TMP_PREFIX)]
        if clash:
            raise StoreConflictError(
                f"{out_dir}: {', '.join(clash[:5])} would be overwritten, but gradsel did not create "
                f"{'them' if len(clash) > 1 else 'it'}; move {'them' if len(clash) > 1 else 'it'} away or choose another directory"
            )
    elif kind == "v1" and not overwrite:
        raise StoreConflictError(
            f"{out_dir} holds a score store of format 1 (written by an older gradsel), whose fingerprint does not "
            "cover the whole model, so it cannot be resumed (it can still be read: ScoreStore.open, gradsel "
            "inspect/select). Pass overwrite=True (CLI: --overwrite) to score again into it, or choose another directory."
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the directory {out_dir}: {e.strerror or e}") from None


def _claim_dir(out_dir: str) -> None:
    """Under the lock: make ``out_dir`` a store of this format (a format-1 store's files are removed:
    ``_open_out_dir`` only lets one through with ``overwrite``)."""
    kind, _ = classify_dir(out_dir)
    if kind == "v1":
        for name in store_files(out_dir, v1=True):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, name))
        log.info("overwrite: removed the format-1 store files in %s", out_dir)
    if kind != "store":
        atomic_write(os.path.join(out_dir, MARKER), marker_bytes())


def _existing_windows(out_dir: str, run_key: str, size: int, found=None, n_records: Optional[int] = None):
    """``{window index: (file, bytes, tensors, meta)}`` of the valid shards of run ``run_key`` present
    (window ``s`` holds records ``[s * size, ...)``, at most ``size``, all of them up to ``n_records`` when
    given); corrupted shards, shards of another run or another layout, and duplicates are removed (with a
    warning naming the file)."""
    if found is None:
        found = scan_shard_files(out_dir)
    valid: Dict[int, Tuple[str, bytes, Dict[str, np.ndarray], Dict[str, Any]]] = {}
    for name, idx, data, tensors, meta, err in found:
        path = os.path.join(out_dir, name)
        reason = err
        if reason is None:
            start, stop = meta.get("start"), meta.get("stop")
            want_stop = None if n_records is None else min(n_records, (idx + 1) * size)
            if meta.get("run_key") != run_key:
                reason = f"{path}: written by another run (different model/config/data)"
            elif (meta.get("index") != idx or start != idx * size or not isinstance(stop, int) or not 0 < stop - start <= size
                  or not isinstance(meta.get("window"), dict) or (want_stop is not None and stop != want_stop)):
                reason = f"{path}: does not match the windows of {size} records"
            elif not np.array_equal(tensors.get("positions"), np.arange(start, stop)):
                reason = f"{path}: positions do not cover [{start}, {stop})"
        if reason is None and idx not in valid:
            valid[idx] = (name, data, tensors, meta)
            continue
        if reason is not None:
            log.warning("%s; removing it, it will be scored again", reason)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return valid


# data totals the manifest adds to the identity's data when the store is complete (not part of the run key)
DATA_TOTALS = ("n_records", "id_kind", "sha256")


def _identity(fingerprint, config, source: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The run's identity (its hash is the run key in every shard): model, config and how the records are
    made. The data itself is identified window by window (``gradsel_core.windows``), in each shard."""
    data: Dict[str, Any] = {"windows": WINDOW_SCHEME}
    if source:
        data["source"] = dict(source)
    return {"model": fingerprint, "config": config, "data": data}


def _stored_identity(ident: Mapping[str, Any]) -> Dict[str, Any]:
    out = {k: ident.get(k) for k in IDENTITY_KEYS}
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k not in DATA_TOTALS or "windows" not in out["data"]}
    return out


def _stored_layout(out_dir: str, identity: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The batch-plan keys of the store in ``out_dir`` when its identity equals ``identity`` except for
    them (and they differ); ``None`` otherwise (no store, another run, or the same plan)."""
    from .store import canonical

    if not os.path.isdir(out_dir):
        return None
    old = None
    with contextlib.suppress(StoreError, OSError):
        m = read_manifest(out_dir)
        old = _stored_identity(m) if m is not None else None
    if old is None:
        with contextlib.suppress(StoreError, OSError):
            for _, _, _, _, meta, err in scan_shard_files(out_dir):
                if err is None and isinstance(meta.get("identity"), dict):
                    old = meta["identity"]
                    break
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return None
    stored = {k: old["config"].get(k) for k in LAYOUT_KEYS}
    if any(k not in old["config"] for k in LAYOUT_KEYS) or all(stored[k] == identity["config"].get(k) for k in LAYOUT_KEYS):
        return None
    strip = lambda ident: canonical({**ident, "config": {k: v for k, v in ident["config"].items() if k not in LAYOUT_KEYS}})
    return stored if strip(old) == strip(dict(identity)) else None


def _prepare_dir(out_dir, identity, run_key, size, resume, overwrite, versions) -> Dict[str, Any]:
    """Rank 0, under the lock: conflict checks, cleanup, the finished windows. Returns what the ranks need:
    ``{"complete", "done": {window index: its stored window info}, "records" (complete only), "created"}``."""
    _claim_dir(out_dir)
    remove_temp_files(out_dir)
    try:
        old = read_manifest(out_dir)
    except StoreError as e:
        log.warning("%s; rebuilding it from the shards", e)
        old = None
    found = scan_shard_files(out_dir)
    ours = [f for f in found if f[5] is None and f[4].get("run_key") == run_key]
    if old is not None and old["run_key"] != run_key and not old["complete"] and not ours and not any(
            f[5] is None and f[4].get("run_key") == old["run_key"] for f in found):
        # an unfinished store without a single scored shard (e.g. a run that failed on its first batch, such
        # as an unavailable backend) holds nothing to protect: it does not block another run
        log.info("%s: replacing an unfinished store that holds no scores yet", out_dir)
        old = None
    if not overwrite:
        if old is not None and old["run_key"] != run_key and "windows" not in old["data"] and "sha256" in old["data"] \
                and old["config"].get("source") != "ScoreStore.from_arrays":
            raise StoreConflictError(
                f"{out_dir} was scored by a gradsel before streaming scoring (its data identity is one hash of the "
                "whole dataset, not per window), so it cannot be resumed or rechecked by this one; it can still be "
                "read (ScoreStore.open, gradsel inspect/select). Pass overwrite=True (CLI: --overwrite) to score "
                "again into it, or choose another directory.")
        if old is not None and old["run_key"] != run_key:
            raise StoreConflictError(conflict_message(out_dir, _stored_identity(old), identity))
        # with our own manifest, a shard of another run (copied in) is removed and rescored below
        for name, _, _, _, meta, err in ([] if old is not None else found):
            if err is None and meta.get("run_key") != run_key:
                other = meta.get("identity")
                if isinstance(other, dict):
                    raise StoreConflictError(conflict_message(out_dir, other, identity, where=f" (in {name})"))
                raise StoreConflictError(
                    f"{out_dir}: {name} holds scores of another run (model, config or data); pass overwrite=True "
                    "(CLI: --overwrite) to replace them, or choose another directory")
    if overwrite or not resume:
        removed = store_files(out_dir)
        for name in removed:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, name))
        old, found = None, []
        if removed:
            log.info("%s: removed the previous store files in %s", "overwrite" if overwrite else "no resume", out_dir)
    created = (old or {}).get("created") or now()
    if old is not None and old["complete"] and resume:
        try:
            store = ScoreStore.open(out_dir, verify=True)
            done = {int(sh["index"]): sh["window"] for sh in old["shards"]}
            return {"complete": True, "done": done, "records": int(old["counts"]["records"]), "created": created,
                    "store": store}  # rank 0 keeps the store it verified (not sent to the other ranks)
        except (StoreError, KeyError, TypeError) as e:
            log.warning("%s; repairing the store", e)
            if _drop_foreign_windows(out_dir, old, run_key):
                found = scan_shard_files(out_dir)
    valid = _existing_windows(out_dir, run_key, size, found)
    if old is None or old["run_key"] != run_key or old["complete"]:
        manifest = build_manifest(identity, run_key, 0, 0, {}, versions, created)
        manifest["counts"]["shards_scored"] = len(valid)
        atomic_write(os.path.join(out_dir, MANIFEST), json_bytes(manifest))
    if valid:
        log.info("resuming %s: %d windows already scored", out_dir, len(valid))
    return {"complete": False, "done": {i: v[3]["window"] for i, v in valid.items()}, "created": created}


def _merge(out_dir, n_records, size, run_key, identity, created, versions, info) -> ScoreStore:
    """Rank 0, after every rank is done: one valid shard per window, the columns file assembled from the
    windows' columns (ids checked: one kind, no duplicate), the manifest. O(window) in memory: shards are read
    one at a time, their columns appended to spool files in the store (:class:`gradsel_core.windows.
    ColumnAssembler`) and their scores summed into the summary (:class:`gradsel_core.store.Summary`), then the
    columns file is written from the spools chunk by chunk. What is held whole: the finite norms (float64, 8
    bytes a record: the summary's exact mean and quantiles) and then, for the duplicate-id check, one int64 key
    per record (8 bytes a record), one after the other; the string fields' dictionaries."""
    from .store import Summary, list_shards, read_store_file
    from .windows import ColumnAssembler, _read_window_columns, chain_hash

    n_windows = -(-n_records // size)
    names = list_shards(out_dir)
    shards, missing = [], []
    summary = Summary(n_records)
    cols = ColumnAssembler(out_dir)
    try:
        for s in range(n_windows):
            picked = None
            for name in names.get(s, []):
                path = os.path.join(out_dir, name)
                found: List[Any]
                try:
                    data = read_store_file(out_dir, name)
                    tensors, meta = decode_shard(data, path)
                    found = [(name, s, data, tensors, meta, None)]
                except StoreError as e:
                    found = [(name, s, None, None, None, str(e))]
                if picked is None:
                    got = _existing_windows(out_dir, run_key, size, found, n_records=n_records)
                    if s in got:
                        picked = got[s]
                        continue
                else:  # a duplicate (another rank's copy): the first valid one is the shard
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            if picked is None:
                missing.append(s)
                continue
            name, data, tensors, meta = picked
            summary.add(tensors["norms"], tensors["losses"], tensors["tokens"])
            shards.append(({"file": name, "index": s, "start": meta["start"], "count": meta["stop"] - meta["start"],
                            "batches": meta.get("batches", 0), "window": meta["window"], "sha256": sha256_bytes(data),
                            "size": len(data)}, None, {}))
            if not missing:
                cols.add(_read_window_columns(tensors, meta, os.path.join(out_dir, name)), meta["start"],
                         os.path.join(out_dir, name))
            del data, tensors, picked
        if missing:
            raise StoreError(f"{out_dir}: shards of windows {missing[:10]} are missing after the run; rerun to finish them")
        stats = summary.result()  # frees its buffer before the duplicate-id keys are read (one after the other)
        id_kind, ids, fields, digests = cols.finish()
        side = write_side_files(out_dir, id_kind, ids, fields, digests)  # the columns file written from the spools
    finally:
        cols.close()
    del ids, fields, digests
    for name in {IDS_FILE, FIELDS_FILE, COLUMNS_FILE} - set(side):
        if os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))  # ours (the directory is a store): stale from a replaced run
    manifest = build_manifest(identity, run_key, n_records, n_windows, side, versions, created, shards=shards, run=info,
                              stats=stats)
    del shards
    manifest["data"] = {**manifest["data"], "n_records": n_records, "id_kind": id_kind,
                        "sha256": chain_hash([sh["window"]["sha256"] for sh in manifest["shards"]])}
    atomic_write(os.path.join(out_dir, MANIFEST), json_bytes(manifest))
    if manifest["counts"]["nonfinite"]:
        log.warning("%s: NaN/inf: %d records have a non-finite loss or norm (stored as such, counted in "
                    "store.meta['counts'])", out_dir, manifest["counts"]["nonfinite"])
    return ScoreStore.open(out_dir, verify=False)


def _drop_foreign_windows(out_dir: str, old: Optional[Mapping[str, Any]], run_key: str) -> int:
    """Remove the shards whose records are not the ones a complete manifest of this run lists (their window
    hash differs: copied from another store of the same model and config); they are rescored by the rerun.
    Returns how many."""
    if old is None or old.get("run_key") != run_key or not old.get("complete"):
        return 0
    want = {int(e["index"]): e.get("window") for e in old.get("shards", []) if isinstance(e, dict)}
    n = 0
    for name, idx, _, _, meta, err in scan_shard_files(out_dir):
        if err is None and want.get(idx) is not None and meta.get("window") != want[idx]:
            log.warning("%s: its records are not the ones the manifest lists (copied from another store?); "
                        "removing it, rerun the score command to score them again", os.path.join(out_dir, name))
            os.unlink(os.path.join(out_dir, name))
            n += 1
    return n


def repair_stream(out_dir: str, run_key: str, identity: Mapping[str, Any], old: Optional[Mapping[str, Any]],
                  versions: Mapping[str, Any]) -> Tuple[bool, int, int, List[int]]:
    """``gradsel repair`` of a streaming run's store (called under the lock): the record count comes from the
    columns file (or a complete manifest); when every window's shard is there the store is assembled again
    (:func:`_merge`), else an incomplete manifest is written (the rerun scores what is missing). Returns
    ``(complete, records, windows, missing windows)``."""
    size = int(identity["config"]["shard_size"])
    n = None
    if old is not None and old.get("complete") and old.get("run_key") == run_key:
        n = int(old["counts"]["records"])
    if n is None:
        with contextlib.suppress(Exception):
            from .store import decode_shard, read_store_file

            n = int(decode_shard(read_store_file(out_dir, COLUMNS_FILE), COLUMNS_FILE)[1]["n"])
    if _drop_foreign_windows(out_dir, old, run_key):
        n = None  # the store must be finished by the rerun
    valid = _existing_windows(out_dir, run_key, size, n_records=n)
    created = (old or {}).get("created") if old is not None and old.get("run_key") == run_key else None
    if n is None and old is not None and old.get("complete") and old.get("run_key") == run_key:
        n = int(old["counts"]["records"])
        missing = [s for s in range(-(-n // size)) if s not in valid]
    elif n is not None:
        missing = [s for s in range(-(-n // size)) if s not in valid]
        if not missing:
            _merge(out_dir, n, size, run_key, dict(identity), created or now(), versions, {"repaired": now()})
            return True, n, -(-n // size), []
    else:
        missing = [s for s in range(max(valid, default=-1) + 1) if s not in valid]
    manifest = build_manifest(dict(identity), run_key, 0, 0, {}, versions, created)
    manifest["counts"]["shards_scored"] = len(valid)
    atomic_write(os.path.join(out_dir, MANIFEST), json_bytes(manifest))
    return False, n or 0, len(valid) + len(missing), missing


# -- scoring ----------------------------------------------------------------------------------------


class _Batches:
    """Collated batches of a shard, on the model's device; on CUDA the next batch is collated and
    copied in a background thread while the current one is scored."""

    def __init__(self, source, pad_id: int, device: torch.device, seq2seq: bool = False):
        self.source, self.pad_id, self.device, self.seq2seq = source, pad_id, device, seq2seq
        self.pool = ThreadPoolExecutor(max_workers=1) if device.type == "cuda" else None

    def _make(self, positions: Sequence[int]) -> Dict[str, torch.Tensor]:
        batch = collate([self.source[int(p)] for p in positions], self.pad_id, seq2seq=self.seq2seq)
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


def _score_shard(engine: GradNormEngine, sh: PlannedShard, batches: _Batches, lengths: np.ndarray, bar, clock,
                 reference=None, base: int = 0, before_batch=None):
    """Score one planned window; ``lengths`` are the window's (``lengths[p - base]`` is record ``p``'s).
    ``before_batch``: called before each scored batch (FSDP's lockstep, see ``score_dataset``)."""
    pos, norms, losses, tokens, dots, cosines = [], [], [], [], [], []
    pp: Dict[str, List[torch.Tensor]] = {n: [] for n in engine.params} if engine.per_param else {}
    for positions, batch in batches(sh.batches):
        if before_batch is not None:
            before_batch()
        res = engine.score(batch, reference=reference)
        pos.extend(positions)
        norms.append(res.norms)
        losses.append(res.losses)
        tokens.append(res.tokens)
        if reference is not None:
            dots.append(res.dots)
            cosines.append(res.cosines)
        for n in pp:
            pp[n].append(res.per_param[n])
        if bar is not None:
            clock["tokens"] += int(lengths[np.asarray(positions, dtype=np.int64) - base].sum())
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
    if reference is not None:  # (N,) for one reference, (N, R) for several
        out["dots"] = torch.cat(dots).float().cpu().numpy()[order]
        out["cosines"] = torch.cat(cosines).float().cpu().numpy()[order]
    return out


def _reference_identity(reference: Any, fingerprint: Mapping[str, Any], engine: GradNormEngine) -> Dict[str, Any]:
    """What the store records of its reference(s): digests, counts, norms; checked against the model."""
    from collections.abc import Mapping as MappingABC

    from .reference import stack_references

    many = [reference] if isinstance(reference, MappingABC) else list(reference)
    stack_references(many, engine.params, torch.float32)  # names and shapes match the scored parameters
    out = []
    for k, r in enumerate(many):
        fp = getattr(r, "fingerprint", None)
        if fp and fp != fingerprint["content_sha256"]:
            raise UsageError(f"reference {k} was computed on other weights (fingerprint {fp[:12]}..., this model "
                             f"{fingerprint['content_sha256'][:12]}...); recompute it on this model")
        digest = r.digest() if hasattr(r, "digest") else None
        if digest is None:
            from .reference import ReferenceGradient

            digest = ReferenceGradient(r).digest()
        out.append({"digest": digest, "count": int(getattr(r, "count", 0)), "fingerprint": fp or None})
    return {"references": out, "single": isinstance(reference, MappingABC)}


@dataclass
class DryRun:
    """What ``score_dataset(..., dry_run=True)`` found: the work, the store's identity and a time estimate."""

    records: int
    tokens: int
    padded_tokens: int
    batches: int
    shards: int
    run_key: str
    backend: str
    out_dir: str
    out_state: str  # "new", "same run: K of S shards scored", "complete", "another run (...)"
    timed_batches: int
    estimate_s: Optional[float]  # the whole run, from the timed batches' seconds per padded token

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _dry_run(engine, totals, first, pad, device, out_dir, run_key, config, reference, seq2seq=False,
             n_timed: int = 3) -> DryRun:
    """Time the first ``n_timed`` batches of the first window (after one untimed warm-up) and describe
    ``out_dir``. ``totals``: records, tokens, padded tokens, batches, windows of the whole stream; ``first``:
    ``(records, lengths, planned shard)`` of window 0, or ``None``."""
    est, timed = None, 0
    if first is not None:
        records, lengths, sh = first
        make = _Batches(records, pad, device, seq2seq)
        try:
            sample = list(sh.batches[:n_timed + 1])
            t_used = tok_used = 0.0
            for k, (b, batch) in enumerate(make(sample)):
                t0 = time.perf_counter()
                engine.score(batch, reference=reference)
                if k == 0 and len(sample) > 1:
                    continue  # warm-up
                t_used += time.perf_counter() - t0
                tok_used += len(b) * int(lengths[b[0]])
                timed += 1
            est = t_used / max(tok_used, 1.0) * totals["padded"]
        finally:
            make.close()
    state = "new"
    with contextlib.suppress(StoreError, OSError):
        m = read_manifest(out_dir) if os.path.isdir(out_dir) else None
        if m is not None:
            if m["run_key"] != run_key:
                state = "another run (refused without --overwrite)"
            elif m["complete"]:
                state = "complete: nothing to score"
            else:
                ours = sum(1 for f in scan_shard_files(out_dir) if f[5] is None and f[4].get("run_key") == run_key)
                state = f"same run: {ours} of {totals['shards']} shards scored"
    return DryRun(totals["records"], totals["tokens"], totals["padded"], totals["batches"], totals["shards"], run_key,
                  str(config["backend_resolved"]), out_dir, state, timed, None if est is None else round(est, 3))


class _Offset:
    """A window's records indexed by dataset position."""

    def __init__(self, records: Sequence[Any], base: int):
        self.records, self.base = records, base

    def __getitem__(self, p: int) -> Any:
        return self.records[p - self.base]


def _tokenize_window(win, tokenizer, length, seq2seq, vocab_in, vocab_out):
    """``(scan, record digests or None, window hash)`` of a window's raw records: tokenized (with
    ``tokenizer``), validated and scanned; the hash as :mod:`gradsel_core.windows` defines it."""
    from .windows import digest_window_hash, digests_array

    records, digests = win.records, None
    if tokenizer is not None:
        from .data import encode_records, record_digest

        digests = digests_array([record_digest(r) if isinstance(r, Mapping) else "00" * 16 for r in records])
        records = encode_records(records, tokenizer, length, compact=True, seq2seq=seq2seq, offset=win.start)
    scan = scan_dataset(records, vocab=vocab_in, label_vocab=vocab_out, seq2seq=seq2seq, offset=win.start)
    return scan, digests, (digest_window_hash(digests) if digests is not None else scan.sha256)


def _check_window(out_dir, win, stored, tokenizer, seq2seq) -> None:
    """A finished window's records must be the ones its shard scored (see :mod:`gradsel_core.windows`):
    by its bytes (JSONL), else by its content hash, with no tokenizing; ``StoreConflictError`` naming the
    window, its record range and the first record that differs."""
    from .windows import digest_window_hash, digests_array, window_conflict

    if win.bytes_ok:
        return
    ids = None
    digests = None
    if tokenizer is not None:
        from .data import record_digest

        digests = digests_array([record_digest(r) if isinstance(r, Mapping) else "00" * 16 for r in win.records])
        sha = digest_window_hash(digests)
        ids = [r.get("id", win.start + k) if isinstance(r, Mapping) else None for k, r in enumerate(win.records)]
    else:
        sha = scan_dataset(win.records, seq2seq=seq2seq, offset=win.start).sha256
    if sha == stored.get("sha256") and win.count == stored.get("count"):
        return
    stored_digests = None
    if digests is not None:  # the shard's per-record digests name the first record that differs
        with contextlib.suppress(Exception):
            from .store import read_store_file

            for name in sorted(os.listdir(out_dir)):
                if name.startswith(f"shard-{win.index:06d}-"):
                    tensors, _ = decode_shard(read_store_file(out_dir, name), name)
                    stored_digests = tensors.get("col.record_sha256")
                    break
    raise window_conflict(out_dir, win, stored, sha, digests, stored_digests, ids)


def score_dataset(
    model: nn.Module,
    dataset: Any,
    out_dir: str,
    *,
    batch_size: Optional[int] = None,
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
    source: Optional[Mapping[str, Any]] = None,
    tokenizer: Any = None,
    max_length: Optional[int] = None,
    reference: Any = None,
    dry_run: bool = False,
    fused_head: Optional[bool] = None,
) -> ScoreStore:
    """Score every record of ``dataset`` into the score store ``out_dir`` and return it.

    Args:
        model: the model (on its device; the batches follow the first parameter's device).
        dataset: records ``{"input_ids", "labels"?, "attention_mask"?, "id"?, ...}``: a list, an iterable
            or any indexable with ``len()`` (an HF ``datasets.Dataset``). A streaming HF ``IterableDataset``
            (no ``len()``) or any other one-pass iterable works too, read once, one window at a time (see the
            module doc: memory holds one window), as does a :class:`gradsel_core.windows.JsonlFile` (raw JSONL
            records, with ``tokenizer``; a rerun checks its finished windows by their bytes). Ids (int or str) are kept, else
            the position is the id; duplicates are an error. Other scalar fields become ``store.fields``.
        batch_size: records per batch at most (``None``: only ``max_tokens`` limits).
        max_tokens: padded tokens per batch at most (``B * T_max``). With neither given, batches are sized
            by the token budget ``gradsel_core.data.DEFAULT_MAX_TOKENS`` alone (chosen by
            ``benchmarks/bench_batching.py``: short records get large batches, long ones small).
        params, backend, per_param, chunk_size, loss_reduction, fused_head: as in :class:`GradNormEngine`.
        reference: a :class:`gradsel_core.ReferenceGradient` (or a list of them): the store also holds
            ``dots`` and ``cosines`` per record; the manifest records each reference's digest, so a store made
            with another reference (or none) is refused. A reference computed on other weights is refused.
        resume: reuse valid shards of an interrupted identical run (``False``: score everything again).
        progress: tqdm bar (rank 0) with samples/s and tokens/s.
        overwrite: replace a store of another model/config/dataset in ``out_dir``.
        shard_size: records per shard, which is also the length-bucketing window (``64 * batch_size``,
            4096 without ``batch_size``).
        pad_id: padding id (default: the model config's ``pad_token_id``, else 0).
        source: how the records were made, e.g. ``{"tokenizer": tokenizer_fingerprint(tok), "max_length":
            512}`` (JSON values): part of the store's identity, so a store made another way is refused.

    ``overwrite`` also lets a non-empty directory that is not a store be used (the store's files are
    put next to the others; a file of the same name as one of the store's is refused). Without it only
    an empty directory or a store of the same identity is written to. The returned store's ``run`` says
    what this call did (``records_scored``, ``tokens_scored``, ``elapsed_s``, ``scoring_s``).
        tokenizer: tokenize records given as ``text``, ``prompt`` + ``response`` or chat ``messages``, as
            ``gradsel score --data`` does (:func:`gradsel_core.data.encode_record`: the loss covers the
            response / assistant turns only); records that have ``input_ids`` pass through unchanged.
        max_length: with ``tokenizer``, truncate records to this many tokens (default: the model's
            maximum positions, else 1024).

    ``dry_run``: touch nothing; return a :class:`DryRun` (records, tokens, batches, the run key, what
    ``out_dir`` holds, and a time estimate from a few timed batches) instead of a store.

    NaN/inf losses and norms are stored as such and counted in ``store.meta["counts"]``.
    Under ``torch.distributed`` every rank must call this with the same arguments (see module doc).
    """
    t_start = time.perf_counter()
    from .batching import is_encoder_decoder
    from .windows import CHECK, READ, SKIP, JsonlFile, Want, iter_windows, window_columns

    seq2seq = is_encoder_decoder(model)  # prompt -> encoder, response -> the decoder's labels
    length = None
    if tokenizer is not None:
        from .data import encode_record, model_max_length
        from .store import tokenizer_fingerprint

        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise UsageError(f"max_length must be a positive int (tokens per record), got {max_length!r}")
        length = max_length or model_max_length(model)
        # how the records were made is part of the store's identity (another tokenizer or length is refused)
        source = dict(source or {})
        source.setdefault("tokenizer", tokenizer_fingerprint(tokenizer))
        source.setdefault("max_length", length)
    elif max_length is not None:
        raise ValueError("max_length truncates while tokenizing: it needs tokenizer= as well")
    elif isinstance(dataset, JsonlFile):
        raise UsageError("a JSONL file is read as raw records: give tokenizer= to score it")
    if not isinstance(dataset, JsonlFile) and not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        if isinstance(dataset, (Mapping, str, bytes)):
            _indexable(dataset)  # the type error
        dataset = _Peekable(iter(dataset))
    rank, world = _dist()
    engine = GradNormEngine(
        model, params=params, backend=backend, per_param=per_param, chunk_size=chunk_size, loss_reduction=loss_reduction,
        fused_head=fused_head,  # exact either way: not part of the store's identity
    )
    vocab_in, vocab_out = _model_vocab(model)
    explicit_budget = max_tokens is not None
    if batch_size is None and max_tokens is None:  # the default: a token budget, no record cap
        max_tokens = DEFAULT_MAX_TOKENS
    window = shard_size if shard_size is not None else (64 * batch_size if batch_size is not None else 4096)
    plan_batches([1], batch_size, max_tokens, window, warn=False)  # the argument checks, now
    device = _model_device(model)
    pad = model_pad_id(model) if pad_id is None else int(pad_id)
    first = _first_record(dataset)  # the backend is resolved on a real record (one record read and tokenized)
    if first is not None:
        rec = first
        if tokenizer is not None:
            rec = encode_record(first, tokenizer, length, seq2seq=seq2seq)
        scan_dataset([rec], vocab=vocab_in, label_vocab=vocab_out, seq2seq=seq2seq)  # the record's own errors, first
        probe: Optional[Dict[str, torch.Tensor]] = collate([rec], pad, seq2seq=seq2seq)
        resolved = engine.resolve_backend(prepare_batch({k: v.to(device) for k, v in probe.items()}, lm_loss=True,
                                                        seq2seq=seq2seq))
    else:
        probe = None
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
        "loss": ({"kind": "seq2seq_cross_entropy", "shift": 0, "ignore_index": IGNORE_INDEX,
                  "reduction": loss_reduction} if seq2seq else
                 {"kind": "causal_lm_cross_entropy", "shift": 1, "ignore_index": IGNORE_INDEX,
                  "reduction": loss_reduction}),
        # CPU reductions split by thread count: another count changes norms in the last bits (up to ~5e-7),
        # so it is part of the identity and a resume at another count is refused instead of mixing them
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
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
    if reference is not None:
        config["reference"] = _reference_identity(reference, fingerprint, engine)
    identity = _identity(fingerprint, config, source)
    if resume and not overwrite and not dry_run:
        stored = _stored_layout(os.fspath(out_dir), identity)
        if stored is not None:  # the batch plan changes no per-sample value: resume with the store's plan
            if rank == 0:
                log.info("%s was scored with %s; resuming with its batch plan (batch size, max tokens and "
                         "shard size change no per-sample value; new values apply to a new store)", os.fspath(out_dir),
                         ", ".join(f"{k}={stored[k]}" for k in LAYOUT_KEYS))
            config.update(stored)
            batch_size, max_tokens, window = stored["batch_size"], stored["max_tokens"], stored["shard_size"]
            identity = _identity(fingerprint, config, source)
    run_key = canonical_hash(identity)
    keys = _all_gather(run_key, world)
    if len(set(keys)) > 1:
        bad = [r for r, k in enumerate(keys) if k != keys[0]]
        raise RuntimeError(
            f"ranks {bad} differ from rank 0 in model weights or config; every rank must call "
            "score_dataset with the same model, dataset and arguments"
        )
    versions = _versions()
    out_dir = os.fspath(out_dir)

    def prepared(win):
        scan, digests, sha = _tokenize_window(win, tokenizer, length, seq2seq, vocab_in, vocab_out)
        (sh,) = plan_batches(scan.lengths, batch_size, max_tokens, max(len(scan), 1), warn=rank == 0 and explicit_budget,
                             offset=win.start, first_index=win.index)
        return scan, digests, sha, sh

    if dry_run:
        totals = {"records": 0, "tokens": 0, "padded": 0, "batches": 0, "shards": 0}
        first_w = None
        for win in iter_windows(dataset, window, lambda s: Want(READ)):
            scan, _, _, sh = prepared(win)
            totals["records"] += len(scan)
            totals["tokens"] += int(scan.lengths.sum())
            totals["padded"] += int(sum(len(b) * int(scan.lengths[b[0] - win.start]) for b in sh.batches))
            totals["batches"] += len(sh.batches)
            totals["shards"] += 1
            if first_w is None:
                first_w = (_Offset(scan.source, win.start), _OffsetLengths(scan.lengths, win.start), sh)
        return _dry_run(engine, totals, first_w, pad, device, out_dir, run_key, config, reference,  # type: ignore[return-value]
                        seq2seq=seq2seq)

    with contextlib.ExitStack() as stack:
        prep: Any
        verified = None
        if rank == 0:
            try:
                _open_out_dir(out_dir, overwrite)
                stack.enter_context(dir_lock(out_dir))
                prep = _prepare_dir(out_dir, identity, run_key, window, resume, overwrite, versions)
            except Exception as e:
                _broadcast({"error": f"{type(e).__name__}: {e}"}, world)
                raise
            verified = prep.pop("store", None)
            _broadcast(prep, world)
        else:
            prep = _broadcast(None, world)
            if "error" in prep:
                raise RuntimeError(f"rank 0 failed: {prep['error']}")
        done: Dict[int, Dict[str, Any]] = prep["done"]

        def want(s: int) -> Want:
            if s % world != rank:
                return Want(SKIP)
            if s in done:
                return Want(CHECK, done[s].get("bytes"))
            return Want(READ)

        run: Dict[str, Any] = {"world_size": world, "device": str(device), "backend_used": resolved, "records_total": 0,
               "records_scored": 0, "shards_scored": 0, "tokens_scored": 0, "scoring_s": 0.0}
        bar = None
        if progress and rank == 0 and not prep["complete"]:
            from tqdm.auto import tqdm

            bar = tqdm(unit="sample", desc="scoring" if world == 1 else f"scoring (rank 0/{world})",
                       dynamic_ncols=True, smoothing=0.05)
        clock = {"t0": time.perf_counter(), "tokens": 0}
        batches = _Batches(None, pad, device, seq2seq)
        header = {"format_version": FORMAT_VERSION, "run_key": run_key, "identity": identity, "records": None,
                  "shards_planned": None, "side_files": {}, "versions": versions, "rank": rank}
        n_records, my_batches, error = 0, 0, None
        # FSDP forwards are collectives that pair up across ranks, and a rank cannot know how many batches the
        # others' windows hold without tokenizing them: before each batch every rank says whether it has one
        # (one small all_gather), and a rank that has none runs a padding forward while any other does
        lockstep = (lambda: _all_gather(1, world)) if sharded and world > 1 else None
        try:
            for win in iter_windows(dataset, window, want):
                n_records = win.start + win.count
                if win.records is None and not win.bytes_ok:
                    continue  # another rank's window
                if win.index in done:
                    _check_window(out_dir, win, done[win.index], tokenizer, seq2seq)
                    continue
                if prep["complete"]:
                    raise StoreConflictError(
                        f"{out_dir}: the dataset has more records than the store scored ({prep['records']}): "
                        f"window {win.index} (records from {win.start}) is new. Pass overwrite=True (CLI: --overwrite) "
                        "to score the new data from scratch, or score it into another directory.")
                scan, digests, sha, sh = prepared(win)
                batches.source = _Offset(scan.source, win.start)
                out = _score_shard(engine, sh, batches, scan.lengths, bar, clock, reference, base=win.start,
                                   before_batch=lockstep)
                tensors, cmeta = window_columns(scan.id_kind, scan.ids, scan.fields, digests)
                out.update(tensors)
                info: Dict[str, Any] = {"count": win.count, "sha256": sha}
                if win.bytes is not None:
                    info["bytes"] = win.bytes
                meta = {**header, "index": sh.index, "start": sh.start, "stop": sh.stop, "batches": len(sh.batches),
                        "window": info, "columns": cmeta, "id_kind": scan.id_kind}
                atomic_write(os.path.join(out_dir, shard_name(sh.index, rank)), encode_shard(out, meta))
                run["records_scored"] += win.count
                run["shards_scored"] += 1
                run["tokens_scored"] += int(scan.lengths.sum())
                my_batches += len(sh.batches)
                del out, tensors, sh, scan
                _release_memory()
            n_windows = -(-n_records // window)
            beyond = sorted(s for s in done if s >= n_windows)
            if beyond or (prep["complete"] and n_records != prep["records"]):
                scored = prep["records"] if prep["complete"] else f"windows {beyond[:5]}, from record {min(beyond) * window}"
                raise StoreConflictError(
                    f"{out_dir}: the dataset has {n_records} records, not what the store scored ({scored}). Pass "
                    "overwrite=True (CLI: --overwrite) to score the new data from scratch, or score it into another "
                    "directory.")
        except Exception as e:  # noqa: BLE001 - every rank must hear of it before the collectives below
            error = e
        finally:
            batches.close()
            if bar is not None:
                bar.close()
        if lockstep is not None and error is None:
            from .integrations.fsdp import pad_collective_forwards

            while any(_all_gather(0, world)):  # another rank still scores: pad its collective forward
                pad_collective_forwards(engine, [1, 0], 1, lambda: {k: v.to(device) for k, v in probe.items()})
        errors = _all_gather(None if error is None else f"{type(error).__name__}: {error}", world)
        if error is not None:
            raise error
        if any(errors):
            bad_rank = next(r for r, e in enumerate(errors) if e)
            raise RuntimeError(f"rank {bad_rank} failed: {errors[bad_rank]}")
        counts = _all_gather(n_records, world)
        if len(set(counts)) > 1:
            raise RuntimeError(f"the ranks read different numbers of records ({counts}); every rank must see the "
                               "same dataset")
        stats = _all_gather({k: run[k] for k in ("records_scored", "shards_scored", "tokens_scored")}, world)
        for k in ("records_scored", "shards_scored", "tokens_scored"):
            run[k] = int(sum(st[k] for st in stats))
        run["records_total"] = n_records
        if prep["complete"]:
            # rank 0 has verified it (and keeps that one), the data was checked above
            store = verified if rank == 0 and verified is not None else ScoreStore.open(out_dir, verify=False)
            run["elapsed_s"] = round(time.perf_counter() - t_start, 3)
            store.run = run
            if rank == 0:
                log.debug("%s is complete already (%d records); nothing to score", out_dir, len(store))
            return store
        if world > 1:
            torch.distributed.barrier()
        run["scoring_s"] = round(time.perf_counter() - clock["t0"], 3)
        run["coverage"] = engine.coverage().summary()  # how each parameter was scored (rules, fallbacks...)

        if rank == 0:
            try:
                run["elapsed_s"] = round(time.perf_counter() - t_start, 3)
                store = _merge(out_dir, n_records, window, run_key, identity, prep["created"], versions, run)
            except Exception as e:
                _broadcast({"error": f"{type(e).__name__}: {e}"}, world)
                raise
            _broadcast({"ok": True}, world)
            store.run = run
            log.debug("scored %d of %d records into %s in %.1f s", run["records_scored"], len(store), out_dir,
                      run["elapsed_s"])
            return store
        status = _broadcast(None, world)
        if "error" in status:
            raise RuntimeError(f"rank 0 failed to write the manifest: {status['error']}")
        store = ScoreStore.open(out_dir, verify=False)
        store.run = run
        return store


def _release_memory() -> None:
    """Hand the freed heap of the last window back to the OS (glibc's ``malloc_trim``; elsewhere nothing):
    windows of many batch shapes otherwise leave the allocator's arenas fragmented, and the process's RSS
    creeps up with the record count although no window is kept."""
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        with contextlib.suppress(Exception):
            import ctypes
            import ctypes.util

            if platform.system() == "Linux":
                _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


class _Peekable:
    """A one-pass iterable whose first record can be read ahead (to resolve the backend) and is not lost."""

    def __init__(self, it):
        self.it, self.head = it, []

    def peek(self):
        if not self.head:
            self.head = [next(self.it)]
        return self.head[0]

    def __iter__(self):
        return itertools.chain(self.head, self.it)


class _OffsetLengths:
    def __init__(self, lengths: np.ndarray, base: int):
        self.lengths, self.base = lengths, base

    def __getitem__(self, p: int) -> int:
        return self.lengths[p - self.base]


def _first_record(dataset: Any) -> Any:
    """The first raw record (``None`` for an empty dataset), leaving ``dataset`` to be read from its start."""
    from .windows import JsonlFile

    if isinstance(dataset, _Peekable):
        try:
            return dataset.peek()
        except StopIteration:
            return None
    if isinstance(dataset, JsonlFile):
        return next(iter(dataset), None)
    return dataset[0] if len(dataset) else None
