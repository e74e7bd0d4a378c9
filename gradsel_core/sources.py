"""The one record iterator behind every ``--data``: a JSONL file (or ``-``), a Parquet file (pyarrow, read in
row batches, never the whole table), a ``datasets.save_to_disk`` folder (memory-mapped Arrow, read in row
batches), or a Hugging Face Hub dataset id (``org/name`` or ``org/name:split``, or ``hf://datasets/org/name``;
its Parquet or JSONL data files, resolved from the local HF cache -- offline with ``HF_HUB_OFFLINE=1`` or
``HF_DATASETS_OFFLINE=1`` -- and downloaded otherwise, then read as files are). All three give the same records (the JSONL record schema: ``text`` / ``prompt`` + ``response`` /
``messages`` / ``input_ids``, optional ``id`` and metadata fields), so :func:`~gradsel_core.jsonl.record_digest`
is the same for the same record content whichever file it came from.

A columnar file cannot tell a missing field from a null one: top-level nulls of a Parquet or dataset row
are dropped (a JSONL record that spells a field ``null`` hashes differently from its columnar copy).
No torch import here (``gradsel select --data`` starts fast); pyarrow and datasets are imported on use."""
from __future__ import annotations

import functools
import itertools
import os
import re
from typing import Any, Dict, Iterator, Optional, Tuple

from .errors import UsageError
from .jsonl import check_record_values, iter_jsonl

KINDS = ("jsonl", "parquet", "hf")
BATCH_ROWS = 1024  # rows decoded to Python at a time (Parquet and datasets folders)
PARQUET_SUFFIXES = (".parquet", ".pq")
WHAT = "give a JSONL file, a .parquet file or a datasets.save_to_disk folder"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
HUB_DATASET_PREFIX = "hf://datasets/"
DATA_FILE_SUFFIXES = PARQUET_SUFFIXES + (".jsonl",)
OTHER_SPLITS = ("validation", "valid", "val", "test", "dev", "eval")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hugging Face Hub id (``name`` or ``org/name``), not a path: at most one
    ``/``, no ``..``/``--``, not starting with ``.``, ``/`` or ``~``."""
    return bool(HUB_ID_RE.match(spec)) and ".." not in spec and "--" not in spec and not spec.endswith(".")


def hub_dataset(spec: str) -> Optional[Tuple[str, str]]:
    """``(repo id, split)`` when ``spec`` names a Hub dataset rather than a local path: ``hf://datasets/ID``,
    or ``org/name`` (``:split`` optional, default ``train``) where no such file or folder exists and the name
    does not end like a data file (``.jsonl``, ``.parquet``: a missing file stays a missing file)."""
    spec = os.fspath(spec)
    explicit = spec.startswith(HUB_DATASET_PREFIX)
    if not explicit and (os.path.exists(spec) or spec.lower().endswith(DATA_FILE_SUFFIXES + (".json",))):
        return None
    repo, _, split = (spec[len(HUB_DATASET_PREFIX):] if explicit else spec).partition(":")
    if not is_hub_id(repo) or (repo.count("/") != 1 and not explicit) or not re.match(r"^[\w.-]*$", split):
        return None
    return repo, split or "train"


def _names_split(rel: str, split: str) -> bool:
    parts = rel.replace(os.sep, "/").split("/")
    return split in parts[:-1] or any(parts[-1].startswith(split + c) for c in "-_.")


@functools.lru_cache(maxsize=16)
def hub_files(spec: str, arg: str = "--data") -> Tuple[str, Tuple[str, ...]]:
    """``(kind, data files in order)`` of the Hub dataset ``spec`` names (:func:`hub_dataset`): its snapshot
    from the local HF cache (``HF_HUB_CACHE`` / ``HF_HOME``), offline when ``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` is set, else downloaded (its Parquet and JSONL files only); the split's files are
    those with the split as a folder or file-name prefix (``data/train-00000-of-00002.parquet``,
    ``train.jsonl``), or every data file when none names a split. A ``UsageError`` naming ``arg`` otherwise."""
    got = hub_dataset(spec)
    if got is None:
        raise UsageError(f"{arg} {spec}: not a Hub dataset id")
    repo, split = got
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{arg} {spec}: no such file, and reading a Hub dataset needs pip install huggingface_hub") from None
    offline = any(os.environ.get(k, "0").strip().lower() not in ("", "0", "false", "no", "off")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        root = snapshot_download(repo, repo_type="dataset", local_files_only=offline,
                                 allow_patterns=[f"*{s}" for s in DATA_FILE_SUFFIXES])
    except Exception as e:  # noqa: BLE001 - not cached, offline, unknown repo, network: all mean "not resolvable"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"{arg} {spec}: not a local file or folder, and the Hub dataset {repo!r} could not be resolved ({why})"
            + ("; HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: put the dataset in the HF cache first (or unset it "
               "to download)" if offline else "; check the id and the network")) from None
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root, followlinks=True)
                   for f in names if f.lower().endswith(DATA_FILE_SUFFIXES))
    chosen = [f for f in files if _names_split(f, split)]
    if not chosen and split == "train" and not any(_names_split(f, s) for f in files for s in OTHER_SPLITS):
        chosen = files  # one unnamed split
    if not chosen:
        raise UsageError(f"{arg} {spec}: the Hub dataset {repo!r} has no Parquet or JSONL files of split {split!r} "
                         f"(its data files: {', '.join(files[:8]) or 'none'}{' ...' if len(files) > 8 else ''}); "
                         f"name the split as {arg} {repo}:SPLIT")
    kinds = {"parquet" if f.lower().endswith(PARQUET_SUFFIXES) else "jsonl" for f in chosen}
    if len(kinds) > 1:
        raise UsageError(f"{arg} {spec}: split {split!r} mixes Parquet and JSONL files; convert them to one format")
    return kinds.pop(), tuple(os.path.join(root, f) for f in chosen)


def is_dataset_folder(path: str) -> bool:
    """A ``Dataset.save_to_disk`` folder (``state.json`` and ``dataset_info.json``)."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def data_kind(path: str, arg: str = "--data") -> str:
    """``"jsonl"``, ``"parquet"`` or ``"hf"`` for the input ``path``; a ``UsageError`` for a folder that
    is not a saved dataset (naming it and what to give)."""
    path = os.fspath(path)
    if path == "-":
        return "jsonl"
    if hub_dataset(path) is not None:
        return hub_files(path, arg)[0]
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
    if hub_dataset(path) is not None:  # its files one after the other, each read as a local file of its kind
        files = hub_files(os.fspath(path), arg)[1]
        if kind == "parquet":
            its = [_parquet_records(f, arg, check_values) for f in files]
        else:
            its = [iter_jsonl(f, progress=progress, arg=arg, check_values=check_values, **jsonl_options) for f in files]
        return itertools.chain.from_iterable(its)
    if kind == "parquet":
        return _parquet_records(os.fspath(path), arg, check_values)
    if kind == "hf":
        return _hf_records(os.fspath(path), arg, check_values)
    return iter_jsonl(path, progress=progress, arg=arg, check_values=check_values, **jsonl_options)


def parquet_schema(path: str) -> Any:
    """The Arrow schema of a Parquet file or Hub dataset (its first file), for writing the kept records back
    with the same column types."""
    import pyarrow.parquet as pq

    if hub_dataset(path) is not None:
        path = hub_files(os.fspath(path))[1][0]
    return pq.read_schema(path)
