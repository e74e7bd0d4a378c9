"""The score store: a directory of safetensors shards, JSON side files and a ``manifest.json``.

Layout of ``out_dir``::

    manifest.json                     format, model fingerprint, scoring config, data hash, counts,
                                      package versions, and the sha256 of every file below
    ids.json                          {"kind": "int"|"str", "ids": [...]} in dataset order
    fields.json                       metadata columns {name: [value per record]} (only when any)
    shard-000000-r0.safetensors       one shard per plan window (dataset positions [start, stop)),
    shard-000001-r1.safetensors       tagged with the rank that scored it; tensors: positions (int64),
    ...                               norms, losses (float32), tokens (int64), pp.<param> (float32,
                                      squared per-parameter norms, with per_param=True)

Every file is written atomically (temp file in the same directory, fsync, ``os.replace``). Each shard's
safetensors header carries the run key (model + config + data identity) and a sha256 of its tensor
payload, so a resumed run can validate shards before a manifest lists them; the manifest then holds
each file's whole-file sha256, checked by :meth:`ScoreStore.open`. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "gradsel-score-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.json"
FIELDS_FILE = "fields.json"
LOCK_FILE = ".lock"
SHARD_RE = re.compile(r"^shard-(\d{6,})-r(\d+)\.safetensors$")
TMP_MARK = ".tmp-"
PP_PREFIX = "pp."


class StoreError(RuntimeError):
    """A score store is unreadable: a missing, truncated or corrupted file (named in the message)."""


class StoreConflictError(RuntimeError):
    """``out_dir`` holds scores of another model, config or dataset."""


# -- files ------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``."""
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")


def canonical_hash(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def remove_temp_files(out_dir: str) -> int:
    """Remove temp files left by killed writers; returns how many."""
    n = 0
    for name in os.listdir(out_dir):
        if TMP_MARK in name:
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
    """``{plan index: [file names]}`` of the shard files present."""
    found: Dict[int, List[str]] = {}
    for name in sorted(os.listdir(out_dir)):
        m = SHARD_RE.match(name)
        if m:
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def store_files(out_dir: str) -> List[str]:
    """Every file of ours in ``out_dir`` (what ``overwrite`` removes); the manifest last."""
    names = []
    for name in sorted(os.listdir(out_dir)):
        if SHARD_RE.match(name) or name in (IDS_FILE, FIELDS_FILE) or TMP_MARK in name:
            names.append(name)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        names.append(MANIFEST)
    return names


# -- shards -----------------------------------------------------------------------------------------


def payload_hash(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(k.encode("utf-8"))
        h.update(str(a.dtype).encode("ascii"))
        h.update(str(a.shape).encode("ascii"))
        h.update(a.tobytes())
    return h.hexdigest()


def encode_shard(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """safetensors bytes with ``meta`` (JSON under ``"gradsel"``) and the payload hash in the header."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header = {"gradsel": json.dumps(dict(meta), sort_keys=True), "payload_sha256": payload_hash(tensors)}
    return save(tensors, metadata=header)


def read_header_metadata(data: bytes) -> Dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise ValueError("header length beyond the end of the file")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad __metadata__")
    return meta


def decode_shard(data: bytes, name: str = "<shard>") -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(tensors, meta)`` of a shard's bytes; ``StoreError`` naming ``name`` when it is truncated or
    its payload does not match the checksum in its header."""
    from safetensors.numpy import load

    try:
        hdr = read_header_metadata(data)
        tensors = load(data)
    except Exception as e:  # truncated/garbled header or data: safetensors raises its own error type
        raise StoreError(f"{name}: unreadable or truncated shard ({type(e).__name__}: {e})") from None
    want = hdr.get("payload_sha256")
    if want is None or "gradsel" not in hdr:
        raise StoreError(f"{name}: not a gradsel shard (no checksum in its header)")
    if payload_hash(tensors) != want:
        raise StoreError(f"{name}: checksum mismatch: the shard is corrupted")
    try:
        meta = json.loads(hdr["gradsel"])
    except json.JSONDecodeError:
        raise StoreError(f"{name}: corrupted header metadata") from None
    return tensors, meta


# -- model fingerprint ------------------------------------------------------------------------------


def tensor_bytes_hash(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())


def model_fingerprint(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Names, shapes and dtypes of the selected parameters, a sha256 over their bytes (in order), and a
    hash of the whole model's parameter structure (names, shapes, dtypes)."""
    h = hashlib.sha256()
    spec = []
    for name, p in params.items():
        spec.append({"name": name, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")})
        h.update(name.encode("utf-8"))
        tensor_bytes_hash(h, p)
    structure = [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters()]
    return {
        "class": type(model).__name__,
        "params": spec,
        "n_selected": int(sum(p.numel() for p in params.values())),
        "n_total": int(sum(p.numel() for _, p in model.named_parameters())),
        "content_sha256": h.hexdigest(),
        "structure_sha256": canonical_hash(structure),
    }


# -- columns ----------------------------------------------------------------------------------------


def column_array(values: List[Any]) -> np.ndarray:
    """A metadata column as numpy: ints -> int64, numbers (None -> nan) -> float64, bools -> bool,
    anything else (strings, mixed) -> object."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.asarray(values, dtype=bool)
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.asarray(values, dtype=np.int64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
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


# -- the store --------------------------------------------------------------------------------------


@dataclass
class ScoreStore:
    """Scores of a dataset, in the dataset's order.

    ``ids`` (int64, or object array of str), ``norms``/``losses`` (float32), ``tokens`` (int64),
    ``per_param`` (``{name: float32 squared norms}`` or ``None``), ``fields`` (metadata columns recorded
    from the records, e.g. ``fields["task"]``), ``meta`` (the manifest), ``path``.
    """

    path: str
    ids: np.ndarray
    norms: np.ndarray
    losses: np.ndarray
    tokens: np.ndarray
    per_param: Optional[Dict[str, np.ndarray]]
    fields: Dict[str, np.ndarray]
    meta: Dict[str, Any]

    def __len__(self) -> int:
        return int(self.norms.shape[0])

    def __repr__(self) -> str:
        return f"ScoreStore({self.path!r}, n={len(self)}, model={self.meta.get('model', {}).get('class')})"

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, out_dir: str, verify: bool = True) -> "ScoreStore":
        """Load a finished store. Checks every file's sha256 against the manifest (``verify``) and the
        shards' coverage of the dataset; errors name the offending file."""
        manifest = read_manifest(out_dir)
        if manifest is None:
            raise StoreError(f"{out_dir}: no {MANIFEST}; not a score store (or its run never started)")
        if not manifest.get("complete"):
            done = len(list_shards(out_dir))
            total = manifest.get("counts", {}).get("shards_planned", "?")
            raise StoreError(
                f"{out_dir}: the store is incomplete ({done}/{total} shards); rerun the same score command "
                "(resume is on by default) to finish it"
            )
        files = manifest.get("files", {})

        def load_checked(name: str) -> bytes:
            path = os.path.join(out_dir, name)
            if not os.path.exists(path):
                raise StoreError(f"{path}: missing file listed in the manifest")
            data = read_bytes(path)
            if verify and name in files and sha256_bytes(data) != files[name]:
                raise StoreError(f"{path}: checksum mismatch (sha256 differs from the manifest): corrupted or truncated")
            return data

        ids_doc = json.loads(load_checked(IDS_FILE).decode("utf-8"))
        fields_doc = json.loads(load_checked(FIELDS_FILE).decode("utf-8")) if FIELDS_FILE in files else {}
        parts: Dict[str, List[np.ndarray]] = {}
        expect = 0
        for sh in manifest["shards"]:
            name = sh["file"]
            data = load_checked(name)
            if verify and sha256_bytes(data) != sh["sha256"]:
                raise StoreError(f"{os.path.join(out_dir, name)}: checksum mismatch: corrupted or truncated shard")
            tensors, _ = decode_shard(data, os.path.join(out_dir, name))
            pos = tensors["positions"]
            if not np.array_equal(pos, np.arange(expect, expect + len(pos))):
                raise StoreError(f"{os.path.join(out_dir, name)}: positions do not continue the dataset at {expect}")
            expect += len(pos)
            for k, v in tensors.items():
                parts.setdefault(k, []).append(v)
        n = manifest["counts"]["records"]
        if expect != n:
            raise StoreError(f"{out_dir}: shards hold {expect} records, the manifest says {n}")
        return cls.from_parts(out_dir, manifest, parts, ids_doc, fields_doc)

    @classmethod
    def from_parts(cls, out_dir, manifest, parts, ids_doc, fields_doc) -> "ScoreStore":
        def cat(key: str, dtype) -> np.ndarray:
            return np.concatenate(parts[key]) if parts.get(key) else np.zeros(0, dtype=dtype)

        per_param = None
        if manifest["config"].get("per_param"):
            per_param = {p["name"]: cat(PP_PREFIX + p["name"], np.float32) for p in manifest["model"]["params"]}
        ids = ids_array(ids_doc["kind"], ids_doc["ids"])
        fields = {k: column_array(v) for k, v in fields_doc.items()}
        return cls(
            path=out_dir,
            ids=ids,
            norms=cat("norms", np.float32),
            losses=cat("losses", np.float32),
            tokens=cat("tokens", np.int64),
            per_param=per_param,
            fields=fields,
            meta=manifest,
        )

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


def summarize(norms: np.ndarray, losses: np.ndarray, tokens: np.ndarray) -> Dict[str, Any]:
    finite = np.isfinite(norms)
    f = norms[finite].astype(np.float64)
    q = np.quantile(f, [0.1, 0.5, 0.9]) if f.size else [float("nan")] * 3
    return {
        "count": int(norms.shape[0]),
        "nan_norms": int(np.isnan(norms).sum()),
        "inf_norms": int(np.isinf(norms).sum()),
        "nan_losses": int(np.isnan(losses).sum()),
        "inf_losses": int(np.isinf(losses).sum()),
        "nonfinite": int((~np.isfinite(norms) | ~np.isfinite(losses)).sum()),
        "tokens": int(tokens.sum()),
        "norm_mean": float(f.mean()) if f.size else float("nan"),
        "norm_median": float(q[1]),
        "norm_p10": float(q[0]),
        "norm_p90": float(q[2]),
        "norm_min": float(f.min()) if f.size else float("nan"),
        "norm_max": float(f.max()) if f.size else float("nan"),
    }


def read_manifest(out_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        manifest = json.loads(read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a gradsel score store manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"{path}: format version {manifest.get('format_version')} is newer than this gradsel reads")
    return manifest


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two JSON-like dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_difference(a, b, key + ".")
        elif a != b:
            out.append(key)
    return out
