"""``gradsel select``: select samples from a score store with a policy and write what it keeps.

    gradsel select --scores DIR --policy median_band --ratio 0.2 [--loss-filter-std 1.0]
                   [--group-by FIELD] [--seed 0] [--length-normalize none|tokens|sqrt]
                   [--param KEY=VALUE ...] --out kept.jsonl [--data data.jsonl|data.parquet|DATASET_DIR|org/name]
                   [--format jsonl|parquet|hf] [--summary-json PATH]

Writes the kept samples:

* without ``--data``: one JSON line per kept sample, ``{"id", "norm", "loss"}`` (plus ``"tokens"`` when
  the store has token counts), in ascending id order;
* with ``--data`` (the JSONL file, Parquet file or datasets folder that was scored): the kept records
  themselves, every original field kept, in the file's order, ready to train on, in the input's format
  unless ``--format`` says otherwise. The file must be the one the store was scored from: same record count and
  the same ids (a record without ``"id"`` has its position as id);
* with ``--format parquet``: the same rows as one Parquet file (the input's column types when
  ``--data`` is Parquet, else inferred from the first rows);
* with ``--format hf``: the same rows as a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``;
  load it with ``datasets.load_from_disk``). Needs ``pip install 'gradsel[datasets]'``.

Prints a short table (per group with ``--group-by``) and writes the full selection summary as JSON to
``--summary-json`` (default: next to ``--out``, ``kept.jsonl`` -> ``kept.summary.json``). Outputs are
never written inside a score store, onto a directory (JSONL) or over a folder that is not a dataset.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, TextIO

import numpy as np

from .. import fileio
from ..errors import UsageError

log = logging.getLogger(__name__)

POLICY_HELP = ("median_band (the paper's rule), keep_bottom, keep_top, drop_top, band, threshold, random; with a "
               "reference (gradsel score --reference): drop_opposed (drops the lowest cosines), project_band (the band "
               "around the median cosine)")
FORMATS = ("jsonl", "parquet", "hf")
PARQUET_WRITE_ROWS = 4096  # rows per Parquet row group written
MAX_TABLE_GROUPS = 20  # table rows shown; the summary file has every group


def _opt_float(text: str):
    """``--loss-filter-std``: a number, ``none``/``off`` (no filter) or ``auto`` (1.0 for median_band only)."""
    t = text.strip().lower()
    if t in ("none", "off", ""):
        return None
    if t == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, 'none' or 'auto', got {text!r}") from None


def add_policy_arguments(p: argparse.ArgumentParser, policy_default: Optional[str] = "median_band") -> None:
    """The selection options, shared by ``select`` and ``inspect --policy``."""
    p.add_argument("--policy", default=policy_default,
                   help=f"selection policy: {POLICY_HELP}" + ("" if policy_default else " (default: none)"))
    p.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of each group to keep (to drop, for drop_top)")
    p.add_argument("--loss-filter-std", type=_opt_float, default="auto", metavar="K",
                   help="keep only losses within K std of the mean first; 'none' disables; 'auto': 1.0 for "
                        "median_band (the paper's step 1), none for other policies")
    p.add_argument("--group-by", default=None, metavar="FIELD", help="select within each value of this store field")
    p.add_argument("--seed", type=int, default=0, help="seed for the random policy")
    p.add_argument("--length-normalize", default="none", choices=["none", "tokens", "sqrt"],
                   help="rank norm / tokens or norm / sqrt(tokens) instead of the norm")
    p.add_argument("--score", default="norm", choices=["norm", "norm_per_token"],
                   help="what the norm policies rank by: the stored norm, or norm_per_token = ||grad sum_t l_t|| / "
                        "sqrt(target tokens), the length-debiased norm (from the same scores, exact for either "
                        "loss reduction the store records)")
    p.add_argument("--diagnostics", action="store_true",
                   help="add the length diagnostics (Spearman/Pearson of norm and target tokens, mean tokens kept and "
                        "dropped) to the summary; they sort every column, so they are off by default")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, repeatable (band: low_q, high_q; threshold: max_norm)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", required=True, metavar="DIR", help="score store directory")
    add_policy_arguments(p)
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output: a JSONL file, or a folder with --format hf (never inside the store)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="the scored data (JSONL, Parquet, a datasets folder, or a Hub dataset id org/name[:split], "
                        "from the HF cache offline with HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1, else downloaded): "
                        "write the kept records with all their original fields")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="jsonl, parquet, or hf: a Hugging Face datasets folder (pip install 'gradsel[datasets]'); "
                        "default: the --data input's format, else jsonl")
    p.add_argument("--summary-json", default=None, metavar="PATH",
                   help="full selection summary as JSON (default: next to --out, <name>.summary.json)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (policy, counts per group, kept, outputs) instead of the table")


# -- shared helpers (also used by ``inspect``) --------------------------------------------------------


def parse_params(items: List[str]) -> Dict[str, Any]:
    """``--param KEY=VALUE`` items as a dict (numbers as floats)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            out[k.strip()] = v.strip()
    return out


def store_field(store: Any, name: str, arg: str) -> np.ndarray:
    """The store's metadata column ``name``; a ``UsageError`` naming ``arg`` and the fields it has."""
    fields = getattr(store, "fields", None)
    if not isinstance(fields, Mapping) or name not in fields:
        have = ", ".join(map(str, fields)) if isinstance(fields, Mapping) and fields else "(none)"
        where = getattr(store, "path", "?")
        raise UsageError(f"{arg} {name!r}: the score store at {where} has no such field; its fields: {have}")
    return np.asarray(fields[name])


def run_policy(store: Any, args: argparse.Namespace):
    """The :class:`~gradsel_core.selection.Selection` the policy options in ``args`` make on ``store``."""
    from ..selection import select

    if args.group_by:
        store_field(store, args.group_by, "--group-by")
    try:
        return select(
            store, policy=args.policy, ratio=args.ratio, loss_filter_std=args.loss_filter_std,
            group_by=args.group_by, seed=args.seed, length_normalize=args.length_normalize,
            score=getattr(args, "score", "norm"), diagnostics=getattr(args, "diagnostics", False),
            **parse_params(args.param),
        )
    except TypeError as e:  # a --param the policy does not take
        raise UsageError(f"--policy {args.policy} with --param {' '.join(args.param) or '(none)'}: {e}") from None


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars as Python numbers and non-finite floats as strict JSON (NaN -> null)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)  # ±inf -> "inf"/"-inf"
    return x


def _store_root(path: str) -> Optional[str]:
    """The score store that ``path`` is or lies in (a folder with a gradsel manifest or shards), else None."""
    from ..store import SHARD_RE, StoreError, read_manifest

    d = os.path.realpath(path)
    if not os.path.isdir(d):
        d = os.path.dirname(d)
    while True:
        if os.path.isdir(d):
            try:
                if read_manifest(d) is not None:
                    return d
            except (StoreError, OSError):  # unreadable or not ours: the shards decide
                pass
            try:
                if any(SHARD_RE.match(n) for n in os.listdir(d)):
                    return d
            except OSError:
                pass
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def check_output_path(path: str, arg: str, kind: str = "file", store_dir: Optional[str] = None,
                      example: str = "kept.jsonl") -> str:
    """Refuse an output ``path`` (for option ``arg``) inside a score store, a file path that is a
    directory, a folder path that is a file, or a place that cannot be written; returns the absolute path.
    ``kind``: "file" or "dir"; ``example``: a file name the messages suggest."""
    full = os.path.abspath(path)
    root = _store_root(full)
    if root is None and store_dir is not None:
        real = os.path.realpath(store_dir)
        if os.path.realpath(full) == real or os.path.realpath(full).startswith(real + os.sep):
            root = real
    if root is not None:
        suggestion = os.path.join(os.path.dirname(root), os.path.basename(root) + "-" + example)
        raise UsageError(
            f"{arg} {path}: that is inside the score store {root}; gradsel writes nothing into a store but its "
            f"own files. Write it elsewhere, e.g. {arg} {suggestion}")
    if kind == "file" and os.path.isdir(full):
        raise UsageError(f"{arg} {path} is a directory; give a file name, e.g. {arg} {os.path.join(path, example)}"
                         + (" (or --format hf to write a datasets folder)" if arg == "--out" else ""))
    if kind == "dir" and os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"{arg} {path} is a file; --format hf writes a folder: give a new folder path")
    existing = os.path.dirname(full)
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and (not os.path.isdir(existing) or not os.access(existing, os.W_OK)):
        why = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise UsageError(f"{arg} {path}: cannot write there ({existing} {why}); choose a writable place")
    return full


def _cannot_write(arg: str, path: str, e: OSError) -> UsageError:
    return UsageError(f"{arg} {path}: cannot write there ({e.strerror or e}); choose a writable place")


def _make_parent(arg: str, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise _cannot_write(arg, path, e) from None
    return d


@contextlib.contextmanager
def atomic_text(path: str, arg: str) -> Iterator[TextIO]:
    """Stream text to ``path`` atomically (``gradsel_core.fileio``); write errors become ``UsageError``s
    naming ``arg``."""
    _make_parent(arg, path)
    with fileio.atomic_text(path, error=lambda e: _cannot_write(arg, path, e)) as f:
        yield f


# -- rows -----------------------------------------------------------------------------------------------


def _score_rows(store: Any, kept: np.ndarray) -> Iterator[Dict[str, Any]]:
    """``{"id", "norm", "loss"[, "tokens"]}`` of the kept positions, in ascending id order."""
    tokens = getattr(store, "tokens", None)
    ids = np.asarray(store.ids)
    for i in kept[np.argsort(ids[kept], kind="stable")].tolist():
        rid = store.ids[i]
        rec = {"id": rid.item() if isinstance(rid, np.generic) else rid,
               "norm": jsonable(float(store.norms[i])), "loss": jsonable(float(store.losses[i]))}
        if tokens is not None and len(tokens) == len(store.norms):
            rec["tokens"] = int(tokens[i])
        yield rec


def _score_lines(store: Any, kept: np.ndarray, chunk: int = 1 << 16) -> Iterator[str]:  # lines or LineBlocks
    """The JSON lines of :func:`_score_rows` (byte-identical), formatted a chunk at a time from columns:
    2M rows in seconds instead of a dict and a ``json.dumps`` per row. Chunks holding a non-finite value
    go through ``_score_rows`` (NaN -> null)."""
    tokens = getattr(store, "tokens", None)
    with_tokens = tokens is not None and len(tokens) == len(store.norms)
    ids = np.asarray(store.ids)
    order = kept if ids.dtype.kind in "iu" and bool(np.all(ids[1:] > ids[:-1])) else \
        kept[np.argsort(ids[kept], kind="stable")]  # ascending ids: nothing to sort
    for lo in range(0, order.shape[0], chunk):
        part = order[lo:lo + chunk]
        norms = store.norms[part].astype(np.float64)
        losses = store.losses[part].astype(np.float64)
        if not (np.isfinite(norms).all() and np.isfinite(losses).all()):
            sub = _score_rows(store, np.sort(part))  # same order: sorted ids within the chunk
            for rec in sub:
                yield json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n"
            continue
        if ids.dtype.kind in "iu":
            id_text = [str(v) for v in ids[part].tolist()]
        else:
            id_text = [json.dumps(v, ensure_ascii=False) for v in ids[part].tolist()]
        if with_tokens:
            text = "".join([f'{{"id": {i}, "norm": {n!r}, "loss": {l!r}, "tokens": {t}}}\n'
                            for i, n, l, t in zip(id_text, norms.tolist(), losses.tolist(), tokens[part].tolist())])
        else:
            text = "".join([f'{{"id": {i}, "norm": {n!r}, "loss": {l!r}}}\n'
                            for i, n, l in zip(id_text, norms.tolist(), losses.tolist())])
        yield LineBlock(text, part.shape[0])


class LineBlock(str):
    """Several JSON lines formatted at once (``rows`` of them), written with one call."""

    rows: int

    def __new__(cls, text: str, rows: int) -> "LineBlock":
        block = super().__new__(cls, text)
        block.rows = rows
        return block


DATA_BATCH = 1 << 14  # records of --data checked against the store at a time


def _data_rows(path: str, store: Any, kept: np.ndarray) -> Iterator[Dict[str, Any]]:
    """The kept records of the scored data ``path`` (JSONL, Parquet or a datasets folder), read once and in
    order, checked against the store a batch of records at a time: the ids, and the content hash the store
    keeps for each record (an edited record with its old id is refused). Memory holds one batch, not the file."""
    import itertools

    from ..jsonl import record_digest, record_digest_bytes
    from ..sources import data_kind, hub_dataset, iter_records

    data_kind(path)  # a directory that is not a saved dataset is refused, naming it; a Hub id is resolved
    if hub_dataset(path) is None and not os.path.exists(path):
        raise UsageError(f"--data {path}: no such file")
    where = getattr(store, "path", "?")
    total = len(store.norms)
    keep = np.zeros(total, dtype=bool)
    keep[kept] = True
    digests = getattr(store, "record_sha256", None)
    if digests is None:
        log.warning("the store at %s keeps no per-record content hash (scored from pre-tokenized records or by an "
                    "older gradsel): --data is checked by id only", where)
    raw = getattr(digests, "arr", None)  # (N, 16) bytes of a columns file: compared a batch at a time
    if raw is not None and raw.shape[1:] != (16,):
        raw = None
    ids = np.asarray(store.ids)
    int_ids = ids.dtype.kind in "iu"
    # a record whose digest matches was checked when it was scored: its values need no second check
    records = iter_records(path, max_line_bytes=None, check_values=digests is None)

    def mismatch(n: int, rec: Dict[str, Any]) -> None:
        """The error for record ``n``, if it is not the one scored there (else nothing)."""
        rid = rec.get("id", n)
        sid = store.ids[n]
        sid = sid.item() if isinstance(sid, np.generic) else sid
        if rid != sid and str(rid) != str(sid):
            raise UsageError(f"--data {path}: record {n} has id {rid!r}, the store at {where} has {sid!r} there; "
                             "give the file that was scored")
        if digests is not None and record_digest(rec) != digests[n]:
            raise UsageError(f"--data {path}: record {n} (id {sid!r}) is not the record that was scored into the "
                             f"store at {where} (its content changed); its scores belong to the old content: score "
                             "the edited file again, or give the file that was scored")

    lo = 0
    while True:
        batch = list(itertools.islice(records, DATA_BATCH))
        if not batch:
            break
        hi = lo + len(batch)
        if hi > total:
            raise UsageError(f"--data {path} has more records than the store at {where} ({total}); "
                             "give the file that was scored")
        got = [r.get("id", n) for n, r in enumerate(batch, lo)]
        if int_ids:  # every id an int equal to the store's (the usual case), checked as one array
            try:
                ok = all(type(v) is int for v in got) and np.array_equal(
                    np.fromiter(got, dtype=np.int64, count=len(got)), ids[lo:hi])
            except OverflowError:
                ok = False
        else:
            ok = got == ids[lo:hi].tolist()
        if ok and digests is not None:
            ok = raw is not None and b"".join(map(record_digest_bytes, batch)) == raw[lo:hi].tobytes()
        if not ok:  # the record-by-record checks name the first record that differs
            for n, rec in enumerate(batch, lo):
                mismatch(n, rec)
        for j in np.flatnonzero(keep[lo:hi]).tolist():
            yield batch[j]
        lo = hi
    if lo != total:
        raise UsageError(f"--data {path} has {lo} records, the store at {where} has {total}; "
                         "give the file that was scored")


# -- writers --------------------------------------------------------------------------------------------


def write_jsonl(path: str, rows: Iterator[Any]) -> int:
    """One JSON line per row (a dict, a line already formatted, or a :class:`LineBlock` of lines), atomically;
    returns the number of rows written."""
    n = 0
    from ..jsonl import json_encoder

    encode = json_encoder(ensure_ascii=False, allow_nan=False)  # json.dumps's text, one encoder
    with atomic_text(path, "--out") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else encode(row) + "\n")
            n += row.rows if isinstance(row, LineBlock) else 1
    return n


def _arrow_tables(path: str, rows: Iterator[Dict[str, Any]], schema: Any, what: str) -> Iterator[Any]:
    """The rows as Arrow tables of ``PARQUET_WRITE_ROWS`` rows (at least one table, maybe empty), of
    ``schema`` (``None``: inferred from the first rows; a later row with another field or type is refused,
    naming the rows and ``what`` holds them)."""
    import itertools

    import pyarrow as pa

    n = 0
    while True:
        chunk = list(itertools.islice(rows, PARQUET_WRITE_ROWS))
        if not chunk and n:
            return
        if schema is None:
            keys = list(dict.fromkeys(k for r in chunk for k in r))
            schema = pa.Table.from_pydict({k: [r.get(k) for r in chunk] for k in keys}).schema
        try:
            table = pa.Table.from_pydict({k: [r.get(k) for r in chunk] for k in schema.names}, schema=schema)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise UsageError(f"--out {path}: rows {n}..{n + len(chunk) - 1} do not fit the {what} columns "
                             f"{schema.names} ({str(e).splitlines()[0]}); write JSONL with --format jsonl") from None
        extra = {k for r in chunk for k in r} - set(schema.names)
        if extra:
            raise UsageError(f"--out {path}: a row has fields {sorted(extra)} that the first rows lack; "
                             "write JSONL with --format jsonl")
        yield table
        n += len(chunk)
        if not chunk:
            return


def write_parquet(path: str, rows: Iterator[Dict[str, Any]], schema: Any = None) -> int:
    """The rows as one Parquet file, written in row groups of ``PARQUET_WRITE_ROWS`` (never the whole
    selection in memory), atomically. ``schema``: the Arrow schema (the input's, for a Parquet ``--data``);
    ``None``: inferred from the first row group (a later row with another field or type is refused)."""
    import pyarrow.parquet as pq

    _make_parent("--out", path)
    n = 0
    with fileio.atomic_path(path, error=lambda e: _cannot_write("--out", path, e)) as tmp:
        writer = None
        try:
            for table in _arrow_tables(path, rows, schema, "Parquet"):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                n += table.num_rows
        finally:
            if writer is not None:
                writer.close()
    return n


def _is_dataset_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def check_hf_target(path: str) -> None:
    """``datasets`` is importable and ``path`` is new, empty or an earlier dataset folder (replaced)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UsageError("--format hf needs the datasets package: pip install 'gradsel[datasets]' "
                         "(or write JSONL with --format jsonl)") from None
    if os.path.isdir(path) and os.listdir(path) and not _is_dataset_folder(path):
        raise UsageError(f"--out {path} is a folder that is not a saved dataset; give a new folder path "
                         "(gradsel replaces only an earlier dataset folder)")


def write_hf(path: str, rows: Iterator[Dict[str, Any]], features: Any = None) -> int:
    """The rows as a ``datasets`` folder (``save_to_disk``), written beside ``path`` and then moved in;
    an earlier dataset folder at ``path`` is replaced. The rows go to an Arrow file in row batches first
    (never the whole selection in memory), which ``save_to_disk`` then copies. ``features``: the input
    dataset's (a datasets ``--data``), so the columns keep their types; ``None``: inferred from the first
    rows. Returns the number of rows."""
    import tempfile

    import pyarrow as pa
    from datasets import Dataset, DatasetInfo

    check_hf_target(path)
    from datasets import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    parent = _make_parent("--out", path)
    try:
        work = tempfile.mkdtemp(prefix=fileio.TMP_PREFIX, dir=parent)
    except OSError as e:
        raise _cannot_write("--out", path, e) from None
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    n = 0
    try:
        arrow = os.path.join(work, "rows.arrow")
        schema = features.arrow_schema if features is not None else None
        with pa.OSFile(arrow, "wb") as sink:
            writer = None
            for table in _arrow_tables(path, rows, schema, "dataset"):  # every column, nulls included
                if writer is None:
                    writer = pa.ipc.new_stream(sink, table.schema)
                writer.write_table(table)
                n += table.num_rows
            if writer is not None:
                writer.close()
        if n == 0:  # as before: an in-memory empty dataset (from an empty Arrow stream it would not load back)
            ds = Dataset.from_dict({k: [] for k in features}, features=features) if features is not None \
                else Dataset.from_list([])
        else:
            ds = Dataset.from_file(arrow, info=DatasetInfo(features=features) if features is not None else None)
        with fileio.atomic_path(path, error=lambda e: _cannot_write("--out", path, e)) as tmp:
            ds.save_to_disk(tmp)
        del ds
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not bars_were_off:
            enable_progress_bars()
    return n


def default_summary_path(out: str) -> str:
    """``kept.jsonl`` -> ``kept.summary.json``; a folder ``kept/`` -> ``kept.summary.json`` beside it."""
    out = os.path.abspath(out)
    root, ext = os.path.splitext(out)
    return (root if ext.lower() in (".jsonl", ".json", ".ndjson", ".parquet", ".pq") else out) + ".summary.json"


# -- the table ------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    n: int
    nonfinite: int
    loss_filtered: int
    kept: int
    norm_lo: float
    norm_hi: float


def _row(label: str, stats: Mapping[str, Any], norms: np.ndarray, mask: np.ndarray) -> Row:
    kept = norms[mask]
    kept = kept[np.isfinite(kept)]
    return Row(label, int(stats.get("n", mask.size)), int(stats.get("nonfinite", 0)), int(stats.get("loss_filtered", 0)),
               int(mask.sum()), float(kept.min()) if kept.size else math.nan, float(kept.max()) if kept.size else math.nan)


def _same_label(value: Any, label: Any) -> bool:
    """Whether a record's group value is the group ``label`` (missing values, None or NaN, form one group)."""
    if label is None:
        return value is None or (isinstance(value, float) and math.isnan(value))
    return type(value) is type(label) and value == label


def table_rows(store: Any, sel: Any, group_field: Optional[np.ndarray], field: Optional[str] = None) -> List[Row]:
    """One row per group (in the summary's order; at most ``MAX_TABLE_GROUPS``) and the total. Each group's
    records come from the group codes the selection used (the store's codes of ``field``, or the vectorized
    grouping), which number the groups in the summary's order; else a value at a time."""
    from ..selection import _group_codes, _stored_codes

    norms = np.asarray(store.norms, dtype=np.float64)
    s = sel.summary
    rows: List[Row] = []
    groups = s.get("groups")
    if groups and group_field is not None:
        shown = list(groups.items())[:MAX_TABLE_GROUPS]
        got = (_stored_codes(store, field, len(group_field)) if field else None) or _group_codes(group_field)
        firsts, codes = got
        same = len(firsts) == len(groups) and all(
            type(a) is type(b) and a == b for a, b in zip(firsts, (g.get("label") for g in groups.values())))
        values = None if same else group_field.tolist()
        for i, (key, g) in enumerate(shown):
            label = g.get("label", key)
            m = codes == i if values is None else np.asarray([_same_label(v, label) for v in values], dtype=bool)
            rows.append(_row(str(label), g, norms[m], sel.kept_mask[m]))
    rows.append(_row("all", s, norms, sel.kept_mask))
    return rows


def format_table(rows: List[Row], n_groups: int = 0) -> List[str]:
    w = max(5, *(len(r.label) for r in rows))
    lines = [f"  {'group':<{w}} {'records':>8} {'non-finite':>10} {'loss-filtered':>13} {'kept':>7} {'kept %':>7}  kept norms"]
    for r in rows:
        rng = "-" if math.isnan(r.norm_lo) else f"{r.norm_lo:.4g} .. {r.norm_hi:.4g}"
        pct = f"{100.0 * r.kept / r.n:.1f}" if r.n else "-"
        lines.append(f"  {r.label:<{w}} {r.n:>8} {r.nonfinite:>10} {r.loss_filtered:>13} {r.kept:>7} {pct:>7}  {rng}")
    if n_groups > MAX_TABLE_GROUPS:
        lines.insert(-1, f"  ... {n_groups - MAX_TABLE_GROUPS} more groups in the summary file")
    return lines


# -- run ------------------------------------------------------------------------------------------------


def _open_store(path: str):
    from ..store import ScoreStore

    return ScoreStore.open(path)


def _write(out: str, fmt: str, rows: Iterator[Any], data: Optional[str]) -> int:
    """Write ``rows`` to ``out`` in ``fmt``, keeping the input's column types when ``data`` has the same format."""
    from ..sources import data_kind, load_dataset_folder, parquet_schema

    same = data is not None and data != "-" and data_kind(data) == fmt
    if fmt == "hf":
        return write_hf(out, rows, load_dataset_folder(data).features if same else None)
    if fmt == "parquet":
        return write_parquet(out, rows, parquet_schema(data) if same else None)
    return write_jsonl(out, rows)


def _data_name(data: str) -> str:
    """``--data`` as the summary names it: a local path made absolute, a Hub dataset id as given."""
    from ..sources import hub_dataset

    return data if data == "-" or hub_dataset(data) is not None else os.path.abspath(data)


def run(args: argparse.Namespace) -> int:
    from ..store import atomic_write

    # every output path is checked before any work
    from ..sources import data_kind

    if args.data is not None and args.data != "-":
        data_kind(args.data)  # a directory that is not a saved dataset is refused, naming it
    args.format = args.format or (data_kind(args.data) if args.data else "jsonl")
    kind = "dir" if args.format == "hf" else "file"
    out = check_output_path(args.out, "--out", kind=kind, store_dir=args.scores)
    summary_path = check_output_path(args.summary_json or default_summary_path(out), "--summary-json",
                                     store_dir=args.scores)
    if os.path.abspath(summary_path) == out:
        raise UsageError(f"--summary-json {summary_path} is the --out path; give another file")
    if args.format == "hf":
        check_hf_target(out)
    if args.data is not None and os.path.exists(args.data):
        for arg, p in (("--out", out), ("--summary-json", summary_path)):
            if os.path.exists(p) and os.path.samefile(p, args.data):
                raise UsageError(f"{arg} {p} is the --data file; write the selection to another file")

    store = _open_store(args.scores)
    sel = run_policy(store, args)
    group_field = store_field(store, args.group_by, "--group-by") if args.group_by else None
    kept = np.flatnonzero(sel.kept_mask)  # ascending dataset positions
    if args.data:
        rows: Iterator[Any] = _data_rows(args.data, store, kept)
    else:  # JSONL: lines formatted from the columns (the same bytes as a json.dumps per row)
        rows = _score_lines(store, kept) if args.format == "jsonl" else _score_rows(store, kept)
    written = _write(out, args.format, rows, args.data)

    summary = dict(sel.summary)
    summary["output"] = {"path": out, "format": args.format, "records": written,
                         "content": "records from " + _data_name(args.data) if args.data else "scores"}
    summary["store"] = os.path.abspath(args.scores)
    _make_parent("--summary-json", summary_path)
    try:
        atomic_write(summary_path, (json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n").encode("utf-8"))
    except OSError as e:
        raise _cannot_write("--summary-json", summary_path, e) from None

    s = sel.summary
    if args.json:
        rows = table_rows(store, sel, group_field, args.group_by)
        print(json.dumps(jsonable({
            "policy": args.policy, "ratio": s["ratio"], "loss_filter_std": s.get("loss_filter_std"),
            "group_by": args.group_by, "store": os.path.abspath(args.scores), "records": len(store.norms),
            "kept": s["kept"], "n": s["n"], "out": out, "format": args.format, "written": written,
            "content": "records" if args.data else "scores", "summary_json": summary_path,
            "groups": [r.__dict__ for r in rows]}), allow_nan=False))
        return 0
    lf = "no loss filter" if s.get("loss_filter_std") is None else f"loss filter ±{s['loss_filter_std']:g} std"
    extra = f", by {args.group_by}" if args.group_by else ""
    print(f"{args.policy}, ratio {s['ratio']:g}, {lf}{extra}: store {args.scores} ({len(store.norms)} records)")
    print("\n".join(format_table(table_rows(store, sel, group_field, args.group_by), int(s.get("n_groups", 0)))))
    what = "records" if args.data else "score rows"
    print(f"kept {s['kept']} of {s['n']} -> {args.out} ({written} {what}, {args.format})")
    print(f"summary -> {summary_path}")
    return 0
