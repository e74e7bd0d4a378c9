"""Streaming scoring (issue #24 item 1): windows read, tokenized and scored one at a time; per-window data
hashes; reruns that check finished windows without tokenizing; edited records refused by name; ranks that
read only their own windows; resume after an interruption mid-window."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from gradsel_core import GradNormEngine
from gradsel_core.data import ByteTokenizer, collate, plan_batches
from gradsel_core.models import TinyGPT, TinyGPTConfig
from gradsel_core.scoring import score_dataset
from gradsel_core.store import ScoreStore, StoreConflictError, repair_store
from gradsel_core.windows import CHECK, READ, SKIP, JsonlFile, Want, iter_windows

KW = dict(batch_size=4, shard_size=8, backend="auto", progress=False)


def tiny(seed=0, vocab=259):
    torch.manual_seed(seed)
    return TinyGPT(TinyGPTConfig(vocab_size=vocab, d_model=16, n_layer=1, n_head=2, max_seq_len=64))


def token_records(n, seed=0, vocab=50):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, vocab, int(rng.integers(2, 30))).tolist(), "id": f"r{i}",
             "task": "a" if i % 3 else "b", "w": i * 0.5} for i in range(n)]


def text_records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": i, "text": "x" * int(rng.integers(1, 20)) + str(i), "task": ["a", "b"][i % 2]} for i in range(n)]


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.calls = 0

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        return super().encode(text, add_special_tokens=add_special_tokens)


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_streaming_equals_the_whole_dataset_plan_scored_batch_by_batch(tmp_path):
    """The old path's numbers: the plan over the whole dataset (windows of shard_size), each batch scored by the
    engine; the streamed store is bitwise equal, with ids, fields and the data totals."""
    model = tiny(vocab=50)
    recs = token_records(21)
    store = score_dataset(model, recs, str(tmp_path / "s"), **KW)
    eng = GradNormEngine(model, backend="auto")
    norms = np.zeros(21, dtype=np.float32)
    losses = np.zeros(21, dtype=np.float32)
    for sh in plan_batches([len(r["input_ids"]) for r in recs], 4, None, 8, warn=False):
        for b in sh.batches:
            res = eng.score(collate([recs[p] for p in b], 0))
            norms[list(b)] = res.norms.float().numpy()
            losses[list(b)] = res.losses.float().numpy()
    assert np.array_equal(store.norms, norms) and np.array_equal(store.losses, losses)
    assert store.ids.tolist() == [r["id"] for r in recs]
    assert store.fields["task"].tolist() == [r["task"] for r in recs]
    assert store.fields["w"].dtype == np.float64 and store.fields["w"].tolist() == [r["w"] for r in recs]
    m = ScoreStore.open(str(tmp_path / "s")).meta
    assert m["data"]["n_records"] == 21 and m["data"]["id_kind"] == "str" and len(m["data"]["sha256"]) == 64
    assert [s["window"]["count"] for s in m["shards"]] == [8, 8, 5]


def test_fields_of_mixed_kinds_across_windows_are_assembled_as_one_column(tmp_path):
    model = tiny(vocab=50)
    recs = token_records(20)
    for i, r in enumerate(recs):
        r.pop("w")
        if i >= 8:
            r["n"] = i if i < 16 else i + 0.5  # window 1: ints, window 2: floats, window 0: missing
        r["mix"] = i if i < 8 else f"s{i}"
    store = score_dataset(model, recs, str(tmp_path / "s"), **KW)
    from gradsel_core.store import column_array

    assert store.fields["n"].dtype == column_array([r.get("n") for r in recs]).dtype == np.float64
    assert np.array_equal(store.fields["n"], column_array([r.get("n") for r in recs]), equal_nan=True)
    assert store.fields["mix"].tolist() == [r["mix"] for r in recs]
    with pytest.raises(ValueError, match=r"duplicate ids: 'r3' \(records 3 and 17\)"):
        recs[17]["id"] = "r3"
        score_dataset(model, recs, str(tmp_path / "d"), **KW)


def test_records_alive_are_bounded_by_the_window(tmp_path):
    """A generator of records that counts how many are alive at once: a window's worth, never the dataset."""
    alive = {"now": 0, "max": 0}

    class Rec(dict):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            alive["now"] += 1
            alive["max"] = max(alive["max"], alive["now"])

        def __del__(self):
            alive["now"] -= 1

    def gen():
        for i, t in enumerate(text_records(200)):
            yield Rec(t)

    tok = ByteTokenizer()
    store = score_dataset(tiny(), gen(), str(tmp_path / "s"), tokenizer=tok, max_length=32, **KW)
    assert len(store) == 200
    assert alive["max"] <= 2 * KW["shard_size"] + 2, alive  # at most a window (plus the one read ahead)


def test_rerun_and_resume_tokenize_only_what_is_missing(tmp_path):
    recs = text_records(40)
    out = str(tmp_path / "s")
    tok = CountingTokenizer()
    first = score_dataset(tiny(), recs, out, tokenizer=tok, max_length=32, **KW)
    assert tok.calls == 41  # every record once, plus the backend probe
    tok.calls = 0
    again = score_dataset(tiny(), recs, out, tokenizer=tok, max_length=32, **KW)
    assert tok.calls == 1 and again.run["records_scored"] == 0  # the probe only
    os.unlink(os.path.join(out, "shard-000002-r0.safetensors"))
    os.unlink(os.path.join(out, "manifest.json"))
    tok.calls = 0
    resumed = score_dataset(tiny(), recs, out, tokenizer=tok, max_length=32, **KW)
    assert tok.calls == 1 + 8 and resumed.run["records_scored"] == 8
    assert np.array_equal(resumed.norms, first.norms) and resumed.ids.tolist() == first.ids.tolist()
    assert resumed.record_sha256 is not None and len(resumed.record_sha256) == 40


@pytest.mark.parametrize("kind", ["list", "jsonl"])
def test_an_edited_record_in_a_finished_window_is_refused_naming_it(tmp_path, kind):
    recs = text_records(30)
    out = str(tmp_path / "s")

    def data(rs):
        return JsonlFile(write_jsonl(tmp_path / "d.jsonl", rs)) if kind == "jsonl" else rs

    score_dataset(tiny(), data(recs), out, tokenizer=ByteTokenizer(), max_length=32, **KW)
    edited = [dict(r) for r in recs]
    edited[11]["text"] += "!"
    with pytest.raises(StoreConflictError, match=r"window 1 \(records \[8, 16\)\).*record 11 \(id 11\)"):
        score_dataset(tiny(), data(edited), out, tokenizer=ByteTokenizer(), max_length=32, **KW)
    # unfinished store: the same refusal (window 0 finished, the rest missing)
    for name in os.listdir(out):
        if name.startswith("shard-00000") and not name.startswith("shard-000000"):
            os.unlink(os.path.join(out, name))
    os.unlink(os.path.join(out, "manifest.json"))
    edited = [dict(r) for r in recs]
    edited[2]["task"] = "zz"
    with pytest.raises(StoreConflictError, match=r"window 0 \(records \[0, 8\)\).*record 2 \(id 2\)"):
        score_dataset(tiny(), data(edited), out, tokenizer=ByteTokenizer(), max_length=32, **KW)
    more = recs + text_records(3, seed=5)
    for i, r in enumerate(more):
        r["id"] = i
    store = score_dataset(tiny(), data(recs), out, tokenizer=ByteTokenizer(), max_length=32, **KW)
    assert len(store) == 30
    with pytest.raises(StoreConflictError, match="records"):  # records added at the end of a complete store
        score_dataset(tiny(), data(more), out, tokenizer=ByteTokenizer(), max_length=32, **KW)


def test_jsonl_rerun_checks_bytes_and_accepts_a_whitespace_change(tmp_path):
    recs = text_records(20)
    path = tmp_path / "d.jsonl"
    out = str(tmp_path / "s")
    first = score_dataset(tiny(), JsonlFile(write_jsonl(path, recs)), out, tokenizer=CountingTokenizer(), max_length=32,
                          **KW)
    assert [sh["window"]["bytes"][0] for sh in first.meta["shards"]][:2] == [0, first.meta["shards"][0]["window"]["bytes"][1]]
    path.write_text("".join(json.dumps(r, indent=None, separators=(", ", ":  ")) + "\n\n" for r in recs))
    tok = CountingTokenizer()
    again = score_dataset(tiny(), JsonlFile(str(path)), out, tokenizer=tok, max_length=32, **KW)
    assert tok.calls == 1 and np.array_equal(again.norms, first.norms)  # same content, other bytes: no work


def test_ranks_read_only_their_windows(tmp_path):
    class Counting(list):
        reads = []

        def __getitem__(self, i):
            Counting.reads.append(i)
            return list.__getitem__(self, i)

    data = Counting(range(20))
    got = [(w.index, w.start, w.count) for w in iter_windows(data, 8, lambda s: Want(READ if s % 2 == 1 else SKIP))]
    assert got == [(0, 0, 8), (1, 8, 8), (2, 16, 4)]
    assert sorted(Counting.reads) == list(range(8, 16))  # rank 1 of 2: window 1 only
    recs = text_records(20)
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    wins = list(iter_windows(JsonlFile(path), 8, lambda s: Want(READ if s % 2 == 0 else SKIP)))
    assert [w.records is None for w in wins] == [False, True, False]  # rank 0's windows parsed, the other counted
    assert [r["id"] for r in wins[2].records] == list(range(16, 20))
    done = {w.index: w.bytes for w in wins}
    checked = list(iter_windows(JsonlFile(path), 8, lambda s: Want(CHECK, done.get(s))))
    assert all(w.bytes_ok and w.records is None for w in checked)  # finished windows: their bytes only


def test_resume_after_an_interruption_mid_window_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    recs = token_records(30)
    ref = score_dataset(tiny(vocab=50), recs, str(tmp_path / "ref"), **KW)
    out = str(tmp_path / "s")
    calls = {"n": 0}
    real = GradNormEngine.score

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # window 1's second batch (2 batches of 4 per window): window 0 is written, window 1 is not
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(GradNormEngine, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(tiny(vocab=50), recs, out, **KW)
    monkeypatch.setattr(GradNormEngine, "score", real)
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == ["shard-000000-r0.safetensors"]
    store = score_dataset(tiny(vocab=50), recs, out, **KW)
    assert store.run["records_scored"] == 22
    for name in sorted(n for n in os.listdir(out) if n.startswith("shard-")):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(tmp_path / "ref", name), "rb") as b:
            assert a.read() == b.read(), name
    assert np.array_equal(store.norms, ref.norms) and store.ids.tolist() == ref.ids.tolist()


def test_repair_a_streaming_store_and_dry_run_and_an_iterable(tmp_path):
    recs = token_records(20)
    out = str(tmp_path / "s")
    store = score_dataset(tiny(vocab=50), iter(recs), out, **KW)  # a one-pass iterable
    dry = score_dataset(tiny(vocab=50), recs, out, dry_run=True, **KW)
    assert dry.records == 20 and dry.shards == 3 and dry.out_state.startswith("complete")
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write("{broken")
    rep = repair_store(out)
    assert rep.complete and rep.shards_planned == 3
    again = ScoreStore.open(out)
    assert np.array_equal(again.norms, store.norms) and again.fields["task"].tolist() == store.fields["task"].tolist()


def test_a_store_of_the_whole_dataset_hash_is_refused_with_the_way_out(tmp_path):
    """A store scored before streaming (one hash of the whole dataset) cannot be rechecked window by window."""
    recs = token_records(10)
    out = str(tmp_path / "s")
    score_dataset(tiny(vocab=50), recs, out, **KW)
    path = os.path.join(out, "manifest.json")
    m = json.load(open(path))
    m["data"] = {"n_records": 10, "sha256": "0" * 64, "id_kind": "str"}
    m["run_key"] = "1" * 64
    json.dump(m, open(path, "w"))
    with pytest.raises(StoreConflictError, match="before streaming scoring.*--overwrite"):
        score_dataset(tiny(vocab=50), recs, out, **KW)
    assert len(score_dataset(tiny(vocab=50), recs, out, overwrite=True, **KW)) == 10
