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


class ColumnAssembler:
    """The store's per-record columns (ids, fields, record digests), assembled window by window into
    :class:`gradsel_core.store.Spool` files inside the store, so the end of a streaming run holds one
    window's columns at a time, never a whole column: ``add`` each window's columns in order, then
    ``finish()`` gives ``(id_kind, ids, fields, digests)`` as :func:`gradsel_core.store.write_side_files`
    takes them (spools written chunk by chunk into the columns file: the same bytes as the whole columns
    in memory). ``close()`` removes the spools.

    What is held: the distinct values of each string field (its dictionary), and for the duplicate-id check
    one int64 key per record (the id, or a hash of a string id), sorted in place (8 bytes a record). Two rare
    kinds are assembled in memory as before, by reading the windows again: a field with missing values or of
    mixed kinds across windows, and string ids holding a NUL (ids.json)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.n = 0
        self.paths: List[str] = []  # each window's shard (read again only for the rare kinds)
        self.starts: List[int] = []
        self.counts: List[int] = []
        self.kinds: Dict[str, int] = {}  # id kind -> first window of that kind
        self.ids_enc: Optional[str] = None  # "int64" | "utf8" | "json" (any json window: ids.json)
        self.spools: List[Any] = []
        self.ids: Any = None  # Spool of int64 ids or of the UTF-8 blob
        self.keys: Any = None  # Spool of string ids' hashes (int ids are their own keys)
        self.fields: Dict[str, Dict[str, Any]] = {}
        self.digests: Any = None  # Spool (N, width) uint8, or False once a window has none

    def _spool(self, name: str, dtype: Any, tail=()) -> Any:
        from .store import Spool

        sp = Spool(self.out_dir, name, dtype, tail)
        self.spools.append(sp)
        return sp

    def add(self, w: "_WinCols", start: int, path: str) -> None:
        k = len(self.paths)
        self.paths.append(path)
        self.starts.append(start)
        self.counts.append(w.n)
        self.kinds.setdefault(w.id_kind, k)
        if len(self.kinds) == 1:
            if w.id_kind == "int":
                if self.ids is None:
                    self.ids, self.ids_enc = self._spool("ids", np.int64), "int64"
                self.ids.append(w.ids)  # (n,) int64
            else:
                strs = None
                if w.ids_enc == "json" or self.ids_enc == "json":
                    self.ids_enc = "json"  # the whole column goes to ids.json, read again in finish()
                else:
                    if self.ids is None:
                        self.ids, self.ids_enc = self._spool("ids-utf8", np.uint8), "utf8"
                    elif k:
                        self.ids.append(np.zeros(1, dtype=np.uint8))  # the NUL between two windows' blobs
                    self.ids.append(w.ids)
                from .store import _str_unblob

                strs = _str_unblob(w.ids, w.n).tolist() if w.ids_enc == "utf8" else w.ids
                if self.keys is None:
                    self.keys = self._spool("id-keys", np.int64)
                # duplicates by each string's hash (this process's), confirmed on the strings themselves
                self.keys.append(np.fromiter((hash(v) for v in strs), dtype=np.int64, count=w.n))
        for name, (kind, x) in w.fields.items():
            st = self.fields.get(name)
            if st is None:
                st = self.fields[name] = {"kind": kind if k == 0 else "mixed", "windows": 0}
                if st["kind"] == "array":
                    st["dtype"], st["spool"] = x.dtype, self._spool(f"f-{len(self.fields)}", x.dtype)
                elif st["kind"] == "dict":
                    st["table"], st["spool"] = {}, self._spool(f"f-{len(self.fields)}", np.int64)
                else:
                    st["kind"] = "mixed"
            st["windows"] += 1
            if st["kind"] == "array" and (kind != "array" or x.dtype != st["dtype"]):
                st["kind"] = "mixed"
            elif st["kind"] == "dict" and kind != "dict":
                st["kind"] = "mixed"
            if st["kind"] == "array":
                st["spool"].append(x)
            elif st["kind"] == "dict":
                c, distinct = x
                table = st["table"]
                remap = np.fromiter((table.setdefault(v, len(table)) for v in distinct.tolist()), dtype=np.int64,
                                    count=len(distinct))
                st["spool"].append(remap[c] if c.size else c)
        for name, st in self.fields.items():
            if name not in w.fields:
                st["kind"] = "mixed"  # missing in this window: its values are None
        if self.digests is not False:
            if w.digests is None:
                self.digests = False
            else:
                if self.digests is None:
                    self.digests = self._spool("digests", np.uint8, (w.digests.shape[1],))
                self.digests.append(w.digests)  # (n, width)
        self.n += w.n

    def _windows(self):
        """Each window's columns again, in order (the rare kinds and the error paths)."""
        from .store import decode_shard, read_store_file

        for path in self.paths:
            tensors, meta = decode_shard(read_store_file(self.out_dir, os.path.basename(path)), path)
            yield _read_window_columns(tensors, meta, path)

    def _id_list(self) -> List[Any]:
        from .store import _str_unblob

        return [v for w in self._windows()
                for v in (w.ids.tolist() if w.ids_enc == "int64" else _str_unblob(w.ids, w.n).tolist()
                          if w.ids_enc == "utf8" else w.ids)]

    def finish(self):
        """``(id_kind, ids, fields, record digests)``; ids are checked (one kind, no duplicate) with errors
        naming the records."""
        from .store import Factorized, Utf8Ids, column_array

        n = self.n
        if len(self.kinds) > 1:
            wi, ws = self.kinds["int"], self.kinds["str"]
            raise TypeError(f"ids must be all ints or all strs (records without an id take their position): records "
                            f"[{self.starts[wi]}, {self.starts[wi] + self.counts[wi]}) have int ids, records "
                            f"[{self.starts[ws]}, {self.starts[ws] + self.counts[ws]}) have str ids")
        id_kind = next(iter(self.kinds), "int")
        keys_spool = self.ids if id_kind == "int" else self.keys
        keys = keys_spool.read() if keys_spool is not None else np.zeros(0, dtype=np.int64)  # (N,) int64
        keys.sort()  # in place
        has_same = bool(keys.size > 1 and (keys[1:] == keys[:-1]).any())
        del keys
        if has_same:  # a repeated key (or a hash collision): find the records, as the whole column
            self._duplicates(id_kind, keys_spool.read())
        ids: Any
        if id_kind == "int":
            ids = self.ids.close() if self.ids is not None else np.zeros(0, dtype=np.int64)
        elif self.ids_enc == "utf8":
            ids = Utf8Ids(self.ids.close(), n)
        else:
            ids = self._id_list()
        fields: Dict[str, Any] = {}
        mixed = [name for name, st in self.fields.items() if st["kind"] == "mixed" or st["windows"] != len(self.paths)]
        values: Dict[str, List[Any]] = {name: [] for name in mixed}
        if mixed:  # the exact values, as the whole column (rare)
            for w in self._windows():
                for name in mixed:
                    g = w.fields.get(name)
                    values[name] += [None] * w.n if g is None else _values(g[0], g[1], w.n)
        for name in sorted(self.fields):
            st = self.fields[name]
            if name in values:
                fields[name] = column_array(values.pop(name))
            elif st["kind"] == "array":
                fields[name] = st["spool"].close()
            else:
                fields[name] = Factorized(st["spool"].close(), list(st["table"]))
        digests = self.digests.close() if self.digests else None
        return id_kind, ids, fields, digests

    def _duplicates(self, id_kind: str, keys: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        same = np.nonzero(keys[order][1:] == keys[order][:-1])[0]
        ids = self._id_list()
        dups = []
        for j in same[:50].tolist():
            a, b = int(order[j]), int(order[j + 1])
            if ids[a] == ids[b]:
                dups.append(f"{ids[a]!r} (records {a} and {b})")
        if dups:
            raise ValueError(f"duplicate ids: {', '.join(dups[:5])}{' ...' if len(dups) > 5 else ''}")

    def close(self) -> None:
        for sp in self.spools:
            sp.remove()
        self.spools = []
