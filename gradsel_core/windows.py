"""Streaming scoring's data side: a dataset read as windows of consecutive records, each window's identity
(its hash), and the store's per-record columns assembled from the windows' shards.

A *window* is ``shard_size`` consecutive records (the last one may be shorter); window ``s`` holds records
``[s * size, s * size + count)`` and becomes shard ``s``. Each source yields its windows in order and reads
only what it is asked for (:data:`SKIP` / :data:`READ` / :data:`CHECK`, see :class:`Want`):

* an indexable dataset (a list, an HF ``datasets.Dataset``): a skipped window is not read at all;
* a one-pass iterable (a generator, an ``IterableDataset``, Parquet and ``save_to_disk`` readers): a
  skipped window's records are read past (counted, never tokenized or kept);
* a JSONL file (:class:`JsonlFile`, what ``gradsel score --data x.jsonl`` passes): a skipped window's
  lines are counted, not parsed; a finished window whose shard records its byte range and the sha256
  of those bytes is checked by reading just those bytes (no JSON parsing, no tokenizing).

Window hash (``window["sha256"]`` in each shard's header): sha256 over the records' content digests
(:func:`gradsel_core.jsonl.record_digest`, the same for a record read from JSONL, Parquet or a dataset
folder) when the records are tokenized by the run (the tokenizer's identity is in the run key); for records
given already tokenized, the sha256 of their tokens, labels, masks, ids and fields (the hash the
non-streaming scan used). A JSONL window also records ``window["bytes"] = [first byte, end byte, sha256 of
those bytes]``: equal bytes at the same offsets are the same records, so a rerun may skip parsing; bytes
that differ fall back to the content hash (a changed whitespace is no change), and a content difference
is refused, naming the window's record range and (with record digests) the first record that differs.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import StoreConflictError, StoreError

SKIP, READ, CHECK = "skip", "read", "check"
WINDOW_SCHEME = "window-sha256-v1"  # the identity's data.windows: how window hashes are made


@dataclass
class Want:
    """What the scorer needs of window ``index``: ``SKIP`` (another rank's), ``READ`` (to score it) or
    ``CHECK`` (a finished window: its records, unless ``bytes`` = [start, end, sha256] of a JSONL window
    match the file)."""

    what: str
    bytes: Optional[Sequence[Any]] = None


@dataclass
class Window:
    index: int
    start: int  # position of its first record
    count: int
    records: Optional[List[Any]]  # the raw records (None: skipped, or checked by its bytes)
    bytes: Optional[List[Any]] = None  # [first byte, end byte, sha256] of a JSONL window
    bytes_ok: bool = False  # CHECK: the stored byte range's sha256 matched the file


class JsonlFile:
    """A JSONL file read in windows with byte offsets (``gradsel score --data``): ``iter_records`` reads it
    as :func:`gradsel_core.jsonl.iter_jsonl` does (the same checks and errors)."""

    def __init__(self, path: str, max_line_bytes: Optional[int] = -1, arg: str = "--data"):
        from .jsonl import DEFAULT_MAX_LINE_BYTES, iter_jsonl

        self.path = os.fspath(path)
        self.limit = DEFAULT_MAX_LINE_BYTES if max_line_bytes == -1 else max_line_bytes  # None: no limit
        iter_jsonl(self.path, max_line_bytes=self.limit, arg=arg)  # the file checks, now (the reading is lazy)

    def __iter__(self):
        from .jsonl import iter_jsonl

        return iter(iter_jsonl(self.path, max_line_bytes=self.limit))


def _blank(raw: bytes) -> bool:
    if raw.isascii():
        return not raw.strip()
    try:
        return not raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False  # parse_jsonl_line names it


def _jsonl_windows(src: JsonlFile, size: int, want: Callable[[int], Want]) -> Iterator[Window]:
    from .jsonl import parse_jsonl_line

    limit = src.limit
    with open(src.path, "rb") as f:
        index, start, lineno, offset = 0, 0, 0, 0
        while True:
            w = want(index)
            if w.what == CHECK and w.bytes is not None:
                a, b, sha = int(w.bytes[0]), int(w.bytes[1]), str(w.bytes[2])
                if a == offset:
                    f.seek(a)
                    data = f.read(b - a)
                    if len(data) == b - a and hashlib.sha256(data).hexdigest() == sha:
                        lineno += data.count(b"\n")
                        offset = b
                        count = int(w.bytes[3]) if len(w.bytes) > 3 else None
                        if count is not None:
                            yield Window(index, start, count, None, [a, b, sha], bytes_ok=True)
                            index, start = index + 1, start + count
                            continue
                    f.seek(offset)  # differs (or no count recorded): read the window's lines below
            h = hashlib.sha256()
            first = offset
            lines: List[Tuple[bytes, int]] = []
            count = 0
            while count < size:
                raw = f.readline(limit + 1 if limit is not None else -1)
                if not raw:
                    break
                lineno += 1
                offset += len(raw)
                h.update(raw)
                if _blank(raw):
                    continue
                count += 1
                if w.what != SKIP:
                    lines.append((raw, lineno))
            if count == 0:
                return
            records = None
            if w.what != SKIP:
                records = [parse_jsonl_line(raw, src.path, n, limit) for raw, n in lines]
            yield Window(index, start, count, records, [first, offset, h.hexdigest(), count])
            index, start = index + 1, start + count


def iter_windows(dataset: Any, size: int, want: Callable[[int], Want]) -> Iterator[Window]:
    """The windows of ``dataset`` in order (see the module doc); ``want(index)`` says what each needs."""
    if isinstance(dataset, JsonlFile):
        yield from _jsonl_windows(dataset, size, want)
        return
    if isinstance(dataset, (Mapping, str, bytes)):
        raise TypeError(
            f"dataset must be a sequence/iterable of records (dicts with 'input_ids') or an indexable dataset, "
            f"got {type(dataset).__name__}")
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        for index, start in enumerate(range(0, n, size)):
            stop = min(n, start + size)
            w = want(index)
            records = None if w.what == SKIP else [dataset[i] for i in range(start, stop)]
            yield Window(index, start, stop - start, records)
        return
    it = iter(dataset)
    index = start = 0
    while True:
        w = want(index)
        if w.what == SKIP:
            count = sum(1 for _ in itertools.islice(it, size))
            records = None
        else:
            records = list(itertools.islice(it, size))
            count = len(records)
        if count == 0:
            return
        yield Window(index, start, count, records)
        index, start = index + 1, start + count


def digests_array(hexes: Sequence[str]) -> np.ndarray:
    """Hex digests as (N, width) uint8."""
    raw = b"".join(bytes.fromhex(d) for d in hexes)
    width = len(hexes[0]) // 2 if hexes else 16
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(hexes), width)


def digest_window_hash(digests: np.ndarray) -> str:
    """The window hash of records tokenized by the run: sha256 over their content digests, in order."""
    return hashlib.sha256(b"W" + np.ascontiguousarray(digests).tobytes()).hexdigest()


def chain_hash(window_hashes: Sequence[str]) -> str:
    """The dataset's hash: a chain over its windows' hashes (the manifest's ``data.sha256``)."""
    h = hashlib.sha256(WINDOW_SCHEME.encode())
    for x in window_hashes:
        h.update(bytes.fromhex(x))
    return h.hexdigest()


def window_conflict(out_dir: str, win: Window, stored: Mapping[str, Any], got_sha: str,
                    digests: Optional[np.ndarray] = None, stored_digests: Optional[np.ndarray] = None,
                    ids: Optional[Sequence[Any]] = None) -> StoreConflictError:
    """The error for a finished window whose records changed: names the window, its record range and, when
    both sides have per-record digests, the first record that differs (position and id)."""
    rng = f"records [{win.start}, {win.start + int(stored.get('count', win.count))})"
    detail = ""
    if int(stored.get("count", -1)) != win.count:
        detail = f": the store scored {stored.get('count')} records there, the dataset now has {win.count}"
    if digests is not None and stored_digests is not None:
        m = min(len(digests), len(stored_digests))
        diff = np.nonzero((digests[:m] != stored_digests[:m]).any(axis=1))[0]
        j = int(diff[0]) if diff.size else m
        rid = f" (id {ids[j]!r})" if ids is not None and j < len(ids) else ""
        detail = detail or f": record {win.start + j}{rid} is not the record scored"
        if diff.size and not detail.startswith(": record"):
            detail += f"; the first that differs is record {win.start + j}{rid}"
    return StoreConflictError(
        f"{out_dir}: the dataset differs from the one this store scored in window {win.index} ({rng}){detail} "
        f"(window hash {got_sha[:12]}..., stored {str(stored.get('sha256'))[:12]}...). Pass overwrite=True (CLI: "
        "--overwrite) to score the new data from scratch, or score it into another directory.")


# -- per-record columns: a window's in its shard, the store's assembled from them --------------------

COL = "col."  # shard tensors holding the window's columns (ids, fields, record digests)


def window_columns(id_kind: str, ids: List[Any], fields: Mapping[str, List[Any]], digests: Optional[np.ndarray]
                   ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(tensors, meta)`` of one window's columns for its shard. A field goes in as an array only when
    no value is missing and its kind is uniform (bool / int64 / float64 / strings as codes), else as its
    exact JSON values, so the store's columns are assembled as if the whole column had been seen at once."""
    from .store import Factorized, _factorize_strings, column_array, columns_tensors

    cols: Dict[str, Any] = {}
    for name, values in fields.items():
        if any(v is None for v in values):
            cols[name] = list(values)
            continue
        fact = _factorize_strings(values)
        if fact is not None:
            cols[name] = Factorized(fact[0], fact[1])
            continue
        if len({type(v) for v in values}) != 1:  # mixed kinds: exact values (the merge decides the column's type)
            cols[name] = list(values)
            continue
        arr = column_array(list(values))
        cols[name] = arr if arr.dtype != object else list(values)
    # list fields that are not arrays must stay JSON: columns_tensors turns them into arrays when they fit,
    # so split them off here
    json_fields = {k: v for k, v in cols.items() if isinstance(v, list)}
    arr_fields = {k: v for k, v in cols.items() if not isinstance(v, list)}
    tensors, meta, ids_doc, rest = columns_tensors(id_kind, ids, arr_fields, digests)
    meta["json_fields"] = json_fields
    meta["ids_json"] = ids_doc["ids"] if ids_doc is not None else None
    meta["order"] = list(fields)
    return {COL + k: v for k, v in tensors.items()}, meta


@dataclass
class _WinCols:
    n: int
    id_kind: str
    ids: Any  # int64 array, utf8 blob, or list (json)
    ids_enc: str
    fields: Dict[str, Tuple[str, Any]]  # name -> ("array", arr) | ("dict", (codes, distinct)) | ("json", list)
    digests: Optional[np.ndarray]


def _read_window_columns(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any], path: str) -> _WinCols:
    from .store import _str_unblob

    cm = meta.get("columns")
    if not isinstance(cm, dict):
        raise StoreError(f"{path}: no window columns in its header (not written by a streaming run); rerun with "
                         "overwrite=True (CLI: --overwrite)")
    t = {k[len(COL):]: v for k, v in tensors.items() if k.startswith(COL)}
    n = int(cm["n"])
    ids: Any
    try:
        if cm["ids"] == "int64":
            ids, enc = t["ids"], "int64"
        elif cm["ids"] == "utf8":
            ids, enc = t["ids.utf8"], "utf8"
        else:
            ids, enc = list(cm["ids_json"]), "json"
        fields: Dict[str, Tuple[str, Any]] = {}
        for i, entry in enumerate(cm["fields"]):
            name, kind = entry[0], entry[1]
            if kind == "array":
                fields[name] = ("array", t[f"f{i}"])
            elif kind == "dict":
                fields[name] = ("dict", (t[f"f{i}.codes"].astype(np.int64), _str_unblob(t[f"f{i}.values"], int(entry[2]))))
            else:
                raise KeyError(name)
        for name, values in cm.get("json_fields", {}).items():
            fields[name] = ("json", values)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: malformed window columns ({type(e).__name__}: {e}); rerun the same score command "
                         "to score the window again") from None
    return _WinCols(n, str(cm["id_kind"]), ids, enc, fields, t.get("record_sha256"))


def _values(kind: str, x: Any, n: int) -> List[Any]:
    if kind == "array":
        return x.tolist()
    if kind == "dict":
        return x[1][x[0]].tolist()
    return list(x)


def assemble_columns(wins: Sequence[_WinCols], first_pos: Sequence[int]):
    """``(id_kind, ids, fields, record digests)`` of the whole store from its windows' columns, as the
    columns file takes them; ids are checked (one kind, no duplicate) with errors naming the records."""
    from .store import Factorized, Utf8Ids, _str_unblob, column_array

    n = sum(w.n for w in wins)
    kinds = {w.id_kind for w in wins}
    if len(kinds) > 1:
        wi = next(k for k, w in enumerate(wins) if w.id_kind == "int")
        ws = next(k for k, w in enumerate(wins) if w.id_kind == "str")
        raise TypeError(f"ids must be all ints or all strs (records without an id take their position): records "
                        f"[{first_pos[wi]}, {first_pos[wi] + wins[wi].n}) have int ids, records "
                        f"[{first_pos[ws]}, {first_pos[ws] + wins[ws].n}) have str ids")
    id_kind = kinds.pop() if kinds else "int"
    keys: Any
    if id_kind == "int":
        ids: Any = _fill(wins, "ids", np.int64, n)
        keys = ids
    else:
        if all(w.ids_enc == "utf8" for w in wins):
            sep = np.zeros(1, dtype=np.uint8)
            parts: List[np.ndarray] = []
            for k, w in enumerate(wins):
                if k:
                    parts.append(sep)
                parts.append(w.ids)
            ids = Utf8Ids(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8), n)
        else:
            ids = [v for w in wins for v in (_str_unblob(w.ids, w.n).tolist() if w.ids_enc == "utf8" else w.ids)]
        # duplicates by each string's hash (this process's), confirmed on the strings themselves
        hs = []
        for w in wins:
            strs = _str_unblob(w.ids, w.n).tolist() if w.ids_enc == "utf8" else w.ids
            hs.append(np.fromiter((hash(v) for v in strs), dtype=np.int64, count=w.n))
        keys = np.concatenate(hs) if hs else np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    same = np.nonzero(keys[order][1:] == keys[order][:-1])[0]
    if same.size:
        def id_at(p: int) -> Any:
            if id_kind == "int":
                return int(ids[p])
            k = int(np.searchsorted(np.cumsum([w.n for w in wins]), p, side="right"))
            w = wins[k]
            local = p - int(sum(x.n for x in wins[:k]))
            return (_str_unblob(w.ids, w.n)[local] if w.ids_enc == "utf8" else w.ids[local])
        dups = []
        for j in same[:50].tolist():
            a, b = int(order[j]), int(order[j + 1])
            if id_at(a) == id_at(b):
                dups.append(f"{id_at(a)!r} (records {a} and {b})")
        if dups:
            raise ValueError(f"duplicate ids: {', '.join(dups[:5])}{' ...' if len(dups) > 5 else ''}")
    names = sorted({name for w in wins for name in w.fields})
    fields: Dict[str, Any] = {}
    for name in names:
        got = [w.fields.get(name) for w in wins]
        if all(g is not None and g[0] == "array" for g in got) and len({g[1].dtype for g in got}) == 1:
            col = np.empty(n, dtype=got[0][1].dtype)
            pos = 0
            for w in wins:
                col[pos:pos + w.n] = w.fields.pop(name)[1]
                pos += w.n
            fields[name] = col
        elif all(g is not None and g[0] == "dict" for g in got):
            table: Dict[str, int] = {}
            codes = np.empty(n, dtype=np.int64)
            pos = 0
            for w in wins:
                c, distinct = w.fields.pop(name)[1]
                remap = np.fromiter((table.setdefault(v, len(table)) for v in distinct.tolist()), dtype=np.int64,
                                    count=len(distinct))
                codes[pos:pos + w.n] = remap[c] if c.size else c
                pos += w.n
            fields[name] = Factorized(codes, list(table))
        else:  # mixed kinds or missing values: the exact values, as the whole column (rare)
            values: List[Any] = []
            for g, w in zip(got, wins):
                values += [None] * w.n if g is None else _values(g[0], g[1], w.n)
            fields[name] = column_array(values)
    digests = None
    if wins and all(w.digests is not None for w in wins):
        digests = np.empty((n, wins[0].digests.shape[1]), dtype=np.uint8)  # (N, width)
        pos = 0
        for w in wins:
            digests[pos:pos + w.n] = w.digests
            pos += w.n
            w.digests = None
    return id_kind, ids, fields, digests


def _fill(wins: Sequence[_WinCols], attr: str, dtype: Any, n: int) -> np.ndarray:
    """The windows' ``attr`` arrays in one (n,) array, each window's dropped once copied (one copy held, not two)."""
    out = np.empty(n, dtype=dtype)
    pos = 0
    for w in wins:
        out[pos:pos + w.n] = getattr(w, attr)
        pos += w.n
        setattr(w, attr, None)
    return out
