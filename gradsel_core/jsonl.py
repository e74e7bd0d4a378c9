"""JSONL reading, without torch (``gradsel select --data`` and ``inspect`` start fast): a per-line byte
limit, regular files only (or ``-``), errors naming the file and line, the metadata columns of a record
and its content hash. ``gradsel_core.data`` re-exports all of it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np

from .errors import UsageError

# keys with a meaning of their own; every other scalar top-level field is a metadata column
RESERVED_KEYS = frozenset({"id", "input_ids", "labels", "attention_mask", "text", "prompt", "response", "messages"})
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_record_values(record: Mapping[str, Any], where: str) -> None:
    """Refuse, naming ``where`` (``file:line`` or ``record N``), an ``id`` that is not an int or a str, and
    an int (id or metadata field) that does not fit in 64 bits: the store keeps them as int64."""
    rid = record.get("id")
    if rid is not None and type(rid) is not int and type(rid) is not str:
        if isinstance(rid, np.integer):
            rid = int(rid)
        if isinstance(rid, bool) or not isinstance(rid, (int, str)):
            raise UsageError(f"{where}: id must be an int or a str, got {type(rid).__name__} {rid!r}")
    if isinstance(rid, int) and not INT64_MIN <= rid <= INT64_MAX:
        raise UsageError(f"{where}: id {rid} does not fit in 64 bits; write it as a string (\"id\": \"{rid}\")")
    for k, v in record.items():  # the metadata fields (extra_fields) holding an int: one pass, no dict built
        if isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX \
                and k not in RESERVED_KEYS and isinstance(k, str):
            raise UsageError(f"{where}: field {k!r} = {v} does not fit in 64 bits; write it as a string")


DEFAULT_MAX_LINE_BYTES = 16 << 20  # 16 MiB: a record longer than that is almost surely not one record


def iter_jsonl(path: str, max_line_bytes: Optional[int] = DEFAULT_MAX_LINE_BYTES, allow_special: bool = False,
               progress: Any = None, arg: str = "--data", check_values: bool = True) -> Iterator[Dict[str, Any]]:
    """Yield the JSON objects of a JSONL file (blank lines skipped). Errors (``UsageError``) name the file
    and line: invalid JSON or UTF-8, a line that is not an object, JSON nested too deeply, a line longer
    than ``max_line_bytes`` (``None``: no limit), an id or int field that does not fit.

    ``path`` must be a regular file; ``"-"`` reads standard input, and ``allow_special`` lets a FIFO or
    device through (a FIFO without a writer waits forever). ``progress``: called with the bytes of each
    line read (for a progress bar); ``arg`` names the option in messages. ``check_values=False`` skips
    :func:`check_record_values` (for a reader that checks each record's digest against one already checked)."""
    import stat as stat_mod

    path = os.fspath(path)
    if max_line_bytes is not None and max_line_bytes < 1:
        raise UsageError(f"--max-line-bytes must be >= 1, got {max_line_bytes}")
    if path != "-":
        if os.path.isdir(path):
            raise UsageError(f"{arg} {path} is a directory; give a JSONL file (one JSON object per line)")
        if not os.path.exists(path):
            raise UsageError(f"{arg} {path}: no such file; give a JSONL file (one JSON object per line)")
        if not stat_mod.S_ISREG(os.stat(path).st_mode) and not allow_special:
            raise UsageError(f"{arg} {path} is not a regular file (a FIFO, socket or device); give a JSONL file, "
                             f"'{arg} -' for standard input, or --allow-special-files to read it anyway")
    return _jsonl_records(path, max_line_bytes, progress, check_values)  # the checks above run now, the reading lazily


_SCAN = json.JSONDecoder().scan_once  # what json.loads runs, without its per-call whitespace regexes


def _loads(line: str) -> Any:
    """``json.loads`` of a stripped line: the scanner directly; anything it does not read whole (an error,
    trailing data) goes through ``json.loads`` for its exact error."""
    try:
        obj, end = _SCAN(line, 0)
    except RecursionError:
        raise
    except Exception:  # noqa: BLE001 - json.loads below raises the precise error
        return json.loads(line)
    return obj if end == len(line) else json.loads(line)


def _jsonl_records(path: str, limit: Optional[int], progress: Any, check_values: bool = True) -> Iterator[Dict[str, Any]]:
    import sys

    with (contextlib.nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb")) as f:
        lineno = 0
        while True:
            raw = f.readline(limit + 1) if limit is not None else f.readline()
            if not raw:
                break
            lineno += 1
            if progress is not None:
                progress(len(raw))
            obj = parse_jsonl_line(raw, path, lineno, limit, check_values)
            if obj is not None:
                yield obj


def parse_jsonl_line(raw: bytes, path: str, lineno: int, limit: Optional[int] = DEFAULT_MAX_LINE_BYTES,
                     check_values: bool = True) -> Optional[Dict[str, Any]]:
    """The record of one raw JSONL line (``None`` for a blank line), checked as :func:`iter_jsonl` checks it;
    ``UsageError`` naming ``path:lineno``."""
    if limit is not None and len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
        raise UsageError(f"{path}:{lineno}: line longer than {limit:,} bytes (--max-line-bytes); is this a "
                         "JSONL file? Raise --max-line-bytes for records that long")
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None
    if not line:
        return None
    try:
        obj = _loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise UsageError(f"{path}:{lineno}: JSON nested too deeply to read; flatten the record") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}:{lineno}: each line must be a JSON object, got {type(obj).__name__}")
    if check_values:
        check_record_values(obj, f"{path}:{lineno}")
    return obj


def _plain(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "detach") and hasattr(x, "tolist"):  # a torch tensor
        return x.tolist()
    raise TypeError(f"{type(x).__name__} cannot be hashed as JSON")


def json_encoder(**options: Any) -> Callable[[Any], str]:
    """``json.JSONEncoder(**options).encode``, the same text, with the C encoder made once instead of once per
    call (``json.dumps`` with options builds both each time: half the cost of a small record). Circular or
    too deeply nested input is handed to the standard encoder, which raises its own error."""
    enc = json.JSONEncoder(**options)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or enc.indent is not None:
        return enc.encode
    quote = json.encoder.encode_basestring_ascii if enc.ensure_ascii else json.encoder.encode_basestring
    fast = make(None, enc.default, quote, None, enc.key_separator, enc.item_separator, enc.sort_keys, enc.skipkeys,
                enc.allow_nan)  # no circular check (markers None): a cycle recurses, then goes to enc.encode

    def encode(o: Any) -> str:
        if isinstance(o, str):
            return enc.encode(o)
        try:
            return "".join(fast(o, 0))
        except RecursionError:
            return enc.encode(o)

    return encode


# one encoder for every digest
_DIGEST_JSON = json_encoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)


def record_digest_bytes(record: Mapping[str, Any]) -> bytes:
    """The 16 bytes :func:`record_digest` spells in hex."""
    return hashlib.sha256(_DIGEST_JSON(record).encode("utf-8")).digest()[:16]


def record_digest(record: Mapping[str, Any]) -> str:
    """A content hash of one record as read from JSON (key order and the file's whitespace do not count):
    the store keeps one per record, so ``gradsel select --data`` can tell an edited record from the scored one."""
    return record_digest_bytes(record).hex()


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """All records of a JSONL file, as a list of dicts."""
    return list(iter_jsonl(path))


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float, np.integer, np.floating))


def extra_fields(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The record's metadata columns: scalar top-level fields that are not reserved keys."""
    return {k: v for k, v in record.items() if k not in RESERVED_KEYS and isinstance(k, str) and _is_scalar(v)}
