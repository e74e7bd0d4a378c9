"""score_dataset and the score store: round trip, resume after SIGKILL, corruption, conflicts, torchrun,
NaN handling, bucketing, ids."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsel_core import GradNormEngine
from gradsel_core.data import bucket_batches, collate, plan_batches
from gradsel_core.models import TinyGPT, TinyGPTConfig
from gradsel_core.scoring import score_dataset
from gradsel_core.store import MANIFEST, ScoreStore, StoreConflictError, StoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = "auto"

# The worker runs in subprocesses (kill -9 / torchrun) and in-process (the reference run); the same code
# builds the same model and records everywhere.
WORKER = r'''
import os, sys, time
import numpy as np
import torch

torch.set_num_threads(1)
from gradsel_core.models import TinyGPT, TinyGPTConfig

DELAY = float(os.environ.get("GS_TEST_DELAY", "0"))


class SlowGPT(TinyGPT):
    """TinyGPT that sleeps in forward (once per batch), so a kill lands mid-run."""

    def forward(self, *args, **kwargs):
        if DELAY:
            time.sleep(DELAY)
        return super().forward(*args, **kwargs)


def build():
    torch.manual_seed(0)
    model = SlowGPT(TinyGPTConfig(vocab_size=97, d_model=16, n_layer=1, n_head=2, max_seq_len=48))
    rng = np.random.default_rng(0)
    records = []
    for i in range(200):
        n = int(rng.integers(2, 40))
        records.append({"id": f"s{i:03d}", "input_ids": rng.integers(1, 97, n).tolist(), "task": "ab"[i % 2]})
    return model, records


KW = dict(batch_size=4, shard_size=8, backend="auto", progress=False)

if __name__ == "__main__":
    from gradsel_core.scoring import score_dataset

    distributed = len(sys.argv) > 2 and sys.argv[2] == "dist"
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    model, records = build()
    store = score_dataset(model, records, sys.argv[1], **KW)
    assert len(store) == len(records)
    if distributed:
        dist.destroy_process_group()
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("worker") / "gs_store_worker.py"
    path.write_text(WORKER)
    spec = importlib.util.spec_from_file_location("gs_store_worker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.path = str(path)
    return mod


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory):
    """An uninterrupted one-process run of the worker's job."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, records = worker.build()
        out = tmp_path_factory.mktemp("ref") / "scores"
        return score_dataset(model, records, str(out), **worker.KW)
    finally:
        torch.set_num_threads(n)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _shards(d):
    return sorted(n for n in os.listdir(d) if n.startswith("shard-")) if os.path.isdir(d) else []


def assert_same_store(a: ScoreStore, b: ScoreStore):
    assert len(a) == len(b)
    assert a.ids.tolist() == b.ids.tolist()
    assert np.array_equal(a.norms, b.norms)
    assert np.array_equal(a.losses, b.losses)
    assert np.array_equal(a.tokens, b.tokens)
    assert a.fields.keys() == b.fields.keys()
    for k in a.fields:
        assert a.fields[k].tolist() == b.fields[k].tolist()
    if a.per_param is None:
        assert b.per_param is None
    else:
        assert a.per_param.keys() == b.per_param.keys()
        for k in a.per_param:
            assert np.array_equal(a.per_param[k], b.per_param[k])


def tiny(seed=0, vocab=50, **kw):
    torch.manual_seed(seed)
    return TinyGPT(TinyGPTConfig(vocab_size=vocab, d_model=16, n_layer=1, n_head=2, max_seq_len=48, **kw))


def records(n=40, seed=0, vocab=50, ids=None, lo=2, hi=30):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = {"input_ids": rng.integers(1, vocab, int(rng.integers(lo, hi))).tolist()}
        if ids is not None:
            r["id"] = ids[i]
        out.append(r)
    return out


KW = dict(batch_size=4, shard_size=8, backend=BACKEND, progress=False)


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_matches_engine_and_manifest(tmp_path):
    model = tiny()
    recs = records(24, ids=[f"doc-{i}" for i in range(24)])
    for i, r in enumerate(recs):
        r["source"] = "web" if i % 3 else "book"
        r["score"] = i * 0.5
        r["nested"] = {"ignored": True}
    recs[5]["labels"] = [-100] * 3 + recs[5]["input_ids"][3:]
    store = score_dataset(model, recs, str(tmp_path / "s"), per_param=True, **KW)
    again = ScoreStore.open(str(tmp_path / "s"))
    assert_same_store(store, again)
    assert len(again) == 24
    assert again.ids.tolist() == [f"doc-{i}" for i in range(24)]
    assert again.fields["source"].tolist() == [r["source"] for r in recs]
    assert again.fields["score"].dtype == np.float64 and "nested" not in again.fields
    assert again.norms.dtype == np.float32 and again.tokens.dtype == np.int64
    # in dataset order, and equal to scoring each record alone (padding-invariant up to fp error)
    eng = GradNormEngine(model, backend=BACKEND, per_param=True)
    for i, r in enumerate(recs):
        b = collate([r], 0)
        res = eng.score(b)
        assert np.allclose(again.norms[i], res.norms.numpy(), rtol=1e-4, atol=1e-6)
        assert np.allclose(again.losses[i], res.losses.numpy(), rtol=1e-5, atol=1e-6)
        assert again.tokens[i] == int(res.tokens)
    assert again.tokens[5] == len(recs[5]["input_ids"]) - 3  # labels given: the first 3 are -100 (1st never counts)
    sq = sum(again.per_param.values())
    assert np.allclose(sq, again.norms.astype(np.float64) ** 2, rtol=1e-4)
    m = again.meta
    assert m["complete"] and m["counts"]["records"] == 24 and m["counts"]["nonfinite"] == 0
    assert m["model"]["content_sha256"] and m["model"]["params"][0]["name"] == "wte.weight"
    assert m["config"]["backend"] == "auto" and m["config"]["backend_resolved"] in ("ghost", "vmap", "triton")
    assert m["config"]["batch_size"] == 4
    assert {"gradsel", "torch", "numpy", "safetensors"} <= set(m["versions"])
    assert len(m["shards"]) == 3 and all(len(s["sha256"]) == 64 for s in m["shards"])
    # nothing is stored with pickle: every data file is safetensors or JSON
    for name in os.listdir(tmp_path / "s"):
        assert name.endswith((".safetensors", ".json")) or name in (".gradsel-lock", ".gradsel-store"), name


def test_int_ids_positions_and_dataset_kinds(tmp_path):
    model = tiny()
    recs = records(10)
    s1 = score_dataset(model, recs, str(tmp_path / "a"), **KW)
    assert s1.ids.tolist() == list(range(10)) and s1.ids.dtype == np.int64
    # given int ids kept; a generator; a duck-typed indexable (like datasets.Dataset); numpy/torch tokens
    given_ids = [100 + 7 * i for i in range(10)]
    s2 = score_dataset(model, (dict(r, id=i) for r, i in zip(recs, given_ids)), str(tmp_path / "b"), **KW)
    assert s2.ids.tolist() == given_ids

    class Indexable:
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            r = self.rows[i]
            return {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": np.ones(len(r["input_ids"]), dtype=np.int64)}

    s3 = score_dataset(model, Indexable(recs), str(tmp_path / "c"), **KW)
    assert np.array_equal(s1.norms, s2.norms) and np.array_equal(s1.norms, s3.norms)
    empty = score_dataset(model, [], str(tmp_path / "e"), **KW)
    assert len(empty) == 0 and len(ScoreStore.open(str(tmp_path / "e"))) == 0


def test_duplicate_and_mixed_ids(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match=r"duplicate ids: 'x'"):
        score_dataset(model, records(4, ids=["x", "y", "x", "z"]), str(tmp_path / "d"), **KW)
    with pytest.raises(ValueError, match="duplicate ids"):
        score_dataset(model, records(4, ids=[0, 1, 1, 2]), str(tmp_path / "d"), **KW)
    recs = records(3)
    recs[1]["id"] = "named"  # the others take their positions (ints)
    with pytest.raises(TypeError, match="all ints or all strs"):
        score_dataset(model, recs, str(tmp_path / "d"), **KW)
    with pytest.raises(ValueError, match="no 'input_ids'"):
        score_dataset(model, [{"text": "hi"}], str(tmp_path / "d"), **KW)


# -- resume -------------------------------------------------------------------------------------------


def test_resume_after_sigkill_equals_uninterrupted_run(worker, reference, tmp_path):
    out = str(tmp_path / "scores")
    n_shards = 25
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    log_lines = []

    def start():
        return subprocess.Popen(
            [sys.executable, worker.path, out], env=_env(GS_TEST_DELAY="0.025"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def kill_after(k, extra_sleep=0.0):
        p = start()
        deadline = time.time() + 120
        while len(_shards(out)) < k and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if extra_sleep:
            time.sleep(extra_sleep)
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
        err = p.stderr.read().decode()
        log_lines.append((k, extra_sleep, rc, len(_shards(out))))
        assert rc in (-signal.SIGKILL, 0), err

    kill_after(2)
    with pytest.raises(StoreError, match="incomplete"):
        ScoreStore.open(out)
    kill_after(len(_shards(out)) + 1, extra_sleep=rng.uniform(0.0, 0.3))  # a random moment
    kill_after(min(len(_shards(out)) + 5, n_shards - 3))
    print("kills (target, extra sleep, rc, shards after):", log_lines)
    assert len(_shards(out)) < n_shards, log_lines
    done = subprocess.run([sys.executable, worker.path, out], env=_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    final = ScoreStore.open(out)
    assert_same_store(final, reference)
    assert len(_shards(out)) == n_shards and not [n for n in os.listdir(out) if n.startswith(".gradsel-tmp-")]
    assert len(set(final.ids.tolist())) == 200, (seed, log_lines)


def test_resume_skips_done_shards_and_removes_temp_files(tmp_path):
    model = tiny()
    recs = records(40)
    out = tmp_path / "s"
    ref = score_dataset(model, recs, str(out), **KW)
    # an interrupted state: manifest not final, one shard gone, a partial temp file left by a kill
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest))
    victim = _shards(out)[2]
    os.unlink(out / victim)
    (out / f".gradsel-tmp-{victim}-999-abcd1234").write_bytes(b"partial")
    before = {n: os.stat(out / n).st_mtime_ns for n in _shards(out)}
    store = score_dataset(model, recs, str(out), **KW)
    assert_same_store(store, ref)
    assert not [n for n in os.listdir(out) if n.startswith(".gradsel-tmp-")]
    for n, t in before.items():
        assert os.stat(out / n).st_mtime_ns == t, f"{n} was rewritten"
    # complete store + same call: nothing is scored again
    before = {n: os.stat(out / n).st_mtime_ns for n in _shards(out)}
    assert_same_store(score_dataset(model, recs, str(out), **KW), ref)
    assert before == {n: os.stat(out / n).st_mtime_ns for n in _shards(out)}
    # resume=False scores everything again (same result)
    assert_same_store(score_dataset(model, recs, str(out), resume=False, **KW), ref)


# -- corruption and conflicts ---------------------------------------------------------------------------


def test_corrupted_or_truncated_shard_is_detected_and_repaired(tmp_path, caplog):
    model = tiny()
    recs = records(40)
    out = tmp_path / "s"
    ref = score_dataset(model, recs, str(out), **KW)
    names = _shards(out)
    flip, trunc = names[1], names[3]
    data = bytearray((out / flip).read_bytes())
    data[-5] ^= 0x40  # a byte of the tensor payload
    (out / flip).write_bytes(bytes(data))
    with pytest.raises(StoreError, match=flip):
        ScoreStore.open(str(out))
    raw = (out / trunc).read_bytes()
    (out / trunc).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StoreError, match=r"shard-0000\d\d-r0\.safetensors"):
        ScoreStore.open(str(out))
    with caplog.at_level(logging.WARNING, logger="gradsel_core"):
        repaired = score_dataset(model, recs, str(out), **KW)
    text = caplog.text
    assert flip in text and trunc in text and "scored again" in text
    assert_same_store(repaired, ref)
    assert_same_store(ScoreStore.open(str(out)), ref)
    cols_path = out / "columns.safetensors"
    b = bytearray(cols_path.read_bytes())
    b[-1] ^= 0x01  # an id changed
    cols_path.write_bytes(bytes(b))
    with pytest.raises(StoreError, match="columns.safetensors"):
        ScoreStore.open(str(out))


def test_conflicting_model_config_or_data_is_refused_unless_overwrite(tmp_path):
    recs = records(16)
    out = str(tmp_path / "s")
    score_dataset(tiny(), recs, out, **KW)
    other = tiny()
    with torch.no_grad():
        other.ln_f.bias.add_(1e-3)
    with pytest.raises(StoreConflictError, match=r"different model .*content_sha256.*overwrite=True"):
        score_dataset(other, recs, out, **KW)
    # the batch plan changes no per-sample value: another batch size resumes the store with its own plan
    same = score_dataset(tiny(), recs, out, **dict(KW, batch_size=8))
    assert same.run["records_scored"] == 0 and same.meta["config"]["batch_size"] == KW["batch_size"]
    with pytest.raises(StoreConflictError, match=r"scoring config .*config\.loss_reduction"):
        score_dataset(tiny(), recs, out, **dict(KW, loss_reduction="sum"))
    with pytest.raises(StoreConflictError, match="dataset"):
        score_dataset(tiny(), records(16, seed=1), out, **KW)
    with pytest.raises(StoreConflictError, match="params"):
        score_dataset(tiny(), recs, out, **dict(KW, params=["lm_head.weight"]))
    fresh = score_dataset(other, recs, str(tmp_path / "fresh"), **KW)
    replaced = score_dataset(other, recs, out, overwrite=True, **KW)
    assert_same_store(replaced, fresh)
    assert_same_store(ScoreStore.open(out), fresh)


# -- NaN --------------------------------------------------------------------------------------------------


def test_nan_scores_are_recorded_and_counted(tmp_path, caplog):
    model = tiny()
    bad = 7
    with torch.no_grad():
        model.wte.weight[bad] = float("nan")  # records that contain token 7 get NaN
    rng = np.random.default_rng(3)
    recs, expect = [], []
    for i in range(30):
        ids = [int(t) for t in rng.choice([t for t in range(1, 50) if t != bad], int(rng.integers(3, 20)))]
        if i % 4 == 1:
            ids[1] = bad
        recs.append({"input_ids": ids})
        expect.append(i % 4 == 1)
    with caplog.at_level(logging.INFO, logger="gradsel_core"):
        store = score_dataset(model, recs, str(tmp_path / "s"), **KW)
    expect = np.array(expect)
    assert np.isnan(store.norms[expect]).all() and np.isnan(store.losses[expect]).all()
    assert np.isfinite(store.norms[~expect]).all() and np.isfinite(store.losses[~expect]).all()
    counts = ScoreStore.open(str(tmp_path / "s")).meta["counts"]
    assert counts["nonfinite"] == counts["nan_norms"] == counts["nan_losses"] == int(expect.sum())
    assert f"NaN/inf: {int(expect.sum())}" in caplog.text
    assert np.isfinite(store.summary()["norm_mean"])


# -- bucketing ------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 120), max_size=150),
    batch_size=st.one_of(st.none(), st.integers(1, 9)),
    max_tokens=st.one_of(st.none(), st.integers(1, 300)),
    window=st.integers(1, 40),
)
def test_plan_batches_properties(lengths, batch_size, max_tokens, window):
    if batch_size is None and max_tokens is None:
        batch_size = 4
    plan = plan_batches(lengths, batch_size, max_tokens, window, warn=False)
    assert plan == plan_batches(lengths, batch_size, max_tokens, window, warn=False)  # deterministic
    seen = []
    start = 0
    for i, sh in enumerate(plan):
        assert sh.index == i and sh.start == start and sh.stop == min(len(lengths), start + window)
        start = sh.stop
        inside = sorted(p for b in sh.batches for p in b)
        assert inside == list(range(sh.start, sh.stop))  # every record once, in its own window
        for b in sh.batches:
            Ls = [lengths[p] for p in b]
            assert Ls[0] == max(Ls)
            if batch_size is not None:
                assert len(b) <= batch_size
            if max_tokens is not None:
                assert len(b) * max(Ls) <= max_tokens or len(b) == 1
        seen += inside
    assert seen == list(range(len(lengths)))


def test_bucketing_groups_lengths_and_caps_tokens(tmp_path, caplog):
    lengths = [2, 30] * 8
    batches = bucket_batches(lengths, batch_size=4, window=16)
    assert [sorted({lengths[p] for p in b}) for b in batches] == [[30], [30], [2], [2]]
    with caplog.at_level(logging.WARNING, logger="gradsel_core"):
        batches = bucket_batches([5, 50, 5, 5, 5], batch_size=8, max_tokens=12)
    assert batches == [(1,), (0, 2), (3, 4)] and "longer than max_tokens=12" in caplog.text
    # the scored store comes back in dataset order whatever the batch plan
    model = tiny()
    recs = records(20, lo=2, hi=40)
    a = score_dataset(model, recs, str(tmp_path / "a"), **dict(KW, max_tokens=60))
    b = score_dataset(model, recs, str(tmp_path / "b"), **dict(KW, batch_size=1, shard_size=20))
    assert a.ids.tolist() == list(range(20))
    assert np.allclose(a.norms, b.norms, rtol=1e-4, atol=1e-6)
    assert np.array_equal(a.tokens, b.tokens)


def test_collate_pads_right():
    b = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=3)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]


# -- torchrun ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_equals_single_process(worker, reference, tmp_path):
    out = str(tmp_path / "dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           worker.path, out, "dist"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    store = ScoreStore.open(out)
    assert_same_store(store, reference)
    names = _shards(out)
    assert len(names) == 25
    assert {n.split("-r")[1] for n in names} == {"0.safetensors", "1.safetensors"}  # rank-tagged
    assert store.meta["run"]["world_size"] == 2


# -- issue 11: the fingerprint covers everything the scores depend on ----------------------------------


def test_fingerprint_covers_frozen_weights_buffers_dtype_loss_and_source(tmp_path):
    recs = records(16)
    out = str(tmp_path / "s")
    head_only = dict(KW, params=["lm_head.weight"])
    score_dataset(tiny(), recs, out, **head_only)
    body_changed = tiny()
    with torch.no_grad():
        body_changed.blocks[0].attn.qkv.weight[0, 0] += 1e-3  # a frozen (unselected) weight
    with pytest.raises(StoreConflictError, match=r"different model .*model\.content_sha256"):
        score_dataset(body_changed, recs, out, **head_only)
    buffered = tiny()
    buffered.register_buffer("scale", torch.ones(3), persistent=False)
    with pytest.raises(StoreConflictError, match=r"model\.content_sha256"):
        score_dataset(buffered, recs, out, **head_only)
    with pytest.raises(StoreConflictError, match=r"model\.dtypes"):
        score_dataset(tiny().double(), recs, out, **head_only)
    with pytest.raises(StoreConflictError, match=r"config\.loss\.reduction"):
        score_dataset(tiny(), recs, out, **dict(head_only, loss_reduction="sum"))
    with pytest.raises(StoreConflictError, match=r"data\.source"):
        score_dataset(tiny(), recs, out, source={"tokenizer": {"class": "X"}, "max_length": 8}, **head_only)
    # the same model, config and data resume fine
    assert len(score_dataset(tiny(), recs, out, **head_only)) == 16


def test_hash_state_is_exact_over_bytes_of_every_tensor():
    from gradsel_core.store import hash_state

    model = tiny().to(torch.bfloat16)
    model.register_buffer("mask", torch.ones(4, dtype=torch.bool), persistent=False)
    h0, dtypes = hash_state(model)
    assert dtypes["bfloat16"] == sum(p.numel() for p in model.parameters()) and dtypes["bool"] == 4
    assert hash_state(model, threads=1)[0] == h0 == hash_state(model, threads=4)[0]
    w = model.blocks[0].fc.weight
    with torch.no_grad():
        raw = w.view(torch.int16)
        raw[3, 5] ^= 1  # the lowest bit of one bf16 weight: a sum or a norm would not see it reliably
    h1, _ = hash_state(model)
    with torch.no_grad():
        raw[3, 5] ^= 1
        model.mask[2] = False
    h2, _ = hash_state(model)
    assert len({h0, h1, h2}) == 3


def test_lora_adapter_on_a_swapped_base_is_refused(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from conftest import hf_llama
    from peft import LoraConfig, get_peft_model

    def adapted(base_seed):
        base = hf_llama()
        if base_seed:
            torch.manual_seed(base_seed)
            with torch.no_grad():
                base.model.layers[0].mlp.down_proj.weight.normal_(0, 0.02)
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.1)
        return model

    recs = records(8, vocab=61)
    out = str(tmp_path / "s")
    kw = dict(KW, params="lora", backend="loop")
    a = score_dataset(adapted(0), recs, out, **kw)
    assert [p["name"] for p in a.meta["model"]["params"]] and all("lora_" in p["name"] for p in a.meta["model"]["params"])
    with pytest.raises(StoreConflictError, match=r"model\.content_sha256"):
        score_dataset(adapted(1), recs, out, **kw)


# -- issue 11: lost or clobbered work ------------------------------------------------------------------


def _mtimes(d):
    return {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in _shards(d)}


def test_corrupted_manifest_is_rebuilt_from_the_shards(tmp_path, caplog):
    from gradsel_core.cli import main
    from gradsel_core.store import repair_store

    model, recs = tiny(), records(40)
    out = str(tmp_path / "s")
    ref = score_dataset(model, recs, out, **KW)
    before = _mtimes(out)
    mpath = os.path.join(out, MANIFEST)
    good = open(mpath, "rb").read()
    open(mpath, "wb").write(good[: len(good) // 2])  # a torn manifest
    with pytest.raises(StoreError, match="gradsel repair"):
        ScoreStore.open(out)
    with caplog.at_level(logging.WARNING, logger="gradsel_core"):
        again = score_dataset(model, recs, out, **KW)  # resume rebuilds it, scoring nothing again
    assert "rebuilding it from the shards" in caplog.text
    assert_same_store(again, ref) and before == _mtimes(out)
    assert again.run["records_scored"] == 0
    # explicitly: `gradsel repair DIR`, also after the manifest is gone
    for damage in (lambda: open(mpath, "w").write('{"format": "gradsel-score-store", "format_version": 2}'),
                   lambda: os.unlink(mpath)):
        damage()
        assert main(["repair", out]) == 0
        assert_same_store(ScoreStore.open(out), ref)
        assert before == _mtimes(out)
    # a shard lost as well: the rebuilt manifest is incomplete, and a resume scores only that shard
    os.unlink(mpath)
    victim = _shards(out)[3]
    os.unlink(os.path.join(out, victim))
    report = repair_store(out)
    assert not report.complete and report.missing == [3] and "rerun the same" in report.message
    with pytest.raises(StoreError, match="incomplete"):
        ScoreStore.open(out)
    resumed = score_dataset(model, recs, out, **KW)
    assert resumed.run["records_scored"] == 8 and resumed.run["shards_scored"] == 1
    assert_same_store(resumed, ref)
    assert {n: t for n, t in _mtimes(out).items() if n != victim} == {n: t for n, t in before.items() if n != victim}


def test_other_model_into_a_store_without_manifest_is_refused(tmp_path):
    recs = records(16)
    out = str(tmp_path / "s")
    score_dataset(tiny(seed=0), recs, out, **KW)
    os.unlink(os.path.join(out, MANIFEST))
    shards_a = {n: open(os.path.join(out, n), "rb").read() for n in _shards(out)}
    with pytest.raises(StoreConflictError, match=r"different model .*in shard-0000\d\d-r0\.safetensors.*overwrite"):
        score_dataset(tiny(seed=1), recs, out, **KW)
    assert {n: open(os.path.join(out, n), "rb").read() for n in _shards(out)} == shards_a  # A's work is intact
    fresh = score_dataset(tiny(seed=1), recs, str(tmp_path / "fresh"), **KW)
    assert_same_store(score_dataset(tiny(seed=1), recs, out, overwrite=True, **KW), fresh)


def test_the_store_touches_only_its_own_files(tmp_path):
    from gradsel_core.scoring import scan_dataset  # noqa: F401 - the API the store is written from

    model, recs = tiny(), records(16)
    # a non-empty directory that is not a store: refused, and nothing is created in it
    user = tmp_path / "user"
    user.mkdir()
    mine = {"notes.tmp-1.txt": b"keep me", ".cache.tmp-2": b"mine too", "data.jsonl": b"{}\n"}
    for n, b in mine.items():
        (user / n).write_bytes(b)
    with pytest.raises(StoreConflictError, match="not empty and is not a gradsel score store"):
        score_dataset(model, recs, str(user), **KW)
    assert sorted(os.listdir(user)) == sorted(mine)
    # asked (overwrite=True): the store's files go next to the user's, which survive resumes and overwrites
    ref = score_dataset(model, recs, str(user), overwrite=True, **KW)
    score_dataset(model, recs, str(user), **KW)
    score_dataset(model, recs, str(user), overwrite=True, **KW)
    score_dataset(model, recs, str(user), resume=False, **KW)
    for n, b in mine.items():
        assert (user / n).read_bytes() == b, n
    assert_same_store(ScoreStore.open(str(user)), ref)
    # a file the store would overwrite but did not create is refused even when asked
    other = tmp_path / "other"
    other.mkdir()
    (other / "ids.json").write_text('{"mine": true}')
    with pytest.raises(StoreConflictError, match=r"ids\.json would be overwritten, but gradsel did not create it"):
        score_dataset(model, recs, str(other), overwrite=True, **KW)
    assert (other / "ids.json").read_text() == '{"mine": true}' and os.listdir(other) == ["ids.json"]
    # an empty directory is fine, and becomes a store (marker file)
    empty = tmp_path / "empty"
    empty.mkdir()
    score_dataset(model, recs, str(empty), **KW)
    assert (empty / ".gradsel-store").is_file()


# -- issue 11: nothing is read outside the store ---------------------------------------------------------


def test_shard_names_in_the_manifest_must_be_plain_files_inside_the_store(tmp_path):
    model, recs = tiny(), records(16)
    out = tmp_path / "s"
    score_dataset(model, recs, str(out), **KW)
    mpath = out / MANIFEST
    good = json.loads(mpath.read_text())
    first = good["shards"][0]["file"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes((out / first).read_bytes())  # valid bytes, right checksum
    for name in ("../outside/x.safetensors", str(outside / "x.safetensors"), "/etc/passwd", "/dev/zero", "..", ""):
        m = json.loads(json.dumps(good))
        m["shards"][0]["file"] = name
        mpath.write_text(json.dumps(m))
        with pytest.raises(StoreError, match="not a plain file name inside the store"):
            ScoreStore.open(str(out))
    # a plain name that is a link (to a device, or to a file outside) or a directory is not read either
    mpath.write_text(json.dumps(good))
    data = (out / first).read_bytes()
    for target in ("/dev/zero", str(outside / "x.safetensors")):
        os.unlink(out / first)
        os.symlink(target, out / first)
        with pytest.raises(StoreError, match="not a regular file"):
            ScoreStore.open(str(out))
    os.unlink(out / first)
    (out / first).write_bytes(data + b"\0" * 7)  # the wrong size: refused before reading
    with pytest.raises(StoreError, match=rf"{first}: {len(data) + 7} bytes, the manifest records {len(data)}"):
        ScoreStore.open(str(out))
    (out / first).write_bytes(data)
    assert len(ScoreStore.open(str(out))) == 16


# -- issue 11: a store that can never be opened; errors that name the cause -----------------------------------


def test_ids_and_fields_beyond_int64_are_refused_before_any_work(tmp_path):
    from gradsel_core.data import read_jsonl
    from gradsel_core.errors import UsageError
    from gradsel_core.store import column_array

    model = tiny()
    recs = records(3)
    recs[1]["id"] = 2**63
    for i in (0, 2):
        recs[i]["id"] = i
    with pytest.raises(UsageError, match=r"record 1 \(id 9223372036854775808\): id .* does not fit in 64 bits"):
        score_dataset(model, recs, str(tmp_path / "a"), **KW)
    recs = records(3)
    recs[2]["weight"] = -(2**64)
    with pytest.raises(UsageError, match=r"record 2: field 'weight' = .* does not fit in 64 bits"):
        score_dataset(model, recs, str(tmp_path / "a"), **KW)
    # streaming: a record is checked when its window is read; the window holding it is never written
    assert not list((tmp_path / "a").glob("shard-*"))
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 18446744073709551616}\n')
    with pytest.raises(UsageError, match=r"d\.jsonl:2: id 18446744073709551616 does not fit in 64 bits"):
        read_jsonl(str(p))
    assert column_array([1, 2**64]).dtype == object  # an old store holding such a field still opens
    assert column_array([1, 2]).dtype == np.int64


def test_bad_records_name_the_record_and_the_vocab(tmp_path):
    from gradsel_core.errors import UsageError

    model = tiny(vocab=50)
    base = records(6, vocab=50)
    out = str(tmp_path / "s")
    ints = [dict(r, input_ids=np.asarray(r["input_ids"], dtype=dt)) for r, dt in zip(base, [np.int32, np.uint8] * 3)]
    ints[1]["input_ids"] = torch.tensor(base[1]["input_ids"], dtype=torch.int32)
    ref = score_dataset(model, base, str(tmp_path / "ref"), **KW)
    assert np.array_equal(score_dataset(model, ints, out, **KW).norms, ref.norms)  # int32/uint8: converted
    for i, bad, want in ((2, -1, r"-1 is outside the model's vocabulary \[0, 50\)"),
                         (4, 50, r"50 is outside the model's vocabulary \[0, 50\)")):
        recs = records(6, vocab=50)
        recs[i]["input_ids"][1] = bad
        with pytest.raises(UsageError, match=rf"record {i}: input_ids\[1\] = {want}"):
            score_dataset(model, recs, str(tmp_path / "x"), **KW)
    recs = records(6, vocab=50, ids=[f"r{i}" for i in range(6)])
    recs[3]["labels"] = [-100] + recs[3]["input_ids"][1:-1] + [77]
    with pytest.raises(UsageError, match=r"record 3 \(id 'r3'\): labels\[.*\] = 77 is outside .*\[0, 50\)"):
        score_dataset(model, recs, str(tmp_path / "x"), **KW)
    recs = records(6, vocab=50)
    recs[5]["input_ids"] = []
    with pytest.raises(UsageError, match=r"record 5 has empty input_ids \(T = 0\)"):
        score_dataset(model, recs, str(tmp_path / "x"), **KW)
    assert not list((tmp_path / "x").glob("shard-*"))  # streaming: the window holding it is never written


def test_manifest_and_ids_file_errors_name_the_key_or_file(tmp_path):
    from gradsel_core.errors import GradselError
    from gradsel_core.store import sha256_bytes

    out = tmp_path / "s"
    score_dataset(tiny(), records(8), str(out), **KW)
    mpath = out / MANIFEST
    good = json.loads(mpath.read_text())
    for edit, want in (
        (lambda m: m["counts"].pop("records"), r"key 'counts\.records' is missing"),
        (lambda m: m.update(complete="yes"), r"key 'complete' must be bool, got str"),
        (lambda m: m.update(shards={"a": 1}), r"key 'shards' must be list, got dict"),
        (lambda m: m["shards"][0].update(size="12"), r"key 'shards\[0\]\.size' must be int, got str"),
        (lambda m: m.update(format_version=99), r"format version 99 is newer than this gradsel reads"),
        (lambda m: m.pop("model"), r"key 'model' is missing"),
    ):
        m = json.loads(json.dumps(good))
        edit(m)
        mpath.write_text(json.dumps(m))
        with pytest.raises(StoreError, match=want) as e:
            ScoreStore.open(str(out))
        assert isinstance(e.value, GradselError)
    for doc, want in (('[1, 2, 3]', "malformed ids file"), ('{"kind": "int", "ids": [1, 2]}', "2 ids for 8 records"),
                      ('{"kind": "int", "ids": [0, 1, 2, 3, 4, 5, 6, 18446744073709551616]}', r"id 7 .* 64-bit int"),
                      ("not json", "malformed ids file")):
        (out / "ids.json").write_text(doc)
        m = json.loads(json.dumps(good))  # a consistent manifest: the checks behind the checksum are reached
        m["format_version"] = 2  # ids in ids.json, as format 2 stores them
        m["files"].pop("columns.safetensors")
        m["file_sizes"].pop("columns.safetensors")
        m["files"]["ids.json"] = sha256_bytes(doc.encode())
        m["file_sizes"]["ids.json"] = len(doc.encode())
        mpath.write_text(json.dumps(m))
        with pytest.raises(StoreError, match=rf"ids\.json: .*{want}"):
            ScoreStore.open(str(out))


def test_a_second_run_while_the_lock_is_held_is_refused(tmp_path):
    import fcntl

    from gradsel_core.errors import GradselError

    out = tmp_path / "s"
    score_dataset(tiny(), records(8), str(out), **KW)
    fd = os.open(out / ".gradsel-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(GradselError, match="being written by another gradsel run"):
            score_dataset(tiny(), records(8), str(out), **KW)
    finally:
        os.close(fd)


# -- issue 11: reproducible bytes; versions -------------------------------------------------------------------


def test_identical_runs_give_byte_identical_shards(tmp_path):
    from gradsel_core.store import encode_shard

    model, recs = tiny(), records(40)
    digests = []
    for k in range(5):
        out = tmp_path / f"run{k}"
        score_dataset(model, recs, str(out), per_param=True, **KW)
        digests.append({n: (out / n).read_bytes() for n in _shards(out)})
        m = json.loads((out / MANIFEST).read_text())
        assert [s["sha256"] for s in m["shards"]] == [
            __import__("hashlib").sha256(digests[-1][s["file"]]).hexdigest() for s in m["shards"]]
    assert all(d == digests[0] for d in digests[1:])
    t = {"b": np.arange(3), "a": np.ones(2, dtype=np.float32)}
    assert encode_shard(t, {"y": 1, "x": 2}) == encode_shard(dict(reversed(list(t.items()))), {"x": 2, "y": 1})


def _as_format_1(out):
    """Rewrite a store as format 1 wrote it: no marker, no sizes, a version-1 manifest."""
    m = json.loads((out / MANIFEST).read_text())
    m["format_version"] = 1
    m.pop("file_sizes")
    for s in m["shards"]:
        s.pop("size")
    (out / MANIFEST).write_text(json.dumps(m))
    os.unlink(out / ".gradsel-store")
    os.unlink(out / ".gradsel-lock")


def test_format_1_stores_are_readable_and_refused_for_resume(tmp_path):
    model, recs = tiny(), records(16)
    out = tmp_path / "s"
    ref = score_dataset(model, recs, str(out), **KW)
    _as_format_1(out)
    assert_same_store(ScoreStore.open(str(out)), ref)
    with pytest.raises(StoreConflictError, match="format 1 .* cannot be resumed .*overwrite"):
        score_dataset(model, recs, str(out), **KW)
    (out / ".shard-000000-r0.safetensors.tmp-12-0123abcd").write_bytes(b"x")  # a format-1 writer's temp file
    assert_same_store(score_dataset(model, recs, str(out), overwrite=True, **KW), ref)
    assert json.loads((out / MANIFEST).read_text())["format_version"] == 3
    assert not [n for n in os.listdir(out) if "tmp" in n]


# -- property: kills, corruptions and resumes in any order end in the uninterrupted run's store -------------


class Killed(BaseException):
    """A simulated kill -9: raised mid-run, caught by nothing in the library."""


PROP_KW = dict(batch_size=2, shard_size=4, backend=BACKEND, progress=False)


@pytest.fixture(scope="module")
def prop_reference(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("prop") / "ref"
        store = score_dataset(tiny(), records(22, ids=[f"r{i}" for i in range(22)]), str(out), **PROP_KW)
        return store, {n: (out / n).read_bytes() for n in _shards(out)}
    finally:
        torch.set_num_threads(n)


_step = st.one_of(
    st.tuples(st.just("kill_after_shards"), st.integers(0, 5)),
    st.tuples(st.just("kill_mid_write"), st.integers(0, 5)),
    st.tuples(st.just("flip_shard"), st.integers(0, 5), st.integers(0, 10_000)),
    st.tuples(st.just("truncate_shard"), st.integers(0, 5), st.integers(0, 10_000)),
    st.tuples(st.just("delete_shard"), st.integers(0, 5)),
    st.tuples(st.just("tear_manifest"), st.integers(0, 10_000)),
    st.tuples(st.just("delete_manifest")),
    st.tuples(st.just("delete_ids")),
    st.tuples(st.just("resume")),
    st.tuples(st.just("repair")),
)


@settings(max_examples=int(os.environ.get("GS_PROPERTY_EXAMPLES", "25")), deadline=None)
@given(steps=st.lists(_step, min_size=1, max_size=6))
def test_property_kills_corruptions_and_resumes_end_in_the_uninterrupted_store(prop_reference, steps, tmp_path_factory):
    import gradsel_core.scoring as scoring
    from gradsel_core.store import repair_store

    ref, ref_bytes = prop_reference
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("prop") / "s"
    out.mkdir()
    (out / "notes.tmp-1").write_bytes(b"not the store's")  # a user file: must survive everything
    recs = records(22, ids=[f"r{i}" for i in range(22)])
    real_write = scoring.atomic_write

    def run(kill_after=None, mid_write=False):
        count = {"n": 0}

        def write(path, data):
            if kill_after is not None and os.path.basename(path).startswith("shard-"):
                if count["n"] >= kill_after:
                    if mid_write:  # a partial temp file, as a kill during the write leaves it
                        (out / f".gradsel-tmp-{os.path.basename(path)}-1-deadbeef").write_bytes(data[: len(data) // 3])
                    raise Killed()
                count["n"] += 1
            real_write(path, data)

        scoring.atomic_write = write
        try:
            # the user's file makes the first run need overwrite=True; later runs resume the store
            return score_dataset(tiny(), recs, str(out), overwrite=not (out / ".gradsel-store").exists(), **PROP_KW)
        except Killed:
            return None
        finally:
            scoring.atomic_write = real_write

    def shard(i):
        names = _shards(out)
        return out / names[i % len(names)] if names else None

    for step in steps:
        kind = step[0]
        if kind in ("kill_after_shards", "kill_mid_write"):
            run(kill_after=step[1], mid_write=kind == "kill_mid_write")
        elif kind in ("flip_shard", "truncate_shard"):
            p = shard(step[1])
            if p is not None and p.stat().st_size:  # (an earlier step may have truncated it to nothing)
                b = bytearray(p.read_bytes())
                at = step[2] % len(b)
                if kind == "flip_shard":
                    b[at] ^= 0x10
                else:
                    b = b[:at]
                p.write_bytes(bytes(b))
        elif kind == "delete_shard":
            p = shard(step[1])
            if p is not None:
                os.unlink(p)
        elif kind == "tear_manifest":
            if (out / MANIFEST).exists() and (out / MANIFEST).stat().st_size:
                b = (out / MANIFEST).read_bytes()
                (out / MANIFEST).write_bytes(b[: step[1] % len(b)])
        elif kind == "delete_manifest":
            if (out / MANIFEST).exists():
                os.unlink(out / MANIFEST)
        elif kind == "delete_ids":
            if (out / "columns.safetensors").exists():
                os.unlink(out / "columns.safetensors")
        elif kind == "resume":
            run()
        elif kind == "repair":
            with contextlib.suppress(StoreError):
                repair_store(str(out))
    final = run()  # the last, uninterrupted resume
    assert_same_store(final, ref)
    assert_same_store(ScoreStore.open(str(out)), ref)
    assert {n: (out / n).read_bytes() for n in _shards(out)} == ref_bytes  # bit for bit
    assert (out / "notes.tmp-1").read_bytes() == b"not the store's"
    assert not [n for n in os.listdir(out) if n.startswith(".gradsel-tmp-")]
