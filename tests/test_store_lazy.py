"""The end of a streaming run in O(window) memory and the lazy ``ScoreStore.open`` (issue #24: peak RSS flat
in N): a lazily opened store gives the columns an eager read gives; the columns file assembled window by
window from spools is byte for byte the whole columns' encoding; the merge holds no whole column."""
from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
import torch

from gradsel_core import scoring
from gradsel_core.data import ByteTokenizer
from gradsel_core.jsonl import record_digest
from gradsel_core.models import TinyGPT, TinyGPTConfig
from gradsel_core.scoring import score_dataset
from gradsel_core.store import (
    COLUMNS_FILE, MANIFEST, ScoreStore, Spool, StoreError, Summary, decode_columns, decode_shard,
    encode_columns, encode_shard, read_store_file, summarize, write_shard,
)
from gradsel_core.windows import JsonlFile


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(TinyGPTConfig(vocab_size=259, d_model=8, n_layer=1, n_head=1, max_seq_len=64))


def jsonl_records(n, str_ids=False):
    rng = np.random.default_rng(0)
    return [{"id": f"r{i}" if str_ids else i, "text": "x" * int(rng.integers(1, 12)) + str(i), "task": "abc"[i % 3],
             "n": i * 3, "w": i * 0.25, "ok": bool(i % 2)} for i in range(n)]


def score_jsonl(tmp_path, recs, name="s", shard_size=7):
    p = tmp_path / f"{name}.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return score_dataset(tiny(), JsonlFile(str(p)), str(tmp_path / name), tokenizer=ByteTokenizer(), max_length=64,
                         shard_size=shard_size, batch_size=4, progress=False)


def eager_read(path):
    """The store's columns read whole, the way ``open`` read them before it was lazy."""
    m = json.loads(open(os.path.join(path, MANIFEST)).read())
    n = m["counts"]["records"]
    ids, fields, _, _, digests = decode_columns(read_store_file(path, COLUMNS_FILE), COLUMNS_FILE, n)
    parts = {}
    for sh in m["shards"]:
        tensors, _ = decode_shard(read_store_file(path, sh["file"]), sh["file"])
        for k, v in tensors.items():
            if k != "positions" and not k.startswith("col."):
                parts.setdefault(k, []).append(v)
    return ids, fields, digests, {k: np.concatenate(v) for k, v in parts.items()}


def test_lazy_open_gives_the_eager_columns_and_reads_nothing_at_open(tmp_path):
    recs = jsonl_records(40)
    score_jsonl(tmp_path, recs)
    store = ScoreStore.open(str(tmp_path / "s"))
    assert store._vals == {} and len(store) == 40  # nothing read: the count is the manifest's
    ids, fields, digests, parts = eager_read(str(tmp_path / "s"))
    assert np.array_equal(store.ids, ids) and store.ids.dtype == np.int64
    for k in ("norms", "losses", "tokens"):
        got = getattr(store, k)
        assert got.dtype == parts[k].dtype and got.tobytes() == parts[k].tobytes(), k
    assert list(store.fields) == list(fields)
    for k in fields:
        assert store.fields[k].dtype == fields[k].dtype and np.array_equal(store.fields[k], fields[k]), k
    assert [store.record_sha256[i] for i in range(40)] == [digests[i] for i in range(40)] == [record_digest(r) for r in recs]
    assert store.per_param is None and store.dots is None
    assert store.field_codes("task") is not None
    assert store.summary() == summarize(parts["norms"], parts["losses"], parts["tokens"])


def test_lazy_open_of_from_arrays_store_with_per_param_dots_and_str_ids(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    cols = dict(norms=rng.random(n), losses=rng.random(n), tokens=rng.integers(1, 9, n))
    pp = {"a.weight": rng.random(n), "b.bias": rng.random(n)}
    dots = rng.random((n, 2))
    ids = np.array([f"id{i}" for i in range(n)], dtype=object)
    store = ScoreStore.from_arrays(str(tmp_path / "a"), **cols, ids=ids, per_param=pp, dots=dots, cosines=dots[:, 0],
                                   fields={"g": np.array(["x", "y"], dtype=object)[np.arange(n) % 2]}, shard_size=64)
    assert store._vals == {}
    assert np.array_equal(store.norms, cols["norms"].astype(np.float32)) and np.array_equal(store.ids, ids)
    assert set(store.per_param) == set(pp) and all(np.array_equal(store.per_param[k], pp[k].astype(np.float32)) for k in pp)
    assert store.dots.shape == (n, 2) and np.array_equal(store.dots, dots.astype(np.float32))
    assert np.array_equal(store.cosines, dots[:, 0].astype(np.float32))
    assert store.fields["g"].tolist() == ["x", "y"] * (n // 2)


def test_lazy_store_refuses_a_shard_changed_after_open_but_not_one_rewritten_with_the_same_bytes(tmp_path):
    score_jsonl(tmp_path, jsonl_records(30))
    out = tmp_path / "s"
    shard = sorted(p for p in os.listdir(out) if p.startswith("shard-"))[1]
    data = (out / shard).read_bytes()
    store = ScoreStore.open(str(out))
    (out / shard).unlink()
    (out / shard).write_bytes(data)  # a new inode, the same bytes (a resume rewrites shards this way)
    assert len(store.norms) == 30
    store = ScoreStore.open(str(out))
    bad = bytearray(data)
    bad[-3] ^= 1
    (out / shard).unlink()
    (out / shard).write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=shard):
        store.norms


@pytest.mark.parametrize("str_ids", [False, True])
def test_streamed_columns_file_is_the_whole_columns_encoding(tmp_path, str_ids):
    """The columns file the merge writes from spools, window by window, is byte for byte what encoding the
    whole columns at once gives (``encode_columns``), with every field kind and a field that is missing in
    some windows and of mixed kinds (the in-memory fallback)."""
    recs = jsonl_records(61, str_ids)
    for i, r in enumerate(recs):
        if i % 13:
            r["sparse"] = i
        r["mix"] = i if i < 25 else f"s{i}"
    store = score_jsonl(tmp_path, recs)
    out = str(tmp_path / "s")
    assert not [f for f in os.listdir(out) if f.startswith(".gradsel-tmp-")]  # the spools are removed
    ids = [r["id"] for r in recs]
    fields = {k: [r.get(k) for r in recs] for k in sorted(["task", "n", "w", "ok", "sparse", "mix"])}
    want, _, rest = encode_columns("str" if str_ids else "int", ids, fields, [record_digest(r) for r in recs])
    assert read_store_file(out, COLUMNS_FILE) == bytes(want)
    assert set(rest) == {"mix", "sparse"}  # ints and strings, ints and None: fields.json, as before
    assert store.fields["sparse"][0] is None and store.fields["sparse"][1] == 1 and store.fields["mix"][30] == "s30"
    assert store.ids.tolist() == ids


def test_spool_layout_equals_the_array_layout(tmp_path):
    """A shard written from spools (chunk by chunk, converted on the way) has the bytes of the same arrays."""
    rng = np.random.default_rng(0)
    arrays = {"a": rng.integers(0, 5, 1000), "b": rng.random(777), "d": rng.integers(0, 255, (300, 16)).astype(np.uint8)}
    spools = {}
    for k, a in arrays.items():
        sp = Spool(str(tmp_path), k, np.int64 if k == "a" else a.dtype, a.shape[1:])
        for lo in range(0, len(a), 97):
            sp.append(a[lo:lo + 97])
        spools[k] = sp
    spools["a"] = spools["a"].astype(np.int32)
    arrays["a"] = arrays["a"].astype(np.int32)
    want = encode_shard(arrays, {"x": 1})
    sha, size = write_shard(str(tmp_path / "f.safetensors"), spools, {"x": 1})
    assert (tmp_path / "f.safetensors").read_bytes() == bytes(want) and size == len(want)
    assert bytes(encode_shard(spools, {"x": 1})) == bytes(want)
    for sp in spools.values():
        sp.remove()


def test_summary_shard_by_shard_equals_summarize():
    rng = np.random.default_rng(3)
    norms = rng.gamma(2, 1, 1001).astype(np.float32)
    norms[::9], norms[5] = np.nan, np.inf
    losses, tokens = rng.normal(size=1001).astype(np.float32), rng.integers(0, 50, 1001)
    acc = Summary(1001)
    for lo in range(0, 1001, 64):
        acc.add(norms[lo:lo + 64], losses[lo:lo + 64], tokens[lo:lo + 64])
    finite = norms[np.isfinite(norms)].astype(np.float64)
    got, want = acc.result(), summarize(norms, losses, tokens)
    assert got == want
    assert want["norm_median"] == float(np.quantile(finite, 0.5)) and want["norm_mean"] == float(finite.mean())


def _merge_peak(tmp_path, n, window):
    """tracemalloc peak (bytes) of the end-of-run merge of an n-record store scored in windows of ``window``."""
    recs = jsonl_records(n, str_ids=True)
    score_jsonl(tmp_path, recs, name=f"m{n}", shard_size=window)
    out = str(tmp_path / f"m{n}")
    m = json.loads(open(os.path.join(out, MANIFEST)).read())
    _, meta = decode_shard(read_store_file(out, m["shards"][0]["file"]))
    args = (out, n, window, m["run_key"], meta["identity"], m["created"], m["versions"], {})
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        store = scoring._merge(*args)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(store) == n and store._vals == {}
    return peak


def test_merge_holds_one_window_not_the_columns(tmp_path, monkeypatch):
    """From 2,000 to 16,000 records (windows of 1,000) the merge's peak grows by the summary's finite norms and
    the duplicate-id keys (8 + 8 bytes a record) and per-window bookkeeping, not by the columns: holding them
    (str ids, digests, field codes, scores) costs over 60 bytes a record. Spools are read in chunks of 16 KiB
    here (1 MiB in use: at this size a whole column would fit in one chunk)."""
    import gradsel_core.store as st

    monkeypatch.setattr(st, "CHUNK_BYTES", 1 << 14)
    small, big = _merge_peak(tmp_path, 2000, 1000), _merge_peak(tmp_path, 16000, 1000)
    per_record = (big - small) / 14000
    assert per_record < 20, f"merge peak grows {per_record:.1f} bytes a record ({small} -> {big} bytes)"
