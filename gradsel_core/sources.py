"""The one record iterator behind every ``--data``: a JSONL file (or ``-``), a Parquet file (pyarrow, read in
row batches, never the whole table) or a ``datasets.save_to_disk`` folder (memory-mapped Arrow, read in row
batches). All three give the same records (the JSONL record schema: ``text`` / ``prompt`` + ``response`` /
``messages`` / ``input_ids``, optional ``id`` and metadata fields), so :func:`~gradsel_core.jsonl.record_digest`
is the same for the same record content whichever file it came from.

A columnar file cannot tell a missing field from a null one: top-level nulls of a Parquet or dataset row
are dropped (a JSONL record that spells a field ``null`` hashes differently from its columnar copy).
No torch import here (``gradsel select --data`` starts fast); pyarrow and datasets are imported on use."""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

from .errors import UsageError
from .jsonl import check_record_values, iter_jsonl

KINDS = ("jsonl", "parquet", "hf")
BATCH_ROWS = 1024  # rows decoded to Python at a time (Parquet and datasets folders)
PARQUET_SUFFIXES = (".parquet", ".pq")
WHAT = "give a JSONL file, a .parquet file or a datasets.save_to_disk folder"


def is_dataset_folder(path: str) -> bool:
    """A ``Dataset.save_to_disk`` folder (``state.json`` and ``dataset_info.json``)."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def data_kind(path: str, arg: str = "--data") -> str:
    """``"jsonl"``, ``"parquet"`` or ``"hf"`` for the input ``path``; a ``UsageError`` for a folder that
    is not a saved dataset (naming it and what to give)."""
    path = os.fspath(path)
    if path == "-":
        return "jsonl"
    if os.path.isdir(path):
        if is_dataset_folder(path):
            return "hf"
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise UsageError(f"{arg} {path} is a DatasetDict folder (several splits); give one split's folder, "
                             f"e.g. {arg} {os.path.join(path, 'train')}")
        raise UsageError(f"{arg} {path} is a directory; {WHAT} (it is not a saved dataset: no state.json and "
                         "dataset_info.json)")
    if path.lower().endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl"


def _type_problem(name: str, t: Any) -> Optional[str]:
    """What is wrong with column ``name`` of Arrow type ``t`` for the record schema (None: fine)."""
    import pyarrow.types as pt

    def is_str(x):
        return pt.is_string(x) or pt.is_large_string(x) or pt.is_null(x)

    def is_list(x):
        return pt.is_list(x) or pt.is_large_list(x) or pt.is_fixed_size_list(x)

    if name in ("text", "prompt", "response") and not is_str(t):
        return "a string"
    if name in ("input_ids", "labels", "attention_mask") and not (
            pt.is_null(t) or (is_list(t) and (pt.is_integer(t.value_type) or pt.is_null(t.value_type)))):
        return "a list of integers"
    if name == "id" and not (pt.is_integer(t) or is_str(t)):
        return "an integer or a string"
    if name == "messages":  # a list of {role, content} structs (other struct fields are left to the chat template)
        ok = pt.is_null(t) or (is_list(t) and pt.is_struct(t.value_type) and all(
            is_str(t.value_type.field(i).type) for i in range(t.value_type.num_fields)
            if t.value_type.field(i).name in ("role", "content")))
        if not ok:
            return "a list of {role, content} structs of strings"
    return None


def check_schema(schema: Any, path: str, arg: str = "--data") -> None:
    """Refuse, naming the file and the column, an Arrow schema whose reserved columns have the wrong type."""
    for field in schema:
        want = _type_problem(field.name, field.type)
        if want is not None:
            raise UsageError(f"{arg} {path}: column {field.name!r} is {field.type}, it must be {want} "
                             "(the same record schema as JSONL); fix the column or convert the file")


def _rows(batches: Iterator[Any], path: str, check_values: bool = True) -> Iterator[Dict[str, Any]]:
    """Records from Arrow record batches or tables, top-level nulls dropped, checked as JSONL records are."""
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            rec = {k: v for k, v in row.items() if v is not None}
            if check_values:
                check_record_values(rec, f"{path}: row {n}")
            n += 1
            yield rec


def _parquet_records(path: str, arg: str, check_values: bool = True) -> Iterator[Dict[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{arg} {path} is a Parquet file: reading it needs pip install 'gradsel[datasets]'") from None

    if not os.path.exists(path):
        raise UsageError(f"{arg} {path}: no such file; {WHAT}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"{arg} {path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    check_schema(pf.schema_arrow, path, arg)
    return _rows(pf.iter_batches(batch_size=BATCH_ROWS), path, check_values)


def load_dataset_folder(path: str, arg: str = "--data") -> Any:
    """The ``datasets.Dataset`` saved in ``path`` (memory-mapped, not read into RAM)."""
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{arg} {path} is a datasets folder: reading it needs pip install 'gradsel[datasets]'") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "not readable"
        raise UsageError(f"{arg} {path}: not a readable saved dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ds, datasets.Dataset):
        raise UsageError(f"{arg} {path} holds a {type(ds).__name__}; give one split's folder")
    return ds


def _hf_records(path: str, arg: str, check_values: bool = True) -> Iterator[Dict[str, Any]]:
    ds = load_dataset_folder(path, arg)
    check_schema(ds.features.arrow_schema, path, arg)
    return _rows(ds.with_format("arrow").iter(batch_size=BATCH_ROWS), path, check_values)


def iter_records(path: str, arg: str = "--data", progress: Any = None, check_values: bool = True,
                 **jsonl_options: Any) -> Iterator[Dict[str, Any]]:
    """The records of ``path`` whatever its kind (:func:`data_kind`). The file is checked now (missing,
    unreadable, a wrong column type: a ``UsageError`` naming it), the rows are read lazily in batches.
    ``progress`` and ``jsonl_options`` (``max_line_bytes``, ``allow_special``) apply to JSONL only;
    ``check_values=False`` skips the per-record id/int checks (a reader that matches each record's digest
    against a record already checked)."""
    kind = data_kind(path, arg)
    if kind == "parquet":
        return _parquet_records(os.fspath(path), arg, check_values)
    if kind == "hf":
        return _hf_records(os.fspath(path), arg, check_values)
    return iter_jsonl(path, progress=progress, arg=arg, check_values=check_values, **jsonl_options)


def parquet_schema(path: str) -> Any:
    """The Arrow schema of a Parquet file (for writing the kept records back with the same column types)."""
    import pyarrow.parquet as pq

    return pq.read_schema(path)
