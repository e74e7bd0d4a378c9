"""The score store: a directory of safetensors shards, JSON side files and a ``manifest.json``.

Layout of ``out_dir`` (format 3)::

    .gradsel-store                    marker: this directory is a score store (gradsel touches only its own
                                      files, and only in a directory holding this marker)
    manifest.json                     format, identity (model fingerprint, scoring config, data and
                                      tokenizer), counts, package versions, and the sha256 and size of
                                      every file below
    columns.safetensors               the ids (int64, or UTF-8 strings) and metadata columns (bool, int64,
                                      float64, or strings as dictionary codes) as arrays, in dataset order:
                                      read without parsing a value at a time (10M records in ~1 s); for
                                      records read from JSON, each record's content hash (128 bits of
                                      sha256: ``gradsel select --data`` refuses an edited record by it)
    ids.json, fields.json             only for what the columns file cannot hold (a string containing
                                      NUL, a column of mixed kinds): {"kind", "ids"}, {name: [values]}.
                                      Stores of format 2 hold all ids and fields here, and stay readable.
    shard-000000-r0.safetensors       one shard per plan window (dataset positions [start, stop)),
    shard-000001-r1.safetensors       tagged with the rank that scored it; tensors: positions (int64),
    ...                               norms, losses (float32), tokens (int64), pp.<param> (float32,
                                      squared per-parameter norms, with per_param=True)
    .gradsel-lock                     flock'ed by the run writing the store
    .gradsel-tmp-*                    partial files of a writer that was killed (removed on resume)

Every file is written atomically (temp file in the same directory, fsync, ``os.replace``). Each shard's
safetensors header carries the run's whole identity, its run key (a hash of the identity), the sha256 of
the side files and of its own tensor payload, so a shard is self-describing: a resumed run validates
shards before a manifest lists them, and a lost or corrupted manifest is rebuilt from the shards
(:func:`repair_store`, ``gradsel repair DIR``). Shards are written with a fixed layout (sorted header keys,
sorted tensors), so identical runs give byte-identical shard files. Nothing is ever unpickled, and only
plain file names inside the store, of regular files of the recorded size, are read.

Reading is lazy (:meth:`ScoreStore.open`): opening checks every file where it lies, in chunks (sha256 with
``verify``, else each payload against its header), and holds no per-record column; the columns file is
memory-mapped (ids, fields and record digests are views into it, decoded on first access), and the scores
are read from the shards into one array each on the first access to any of them. So a caller pays in
memory for the columns it reads: at 1M records ``open`` allocates 2.3 MB (it was 100 MB when it loaded
everything), ``store.norms`` (with losses and tokens) 15 MB, ``store.fields`` of one string field 8 MB
(tracemalloc peaks, ``benchmarks/bench_merge_rss.py``). Writing the columns file at the end of a streaming run is O(window)
too: each window's columns are appended to :class:`Spool` temp files and the file is written from them
chunk by chunk (byte for byte what the whole columns in memory give).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import fileio
from .errors import StoreConflictError, StoreError
from .fileio import TMP_PREFIX

if TYPE_CHECKING:  # torch is imported where a model is hashed: reading a store (inspect, select) needs none
    import torch

log = logging.getLogger(__name__)

FORMAT = "gradsel-score-store"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
IDS_FILE = "ids.json"  # formats 1-2 (format 3: only ids the columns file cannot hold)
FIELDS_FILE = "fields.json"  # formats 1-2 (format 3: only columns the columns file cannot hold)
COLUMNS_FILE = "columns.safetensors"  # format 3: ids and metadata columns as arrays
MARKER = ".gradsel-store"
LOCK_FILE = ".gradsel-lock"
SHARD_RE = re.compile(r"^shard-(\d{6,})-r(\d+)\.safetensors$")
# temp files of format-1 writers (".NAME.tmp-PID-XXXXXXXX"), removed only when replacing a format-1 store
V1_TMP_RE = re.compile(r"^\.(manifest\.json|ids\.json|fields\.json|shard-\d{6,}-r\d+\.safetensors)\.tmp-\d+-[0-9a-f]{8}$")
V1_LOCK = ".lock"
PP_PREFIX = "pp."
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_HEADER = 100_000_000


# -- files ------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``gradsel_core.fileio``); a write error names the file."""
    fileio.atomic_write(path, data, error=lambda e: StoreError(
        f"cannot write {path}: {e.strerror or e} (is the directory writable, is the disk full?)"))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")


def canonical_hash(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def check_plain_name(out_dir: str, name: Any, what: str = "file") -> str:
    """``os.path.join(out_dir, name)`` when ``name`` is a plain file name (no directory part, not ``..``);
    ``StoreError`` otherwise (the name is never followed)."""
    bad = (
        not isinstance(name, str) or not name or name in (".", "..") or "\x00" in name or "/" in name
        or (os.altsep is not None and os.altsep in name) or os.sep in name or os.path.basename(name) != name
    )
    if bad:
        raise StoreError(
            f"{os.path.join(out_dir, MANIFEST)}: {what} name {name!r} is not a plain file name inside the store; "
            f"the manifest was edited or forged (run `gradsel repair {out_dir}` to rebuild it from the shards)"
        )
    return os.path.join(out_dir, name)


def read_store_file(out_dir: str, name: Any, size: Optional[int] = None, pattern: Optional[re.Pattern] = None) -> bytes:
    """The bytes of the store's file ``name``: a plain name (matching ``pattern``), a regular file (not a
    link, device or directory), of ``size`` bytes when given; all checked before a byte is read
    (:func:`open_store_file`)."""
    fd = open_store_file(out_dir, name, size, pattern)
    with os.fdopen(fd, "rb") as f:
        want = os.fstat(fd).st_size
        data = f.read(want + 1)
    if len(data) != want:
        raise StoreError(f"{os.path.join(out_dir, name)}: changed size while being read")
    return data


def remove_temp_files(out_dir: str, v1: bool = False) -> int:
    """Remove partial temp files left by killed writers (``.gradsel-tmp-*``; with ``v1`` also a format-1
    writer's); returns how many."""
    n = 0
    for name in os.listdir(out_dir):
        if name.startswith(TMP_PREFIX) or (v1 and V1_TMP_RE.match(name)):
            try:
                os.unlink(os.path.join(out_dir, name))
                n += 1
            except OSError:
                pass
    if n:
        log.info("removed %d partial temp file(s) left by an interrupted run in %s", n, out_dir)
    return n


def shard_name(index: int, rank: int) -> str:
    return f"shard-{index:06d}-r{rank}.safetensors"


def list_shards(out_dir: str) -> Dict[int, List[str]]:
    """``{plan index: [file names]}`` of the shard files present (regular files only)."""
    found: Dict[int, List[str]] = {}
    for name in sorted(os.listdir(out_dir)):
        m = SHARD_RE.match(name)
        if m and os.path.isfile(os.path.join(out_dir, name)) and not os.path.islink(os.path.join(out_dir, name)):
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def store_files(out_dir: str, v1: bool = False) -> List[str]:
    """Every file of the store in ``out_dir`` (what ``overwrite`` removes; not the marker); the manifest
    last."""
    names = []
    for name in sorted(os.listdir(out_dir)):
        if SHARD_RE.match(name) or name in (IDS_FILE, FIELDS_FILE, COLUMNS_FILE) or name.startswith(TMP_PREFIX):
            names.append(name)
        elif v1 and V1_TMP_RE.match(name):
            names.append(name)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        names.append(MANIFEST)
    return names


# -- the directory ---------------------------------------------------------------------------------


def marker_bytes() -> bytes:
    return json_bytes({"format": FORMAT, "format_version": FORMAT_VERSION,
                       "note": "a gradsel score store; gradsel creates, replaces and removes only its own files here"})


def is_store_dir(path: str) -> bool:
    """Whether ``path`` is (or is inside) a score store: a marker file, or a format-1 manifest."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MARKER)):
        return True
    try:
        return read_manifest(path) is not None
    except StoreError:
        return False


def classify_dir(out_dir: str) -> Tuple[str, List[str]]:
    """``(kind, other files)``; kind: ``"missing"``, ``"empty"``, ``"store"`` (marker), ``"v1"`` (a store of
    format 1, without marker) or ``"foreign"`` (a non-empty directory that is not a store)."""
    if not os.path.exists(out_dir):
        return "missing", []
    names = [n for n in sorted(os.listdir(out_dir)) if n != LOCK_FILE]
    if MARKER in names:
        return "store", []
    if not names:
        return "empty", []
    mpath = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(mpath):
        try:
            m = json.loads(read_bytes(mpath).decode("utf-8"))
        except (ValueError, OSError):
            m = None
        if isinstance(m, dict) and m.get("format") == FORMAT:  # a store whose marker was lost: by its version
            v = m.get("format_version", 1)
            return ("v1" if isinstance(v, int) and v < 2 else "store"), names
    for name in names:
        if SHARD_RE.match(name) and os.path.isfile(os.path.join(out_dir, name)):
            with contextlib.suppress(Exception):
                _, meta = decode_shard(read_store_file(out_dir, name), name)
                return "v1" if int(meta.get("format_version", 1)) < 2 else "store", names
    return "foreign", names


@contextlib.contextmanager
def dir_lock(out_dir: str) -> Iterator[None]:
    """Hold ``out_dir/.gradsel-lock`` (flock); ``StoreError`` when another run holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"cannot create {path}: {e.strerror or e} (is the directory writable?)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"{out_dir} is being written by another gradsel run (it holds {LOCK_FILE}); wait for it to "
                "finish or use another directory"
            ) from None
        yield
    finally:
        os.close(fd)


# -- shards -----------------------------------------------------------------------------------------

ST_DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}


CHUNK_BYTES = 1 << 20  # what is read or written of a spooled column or a file at a time (1 MiB)


class Spool:
    """A column of the store written window by window to a temp file inside the store (``.gradsel-tmp-*``:
    a killed run's is removed by the resume) and read back in chunks of :data:`CHUNK_BYTES`: the end of a
    streaming run writes the columns file from spools, so it never holds a whole column (``_shard_layout``,
    :func:`payload_hash` and :func:`write_shard` take a spool wherever they take an array). ``astype`` gives
    the same file read as another dtype (converted chunk by chunk)."""

    def __init__(self, out_dir: str, name: str, dtype: Any, tail: Tuple[int, ...] = ()):
        import uuid

        self.path = os.path.join(out_dir, f"{TMP_PREFIX}spool-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.stored = np.dtype(dtype).newbyteorder("<")
        self.dtype = self.stored
        self.tail = tuple(int(t) for t in tail)
        self.rows = 0
        self._f: Any = open(self.path, "wb")

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.stored)
        if a.shape[1:] != self.tail:
            raise ValueError(f"spooled column {os.path.basename(self.path)}: rows of shape {a.shape[1:]}, not {self.tail}")
        if a.size:
            self._f.write(memoryview(a.reshape(-1).view(np.uint8)))
        self.rows += int(a.shape[0])

    def close(self) -> "Spool":
        if self._f is not None:
            self._f.close()
            self._f = None
        return self

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.rows, *self.tail)

    @property
    def ndim(self) -> int:
        return 1 + len(self.tail)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.rows

    def astype(self, dtype: Any, copy: bool = True) -> "Spool":
        out = Spool.__new__(Spool)
        out.__dict__.update(self.__dict__)
        out.dtype = np.dtype(dtype).newbyteorder("<")
        return out

    def chunks(self) -> Iterator[np.ndarray]:
        """The column in order, as arrays of ``dtype`` of at most about CHUNK_BYTES each."""
        self.close()
        width = max(1, int(np.prod(self.tail, dtype=np.int64))) * self.stored.itemsize
        rows = max(1, CHUNK_BYTES // width)
        with open(self.path, "rb") as f:
            done = 0
            while done < self.rows:
                k = min(rows, self.rows - done)
                a = np.fromfile(f, dtype=self.stored, count=k * (width // self.stored.itemsize))
                if a.size != k * (width // self.stored.itemsize):
                    raise StoreError(f"{self.path}: spooled column truncated (the disk is full?)")
                yield a.reshape((k, *self.tail)).astype(self.dtype, copy=False)
                done += k

    def read(self) -> np.ndarray:
        """The whole column in memory (a caller that needs it whole: the duplicate-id check, the error paths)."""
        self.close()
        return np.fromfile(self.path, dtype=self.stored).reshape(self.shape).astype(self.dtype, copy=False)


def _byte_chunks(a: Any) -> Iterator[memoryview]:
    """The raw little-endian bytes of an array (one view, no copy) or a :class:`Spool` (chunk by chunk)."""
    if isinstance(a, Spool):
        for c in a.chunks():
            if c.size:
                yield memoryview(np.ascontiguousarray(c).reshape(-1).view(np.uint8))
    elif a.nbytes:
        yield memoryview(a.reshape(-1).view(np.uint8))


def _layout_array(a: Any) -> Any:
    """An array as the shard layout stores it (contiguous, little-endian); a spool as it is."""
    if isinstance(a, Spool):
        return a
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def payload_hash(tensors: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = tensors[k] if isinstance(tensors[k], Spool) else np.ascontiguousarray(tensors[k])
        h.update(k.encode("utf-8"))
        h.update(str(a.dtype).encode("ascii"))
        h.update(str(a.shape).encode("ascii"))
        for mv in _byte_chunks(a):  # the same bytes as a.tobytes(), not copied
            h.update(mv)
    return h.hexdigest()


def _shard_layout(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> Tuple[bytes, List[Any]]:
    """(the length prefix and header, the tensors in file order) of :func:`encode_shard`'s layout."""
    meta_json = json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), allow_nan=False)
    header: Dict[str, Any] = {
        "__metadata__": {"gradsel": meta_json, "gradsel_sha256": sha256_bytes(meta_json.encode("utf-8")),
                         "payload_sha256": payload_hash(tensors)}
    }
    arrays = []
    offset = 0
    for k in sorted(tensors):
        a = _layout_array(tensors[k])
        if a.dtype not in ST_DTYPES:
            raise TypeError(f"shard tensor {k!r}: dtype {a.dtype} cannot be stored")
        header[k] = {"dtype": ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h, arrays


def encode_shard(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> bytes:
    """safetensors bytes with ``meta`` (JSON under ``"gradsel"``) and the payload hash in the header.

    The layout is fixed (header keys sorted, tensors in name order, no whitespace but the padding to 8
    bytes), so the same tensors and metadata always give the same bytes."""
    head, arrays = _shard_layout(tensors, meta)
    out = bytearray(len(head) + sum(a.nbytes for a in arrays))  # one buffer, filled in place (no join)
    out[:len(head)] = head
    pos = len(head)
    for a in arrays:
        for mv in _byte_chunks(a):
            out[pos:pos + mv.nbytes] = mv
            pos += mv.nbytes
    return out  # type: ignore[return-value]  # a bytearray (bytes-like): no second copy of a large file


def write_shard(path: str, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> Tuple[str, int]:
    """Write :func:`encode_shard`'s bytes to ``path`` atomically, tensor by tensor (no copy of the file in
    memory: a 10M-record columns file is written from its arrays, or from :class:`Spool` files chunk by
    chunk); returns (sha256 of the file, its size)."""
    head, arrays = _shard_layout(tensors, meta)
    h = hashlib.sha256(head)
    size = len(head)
    with fileio.atomic_path(path, error=lambda e: StoreError(
            f"cannot write {path}: {e.strerror or e} (is the directory writable, is the disk full?)")) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            for a in arrays:
                for mv in _byte_chunks(a):
                    f.write(mv)
                    h.update(mv)
                    size += mv.nbytes
    return h.hexdigest(), size


def read_header_metadata(data: bytes) -> Dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER:
        raise ValueError("header length beyond the end of the file")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("bad __metadata__")
    return meta


_ST_NUMPY = {name: dt for dt, name in ST_DTYPES.items()}


def _parse_layout(head: bytes, size: int) -> Tuple[Dict[str, Any], Optional[Dict[str, Tuple[np.dtype, List[int], int, int]]]]:
    """``(header, {tensor: (dtype, shape, begin, end)})`` of a safetensors JSON header over a payload of
    ``size`` bytes (offsets from the payload's start), with the checks of :func:`load_views`; the spans are
    ``None`` when a tensor has a dtype gradsel does not write (``safetensors`` then reads the file)."""
    header = json.loads(head.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    spans: Dict[str, Tuple[np.dtype, List[int], int, int]] = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        dt = _ST_NUMPY.get(info["dtype"]) if isinstance(info, dict) else None
        if dt is None:
            return header, None
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size or end - begin != count * dt.itemsize:
            raise ValueError(f"tensor {k!r}: offsets {begin}..{end} do not hold shape {shape} of {dt} in a payload "
                             f"of {size} bytes")
        spans[k] = (dt.newbyteorder("<"), shape, begin, end)
    covered = 0
    for begin, end in sorted((sp[2], sp[3]) for sp in spans.values()):
        if begin != covered:
            raise ValueError("the tensors do not cover the payload back to back")
        covered = end
    if covered != size:
        raise ValueError("the tensors do not cover the payload back to back")
    return header, spans


def load_views(data: Any) -> Dict[str, np.ndarray]:
    """The tensors of safetensors bytes (or a read-only ``mmap`` of the file) as read-only numpy views into
    ``data`` (``safetensors.numpy.load`` copies every tensor out first: at 10M records that copy is a tenth of
    ``ScoreStore.open``), with its checks: known dtypes, offsets inside the payload matching each shape, the
    tensors back to back covering it. ``ValueError`` otherwise; a dtype gradsel does not write goes to
    ``safetensors`` itself."""
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER:
        raise ValueError("header length beyond the end of the file")
    _, spans = _parse_layout(bytes(data[8:8 + n]), len(data) - 8 - n)
    if spans is None:
        from safetensors.numpy import load

        return load(bytes(data))
    base = 8 + n
    return {k: np.frombuffer(data, dtype=dt, count=(end - begin) // dt.itemsize, offset=base + begin).reshape(shape)
            for k, (dt, shape, begin, end) in spans.items()}


def _shard_meta(hdr: Mapping[str, Any], name: str, payload_ok: Optional[Any] = None) -> Dict[str, Any]:
    """The gradsel metadata of a shard's safetensors ``__metadata__``, checked: a gradsel shard, the payload
    hash (``payload_ok(want)`` -> bool; ``None``: the caller checked the file's sha256), the metadata's own
    checksum; ``StoreError`` naming ``name`` otherwise."""
    want = hdr.get("payload_sha256")
    if want is None or "gradsel" not in hdr:
        raise StoreError(f"{name}: not a gradsel shard (no checksum in its header)")
    if payload_ok is not None and not payload_ok(want):
        raise StoreError(f"{name}: checksum mismatch: the shard is corrupted")
    meta_sha = hdr.get("gradsel_sha256")
    if meta_sha is not None and sha256_bytes(hdr["gradsel"].encode("utf-8")) != meta_sha:
        raise StoreError(f"{name}: checksum mismatch in the header metadata: the shard is corrupted")
    try:
        meta = json.loads(hdr["gradsel"])
    except json.JSONDecodeError:
        raise StoreError(f"{name}: corrupted header metadata") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{name}: corrupted header metadata")
    if meta_sha is None and meta.get("format_version", 1) != 1:
        raise StoreError(f"{name}: no checksum of the header metadata: the shard is corrupted")
    return meta


def decode_shard(data: Any, name: str = "<shard>", check_payload: bool = True) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(tensors, meta)`` of a shard's bytes (or a read-only ``mmap`` of it); ``StoreError`` naming ``name``
    when it is truncated or its payload does not match the checksum in its header (``check_payload=False``:
    the caller has just checked the whole file's sha256 against the manifest, which covers the payload)."""
    if isinstance(data, bytearray):  # encode_shard's buffer, decoded as it is (read-only views)
        data = bytes(data)
    try:
        hdr = read_header_metadata(data)
        tensors = load_views(data)
    except Exception as e:  # truncated/garbled header or data: safetensors raises its own error type
        raise StoreError(f"{name}: unreadable or truncated shard ({type(e).__name__}: {e})") from None
    meta = _shard_meta(hdr, name, (lambda want: payload_hash(tensors) == want) if check_payload else None)
    return tensors, meta


def _pread_chunks(fd: int, begin: int, end: int) -> Iterator[bytes]:
    pos = begin
    while pos < end:
        chunk = os.pread(fd, min(CHUNK_BYTES, end - pos), pos)
        if not chunk:
            raise StoreError("file shorter than its header says (truncated while being read)")
        yield chunk
        pos += len(chunk)


@dataclass
class FileLayout:
    """A shard or columns file checked where it lies, without reading it into memory (:func:`check_file`):
    its gradsel metadata, its tensors' ``(dtype, shape, begin, end)`` (absolute offsets in the file) and its
    ``(inode, size, mtime)`` (what a later read checks it by)."""

    path: str
    meta: Dict[str, Any]
    spans: Dict[str, Tuple[np.dtype, List[int], int, int]]
    stat: Tuple[int, int, int]

    def read(self, fd: int, key: str, out: np.ndarray) -> None:
        """Read tensor ``key`` into ``out`` (its shape and dtype) straight from ``fd``."""
        dt, shape, begin, end = self.spans[key]
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        pos = 0
        while pos < end - begin:
            got = os.preadv(fd, [view[pos:]], begin + pos)
            if got <= 0:
                raise StoreError(f"{self.path}: truncated while being read; open the store again")
            pos += got


def open_store_file(out_dir: str, name: Any, size: Optional[int] = None, pattern: Optional[re.Pattern] = None) -> int:
    """A read-only fd of the store's file ``name``, with the checks of :func:`read_store_file` (a plain name,
    a regular file, of ``size`` bytes); the caller closes it."""
    path = check_plain_name(out_dir, name)
    if pattern is not None and not pattern.match(name):
        raise StoreError(f"{os.path.join(out_dir, MANIFEST)}: {name!r} is not a shard file name (shard-NNNNNN-rR.safetensors)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing file listed in the manifest") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: not a regular file (a link, directory or device); the store only reads its own files")
    if size is not None and st.st_size != size:
        raise StoreError(f"{path}: {st.st_size} bytes, the manifest records {size}: truncated or replaced")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if os.fstat(fd).st_size != st.st_size:
        os.close(fd)
        raise StoreError(f"{path}: changed size while being read")
    return fd


def file_stat(fd: int) -> Tuple[int, int, int]:
    st = os.fstat(fd)
    return (int(st.st_ino), int(st.st_size), int(st.st_mtime_ns))


def check_file(fd: int, path: str, sha: Optional[str]) -> FileLayout:
    """Check a shard or columns file where it lies, reading it in chunks (the page cache, not this process's
    memory, holds it): the sha256 of the whole file against ``sha`` when given, else its payload against the
    checksum in its header; then its header and layout. ``StoreError`` naming ``path`` otherwise."""
    size = os.fstat(fd).st_size
    if sha is not None:
        h = hashlib.sha256()
        for chunk in _pread_chunks(fd, 0, size):
            h.update(chunk)
        if h.hexdigest() != sha:
            raise StoreError(f"{path}: checksum mismatch (sha256 differs from the manifest): corrupted or truncated")
    try:
        if size < 8:
            raise ValueError("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > size - 8 or n > MAX_HEADER:
            raise ValueError("header length beyond the end of the file")
        header, spans = _parse_layout(os.pread(fd, n, 8), size - 8 - n)
        if spans is None:
            raise ValueError("a tensor of a dtype gradsel does not write")
        hdr = header.get("__metadata__") or {}
        if not isinstance(hdr, dict):
            raise ValueError("bad __metadata__")
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise StoreError(f"{path}: unreadable or truncated shard ({type(e).__name__}: {e})") from None
    spans = {k: (dt, shape, 8 + n + b, 8 + n + e) for k, (dt, shape, b, e) in spans.items()}

    def payload_ok(want: str) -> bool:
        h = hashlib.sha256()
        for k in sorted(spans):
            dt, shape, b, e = spans[k]
            h.update(k.encode("utf-8"))
            h.update(str(dt).encode("ascii"))
            h.update(str(tuple(shape)).encode("ascii"))
            for chunk in _pread_chunks(fd, b, e):
                h.update(chunk)
        return h.hexdigest() == want

    meta = _shard_meta(hdr, path, payload_ok if sha is None else None)
    return FileLayout(path, meta, spans, file_stat(fd))


# -- fingerprints -----------------------------------------------------------------------------------


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, any device; copied to the CPU when needed)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    h = hashlib.sha256()
    if t.numel():
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(t.view(torch.uint8).numpy())  # a view: no copy of the bytes
    return h.hexdigest()


def hash_state(model: torch.nn.Module, threads: Optional[int] = None) -> Tuple[str, Dict[str, int]]:
    """``(sha256, {dtype: numel})`` over every parameter and buffer of ``model``: names, kinds, dtypes,
    shapes and the sha256 of each tensor's raw bytes, in module order. Exact (a change of any byte changes
    it); tensors are hashed in parallel threads (hashlib releases the GIL)."""
    entries: List[Tuple[str, str, torch.Tensor]] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        entries.append(("p", name, p))
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            entries.append(("b", name, b))
    unique = list({id(t): t for _, _, t in entries}.values())  # a tied weight is hashed once, named twice
    threads = threads or min(8, os.cpu_count() or 1)
    if any(callable(getattr(t, "full_tensor", None)) for t in unique):
        # sharded (FSDP2 DTensor): each whole tensor is gathered (a collective: every rank, same order, one
        # thread), hashed and dropped, so the hash equals the unsharded model's and memory stays one tensor
        digests = {}
        for t in unique:
            full = getattr(t, "full_tensor", None)
            digests[id(t)] = _tensor_digest(full() if callable(full) else t)
    elif threads > 1 and len(unique) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            digests = dict(zip(map(id, unique), pool.map(_tensor_digest, unique)))
    else:
        digests = {id(t): _tensor_digest(t) for t in unique}
    h = hashlib.sha256()
    dtypes: Dict[str, int] = {}
    for kind, name, t in entries:
        d = digests[id(t)]
        dt = str(t.dtype).replace("torch.", "")
        h.update(f"{kind}\x00{name}\x00{dt}\x00{tuple(t.shape)}\x00{d}\n".encode("utf-8"))
        dtypes[dt] = dtypes.get(dt, 0) + int(t.numel())
    return h.hexdigest(), dict(sorted(dtypes.items()))


def model_fingerprint(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """What the scores depend on in the model: the selected parameters (names, shapes, dtypes), a sha256
    over the bytes of *every* parameter and buffer (frozen ones and a LoRA adapter's base included), the
    dtypes, and a hash of the parameter structure."""
    spec = [{"name": name, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")} for name, p in params.items()]
    content, dtypes = hash_state(model)
    structure = [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters()]
    return {
        "class": type(model).__name__,
        "params": spec,
        "n_selected": int(sum(p.numel() for p in params.values())),
        "n_total": int(sum(p.numel() for _, p in model.named_parameters())),
        "dtypes": dtypes,
        "content_sha256": content,
        "structure_sha256": canonical_hash(structure),
    }


def tokenizer_fingerprint(tokenizer: Any) -> Optional[Dict[str, Any]]:
    """What the token ids depend on in a tokenizer: its class, a hash of its whole definition (the fast
    tokenizer's JSON, else its vocabulary), its special tokens and their ids, and its chat template."""
    if tokenizer is None:
        return None
    out: Dict[str, Any] = {"class": type(tokenizer).__name__}
    definition = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        with contextlib.suppress(Exception):
            definition = backend.to_str()
    if definition is None and hasattr(tokenizer, "get_vocab"):
        with contextlib.suppress(Exception):
            definition = json.dumps(sorted((str(k), int(v)) for k, v in tokenizer.get_vocab().items()))
    if definition is None:  # e.g. ByteTokenizer: the class and its sizes define it
        definition = json.dumps({"vocab_size": getattr(tokenizer, "vocab_size", None)})
    out["definition_sha256"] = sha256_bytes(definition.encode("utf-8"))
    specials: Dict[str, Any] = {}
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"):
        for suffix, key in (("", attr), ("_id", attr + "_id")):
            v = getattr(tokenizer, attr + suffix, None) if suffix else getattr(tokenizer, attr, None)
            if isinstance(v, (str, int)) and not isinstance(v, bool):
                specials[key] = v
    extra = getattr(tokenizer, "added_tokens_encoder", None)
    if isinstance(extra, Mapping):
        specials["added_tokens"] = sorted((str(k), int(v)) for k, v in extra.items())
    out["special_tokens"] = specials
    for attr in ("add_bos_token", "add_eos_token", "padding_side", "truncation_side"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (bool, str)):
            out[attr] = v
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str):
        out["chat_template_sha256"] = sha256_bytes(tmpl.encode("utf-8"))
    return out


# -- columns ----------------------------------------------------------------------------------------


def _fits_int64(v: Any) -> bool:
    return INT64_MIN <= v <= INT64_MAX


def column_array(values: List[Any]) -> np.ndarray:
    """A metadata column as numpy: ints -> int64 (object when one does not fit), numbers (None -> nan)
    -> float64, bools -> bool, anything else (strings, mixed) -> object."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.asarray(values, dtype=bool)
    ints = present and all(isinstance(v, int) and not isinstance(v, bool) for v in present)
    if ints and len(present) == len(values) and all(_fits_int64(v) for v in present):
        return np.asarray(values, dtype=np.int64)
    if present and not ints and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def ids_array(kind: str, ids: List[Any]) -> np.ndarray:
    if kind == "int":
        return np.asarray(ids, dtype=np.int64)
    arr = np.empty(len(ids), dtype=object)
    arr[:] = ids
    return arr


# -- the columns file (format 3) --------------------------------------------------------------------

_SEP = "\x00"  # joins the strings of a column in one UTF-8 blob (a string holding it goes to JSON instead)
_NUMERIC = (np.dtype(np.bool_), np.dtype(np.int64), np.dtype(np.float64))


def _str_blob(values: Sequence[str]) -> Optional[np.ndarray]:
    """The strings as one NUL-joined UTF-8 byte array; ``None`` when one holds a NUL or cannot be encoded."""
    joined = _SEP.join(values)
    if joined.count(_SEP) != max(len(values) - 1, 0):
        return None
    try:
        return np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
    except UnicodeEncodeError:  # a lone surrogate (possible in JSON text)
        return None


def _str_unblob(blob: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    if count:
        out[:] = blob.tobytes().decode("utf-8").split(_SEP)
    return out


def _factorize_strings(values: Sequence[Any]) -> Optional[Tuple[np.ndarray, List[str]]]:
    """``(codes, distinct values in first-appearance order)`` of an all-string column, else ``None``."""
    if not all(type(v) is str for v in values):
        return None
    table: Dict[str, int] = {}
    codes = np.fromiter((table.setdefault(v, len(table)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(table)


class Factorized:
    """A string column given as ``codes`` (N,) into ``distinct`` values (first-appearance order), so a
    column assembled window by window is written without a Python string per record."""

    def __init__(self, codes: np.ndarray, distinct: List[str]):
        self.codes, self.distinct = codes, distinct

    def __len__(self) -> int:
        return int(self.codes.shape[0])


class Utf8Ids:
    """String ids given as their NUL-joined UTF-8 blob (what the columns file stores) and their count."""

    def __init__(self, blob: np.ndarray, count: int):
        self.blob, self.count = blob, count

    def __len__(self) -> int:
        return self.count


def encode_columns(id_kind: str, ids: Any, fields: Mapping[str, Any], record_sha256: Optional[Sequence[str]] = None
                   ) -> Tuple[Optional[bytes], Optional[Dict[str, Any]], Dict[str, List[Any]]]:
    """``(columns file bytes, ids doc for ids.json or None, fields for fields.json)``: everything that fits
    goes into the columns file as arrays (ids: int64 or a UTF-8 blob; fields: bool/int64/float64 arrays,
    string columns as int codes plus their distinct values; ``record_sha256``, hex digests one per record,
    as (N, digest bytes)); the rest falls back to the JSON side files."""
    tensors, meta, ids_doc, rest = columns_tensors(id_kind, ids, fields, record_sha256)
    return encode_shard(tensors, meta), ids_doc, rest


def columns_tensors(id_kind: str, ids: Any, fields: Mapping[str, Any], record_sha256: Any = None
                    ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], Optional[Dict[str, Any]], Dict[str, List[Any]]]:
    """``(tensors, meta, ids doc or None, JSON fields)`` of :func:`encode_columns` before they are written
    (a streaming run keeps each window's in its shard). ``ids`` may be a :class:`Utf8Ids`, a field a
    :class:`Factorized`, ``record_sha256`` an (N, width) uint8 array; int ids, numeric fields, codes, blobs
    and digests may be :class:`Spool` files (the end of a streaming run: written chunk by chunk)."""
    n = len(ids)
    tensors: Dict[str, np.ndarray] = {}
    meta: Dict[str, Any] = {"kind": "gradsel-columns", "n": n, "id_kind": id_kind, "fields": []}
    if isinstance(record_sha256, (np.ndarray, Spool)):
        if record_sha256.dtype != np.uint8 or record_sha256.ndim != 2 or record_sha256.shape[0] != n:
            raise ValueError(f"record_sha256 must be ({n}, width) uint8, got {record_sha256.dtype} {record_sha256.shape}")
        tensors["record_sha256"] = _layout_array(record_sha256)
        meta["record_sha256"] = int(record_sha256.shape[1])
    elif record_sha256 is not None:
        raw = [bytes.fromhex(d) for d in record_sha256]
        width = len(raw[0]) if raw else 16
        if any(len(r) != width for r in raw):
            raise ValueError("record_sha256: digests of different lengths")
        tensors["record_sha256"] = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(n, width)  # (N, width)
        meta["record_sha256"] = width
    ids_doc = None
    if id_kind == "int":
        tensors["ids"] = ids if isinstance(ids, Spool) else np.asarray(ids, dtype=np.int64).reshape(n)
        meta["ids"] = "int64"
    elif isinstance(ids, Utf8Ids):
        tensors["ids.utf8"] = ids.blob
        meta["ids"] = "utf8"
    else:
        blob = _str_blob(ids.tolist() if isinstance(ids, np.ndarray) else list(ids))
        if blob is None:
            ids_doc = {"kind": "str", "ids": ids.tolist() if isinstance(ids, np.ndarray) else list(ids)}
            meta["ids"] = "json"
        else:
            tensors["ids.utf8"] = blob
            meta["ids"] = "utf8"
    rest: Dict[str, List[Any]] = {}
    for i, (name, col) in enumerate(fields.items()):
        if isinstance(col, Factorized):
            tensors[f"f{i}.codes"] = col.codes.astype(np.int32 if len(col.distinct) < 1 << 31 else np.int64)
            blob = _str_blob(col.distinct)
            if blob is None:
                raise ValueError(f"field {name!r}: a value holds a NUL or cannot be encoded as UTF-8")
            tensors[f"f{i}.values"] = blob
            meta["fields"].append([name, "dict", len(col.distinct)])
            continue
        arr = col if isinstance(col, (np.ndarray, Spool)) and col.dtype != object else None
        if arr is None:
            values = col.tolist() if isinstance(col, np.ndarray) else list(col)
            arr = column_array(values)
        if arr.dtype.kind in "biuf" and arr.dtype not in _NUMERIC:
            arr = arr.astype(np.float64 if arr.dtype.kind == "f" else np.int64 if arr.dtype.kind in "iu" else bool)
        if arr.dtype in _NUMERIC:
            tensors[f"f{i}"] = arr if isinstance(arr, Spool) else np.ascontiguousarray(arr).reshape(n)
            meta["fields"].append([name, "array"])
            continue
        values = arr.tolist()
        fact = _factorize_strings(values)
        blob = _str_blob(fact[1]) if fact is not None else None
        if blob is None:
            rest[name] = values
            meta["fields"].append([name, "json"])
            continue
        codes, distinct = fact
        tensors[f"f{i}.codes"] = codes.astype(np.int32 if len(distinct) < 1 << 31 else np.int64)
        tensors[f"f{i}.values"] = blob
        meta["fields"].append([name, "dict", len(distinct)])
    return tensors, meta, ids_doc, rest


def decode_columns(data: bytes, path: str, n: int, check_payload: bool = True):
    """``(ids or None when in ids.json, fields from the file, [(name, encoding)] in order, {name: (codes,
    distinct values)} of the string fields)`` of a columns file; ``StoreError`` naming ``path`` when it is
    malformed."""
    tensors, meta = decode_shard(data, path, check_payload=check_payload)
    return columns_from_tensors(tensors, meta, path, n)


def columns_from_tensors(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any], path: str, n: int,
                         parts: Sequence[str] = ("ids", "fields", "digests")):
    """:func:`decode_columns` of tensors and meta already read (a streaming shard's window columns, or views
    into a memory-mapped columns file); only ``parts`` are decoded (the others come back empty: a lazy
    reader decodes each when it is first asked for)."""
    bad = f"{path}: malformed columns file"
    if meta.get("kind") != "gradsel-columns" or meta.get("n") != n or not isinstance(meta.get("fields"), list):
        raise StoreError(f"{bad} (not a columns file of {n} records); rerun the same `gradsel score` command to rewrite it")
    try:
        ids: Optional[np.ndarray] = None
        if "ids" not in parts:
            pass
        elif meta.get("ids") == "int64":
            ids = tensors["ids"]
            if ids.dtype != np.int64 or ids.shape != (n,):
                raise ValueError("ids")
        elif meta.get("ids") == "utf8":
            ids = _str_unblob(tensors["ids.utf8"], n)
            if ids.shape != (n,):
                raise ValueError("ids")
        elif meta.get("ids") != "json":
            raise ValueError("ids")
        fields: Dict[str, np.ndarray] = {}
        dict_codes: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        order: List[Tuple[str, str]] = []
        for i, entry in enumerate(meta["fields"]):
            name, enc = str(entry[0]), entry[1]
            order.append((name, enc))
            if "fields" not in parts:
                continue
            if enc == "array":
                col = tensors[f"f{i}"]
            elif enc == "dict":
                distinct = _str_unblob(tensors[f"f{i}.values"], int(entry[2]))
                codes = tensors[f"f{i}.codes"]
                if codes.size and (codes.min() < 0 or codes.max() >= distinct.shape[0]):
                    raise ValueError(name)
                col = distinct[codes]
                col.setflags(write=False)  # field_codes stays true to it: replaced is detected, edited refused
                dict_codes[name] = (codes, distinct, col)
            elif enc == "json":
                continue
            else:
                raise ValueError(name)
            if col.shape != (n,):
                raise ValueError(name)
            fields[name] = col
    except (KeyError, ValueError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise StoreError(f"{bad} ({type(e).__name__}: {e}); rerun the same `gradsel score` command to rewrite it") from None
    digests = None
    width = meta.get("record_sha256")
    if width and "digests" in parts:
        arr = tensors.get("record_sha256")
        if arr is None or arr.dtype != np.uint8 or arr.shape != (n, width):
            raise StoreError(f"{bad} (record_sha256 must be ({n}, {width}) bytes); rerun the same `gradsel score` "
                             "command to rewrite it")
        digests = HexDigests(arr)
    return ids, fields, order, dict_codes, digests


class HexDigests:
    """Per-record content digests kept as (N, digest bytes); item i is the hex string (as ``record_digest`` gives)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr  # (N, digest bytes) uint8

    def __len__(self) -> int:
        return int(self.arr.shape[0])

    def __getitem__(self, i: int) -> str:
        return self.arr[i].tobytes().hex()


def side_file_docs(id_kind: str, ids: Any, fields: Mapping[str, Any],
                   record_sha256: Optional[Sequence[str]] = None) -> List[Tuple[str, bytes]]:
    """The side files of a store of this format: ``[(name, bytes)]`` (the columns file, and ids.json /
    fields.json only for what it cannot hold)."""
    columns, ids_doc, rest = encode_columns(id_kind, ids, fields, record_sha256)
    docs = [(COLUMNS_FILE, columns)]
    if ids_doc is not None:
        docs.append((IDS_FILE, json_bytes(ids_doc)))
    if rest:
        docs.append((FIELDS_FILE, json_bytes(rest)))
    return docs


def write_side_files(out_dir: str, id_kind: str, ids: Any, fields: Mapping[str, Any],
                     record_sha256: Any = None) -> Dict[str, Tuple[str, int]]:
    """Write the side files of :func:`side_file_docs` into ``out_dir`` (the columns file streamed from its
    arrays by :func:`write_shard`); returns {name: (sha256, size)}."""
    tensors, meta, ids_doc, rest = columns_tensors(id_kind, ids, fields, record_sha256)
    side = {COLUMNS_FILE: write_shard(os.path.join(out_dir, COLUMNS_FILE), tensors, meta)}
    del tensors
    for name, doc in ((IDS_FILE, None if ids_doc is None else json_bytes(ids_doc)),
                      (FIELDS_FILE, json_bytes(rest) if rest else None)):
        if doc is not None:
            side[name] = (sha256_bytes(doc), len(doc))
            atomic_write(os.path.join(out_dir, name), doc)
    return side


# -- manifest and side files: validation ------------------------------------------------------------


def _repair_hint(out_dir: str) -> str:
    return f"run `gradsel repair {out_dir}` to rebuild it from the shards"


def _require(doc: Mapping[str, Any], key: str, types, path: str, hint: str, prefix: str = "") -> Any:
    if key not in doc:
        raise StoreError(f"{path}: key '{prefix}{key}' is missing; {hint}")
    v = doc[key]
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
    if not ok:
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise StoreError(f"{path}: key '{prefix}{key}' must be {want}, got {type(v).__name__}; {hint}")
    return v


def validate_manifest(manifest: Any, out_dir: str) -> Dict[str, Any]:
    """The manifest when every key the reader uses is present with the right type; ``StoreError`` naming
    the key otherwise."""
    path = os.path.join(out_dir, MANIFEST)
    hint = _repair_hint(out_dir)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a gradsel score store manifest")
    version = _require(manifest, "format_version", int, path, hint)
    if version > FORMAT_VERSION:
        raise StoreError(f"{path}: format version {version} is newer than this gradsel reads ({FORMAT_VERSION}); upgrade gradsel")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path}: format version {version} is not readable by this gradsel")
    _require(manifest, "complete", bool, path, hint)
    _require(manifest, "run_key", str, path, hint)
    for key in ("model", "config", "data", "counts", "files"):
        _require(manifest, key, dict, path, hint)
    counts = manifest["counts"]
    for key in ("records", "shards_planned"):
        if _require(counts, key, int, path, hint, "counts.") < 0:
            raise StoreError(f"{path}: counts.{key} is negative; {hint}")
    for name, sha in manifest["files"].items():
        if not isinstance(sha, str):
            raise StoreError(f"{path}: files[{name!r}] must be a sha256 string; {hint}")
    _require(manifest["config"], "per_param", bool, path, hint, "config.")
    if manifest["config"]["per_param"]:
        params = _require(manifest["model"], "params", list, path, hint, "model.")
        if not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in params):
            raise StoreError(f"{path}: model.params must be a list of {{'name': ...}}; {hint}")
    if manifest["complete"]:
        shards = _require(manifest, "shards", list, path, hint)
        for i, sh in enumerate(shards):
            if not isinstance(sh, dict):
                raise StoreError(f"{path}: shards[{i}] must be an object; {hint}")
            for key, types in (("file", str), ("sha256", str), ("index", int), ("start", int), ("count", int)):
                _require(sh, key, types, path, hint, f"shards[{i}].")
            if version >= 2:
                _require(sh, "size", int, path, hint, f"shards[{i}].")
        if version >= 2:
            sizes = _require(manifest, "file_sizes", dict, path, hint)
            for name in manifest["files"]:
                if not isinstance(sizes.get(name), int):
                    raise StoreError(f"{path}: file_sizes[{name!r}] must be an int; {hint}")
    return manifest


def parse_ids(data: bytes, path: str, n: int) -> Dict[str, Any]:
    """``{"kind", "ids"}`` of ``ids.json`` when well-formed (``n`` ids of one kind, ints in int64)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: malformed ids file ({e}); rerun the same `gradsel score` command to rewrite it") from None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    ids = doc.get("ids") if isinstance(doc, dict) else None
    if kind not in ("int", "str") or not isinstance(ids, list):
        raise StoreError(f"{path}: malformed ids file (needs {{'kind': 'int'|'str', 'ids': [...]}}); rerun the same "
                         "`gradsel score` command to rewrite it")
    if len(ids) != n:
        raise StoreError(f"{path}: {len(ids)} ids for {n} records; rerun the same `gradsel score` command to rewrite it")
    digests = doc.get("record_sha256")
    if digests is not None and (not isinstance(digests, list) or len(digests) != n
                                or not all(isinstance(d, str) for d in digests)):
        raise StoreError(f"{path}: malformed record_sha256 (needs one hash string per record); rerun the same "
                         "`gradsel score` command to rewrite it")
    for i, v in enumerate(ids):
        ok = (isinstance(v, int) and not isinstance(v, bool) and _fits_int64(v)) if kind == "int" else isinstance(v, str)
        if not ok:
            raise StoreError(f"{path}: id {i} ({v!r}) is not a{' 64-bit int' if kind == 'int' else ' str'}; "
                             "rerun the same `gradsel score` command to rewrite it")
    return doc


def parse_fields(data: bytes, path: str, n: int) -> Dict[str, List[Any]]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: malformed fields file ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(v, list) and len(v) == n for v in doc.values()):
        raise StoreError(f"{path}: malformed fields file (needs {{name: [one value per record]}})")
    return doc


# -- the store --------------------------------------------------------------------------------------


def _file_sha256(fd: int) -> str:
    h = hashlib.sha256()
    for chunk in _pread_chunks(fd, 0, os.fstat(fd).st_size):
        h.update(chunk)
    return h.hexdigest()


class _StoreReader:
    """What :meth:`ScoreStore.open` checked, and how each column is read the first time it is asked for.

    At open every file is checked where it lies, in chunks (the page cache holds it, not the process): its
    name, type and size, its sha256 against the manifest (``verify``; else each shard's payload against the
    checksum in its header), each shard's identity and positions; nothing is kept but the tensors' offsets and
    each file's (inode, size, mtime); JSON side files (formats 1-2, and in format 3 what the columns file
    cannot hold) are parsed at open, as before. The columns file is memory-mapped: ids, fields and record digests are
    views into it, decoded when first asked for (pages of a memory-mapped file count in RSS once touched, and
    only those). The scores (norms, losses, tokens, per-parameter norms, dots, cosines) are read from the
    shards into one array each the first time any of them is asked for; a shard replaced or rewritten since
    the open is refused (its inode, size or mtime changed)."""

    def __init__(self, out_dir: str, manifest: Dict[str, Any], verify: bool):
        import mmap

        self.out_dir, self.manifest, self.verify = out_dir, manifest, verify
        self.n = int(manifest["counts"]["records"])
        files, sizes = manifest["files"], manifest.get("file_sizes", {})
        self.columns: Optional[Tuple[Dict[str, np.ndarray], Dict[str, Any]]] = None
        if COLUMNS_FILE in files:  # format 3
            path = os.path.join(out_dir, COLUMNS_FILE)
            fd = open_store_file(out_dir, COLUMNS_FILE, sizes.get(COLUMNS_FILE))
            try:
                lay = check_file(fd, path, files[COLUMNS_FILE] if verify else None)
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            tensors = {k: np.frombuffer(mm, dtype=dt, count=(e - b) // dt.itemsize, offset=b).reshape(shape)
                       for k, (dt, shape, b, e) in lay.spans.items()}  # views: no page is read until used
            columns_from_tensors(tensors, lay.meta, path, self.n, parts=("digests",))  # the structure, now
            self.columns = (tensors, lay.meta)
        # JSON side files (formats 1-2; in format 3 only what the columns file cannot hold): parsed now, as before
        self.ids_doc = None if self._ids_in_columns() else parse_ids(
            self._json(IDS_FILE), os.path.join(out_dir, IDS_FILE), self.n)
        self.fields_doc = parse_fields(self._json(FIELDS_FILE), os.path.join(out_dir, FIELDS_FILE), self.n) \
            if FIELDS_FILE in files else None
        self.shards: List[Tuple[FileLayout, int, str]] = []  # (layout, records, the manifest's sha256)
        expect = 0
        for sh in manifest["shards"]:
            name = sh["file"]
            path = os.path.join(out_dir, name)
            fd = open_store_file(out_dir, name, sh.get("size"), SHARD_RE)
            try:
                # with verify the file's sha256 (which covers the payload) is checked: no second hash
                lay = check_file(fd, path, sh["sha256"] if verify else None)
                check_shard_identity(lay.meta, manifest, sh, path)
                span = lay.spans.get("positions")
                pos = None
                if span is not None and len(span[1]) == 1:
                    pos = np.empty(span[1], dtype=span[0])  # (count,)
                    lay.read(fd, "positions", pos)
                if pos is None or not np.array_equal(pos, np.arange(expect, expect + len(pos))):
                    raise StoreError(f"{path}: positions do not continue the dataset at {expect}")
            finally:
                os.close(fd)
            lay.meta = {}  # checked; each shard's header repeats the run's identity: not kept (N / window of them)
            self.shards.append((lay, len(pos), sh["sha256"]))
            expect += len(pos)
        if expect != self.n:
            raise StoreError(f"{out_dir}: shards hold {expect} records, the manifest says {self.n}")

    def _ids_in_columns(self) -> bool:
        return self.columns is not None and self.columns[1].get("ids") != "json"

    def _json(self, name: str) -> bytes:
        files, sizes = self.manifest["files"], self.manifest.get("file_sizes", {})
        data = read_store_file(self.out_dir, name, sizes.get(name))
        if self.verify and files.get(name) is not None and sha256_bytes(data) != files[name]:
            raise StoreError(f"{os.path.join(self.out_dir, name)}: checksum mismatch (sha256 differs from the manifest): "
                             "corrupted or truncated")
        return data

    def load(self, name: str, vals: Dict[str, Any], store: "ScoreStore") -> None:
        """Set ``vals[name]`` (and what is read with it)."""
        path = os.path.join(self.out_dir, COLUMNS_FILE)
        if name == "ids":
            digests = None
            if self._ids_in_columns():
                vals["ids"] = columns_from_tensors(self.columns[0], self.columns[1], path, self.n, parts=("ids",))[0]
                return
            doc = self.ids_doc
            vals["ids"] = ids_array(doc["kind"], doc["ids"])
            if "record_sha256" not in vals:
                if self.columns is not None:
                    digests = columns_from_tensors(self.columns[0], self.columns[1], path, self.n, parts=("digests",))[4]
                vals["record_sha256"] = digests if digests is not None else doc.get("record_sha256")
        elif name == "record_sha256":
            digests = None
            if self.columns is not None:
                digests = columns_from_tensors(self.columns[0], self.columns[1], path, self.n, parts=("digests",))[4]
            if digests is None and not self._ids_in_columns():
                self.load("ids", vals, store)  # format 2: the digests are in ids.json
                vals.setdefault("record_sha256", None)
            else:
                vals["record_sha256"] = digests
        elif name == "fields":
            fields: Dict[str, Any] = {}
            order: List[Tuple[str, str]] = []
            codes: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            if self.columns is not None:
                _, fields, order, codes, _ = columns_from_tensors(self.columns[0], self.columns[1], path, self.n, parts=("fields",))
            if self.fields_doc is not None:
                fields.update(self.fields_doc)
            if order:  # the columns' recorded order, whichever file holds each
                fields = {name: fields[name] for name, _ in order if name in fields}
            vals["fields"] = {k: v if isinstance(v, np.ndarray) else column_array(v) for k, v in fields.items()}
            store._codes = codes
        else:
            vals.update(self.scores())

    def scores(self) -> Dict[str, Any]:
        """The scores, each read from every shard into one array (the shards checked by :meth:`__init__`)."""
        man = self.manifest
        keys = ["norms", "losses", "tokens", "dots", "cosines"]
        pp = [PP_PREFIX + p["name"] for p in man["model"]["params"]] if man["config"].get("per_param") else []
        first = {}
        for lay, _, _ in self.shards:
            for k in keys + pp:
                if k in lay.spans and k not in first:
                    dt, shape, _, _ = lay.spans[k]
                    first[k] = (dt, tuple(shape[1:]))
        out = {k: np.empty((self.n, *tail), dtype=dt) for k, (dt, tail) in first.items()}  # (N,) or (N, R)
        pos = 0
        for lay, count, sha in self.shards:
            name = os.path.basename(lay.path)
            try:
                fd = open_store_file(self.out_dir, name, lay.stat[1], SHARD_RE)
            except StoreError as e:
                raise StoreError(f"{e} (since the store was opened: its columns are read when first used; call "
                                 "store.load() to read them all before its directory is removed or changed)") from None
            try:
                if file_stat(fd) != lay.stat and _file_sha256(fd) != sha:  # replaced by the same bytes (a resume): fine
                    raise StoreError(f"{lay.path}: replaced or rewritten since the store was opened; open it again")
                for k, arr in out.items():
                    dt, shape, _, _ = lay.spans.get(k, (None, None, 0, 0))
                    if dt != arr.dtype or shape is None or tuple(shape) != (count, *arr.shape[1:]):
                        raise StoreError(f"{lay.path}: its {k!r} is not ({count}, ...) {arr.dtype} like the other shards'; "
                                         f"{_repair_hint(self.out_dir)}")
                    lay.read(fd, k, arr[pos:pos + count])
            finally:
                os.close(fd)
            pos += count
        z32 = np.zeros(0, dtype=np.float32)
        return {
            "norms": out.get("norms", z32), "losses": out.get("losses", z32),
            "tokens": out.get("tokens", np.zeros(0, dtype=np.int64)),
            "per_param": {p[len(PP_PREFIX):]: out.get(p, z32) for p in pp} if man["config"].get("per_param") else None,
            "dots": out.get("dots"), "cosines": out.get("cosines"),
        }


def _lazy_column(name: str, doc: str) -> Any:
    def get(self: "ScoreStore") -> Any:
        vals = self._vals
        if name not in vals:
            self._reader.load(name, vals, self)
        return vals[name]

    def set_(self: "ScoreStore", value: Any) -> None:
        self._vals[name] = value

    return property(get, set_, doc=doc)


class ScoreStore:
    """Scores of a dataset, in the dataset's order.

    ``ids`` (int64, or object array of str), ``norms``/``losses`` (float32), ``tokens`` (int64),
    ``per_param`` (``{name: float32 squared norms}`` or ``None``), ``dots``/``cosines`` (with a reference:
    (N,) or (N, R) float32, else ``None``), ``fields`` (metadata columns recorded
    from the records, e.g. ``fields["task"]``), ``record_sha256`` (each scored record's content hash, a hex
    string per record, for records read from JSON), ``meta`` (the manifest), ``path``; ``run``: what the
    :func:`score_dataset` call that returned it did (records and tokens scored, times; empty from ``open``).

    A store from :meth:`open` is lazy: each column is read the first time it is asked for (the ids, fields
    and record digests as views into the memory-mapped columns file; the scores from the shards, together),
    so opening a store of any size holds no per-record column, and a caller pays for what it reads.
    """

    ids = _lazy_column("ids", "(N,) int64, or object array of str")
    norms = _lazy_column("norms", "(N,) float32: ||∇θ L_i||")
    losses = _lazy_column("losses", "(N,) float32")
    tokens = _lazy_column("tokens", "(N,) int64: tokens in each record's loss")
    per_param = _lazy_column("per_param", "{name: (N,) float32 squared norms} or None")
    fields = _lazy_column("fields", "{name: (N,) column}")
    dots = _lazy_column("dots", "(N,) or (N, R) float32 ⟨∇θ L_i, r⟩ (scored with reference=), else None")
    cosines = _lazy_column("cosines", "(N,) or (N, R) float32, else None")
    record_sha256 = _lazy_column("record_sha256", "each record's content hash (hex per record), or None")

    def __init__(self, path: str, ids: Any = None, norms: Any = None, losses: Any = None, tokens: Any = None,
                 per_param: Optional[Dict[str, np.ndarray]] = None, fields: Optional[Dict[str, np.ndarray]] = None,
                 meta: Optional[Dict[str, Any]] = None, run: Optional[Dict[str, Any]] = None, dots: Any = None,
                 cosines: Any = None, record_sha256: Any = None):
        self.path = path
        self.meta: Dict[str, Any] = {} if meta is None else meta
        self.run: Dict[str, Any] = {} if run is None else run  # what the score_dataset call that returned it did
        self._reader: Optional[_StoreReader] = None
        # string fields as read from the columns file: {name: (codes (N,), distinct values, column)}
        self._codes: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._vals: Dict[str, Any] = {"ids": ids, "norms": norms, "losses": losses, "tokens": tokens,
                                      "per_param": per_param, "fields": {} if fields is None else fields, "dots": dots,
                                      "cosines": cosines, "record_sha256": record_sha256}

    def __len__(self) -> int:
        norms = self._vals.get("norms")
        return int(norms.shape[0]) if norms is not None else int(self.meta["counts"]["records"])

    def __repr__(self) -> str:
        return f"ScoreStore({self.path!r}, n={len(self)}, model={self.meta.get('model', {}).get('class')})"

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, out_dir: str, verify: bool = True) -> "ScoreStore":
        """Open a finished store. Every file is checked before it is read (a plain name inside the store,
        a regular file of the recorded size), then its sha256 against the manifest (``verify``; else each
        shard's payload against its header's checksum), and the shards' coverage of the dataset; errors name
        the offending file. The columns are read lazily (see the class doc): opening holds none of them."""
        out_dir = os.fspath(out_dir)
        if not os.path.isdir(out_dir):
            raise StoreError(f"{out_dir}: not a directory (a score store is a directory)")
        manifest = read_manifest(out_dir)
        if manifest is None:
            if list_shards(out_dir):
                raise StoreError(f"{out_dir}: no {MANIFEST} but shards are present; {_repair_hint(out_dir)}")
            raise StoreError(f"{out_dir}: no {MANIFEST}; not a score store (or its run never started)")
        if not manifest.get("complete"):
            done = len(list_shards(out_dir))
            total = manifest["counts"]["shards_planned"] or "?"  # a streaming run learns its count at the end
            raise StoreError(
                f"{out_dir}: the store is incomplete ({done}/{total} shards); rerun the same score command "
                "(resume is on by default) to finish it"
            )
        store = cls(out_dir, meta=manifest)
        store._reader = _StoreReader(out_dir, manifest, verify)
        store._vals = {}
        return store

    def load(self) -> "ScoreStore":
        """Read every column now (what ``open`` did before it was lazy); returns the store."""
        for name in ("ids", "norms", "fields", "record_sha256"):
            getattr(self, name)
        return self

    @classmethod
    def from_parts(cls, out_dir, manifest, parts, ids, fields, record_sha256: Any = None) -> "ScoreStore":
        """A store from its manifest, shard tensors (``{name: [array per shard]}``), ids (an array, or an
        ``ids.json`` document, which may carry ``record_sha256``) and fields (``{name: array or list of
        values}``)."""
        def cat(key: str, dtype) -> np.ndarray:
            return np.concatenate(parts[key]) if parts.get(key) else np.zeros(0, dtype=dtype)

        per_param = None
        if manifest["config"].get("per_param"):
            per_param = {p["name"]: cat(PP_PREFIX + p["name"], np.float32) for p in manifest["model"]["params"]}
        if isinstance(ids, Mapping):
            if record_sha256 is None:
                record_sha256 = ids.get("record_sha256")
            ids = ids_array(ids["kind"], ids["ids"])
        fields = {k: v if isinstance(v, np.ndarray) else column_array(v) for k, v in fields.items()}
        return cls(
            path=out_dir,
            ids=ids,
            norms=cat("norms", np.float32),
            losses=cat("losses", np.float32),
            tokens=cat("tokens", np.int64),
            per_param=per_param,
            fields=fields,
            meta=manifest,
            dots=np.concatenate(parts["dots"]) if parts.get("dots") else None,
            cosines=np.concatenate(parts["cosines"]) if parts.get("cosines") else None,
            record_sha256=record_sha256,
        )

    @classmethod
    def from_arrays(
        cls,
        out_dir: str,
        norms: Any,
        losses: Any,
        tokens: Any = None,
        *,
        ids: Any = None,
        fields: Optional[Mapping[str, Any]] = None,
        per_param: Optional[Mapping[str, Any]] = None,
        dots: Any = None,
        cosines: Any = None,
        loss_reduction: str = "mean",
        shard_size: int = 1 << 20,
        overwrite: bool = False,
        record_sha256: Optional[Sequence[str]] = None,
    ) -> "ScoreStore":
        """Write a complete score store from per-record arrays, without scoring, and return it (as
        :meth:`open` reads it): for scores computed elsewhere, tests and benchmarks (a 10M-record store in
        seconds). ``norms``/``losses`` (n,) (stored float32), ``tokens`` (n,) int (default 0), ``ids`` (n,)
        unique ints or strings (default positions), ``fields`` ``{name: (n,) values}``, ``per_param``
        ``{name: (n,) squared norms}``, ``dots``/``cosines`` (n,) or (n, R); ``loss_reduction``: how the
        losses the norms belong to were reduced over tokens (``select(score="norm_per_token")`` reads it).
        ``record_sha256``: each record's content hash (``gradsel_core.jsonl.record_digest``, hex), for
        ``gradsel select --data`` to check the data file by. The identity records
        ``config.source = "ScoreStore.from_arrays"``; a directory holding a store is refused unless ``overwrite``."""
        from .errors import UsageError
        from .scoring import _claim_dir, _open_out_dir, _versions
        from .selection import _check_ids

        out_dir = os.fspath(out_dir)
        norms_a = np.asarray(norms, dtype=np.float32)
        if norms_a.ndim != 1:
            raise UsageError(f"from_arrays: norms must be 1-D (one per record), got shape {norms_a.shape}")
        n = norms_a.shape[0]

        def column(x: Any, name: str, dtype) -> np.ndarray:
            a = np.asarray(x, dtype=dtype)
            if a.shape[:1] != (n,) or (a.ndim != 1 and name not in ("dots", "cosines")) or a.ndim > 2:
                raise UsageError(f"from_arrays: {name} must have shape ({n},){' or (n, R)' if name in ('dots', 'cosines') else ''} "
                                 f"like norms, got {a.shape}")
            return np.ascontiguousarray(a)

        cols = {"norms": norms_a, "losses": column(losses, "losses", np.float32),
                "tokens": column(np.zeros(n, dtype=np.int64) if tokens is None else tokens, "tokens", np.int64)}
        for name, x in (("dots", dots), ("cosines", cosines)):
            if x is not None:
                cols[name] = column(x, name, np.float32)
        for name, x in (per_param or {}).items():
            cols[PP_PREFIX + name] = column(x, f"per_param[{name!r}]", np.float32)
        if loss_reduction not in ("mean", "sum"):
            raise UsageError(f"from_arrays: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise UsageError(f"from_arrays: shard_size must be a positive int, got {shard_size!r}")
        if ids is None:
            ids_a, id_kind = np.arange(n, dtype=np.int64), "int"
        else:
            ids_a = np.asarray(ids)
            if ids_a.dtype.kind in "iu":
                ids_a, id_kind = ids_a.astype(np.int64), "int"
            elif ids_a.dtype.kind == "U" or (ids_a.dtype.kind == "O" and all(type(v) is str for v in ids_a.tolist())):
                ids_a, id_kind = ids_a.astype(object), "str"
            else:
                raise UsageError(f"from_arrays: ids must be all ints or all strings, got dtype {ids_a.dtype}")
            if ids_a.shape != (n,):
                raise UsageError(f"from_arrays: ids must have shape ({n},) like norms, got {ids_a.shape}")
            try:
                _check_ids(ids_a)
            except ValueError as e:
                raise UsageError(f"from_arrays: {e}") from None
        field_cols = {}
        for name, x in (fields or {}).items():
            a = np.asarray(x) if not isinstance(x, np.ndarray) else x
            if a.shape != (n,):
                raise UsageError(f"from_arrays: fields[{name!r}] must have shape ({n},), got {a.shape}")
            field_cols[str(name)] = a.astype(object) if a.dtype.kind in "US" else a
        if record_sha256 is not None and len(record_sha256) != n:
            raise UsageError(f"from_arrays: record_sha256 must hold one digest per record ({n}), got {len(record_sha256)}")
        docs = side_file_docs(id_kind, ids_a, field_cols, record_sha256)
        side = {name: (sha256_bytes(doc), len(doc)) for name, doc in docs}
        identity = {
            "model": {"class": "arrays", "params": [{"name": k[len(PP_PREFIX):]} for k in cols if k.startswith(PP_PREFIX)]},
            "config": {"source": "ScoreStore.from_arrays", "per_param": bool(per_param), "loss_reduction": loss_reduction,
                       "shard_size": shard_size},
            "data": {"n_records": n, "id_kind": id_kind, "sha256": canonical_hash(
                {"side": {k: v[0] for k, v in side.items()}, "scores": payload_hash(cols)})},
        }
        run_key = canonical_hash(identity)
        versions = _versions()
        starts = list(range(0, n, shard_size)) or [0]
        _open_out_dir(out_dir, overwrite)
        with dir_lock(out_dir):
            _claim_dir(out_dir)
            existing = [name for name in store_files(out_dir) if not name.startswith(TMP_PREFIX)]
            if existing and not overwrite:
                raise StoreConflictError(f"{out_dir} already holds a score store; pass overwrite=True to replace it, or "
                                         "choose another directory")
            for name in store_files(out_dir):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(out_dir, name))
            for name, doc in docs:
                atomic_write(os.path.join(out_dir, name), doc)
            header = {"format_version": FORMAT_VERSION, "run_key": run_key, "identity": identity, "records": n,
                      "shards_planned": len(starts), "side_files": {k: v[0] for k, v in side.items()},
                      "versions": versions, "rank": 0}
            shards = []
            for index, start in enumerate(starts):
                stop = min(start + shard_size, n)
                tensors = {k: v[start:stop] for k, v in cols.items()}
                tensors["positions"] = np.arange(start, stop, dtype=np.int64)
                data = encode_shard(tensors, {**header, "index": index, "start": start, "stop": stop, "batches": 0})
                name = shard_name(index, 0)
                atomic_write(os.path.join(out_dir, name), data)
                shards.append(({"file": name, "index": index, "start": start, "count": stop - start, "batches": 0},
                               data, tensors))
            manifest = build_manifest(identity, run_key, n, len(starts), side, versions, now(), shards=shards,
                                      run={"from_arrays": now()})
            atomic_write(os.path.join(out_dir, MANIFEST), json_bytes(manifest))
        return cls.open(out_dir, verify=False)

    def field_codes(self, name: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """``(codes (N,), distinct values)`` of a string field as the columns file stores it (codes number
        the values by first appearance), while ``fields[name]`` is still the column read; else ``None``."""
        col = self.fields.get(name)  # (reads the fields of a lazy store)
        got = self._codes.get(name)
        if got is None or col is not got[2]:
            return None  # not a string field of the columns file, or the column was replaced after reading
        return got[0], got[1]

    # -- summaries --------------------------------------------------------------------------------
    def summary(self) -> Dict[str, Any]:
        """Counts and norm statistics (over finite norms)."""
        return summarize(self.norms, self.losses, self.tokens)

    def index_of(self, id_: Any) -> int:
        """Position of a record id."""
        hits = np.nonzero(self.ids == id_)[0]
        if not len(hits):
            raise KeyError(id_)
        return int(hits[0])


def check_shard_identity(meta: Mapping[str, Any], manifest: Mapping[str, Any], entry: Mapping[str, Any], path: str) -> None:
    """A format-2 shard's header must carry the manifest's run key and the plan index and start the manifest
    lists it at; ``StoreError`` otherwise (a shard copied from another store, with the manifest's size and
    sha256 edited to match, is caught here)."""
    if int(manifest.get("format_version", 1)) < 2 and "run_key" not in meta:
        return
    key, want = meta.get("run_key"), manifest.get("run_key")
    if key != want:
        raise StoreError(
            f"{path}: written by another run (run key {str(key)[:12]}..., this store's {str(want)[:12]}...): "
            "copied from another store? Rerun the same `gradsel score` command: it removes the shard and "
            "scores its records again")
    if "window" in entry and meta.get("window") != entry["window"]:  # a streaming run: the run key does not cover the data
        raise StoreError(
            f"{path}: written by another run (its records' hash {str((meta.get('window') or {}).get('sha256'))[:12]}... is "
            f"not the manifest's {str(entry['window'].get('sha256'))[:12]}...): copied from another store? Rerun the same "
            "`gradsel score` command: it removes the shard and scores its records again")
    if meta.get("index") != entry.get("index") or meta.get("start") != entry.get("start"):
        raise StoreError(f"{path}: its header says plan index {meta.get('index')} at record {meta.get('start')}, "
                         f"the manifest lists it as {entry.get('index')} at {entry.get('start')}; "
                         f"{_repair_hint(os.path.dirname(path))}")


class Summary:
    """:func:`summarize` of a store's scores given shard by shard (``add``): the counts are summed, the
    finite norms copied into one float64 buffer of ``capacity`` (8 bytes a record: the exact mean, median and
    quantiles need them all), so the end of a streaming run holds no other column; ``result()`` equals
    ``summarize`` of the concatenated arrays, bit for bit."""

    def __init__(self, capacity: int):
        self.finite = np.empty(capacity, dtype=np.float64)
        self.m = 0
        self.c = {"count": 0, "nan_norms": 0, "inf_norms": 0, "nan_losses": 0, "inf_losses": 0, "nonfinite": 0, "tokens": 0}

    def add(self, norms: np.ndarray, losses: np.ndarray, tokens: np.ndarray) -> None:
        finite = np.isfinite(norms)
        k = int(finite.sum())
        if self.m + k > self.finite.shape[0]:
            raise ValueError(f"Summary: more than {self.finite.shape[0]} records")
        self.finite[self.m:self.m + k] = norms[finite]
        self.m += k
        for key, v in (("count", norms.shape[0]), ("nan_norms", np.isnan(norms).sum()), ("inf_norms", np.isinf(norms).sum()),
                       ("nan_losses", np.isnan(losses).sum()), ("inf_losses", np.isinf(losses).sum()),
                       ("nonfinite", (~finite | ~np.isfinite(losses)).sum()), ("tokens", tokens.sum())):
            self.c[key] += int(v)

    def result(self) -> Dict[str, Any]:
        f = self.finite[:self.m]  # (M,) float64, in dataset order
        nan = float("nan")
        out = {**self.c, "norm_mean": float(f.mean()) if f.size else nan}
        out["norm_min"], out["norm_max"] = (float(f.min()), float(f.max())) if f.size else (nan, nan)
        q = np.quantile(f, [0.1, 0.5, 0.9], overwrite_input=True) if f.size else [nan] * 3  # after the mean: reorders f
        self.finite, self.m = np.empty(0, dtype=np.float64), 0
        out.update({"norm_median": float(q[1]), "norm_p10": float(q[0]), "norm_p90": float(q[2])})
        keys = ("count", "nan_norms", "inf_norms", "nan_losses", "inf_losses", "nonfinite", "tokens", "norm_mean",
                "norm_median", "norm_p10", "norm_p90", "norm_min", "norm_max")
        return {k: out[k] for k in keys}


def summarize(norms: np.ndarray, losses: np.ndarray, tokens: np.ndarray) -> Dict[str, Any]:
    """Counts and norm statistics (over the finite norms) of a store's scores."""
    acc = Summary(int(norms.shape[0]))
    acc.add(norms, losses, tokens)
    return acc.result()


def read_manifest(out_dir: str) -> Optional[Dict[str, Any]]:
    """The validated manifest, ``None`` when there is none; ``StoreError`` naming the file (and the key)
    when it is corrupted."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path) or os.path.islink(path):
        raise StoreError(f"{path}: not a regular file")
    try:
        manifest = json.loads(read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: corrupted manifest ({e}); {_repair_hint(out_dir)}") from None
    return validate_manifest(manifest, out_dir)


# config keys that shape the batch plan but change no per-sample value (each sample's norm, loss, dot and
# cosine depend on its own tokens only): a store is resumed with its own plan whatever these are now
LAYOUT_KEYS = ("batch_size", "max_tokens", "shard_size")


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists, numpy scalars -> Python numbers): what a stored
    identity is compared in."""
    return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two JSON-like dicts, compared in their JSON forms (a tuple
    written to the store reads back as a list: that is no difference)."""
    if not prefix:
        old, new = canonical(dict(old)), canonical(dict(new))
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_difference(a, b, key + ".")
        elif a != b:
            out.append(key)
    return out


def conflict_message(out_dir: str, old_identity: Mapping[str, Any], identity: Mapping[str, Any], where: str = "") -> str:
    diffs = describe_difference(dict(old_identity), dict(identity))
    numbers = [d for d in diffs if d not in tuple(f"config.{k}" for k in LAYOUT_KEYS)]
    diffs = numbers or diffs  # the batch plan alone never refuses a resume: name what changes the numbers
    what = sorted({d.split(".")[0] for d in diffs}) or ["model"]
    names = {"model": "model", "config": "scoring config", "data": "dataset"}
    head = (f"{out_dir} already holds scores of a different {' and '.join(names.get(w, w) for w in what)}{where} "
            f"(differs in: {', '.join(diffs[:8])}{', ...' if len(diffs) > 8 else ''}).")
    if diffs and all(d.startswith("config.reference") for d in diffs):
        had = isinstance(old_identity.get("config"), Mapping) and old_identity["config"].get("reference")
        return (f"{out_dir} holds scores {'with another reference' if had else 'without a reference'}: dots and "
                "cosines need every per-sample gradient again, so they cannot be added to it. Score into a new "
                "directory with the reference (the norms come with it, same cost), or replace this store with "
                "overwrite=True (CLI: --overwrite).")
    threads = ""
    if "config.cpu_threads" in diffs:
        threads = (f" The store was scored with {old_identity.get('config', {}).get('cpu_threads')} CPU thread(s), this "
                   f"run has {identity.get('config', {}).get('cpu_threads')}: resume with the same count "
                   "(torch.set_num_threads, or OMP_NUM_THREADS for the CLI), since it changes the last bits of the norms.")
    return head + threads + " Pass overwrite=True (CLI: --overwrite) to replace them, or choose another directory."


# -- building a manifest ----------------------------------------------------------------------------


IDENTITY_KEYS = ("model", "config", "data")


def build_manifest(
    identity: Mapping[str, Any], run_key: str, records: int, shards_planned: int, side_files: Mapping[str, Tuple[str, int]],
    versions: Mapping[str, Any], created: Optional[str], shards: Optional[Sequence[Tuple[Mapping[str, Any], bytes, Mapping[str, np.ndarray]]]] = None,
    run: Optional[Mapping[str, Any]] = None, stats: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """A manifest: incomplete without ``shards``; complete with ``shards`` = one ``(entry, bytes,
    tensors)`` per plan window in order (``entry``: file, index, start, count, batches). ``stats``: the
    :func:`summarize` of the scores when the caller summed them shard by shard (:class:`Summary`; the
    shards' tensors are then not read)."""
    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": shards is not None,
        "run_key": run_key,
        **{k: identity[k] for k in IDENTITY_KEYS},
        "counts": {"records": records, "shards_planned": shards_planned},
        "files": {k: v[0] for k, v in side_files.items()},
        "file_sizes": {k: v[1] for k, v in side_files.items()},
        "versions": dict(versions),
        "created": created,
    }
    if shards is None:
        return manifest
    entries, parts = [], {}
    n_batches = 0
    for entry, data, tensors in shards:
        entries.append({**{k: entry[k] for k in ("file", "index", "start", "count")},
                        "sha256": entry["sha256"] if data is None else sha256_bytes(data),  # None: given in entry
                        "size": entry["size"] if data is None else len(data),
                        **({"window": entry["window"]} if "window" in entry else {})})  # a streaming run's window
        n_batches += int(entry.get("batches", 0))
        for k, v in ({} if stats is not None else tensors).items():
            parts.setdefault(k, []).append(v)
    if stats is None:
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        z = np.zeros(0, dtype=np.float32)
        stats = summarize(cat.get("norms", z), cat.get("losses", z), cat.get("tokens", np.zeros(0, dtype=np.int64)))
    manifest["counts"].update({
        "shards": len(entries),
        "batches": n_batches,
        **{k: stats[k] for k in ("nan_norms", "inf_norms", "nan_losses", "inf_losses", "nonfinite", "tokens")},
    })
    manifest["summary"] = {k: (v if np.isfinite(v) else None) if isinstance(v, float) else v for k, v in stats.items()}
    manifest["shards"] = entries
    if run is not None:
        manifest["run"] = dict(run)
    manifest["finished"] = now()
    return manifest


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def scan_shard_files(out_dir: str) -> List[Tuple[str, int, Optional[bytes], Optional[Dict[str, np.ndarray]], Optional[Dict[str, Any]], Optional[str]]]:
    """Every shard file: ``(name, index, bytes, tensors, meta, error)`` (``error`` set when unreadable)."""
    out = []
    for idx, names in sorted(list_shards(out_dir).items()):
        for name in names:
            path = os.path.join(out_dir, name)
            try:
                data = read_store_file(out_dir, name)
                tensors, meta = decode_shard(data, path)
            except StoreError as e:
                out.append((name, idx, None, None, None, str(e)))
            else:
                out.append((name, idx, data, tensors, meta, None))
    return out


@dataclass
class RepairReport:
    """What :func:`repair_store` found and did."""

    path: str
    complete: bool
    shards_valid: int
    shards_planned: int
    removed: List[str]
    missing: List[int]
    message: str


def repair_store(out_dir: str) -> RepairReport:
    """Rebuild ``manifest.json`` from the shards, which carry the run's identity, their positions and
    checksums. Corrupted shards are removed (they are rescored by rerunning the same ``gradsel score``
    command). The manifest is complete when every planned shard is valid and ``ids.json`` (and
    ``fields.json``) match the checksums the shards record; otherwise it is marked incomplete, and the
    message says what rescoring will redo."""
    out_dir = os.fspath(out_dir)
    kind, _ = classify_dir(out_dir)
    if kind == "missing":
        raise StoreError(f"{out_dir}: no such directory")
    if kind == "v1":
        raise StoreError(f"{out_dir}: a store of format 1 (an older gradsel) cannot be repaired: its shards do not "
                         "carry their identity; score again into a new directory (or with --overwrite)")
    if kind != "store":
        raise StoreError(f"{out_dir}: not a gradsel score store (no {MARKER}); nothing to repair")
    with dir_lock(out_dir):
        remove_temp_files(out_dir)
        try:
            old = read_manifest(out_dir)
        except StoreError as e:
            log.warning("%s", e)
            old = None
        found = scan_shard_files(out_dir)
        good = [f for f in found if f[5] is None and isinstance(f[4].get("identity"), dict)]
        keys = sorted({f[4].get("run_key") for f in good})
        if old is not None:  # a readable manifest names the run: shards of another run (copied in) are not it
            key = old["run_key"]
        elif len(keys) == 1:
            key = keys[0]
        elif not keys:
            raise StoreError(f"{out_dir}: no readable shard to rebuild the manifest from; score again with --overwrite")
        else:
            counts = {k: sum(1 for f in good if f[4].get("run_key") == k) for k in keys}
            raise StoreConflictError(
                f"{out_dir}: shards of {len(keys)} different runs ({', '.join(f'{k[:12]}: {c} shards' for k, c in counts.items())}); "
                "move the files of the run you do not want out of the store, then repair again")
        removed = []
        for name, idx, data, tensors, meta, err in found:
            if err is not None:
                log.warning("%s; removing it, rerun the score command to score it again", err)
                removed.append(name)
                os.unlink(os.path.join(out_dir, name))
        meta0 = next((f[4] for f in good if f[4].get("run_key") == key), None)
        if meta0 is None:  # no shard of the manifest's run is left: the manifest says what it was
            meta0 = {"identity": {k: old[k] for k in IDENTITY_KEYS}, "records": old["counts"]["records"],
                     "shards_planned": old["counts"]["shards_planned"], "side_files": old["files"],
                     "versions": old.get("versions", {})}
        foreign = sorted(f[0] for f in good if f[4].get("run_key") != key)
        identity = meta0["identity"]
        if canonical_hash({k: identity.get(k) for k in IDENTITY_KEYS}) != key:
            raise StoreError(f"{out_dir}: the shards' identity does not hash to their run key; score again with --overwrite")
        if meta0.get("records") is None and isinstance(identity.get("data"), dict) and "windows" in identity["data"]:
            from .scoring import repair_stream  # a streaming run's shards: the store is assembled from them

            done, records, planned, missing = repair_stream(out_dir, key, identity, old, meta0.get("versions", {}))
            msg = (f"rebuilt {os.path.join(out_dir, MANIFEST)}: complete, {records} records in {planned} shards" if done
                   else f"rebuilt {os.path.join(out_dir, MANIFEST)} as incomplete ({len(missing)} windows missing or "
                   "corrupted, or the record count unknown); rerun the same `gradsel score` command to finish the store")
            return RepairReport(out_dir, done, planned - len(missing), planned, removed, missing, msg)
        records, planned = int(meta0["records"]), int(meta0["shards_planned"])
        chosen: Dict[int, Tuple[Mapping[str, Any], bytes, Mapping[str, np.ndarray]]] = {}
        for name, idx, data, tensors, meta, err in found:
            if err is not None or meta.get("run_key") != key or idx in chosen:
                continue
            start, stop = int(meta["start"]), int(meta["stop"])
            if meta.get("index") != idx or not np.array_equal(tensors.get("positions"), np.arange(start, stop)):
                log.warning("%s: positions do not match its header; ignoring it", os.path.join(out_dir, name))
                continue
            chosen[idx] = ({"file": name, "index": idx, "start": start, "count": stop - start,
                            "batches": meta.get("batches", 0)}, data, tensors)
        missing = [i for i in range(planned) if i not in chosen]
        side_want = meta0.get("side_files", {})
        side: Dict[str, Tuple[str, int]] = {}
        bad_side = []
        for name, sha in side_want.items():
            try:
                data = read_store_file(out_dir, name)
            except StoreError:
                bad_side.append(name)
                continue
            if sha256_bytes(data) != sha:
                bad_side.append(name)
            side[name] = (sha, len(data))
        contiguous = not missing and sum(int(e[0]["count"]) for e in chosen.values()) == records
        complete = contiguous and not bad_side
        created = (old or {}).get("created") if old is not None and old["run_key"] == key else None
        manifest = build_manifest(
            identity, key, records, planned, side, meta0.get("versions", {}), created,
            shards=[chosen[i] for i in range(planned)] if complete else None,
            run={"repaired": now()} if complete else None,
        )
        atomic_write(os.path.join(out_dir, MANIFEST), json_bytes(manifest))
    if complete:
        msg = f"rebuilt {os.path.join(out_dir, MANIFEST)}: complete, {records} records in {planned} shards"
    else:
        why = []
        if missing:
            why.append(f"{len(missing)} of {planned} shards missing or corrupted")
        if bad_side:
            why.append(f"{', '.join(bad_side)} missing or corrupted")
        if foreign:
            why.append(f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} written by another run "
                       "(rescored by the rerun)")
        msg = (f"rebuilt {os.path.join(out_dir, MANIFEST)} as incomplete ({'; '.join(why)}); rerun the same "
               "`gradsel score` command to finish the store")
    return RepairReport(out_dir, complete, len(chosen), planned, removed, missing, msg)
