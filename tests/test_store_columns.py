"""Format 3: ids and metadata columns stored as arrays (columns.safetensors), ScoreStore.from_arrays, and
format-2 stores (ids.json, fields.json) still readable."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import gradsel_core as gs
from gradsel_core.store import COLUMNS_FILE, FIELDS_FILE, IDS_FILE, MANIFEST, json_bytes, sha256_bytes


def _cols(n=7):
    rng = np.random.default_rng(0)
    return dict(norms=rng.random(n).astype(np.float32), losses=rng.random(n), tokens=rng.integers(0, 9, n))


def _same(store, other):
    assert store.ids.tolist() == other.ids.tolist() and store.ids.dtype == other.ids.dtype
    assert list(store.fields) == list(other.fields)
    for k in store.fields:
        a, b = store.fields[k], other.fields[k]
        assert a.dtype == b.dtype, k
        assert [None if v != v else v for v in a.tolist()] == [None if v != v else v for v in b.tolist()], k
    for k in ("norms", "losses", "tokens"):
        assert np.array_equal(getattr(store, k), getattr(other, k))


def test_from_arrays_round_trip_every_column_kind(tmp_path):
    fields = {
        "task": ["a", "b", "a", "c", "b", "a", "é\n"],  # strings: dictionary codes
        "flag": np.array([True, False, True, True, False, False, True]),
        "n": np.arange(7) * 10,
        "x": [0.5, None, 1.5, 2.0, None, 3.0, 4.0],  # numbers with missing: float64 with NaN
        "mixed": ["1", 1, None, "x", 2.5, "y", "z"],  # kinds mixed: fields.json
        "nul": ["a\x00b", "c", "d", "e", "f", "g", "h"],  # holds the separator: fields.json
    }
    ids = np.array([f"r{i}" for i in range(7)])
    store = gs.ScoreStore.from_arrays(tmp_path / "s", ids=ids, fields=fields, shard_size=3, **_cols())
    names = set(os.listdir(tmp_path / "s"))
    assert COLUMNS_FILE in names and FIELDS_FILE in names and IDS_FILE not in names
    assert set(json.loads((tmp_path / "s" / FIELDS_FILE).read_text())) == {"mixed", "nul"}
    assert store.ids.tolist() == ids.tolist() and store.ids.dtype == object
    assert store.fields["task"].tolist() == fields["task"] and store.fields["task"].dtype == object
    assert store.fields["flag"].dtype == bool and store.fields["n"].dtype == np.int64
    assert np.isnan(store.fields["x"][1]) and store.fields["x"][2] == 1.5
    assert store.fields["mixed"].tolist() == fields["mixed"] and store.fields["nul"][0] == "a\x00b"
    assert list(store.fields) == list(fields)
    assert len(store.meta["shards"]) == 3 and store.meta["format_version"] == 3
    _same(store, gs.ScoreStore.open(tmp_path / "s"))
    sel = gs.select(store, policy="keep_top", ratio=0.5, group_by="task")
    assert sel.summary["n_groups"] == 4


def test_string_ids_holding_the_separator_go_to_ids_json(tmp_path):
    ids = ["a\x00", "b", "c"]
    store = gs.ScoreStore.from_arrays(tmp_path / "s", ids=np.array(ids, dtype=object), **_cols(3))
    assert IDS_FILE in os.listdir(tmp_path / "s") and store.ids.tolist() == ids
    _same(store, gs.ScoreStore.open(tmp_path / "s"))


def test_format_2_store_stays_readable(tmp_path):
    """The same store written as format 2 (ids.json and fields.json, no columns file) reads the same."""
    fields = {"task": ["a", "b", "a", "c", "b", "a", "d"], "n": list(range(7))}
    out = tmp_path / "s"
    v3 = gs.ScoreStore.from_arrays(out, ids=np.arange(7) * 3, fields=fields, **_cols())
    m = json.loads((out / MANIFEST).read_text())
    os.unlink(out / COLUMNS_FILE)
    for name, doc in ((IDS_FILE, {"kind": "int", "ids": v3.ids.tolist()}), (FIELDS_FILE, fields)):
        data = json_bytes(doc)
        (out / name).write_bytes(data)
        m["files"][name], m["file_sizes"][name] = sha256_bytes(data), len(data)
    m["files"].pop(COLUMNS_FILE)
    m["file_sizes"].pop(COLUMNS_FILE)
    m["format_version"] = 2
    (out / MANIFEST).write_text(json.dumps(m))
    _same(gs.ScoreStore.open(out), v3)


def test_corrupted_columns_file_is_named(tmp_path):
    out = tmp_path / "s"
    gs.ScoreStore.from_arrays(out, fields={"task": list("abcabca")}, **_cols())
    b = bytearray((out / COLUMNS_FILE).read_bytes())
    b[-1] ^= 1
    (out / COLUMNS_FILE).write_bytes(bytes(b))
    with pytest.raises(gs.StoreError, match="columns.safetensors: checksum mismatch"):
        gs.ScoreStore.open(out)
    with pytest.raises(gs.StoreError, match="columns.safetensors"):
        gs.ScoreStore.open(out, verify=False)


def test_from_arrays_refusals(tmp_path):
    c = _cols(3)
    with pytest.raises(gs.UsageError, match="ids must be unique"):
        gs.ScoreStore.from_arrays(tmp_path / "a", ids=[1, 1, 2], **c)
    with pytest.raises(gs.UsageError, match=r"losses must have shape \(3,\)"):
        gs.ScoreStore.from_arrays(tmp_path / "b", c["norms"], np.ones(4))
    with pytest.raises(gs.UsageError, match="loss_reduction"):
        gs.ScoreStore.from_arrays(tmp_path / "c", loss_reduction="max", **c)
    gs.ScoreStore.from_arrays(tmp_path / "d", **c)
    with pytest.raises(gs.StoreConflictError, match="overwrite=True"):
        gs.ScoreStore.from_arrays(tmp_path / "d", **c)
    again = gs.ScoreStore.from_arrays(tmp_path / "d", overwrite=True, ids=[5, 6, 7], **c)
    assert gs.ScoreStore.open(tmp_path / "d").ids.tolist() == [5, 6, 7] == again.ids.tolist()
    empty = gs.ScoreStore.from_arrays(tmp_path / "e", np.zeros(0), np.zeros(0))
    assert len(empty) == 0 and len(gs.ScoreStore.open(tmp_path / "e")) == 0


@pytest.mark.parametrize("ids", [None, np.array([9, 3, 5, 1, 7, 2, 4]), np.array(list("gfedcba"), dtype=object)])
def test_select_lines_are_the_json_of_each_row(tmp_path, ids):
    """``gradsel select`` formats its JSONL from columns: the same bytes as one json.dumps per row, NaN too."""
    from gradsel_core.commands.select import _score_lines, _score_rows

    c = _cols()
    c["norms"][2] = np.nan
    store = gs.ScoreStore.from_arrays(tmp_path / "s", ids=ids, **c)
    kept = np.array([0, 2, 3, 6])
    want = [json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in _score_rows(store, kept)]
    def lines(blocks):  # a LineBlock holds several lines: split them back, and its row count must match
        out = []
        for b in blocks:
            got = b.splitlines(keepends=True)
            assert len(got) == getattr(b, "rows", 1)
            out += got
        return out

    assert lines(_score_lines(store, kept, chunk=2)) == want
    assert lines(_score_lines(store, kept[[0, 2, 3]])) == [w for w in want if "null" not in w]


def test_cpu_thread_count_is_part_of_the_identity(tmp_path):
    """Another torch thread count changes the last bits of CPU norms: a resume at another count is refused
    (naming it), the same count resumes."""
    import torch

    from gradsel_core.models import TinyGPT, TinyGPTConfig

    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, max_seq_len=32))
    g = torch.Generator().manual_seed(0)
    recs = [{"input_ids": torch.randint(0, 50, (5 + i,), generator=g).tolist()} for i in range(6)]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        store = gs.score_dataset(model, recs, tmp_path / "s", batch_size=4, progress=False)
        assert store.meta["config"]["cpu_threads"] == 1
        torch.set_num_threads(2)
        with pytest.raises(gs.StoreConflictError, match=r"config\.cpu_threads.*1 CPU thread\(s\), this run has 2"):
            gs.score_dataset(model, recs, tmp_path / "s", batch_size=4, progress=False)
        torch.set_num_threads(1)
        again = gs.score_dataset(model, recs, tmp_path / "s", batch_size=4, progress=False)
        assert again.run["records_scored"] == 0
    finally:
        torch.set_num_threads(n)


def test_grouping_by_stored_codes_equals_grouping_by_values(tmp_path):
    rng = np.random.default_rng(3)
    labels = np.array([f"g{k}" for k in range(120)], dtype=object)[rng.integers(0, 120, 2000)]
    c = {"norms": rng.random(2000).astype(np.float32), "losses": rng.random(2000), "tokens": rng.integers(1, 9, 2000)}
    store = gs.ScoreStore.open(gs.ScoreStore.from_arrays(tmp_path / "s", fields={"g": labels}, **c).path)
    codes, distinct = store.field_codes("g")
    assert distinct[codes].tolist() == labels.tolist()
    for policy in ("median_band", "random"):
        a = gs.select(store, policy=policy, ratio=0.3, group_by="g")
        b = gs.select({**c, "g": labels.copy()}, policy=policy, ratio=0.3, group_by="g")
        assert np.array_equal(a.kept_mask, b.kept_mask) and list(a.summary["groups"]) == list(b.summary["groups"])
    with pytest.raises(ValueError):
        store.fields["g"][0] = "other"  # read-only: the codes stay true to the column
    store.fields["g"] = labels[::-1].copy()  # replaced: the codes are not used
    assert store.field_codes("g") is None
    assert gs.select(store, ratio=0.3, group_by="g").summary["n_groups"] == 120


def test_default_batching_is_a_token_budget(tmp_path, monkeypatch):
    """Neither batch_size nor max_tokens: batches of at most DEFAULT_MAX_TOKENS padded tokens, no record cap
    (short records share big batches, long ones small); an explicit batch_size alone caps records only."""
    import torch

    import gradsel_core.scoring as scoring
    from gradsel_core.models import TinyGPT, TinyGPTConfig

    monkeypatch.setattr(scoring, "DEFAULT_MAX_TOKENS", 64)
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, max_seq_len=40))
    g = torch.Generator().manual_seed(0)
    lengths = [4] * 40 + [30] * 4
    recs = [{"input_ids": torch.randint(0, 50, (n,), generator=g).tolist()} for n in lengths]
    store = gs.score_dataset(model, recs, tmp_path / "s", progress=False)
    cfg = store.meta["config"]
    assert cfg["batch_size"] is None and cfg["max_tokens"] == 64
    planned = gs.data.plan_batches(lengths, None, 64, cfg["shard_size"])
    batches = [b for sh in planned for b in sh.batches]
    assert max(len(b) * max(lengths[i] for i in b) for b in batches) <= 64
    assert max(len(b) for b in batches) == 16 and min(len(b) for b in batches) == 2  # 16 x 4 tokens, 2 x 30
    assert store.meta["counts"]["batches"] == len(batches)
    capped = gs.score_dataset(model, recs, tmp_path / "c", batch_size=8, progress=False)
    assert capped.meta["config"]["batch_size"] == 8 and capped.meta["config"]["max_tokens"] is None


def test_cli_select_score_and_diagnostics(tmp_path, capsys):
    from gradsel_core.cli import main

    tokens = np.array([1, 4, 9, 16])
    gs.ScoreStore.from_arrays(tmp_path / "s", np.array([4.0, 2.0, 1.0, 1.0]), np.ones(4), tokens)
    out, summ = tmp_path / "kept.jsonl", tmp_path / "kept.summary.json"
    base = ["select", "--scores", str(tmp_path / "s"), "--out", str(out), "--policy", "keep_bottom", "--ratio", "0.25"]
    assert main(base) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [2]  # lowest norm, first of a tie
    assert "norm_tokens_spearman" not in json.loads(summ.read_text())
    assert main(base + ["--score", "norm_per_token", "--diagnostics"]) == 0  # keys sqrt(n) * norm: 4, 4, 3, 4
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [2]
    s = json.loads(summ.read_text())
    assert s["score"] == "norm_per_token" and "norm_tokens_spearman" in s
    assert main(base[:-1] + ["0.5", "--score", "norm_per_token"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 2]


def test_inspect_groups_by_codes_as_by_values(tmp_path):
    """gradsel inspect --by: the vectorized grouping gives the groups a value-at-a-time pass gives."""
    from gradsel_core.commands.inspect import split_groups

    rng = np.random.default_rng(4)
    n = 500
    cols = {"s": np.array(["b", "a", None, "c"], dtype=object)[rng.integers(0, 4, n)],
            "f": np.array([2.5, np.nan, 1.0])[rng.integers(0, 3, n)], "i": rng.integers(0, 30, n),
            "m": np.array(["1", 1, None, "x"], dtype=object)[rng.integers(0, 4, n)]}
    store = gs.ScoreStore.open(gs.ScoreStore.from_arrays(tmp_path / "s", rng.random(n), rng.random(n),
                                                         fields=cols).path)
    for name in cols:
        col = store.fields[name].tolist()
        keys = ["(missing)" if v is None or (isinstance(v, float) and v != v) else str(v) for v in col]
        groups, total = split_groups(store, name, max_groups=5)
        assert total == len(set(keys))
        for label, mask in groups:
            assert np.array_equal(mask, np.array([k == label for k in keys]))
        assert [lab for lab, _ in groups] == sorted(lab for lab, _ in groups)


def test_write_shard_streams_the_bytes_encode_shard_gives(tmp_path):
    """The columns file of a streaming run is written tensor by tensor: the same bytes, sha256 and size as
    the in-memory encoding, and the side files equal side_file_docs'."""
    import hashlib

    from gradsel_core.store import encode_shard, side_file_docs, write_shard, write_side_files

    rng = np.random.default_rng(0)
    tensors = {"b": rng.random(7).astype(np.float32), "a": np.arange(5, dtype=np.int64),
               "empty": np.zeros((0, 3), dtype=np.uint8)}
    meta = {"kind": "test", "n": 7}
    sha, size = write_shard(str(tmp_path / "x"), tensors, meta)
    want = bytes(encode_shard(tensors, meta))
    assert (tmp_path / "x").read_bytes() == want and size == len(want) and sha == hashlib.sha256(want).hexdigest()
    ids = [f"r{i}" for i in range(6)]
    fields = {"task": ["a", "b"] * 3, "w": [1.5, None, 2.0, 3.0, 4.0, 5.0], "odd": [{"x": 1}] * 6}
    digests = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(6)]
    d = tmp_path / "store"
    d.mkdir()
    side = write_side_files(str(d), "str", ids, fields, digests)
    docs = dict(side_file_docs("str", ids, fields, digests))
    assert sorted(side) == sorted(docs)
    for name, doc in docs.items():
        assert (d / name).read_bytes() == bytes(doc)
        assert side[name] == (hashlib.sha256(bytes(doc)).hexdigest(), len(doc))
