"""``--data`` as Parquet and as a ``datasets.save_to_disk`` folder (issue #24 item 4): the same scores and
per-record content hashes as the same records given as JSONL, ``select --data`` writing the kept records
back in the input's format, one-line errors naming the file for bad input, and ``score_dataset`` on a
streaming ``IterableDataset``. Tiny model, tiny files: seconds."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gradsel_core.cli import main
from gradsel_core.store import ScoreStore

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.needs_datasets]
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


def _records(n: int = 12):
    """Every record kind (text, prompt + response, messages, input_ids), with ids and metadata."""
    out = []
    for i in range(n):
        r = {"id": f"r{i:02d}", "task": ("a", "b", "c")[i % 3], "w": 0.1 * i}
        kind = i % 4
        if kind == 0:
            r["text"] = "alpha beta " * (1 + i % 5) + "é"
        elif kind == 1:
            r.update(prompt=f"Q{i}: what?", response=" ok" * (1 + i % 3))
        elif kind == 2:
            r["messages"] = CHAT
        else:
            r["input_ids"] = [1 + (7 * i + j) % 200 for j in range(3 + i % 4)]
        out.append(r)
    return out


def _columns(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def _write_all(d, rows):
    """The same records as JSONL, Parquet (small row groups: several batches) and a datasets folder."""
    jl = d / "data.jsonl"
    jl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pqf = d / "data.parquet"
    pq.write_table(pa.Table.from_pydict(_columns(rows)), pqf, row_group_size=5)
    hf = d / "data_ds"
    datasets.Dataset.from_dict(_columns(rows)).save_to_disk(str(hf))
    return str(jl), str(pqf), str(hf)


def _run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _score(capsys, data, out):
    rc, _, err = _run(capsys, ["score", "--model", "tiny", "--data", data, "--out", str(out), "--batch-size", "4",
                              "--no-progress"])
    assert rc == 0, err
    return ScoreStore.open(str(out))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    rows = _records()
    paths = _write_all(d, rows)
    return d, rows, paths


def test_iter_records_gives_the_jsonl_records_and_digests(three):
    from gradsel_core.jsonl import iter_jsonl, record_digest
    from gradsel_core.sources import data_kind, iter_records

    _, rows, (jl, pqf, hf) = three
    assert [data_kind(p) for p in (jl, pqf, hf, "-")] == ["jsonl", "parquet", "hf", "jsonl"]
    want = list(iter_jsonl(jl))
    for p in (pqf, hf):
        got = list(iter_records(p))
        assert got == want
        assert [record_digest(r) for r in got] == [record_digest(r) for r in want]


def test_parquet_and_dataset_folder_score_like_jsonl(three, tmp_path, capsys):
    _, rows, (jl, pqf, hf) = three
    ref = _score(capsys, jl, tmp_path / "s_jl")
    assert len(ref.norms) == len(rows) and ref.record_sha256 is not None
    for name, p in (("pq", pqf), ("hf", hf)):
        st = _score(capsys, p, tmp_path / f"s_{name}")
        np.testing.assert_array_equal(st.norms, ref.norms)  # same records, same batches: bitwise equal
        np.testing.assert_array_equal(st.losses, ref.losses)
        np.testing.assert_array_equal(st.tokens, ref.tokens)
        assert st.ids.tolist() == ref.ids.tolist()
        assert list(st.record_sha256) == list(ref.record_sha256)
        assert sorted(st.fields) == sorted(ref.fields) == ["task", "w"]
        for k in ref.fields:
            assert np.asarray(st.fields[k]).tolist() == np.asarray(ref.fields[k]).tolist()


def _kept_ids_jsonl(path):
    return [json.loads(x)["id"] for x in open(path, encoding="utf-8").read().splitlines()]


def test_select_data_writes_the_input_format(three, tmp_path, capsys):
    _, rows, (jl, pqf, hf) = three
    _score(capsys, jl, tmp_path / "s")
    store = str(tmp_path / "s")
    base = ["select", "--scores", store, "--ratio", "0.5", "--loss-filter-std", "none"]
    assert _run(capsys, base + ["--data", jl, "--out", str(tmp_path / "k.jsonl")])[0] == 0
    want = [json.loads(x) for x in (tmp_path / "k.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(want) == 6 and all(w == rows[int(w["id"][1:])] for w in want)
    # a Parquet input gives a Parquet file with the input's columns and types (the scores are the JSONL's)
    rc, _, err = _run(capsys, base + ["--data", pqf, "--out", str(tmp_path / "k.parquet")])
    assert rc == 0, err
    got = pq.read_table(tmp_path / "k.parquet")
    assert got.schema == pq.read_schema(pqf)
    assert [{k: v for k, v in r.items() if v is not None} for r in got.to_pylist()] == want
    summary = json.loads((tmp_path / "k.summary.json").read_text())
    assert summary["output"]["format"] == "parquet" and summary["output"]["records"] == 6
    # a datasets folder gives a datasets folder, with the input's features
    rc, _, err = _run(capsys, base + ["--data", hf, "--out", str(tmp_path / "k_ds")])
    assert rc == 0, err
    ds = datasets.load_from_disk(str(tmp_path / "k_ds"))
    assert ds.features == datasets.load_from_disk(hf).features
    assert [{k: v for k, v in r.items() if v is not None} for r in ds.to_list()] == want
    # --format overrides: JSONL in, Parquet out (schema inferred); the score rows alone as Parquet
    assert _run(capsys, base + ["--data", jl, "--format", "parquet", "--out", str(tmp_path / "j.parquet")])[0] == 0
    assert [r["id"] for r in pq.read_table(tmp_path / "j.parquet").to_pylist()] == [w["id"] for w in want]
    assert _run(capsys, base + ["--format", "parquet", "--out", str(tmp_path / "s.parquet")])[0] == 0
    t = pq.read_table(tmp_path / "s.parquet")
    assert t.column_names[:3] == ["id", "norm", "loss"] and t.num_rows == 6
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".gradsel-tmp-")]


def test_select_refuses_an_edited_parquet_record(three, tmp_path, capsys):
    _, rows, (jl, _, _) = three
    _score(capsys, jl, tmp_path / "s")
    store = str(tmp_path / "s")
    edited = [dict(r) for r in rows]
    edited[4]["task"] = "z"
    p = tmp_path / "edited.parquet"
    pq.write_table(pa.Table.from_pydict(_columns(edited)), p)
    rc, _, err = _run(capsys, ["select", "--scores", store, "--data", str(p), "--out", str(tmp_path / "k.parquet")])
    assert rc == 2 and "record 4" in err and "content changed" in err and err.count("\n") == 1
    assert not (tmp_path / "k.parquet").exists()


def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), bad)
    ids = tmp_path / "bad_ids.parquet"
    pq.write_table(pa.table({"input_ids": ["1 2", "3"]}), ids)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all\n")
    notds = tmp_path / "folder"
    notds.mkdir()
    (notds / "x.txt").write_text("hi")
    cases = [(bad, "column 'text' is int64, it must be a string"),
             (ids, "column 'input_ids' is string, it must be a list of integers"),
             (junk, "not a readable Parquet file"),
             (notds, "is a directory; give a JSONL file, a .parquet file or a datasets.save_to_disk folder (it is not a saved dataset")]
    for path, want in cases:
        for argv in (["score", "--model", "tiny", "--data", str(path), "--out", str(tmp_path / "s"), "--no-progress"],
                     ["reference", "--model", "tiny", "--data", str(path), "--out", str(tmp_path / "r.safetensors"),
                      "--no-progress"]):
            rc, _, err = _run(capsys, argv)
            assert rc == 2 and want in err and str(path) in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")


def test_score_dataset_takes_a_streaming_iterable_dataset(three, tmp_path):
    from gradsel_core.data import load_model_and_tokenizer
    from gradsel_core.scoring import score_dataset

    _, rows, _ = three
    model, tok = load_model_and_tokenizer("tiny")
    recs = [r for r in rows if "prompt" in r or "text" in r]
    recs = [{**r, "text": r.get("text", "x")} for r in recs]  # one schema: a generator's rows share the columns
    recs = [{k: v for k, v in r.items() if k not in ("prompt", "response")} for r in recs]
    ref = score_dataset(model, recs, str(tmp_path / "a"), tokenizer=tok, batch_size=4, progress=False)
    it = datasets.IterableDataset.from_generator(lambda: iter(recs))
    assert not hasattr(it, "__len__")
    got = score_dataset(model, it, str(tmp_path / "b"), tokenizer=tok, batch_size=4, progress=False)
    np.testing.assert_array_equal(got.norms, ref.norms)
    np.testing.assert_array_equal(got.losses, ref.losses)
    assert got.ids.tolist() == ref.ids.tolist()



def test_score_dataset_takes_a_pretokenized_iterable_dataset(tmp_path):
    from conftest import tiny_gpt

    from gradsel_core.scoring import score_dataset

    model = tiny_gpt(vocab_size=50)
    recs = [{"id": i, "input_ids": [1 + (3 * i + j) % 40 for j in range(2 + i % 5)], "task": "ab"[i % 2]} for i in range(7)]
    ref = score_dataset(model, recs, str(tmp_path / "a"), batch_size=3, progress=False)
    it = datasets.IterableDataset.from_generator(lambda: iter(recs))
    got = score_dataset(model, it, str(tmp_path / "b"), batch_size=3, progress=False)
    np.testing.assert_array_equal(got.norms, ref.norms)
    assert got.ids.tolist() == list(range(7)) and np.asarray(got.fields["task"]).tolist() == list("abababa")


# -- Hub dataset ids (item 4): resolved from a hub-layout cache built here, offline ------------------------


def _hub_dataset_cache(root, repo: str, files: dict, rev: str = "89abcdef0123456789abcdef0123456789abcdef"):
    """``files`` ({relative path: records}) in the HF hub cache layout of a dataset repo:
    datasets--org--name/{refs/main, snapshots/<rev>/...} (Parquet for .parquet names, else JSONL)."""
    d = root / ("datasets--" + repo.replace("/", "--"))
    snap = d / "snapshots" / rev
    for rel, recs in files.items():
        p = snap / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(recs), p)
        else:
            p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(rev)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline HF cache holding two datasets: Parquet train/test shards, and one unnamed JSONL split."""
    import huggingface_hub

    from gradsel_core import sources

    recs = [{"id": i, "text": f"record {i}", "task": "ab"[i % 2]} for i in range(9)]
    cache = tmp_path / "hub"
    _hub_dataset_cache(cache, "gradsel-test/pq", {"data/train-00000-of-00002.parquet": recs[:5],
                                                  "data/train-00001-of-00002.parquet": recs[5:],
                                                  "data/test-00000-of-00001.parquet": recs[:3]})
    _hub_dataset_cache(cache, "gradsel-test/js", {"all.jsonl": recs})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sources.hub_files.cache_clear()
    yield recs
    sources.hub_files.cache_clear()


def test_hub_dataset_ids_resolve_from_the_local_cache_offline(hub_cache, tmp_path, capsys):
    """`--data org/name[:split]` reads a Hub dataset's files from the HF cache offline (its split's files
    in order), and `select --data` checks them against the store and writes the kept records in their format."""
    from gradsel_core.jsonl import record_digest
    from gradsel_core.sources import data_kind, hub_dataset, iter_records

    recs = hub_cache
    assert hub_dataset("gradsel-test/pq") == ("gradsel-test/pq", "train")
    assert hub_dataset("hf://datasets/gradsel-test/pq:test") == ("gradsel-test/pq", "test")
    assert hub_dataset("sub/missing.jsonl") is None and hub_dataset(str(tmp_path)) is None
    assert data_kind("gradsel-test/pq") == "parquet" and data_kind("gradsel-test/js") == "jsonl"
    assert list(iter_records("gradsel-test/pq")) == recs
    assert list(iter_records("gradsel-test/pq:test")) == recs[:3]
    assert list(iter_records("gradsel-test/js")) == recs
    rng = np.random.default_rng(0)
    store = tmp_path / "s"
    ScoreStore.from_arrays(store, rng.random(9), rng.random(9), ids=[r["id"] for r in recs],
                           record_sha256=[record_digest(r) for r in recs])
    kept_pos = np.sort(np.argsort(ScoreStore.open(store).norms, kind="stable")[:4])
    for spec, out in (("gradsel-test/pq", "k.parquet"), ("gradsel-test/js", "k.jsonl")):
        rc = main(["select", "--scores", str(store), "--data", spec, "--out", str(tmp_path / out),
                   "--policy", "keep_bottom", "--ratio", "0.5"])
        assert rc == 0, capsys.readouterr().err
        got = pq.read_table(tmp_path / out).to_pylist() if out.endswith(".parquet") else \
            [json.loads(x) for x in (tmp_path / out).read_text().splitlines()]
        assert got == [recs[i] for i in kept_pos]
    capsys.readouterr()
    assert main(["select", "--scores", str(store), "--data", "gradsel-test/pq:test", "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "has 3 records" in capsys.readouterr().err
    assert main(["select", "--scores", str(store), "--data", "gradsel-test/pq:dev", "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no Parquet or JSONL files of split 'dev'" in err and "data/train-00000-of-00002.parquet" in err
    assert main(["select", "--scores", str(store), "--data", "gradsel-test/not-cached", "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "could not be resolved" in err and "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" in err and err.count("\n") == 1


def test_gradsel_score_takes_a_hub_dataset_id(hub_cache, tmp_path, capsys):
    """`gradsel score --data org/name` reads the cached split like a local file of its format: the same
    scores, ids and record digests as scoring those records from a JSONL file."""
    recs = hub_cache
    # the Parquet train split's first file holds recs[:5], its second recs[5:]: score the whole split
    local_all = tmp_path / "all.jsonl"
    local_all.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ref = _score(capsys, str(local_all), tmp_path / "s_ref")
    for spec in ("gradsel-test/pq", "gradsel-test/js"):
        got = _score(capsys, spec, tmp_path / f"s_{spec.split('/')[1]}")
        np.testing.assert_array_equal(got.norms, ref.norms)
        assert got.ids.tolist() == ref.ids.tolist() and list(got.record_sha256) == list(ref.record_sha256)
    rc, _, err = _run(capsys, ["score", "--model", "tiny", "--data", "gradsel-test/not-cached", "--out",
                               str(tmp_path / "s_missing"), "--no-progress"])
    assert rc == 2 and "could not be resolved" in err
    for spec, name in ((str(local_all), "ref_local"), ("gradsel-test/js", "ref_hub")):  # reference: the same
        rc, _, err = _run(capsys, ["reference", "--model", "tiny", "--data", spec, "--out",
                                   str(tmp_path / f"{name}.safetensors"), "--no-progress"])
        assert rc == 0, err
    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "ref_local.safetensors")), load_file(str(tmp_path / "ref_hub.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)  # (the metadata names the source)


def test_json_encoder_gives_json_dumps_text_and_errors():
    """The once-built C encoder behind record digests and `select --data` output: the text of ``json.dumps``
    with the same options, and its errors (NaN refused, a cycle, an unknown type)."""
    from gradsel_core.jsonl import _plain, json_encoder, record_digest

    values = [{"b": [1.5, 1e-7, 10 ** 30, -0.0, {"z": "é\u2028\"\\", "a": None, "c": True}], "a": 2},
              {"id": "x", "t": "\u00e9" * 3, "n": [[], {}, [1, [2, [3]]]]}, [], "plain \u2028", 3.0, None,
              {"f": float("inf")}, {"nan": float("nan")}, {"np": np.int64(3), "arr": np.arange(3)}]
    for opts in (dict(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain),
                 dict(ensure_ascii=False, allow_nan=False), dict()):
        enc = json_encoder(**opts)
        for v in values:
            try:
                want = json.dumps(v, **opts)
            except (TypeError, ValueError) as e:
                with pytest.raises(type(e)):
                    enc(v)
                continue
            assert enc(v) == want
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(ValueError, match="Circular"):
        json_encoder(ensure_ascii=False)(cyc)
    rec = {"text": "b", "id": 1, "meta": {"k": [1, 2]}}
    assert record_digest(rec) == __import__("hashlib").sha256(
        json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()[:32]


def test_jsonl_line_scan_equals_json_loads():
    """The JSONL reader scans each stripped line directly: the same object as ``json.loads``, and for a line
    it cannot read whole the same error."""
    from gradsel_core.jsonl import _loads

    for line in ['{"a": 1, "b": [1.5, NaN, "\\u00e9"]}', "5", '"s"', "[]", '{"a": 1} x', '{"a": 1}{"b": 2}', "{",
                 '{"a": "\\x"}', "\ufeff{}", "{'a': 1}", '{"a": tru}', "nul", '{"a" 1}']:
        try:
            want = json.loads(line)
        except json.JSONDecodeError as e:
            with pytest.raises(json.JSONDecodeError) as got:
                _loads(line)
            assert (got.value.msg, got.value.pos) == (e.msg, e.pos), line
            continue
        assert json.dumps(_loads(line)) == json.dumps(want), line  # as text: NaN equals NaN


def test_write_hf_streams_row_batches(tmp_path, monkeypatch):
    """`select --format hf` writes the kept rows to an Arrow file a batch at a time (not a list of them all),
    keeping the input's features or inferring them from the first rows, and refuses a later row that does
    not fit, naming the rows."""
    from gradsel_core.commands import select as S
    from gradsel_core.errors import UsageError

    monkeypatch.setattr(S, "PARQUET_WRITE_ROWS", 3)
    rows = [{"id": i, "text": f"t{i}", "meta": {"k": [i] * (i % 3)}} for i in range(10)]
    assert S.write_hf(str(tmp_path / "a"), iter(rows)) == 10
    assert datasets.load_from_disk(str(tmp_path / "a")).to_list() == rows
    feats = datasets.Features({"id": datasets.Value("int32"), "text": datasets.Value("string"),
                               "meta": {"k": datasets.List(datasets.Value("int64"))}, "w": datasets.Value("float32")})
    assert S.write_hf(str(tmp_path / "b"), iter(rows), feats) == 10
    back = datasets.load_from_disk(str(tmp_path / "b"))
    assert back.features == feats and back.to_list() == [dict(r, w=None) for r in rows]
    with pytest.raises(UsageError, match="rows 3..5 do not fit"):
        S.write_hf(str(tmp_path / "c"), iter(rows[:3] + [{"id": "x", "text": 1}] + rows[4:]))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".gradsel-tmp-")]
