"""Issue #23, the CLI in real use: hostile inputs (one table: input, exit code, a fragment of the message),
honest store-mismatch messages, resumes that ignore the batch plan, no silent wrong joins (select --data,
copied shards), Hub ids from a local HF cache, --json / --dry-run, progress bars, docs that match the code,
and a start without torch."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradsel_core.cli import build_parser, main
from gradsel_core.store import ScoreStore, describe_difference

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run_cli(capsys, argv):
    """``(exit code, stdout, stderr)`` of ``gradsel argv`` in this process (argparse exits included)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_line(err: str) -> str:
    """The error line (``gradsel <cmd>: error: ...``), wherever a progress bar left the cursor."""
    found = re.findall(r"gradsel \w+: error: [^\r\n]*", err)
    assert len(found) == 1, err
    return found[0].rstrip()


def tiny_records(n=10):
    return [{"id": f"r{i}", "prompt": f"question {i}?", "response": " answer " * (1 + i % 3),
             "task": "a" if i % 2 else "b"} for i in range(n)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from conftest import make_llama_dir

    return make_llama_dir(tmp_path_factory.mktemp("llama"))


# -- hostile inputs: one table ---------------------------------------------------------------------------


def _deep_json(tmp):
    return _write(tmp / "deep.jsonl", '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _fifo(tmp):
    path = tmp / "fifo.jsonl"
    os.mkfifo(path)
    return str(path)


def _truncated_model(tmp, llama):
    d = tmp / "trunc"
    shutil.copytree(llama, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return str(d)


def _mismatched_config(tmp, llama):
    d = tmp / "mismatch"
    shutil.copytree(llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _readonly_dir(tmp):
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return str(d)


def _train_config(tmp, **over):
    write_jsonl(tmp / "t.jsonl", tiny_records(6))
    return _write(tmp / "run.json", json.dumps({"model": "tiny", "tasks": [{"name": "t", "train": "t.jsonl"}],
                                                "batch_size": 4, **over}))


DATA = "{data}"
HOSTILE = [
    # (name, argv with {tmp}/{data}/{llama} placeholders or a callable building a path, exit code, fragment)
    ("dev-zero", ["score", "--model", "tiny", "--data", "/dev/zero", "--out", "{tmp}/s"], 2,
     "--data /dev/zero is not a regular file"),
    ("fifo", ["score", "--model", "tiny", "--data", _fifo, "--out", "{tmp}/s"], 2, "is not a regular file"),
    ("long-line", ["score", "--model", "tiny", "--data", lambda t: _write(t / "long.jsonl", '{"text": "' + "x" * 5000 + '"}\n'),
                   "--out", "{tmp}/s", "--max-line-bytes", "1000"], 2, "long.jsonl:1: line longer than 1,000 bytes"),
    ("no-newline-flood", ["score", "--model", "tiny", "--data", lambda t: _write(t / "flood.jsonl", "x" * 3000),
                          "--out", "{tmp}/s", "--max-line-bytes", "1000"], 2, "line longer than 1,000 bytes"),
    ("deep-json", ["score", "--model", "tiny", "--data", _deep_json, "--out", "{tmp}/s"], 2, "nested too deeply"),
    ("float-token-ids", ["score", "--model", "tiny", "--data",
                         lambda t: _write(t / "f.jsonl", '{"input_ids": [256, 1.7, 2]}\n'), "--out", "{tmp}/s"], 2,
     "input_ids[1] = 1.7 is not an integer token id"),
    ("float-token-ids-exact", ["score", "--model", "tiny", "--data",
                               lambda t: _write(t / "f2.jsonl", '{"input_ids": [256, 1, 2], "labels": [256, 1.0, 2]}\n'),
                               "--out", "{tmp}/s"], 2, "labels[1] = 1.0 is not an integer token id"),
    ("empty-data", ["score", "--model", "tiny", "--data", lambda t: _write(t / "e.jsonl", "\n\n"), "--out", "{tmp}/s"], 2,
     "holds no record (empty, or blank lines only)"),
    ("cuda-on-cpu", ["score", "--model", "tiny", "--data", DATA, "--out", "{tmp}/s", "--device", "cuda:7"], 2,
     "--device cuda:7: "),
    ("bad-device", ["score", "--model", "tiny", "--data", DATA, "--out", "{tmp}/s", "--device", "gpu0"], 2,
     "--device gpu0: not a device"),
    ("triton-on-cpu", ["score", "--model", "tiny", "--data", DATA, "--out", "{tmp}/s", "--backend", "triton",
                       "--device", "cpu"], 2, "--backend triton runs on CUDA devices only"),
    ("unknown-flag", ["score", "--model", "tiny", "--data", DATA, "--out", "{tmp}/s", "--bogus"], 2,
     "gradsel score: error: unrecognized arguments: --bogus"),
    ("not-a-model", ["score", "--model", "../no/such/model", "--data", DATA, "--out", "{tmp}/s"], 2,
     "not a local model directory and not a Hub id"),
    ("truncated-weights", ["score", "--model", _truncated_model, "--data", DATA, "--out", "{tmp}/s"], 2,
     "cannot load the model"),
    ("config-not-the-weights", ["score", "--model", _mismatched_config, "--data", DATA, "--out", "{tmp}/s"], 2,
     "the weights do not match config.json"),
    ("reference-no-targets", ["reference", "--model", "tiny", "--data", lambda t: _write(
        t / "nt.jsonl", '{"text": ""}\n{"input_ids": [256, 5], "labels": [-100, -100]}\n'),
        "--out", "{tmp}/ref.safetensors"], 2, "has a target token"),
    ("reference-read-only-out", ["reference", "--model", "tiny", "--data", DATA, "--out",
                                 lambda t: os.path.join(_readonly_dir(t), "ref.safetensors")], 2, "cannot write there"),
    ("train-group-by-online", ["train", "--config", lambda t: _train_config(
        t, mode="online", selection={"policy": "median_band", "group_by": "task"})], 2,
     "selection.group_by = 'task' works in mode \"offline\" only"),
    ("select-unknown-flag", ["select", "--scores", "{tmp}/s", "--out", "{tmp}/k.jsonl", "--frob"], 2,
     "gradsel select: error: unrecognized arguments: --frob"),
]


@pytest.mark.parametrize("name, argv, code, fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_inputs(name, argv, code, fragment, tmp_path, capsys, request, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (interpreted triton runs on CPU tensors)
    if name in ("truncated-weights", "config-not-the-weights"):
        llama = request.getfixturevalue("llama_dir")
        from transformers.utils import logging as hf_logging

        # transformers' own handler keeps the (closed) stderr of the test that first imported it: silence it here
        hf_logging.disable_default_handler()
        request.addfinalizer(hf_logging.enable_default_handler)
    if name == "reference-read-only-out" and os.geteuid() == 0:  # root may write anywhere: the check sees "ro"
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p).endswith("/ro") else real_access(p, m))
    data = write_jsonl(tmp_path / "data.jsonl", tiny_records())
    args = []
    for a in argv:
        if callable(a):
            a = a(tmp_path, llama) if a in (_truncated_model, _mismatched_config) else a(tmp_path)
        args.append(a.format(tmp=tmp_path, data=data))
    rc, out, err = run_cli(capsys, args)
    assert rc == code, (rc, err)
    line = error_line(err)
    assert fragment in line, err
    assert "Traceback" not in err and "internal error" not in err, err
    if name.endswith("unknown-flag"):
        assert f"usage: gradsel {args[0]}" in err, err  # the subcommand's usage, not the top-level one
    assert not os.path.exists(tmp_path / "s" / "manifest.json"), "an error before the work creates no store"


# -- item 1, 2: mismatch messages name what differs; the batch plan never refuses a resume -------------------


def test_describe_difference_compares_json_forms():
    old = {"tok": {"added_tokens": [["<s>", 1], ["</s>", 2]]}, "config": {"batch_size": 4}}
    new = {"tok": {"added_tokens": [("<s>", 1), ("</s>", 2)]}, "config": {"batch_size": 4}}
    assert describe_difference(old, new) == []
    assert describe_difference(old, {**new, "config": {"batch_size": 8}}) == ["config.batch_size"]


def test_resume_with_another_batch_plan_and_reference_advice(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(12))
    out = str(tmp_path / "s")
    base = ["score", "--model", "tiny", "--data", data, "--out", out, "--no-progress"]
    assert run_cli(capsys, base + ["--batch-size", "4"])[0] == 0
    first = ScoreStore.open(out)
    # another batch size, max tokens and shard size: resumed with the store's plan, nothing rescored
    rc, o, e = run_cli(capsys, base + ["--batch-size", "3", "--max-tokens", "64", "--shard-size", "5"])
    assert rc == 0 and "nothing to score" in o, e
    np.testing.assert_array_equal(ScoreStore.open(out).norms, first.norms)
    # adding a reference to a finished store: refused with what to do (the README says the same)
    ref = str(tmp_path / "ref.safetensors")
    assert run_cli(capsys, ["reference", "--model", "tiny", "--data", data, "--out", ref, "--no-progress"])[0] == 0
    rc, o, e = run_cli(capsys, base + ["--reference", ref])
    line = error_line(e)
    assert rc == 2 and "holds scores without a reference" in line and "--overwrite" in line, e
    assert "overwrite=True" not in line and "config.batch_size" not in line
    rc, o, e = run_cli(capsys, base[:-3] + ["--out", str(tmp_path / "s2"), "--no-progress", "--reference", ref])
    assert rc == 0 and "cosine with the reference" in o, e
    with_ref = ScoreStore.open(str(tmp_path / "s2"))
    np.testing.assert_allclose(with_ref.norms, first.norms, rtol=1e-5)


def test_an_unfinished_store_without_shards_does_not_block_another_backend(tmp_path, monkeypatch):
    from gradsel_core import GradNormEngine, score_dataset
    from gradsel_core.data import tiny_model

    recs = [{"input_ids": [256, 1 + i, 2 + i, 3]} for i in range(6)]
    out = str(tmp_path / "s")
    real = GradNormEngine.score

    def broken(self, *a, **k):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(GradNormEngine, "score", broken)
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        score_dataset(tiny_model(), recs, out, backend="loop", progress=False)
    monkeypatch.setattr(GradNormEngine, "score", real)
    store = score_dataset(tiny_model(), recs, out, backend="auto", progress=False)  # not refused
    assert len(store) == 6 and store.meta["config"]["backend"] == "auto"


# -- item 3, 4: no silent wrong joins ------------------------------------------------------------------------


def test_select_data_refuses_an_edited_record(tmp_path, capsys):
    recs = tiny_records(8)
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    out = str(tmp_path / "s")
    assert run_cli(capsys, ["score", "--model", "tiny", "--data", data, "--out", out, "--no-progress"])[0] == 0
    sel = ["select", "--scores", out, "--out", str(tmp_path / "k.jsonl"), "--data", data, "--ratio", "1",
           "--loss-filter-std", "none", "--policy", "keep_bottom"]
    rc, o, e = run_cli(capsys, sel)
    assert rc == 0, e
    assert "checked by id only" not in e
    # reformatting the file (key order, spacing) is not an edit
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(dict(reversed(list(r.items()))), indent=None,
                                                         separators=(", ", " : ")) + "\n" for r in recs))
    assert run_cli(capsys, sel)[0] == 0
    edited = [dict(r) for r in recs]
    edited[5]["response"] = " a different answer"
    write_jsonl(tmp_path / "d.jsonl", edited)
    rc, o, e = run_cli(capsys, sel)
    assert rc == 2 and "record 5 (id 'r5') is not the record that was scored" in error_line(e), e


def test_a_copied_shard_is_caught_on_read_and_rescored_by_the_same_command(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", tiny_records(8))
    b = write_jsonl(tmp_path / "b.jsonl", [dict(r, response=" other") for r in tiny_records(8)])
    sa, sb = str(tmp_path / "sa"), str(tmp_path / "sb")
    cmd_a = ["score", "--model", "tiny", "--data", a, "--out", sa, "--no-progress"]
    assert run_cli(capsys, cmd_a)[0] == 0
    assert run_cli(capsys, ["score", "--model", "tiny", "--data", b, "--out", sb, "--no-progress"])[0] == 0
    good = ScoreStore.open(sa).norms.copy()
    name = "shard-000000-r0.safetensors"
    shutil.copy(os.path.join(sb, name), os.path.join(sa, name))
    m = json.loads(Path(sa, "manifest.json").read_text())  # the forger edits the manifest's size and sha256
    m["shards"][0]["size"] = os.path.getsize(os.path.join(sa, name))
    m["shards"][0]["sha256"] = json.loads(Path(sb, "manifest.json").read_text())["shards"][0]["sha256"]
    Path(sa, "manifest.json").write_text(json.dumps(m))
    for argv in (["inspect", sa], ["select", "--scores", sa, "--out", str(tmp_path / "k.jsonl")]):
        rc, o, e = run_cli(capsys, argv)
        assert rc == 2 and f"{name}: written by another run" in error_line(e), e
    # repair's advice and the error's are the same: rerun the same command, which rescores the foreign shard
    rc, o, e = run_cli(capsys, ["repair", sa])
    assert rc == 0 and "rerun the same `gradsel score` command" in o, (o, e)
    rc, o, e = run_cli(capsys, cmd_a)
    assert rc == 0 and "scored 8 records" in o, e
    np.testing.assert_array_equal(ScoreStore.open(sa).norms, good)


# -- item 8: the no-target warning says what happened --------------------------------------------------------


def test_no_target_warning_says_what_happened(caplog):
    from gradsel_core.data import ByteTokenizer, encode_records

    recs = [{"text": ""}, {"prompt": "a long prompt", "response": "x"}, {"text": "fine text"}]
    with caplog.at_level("WARNING"):
        encode_records(recs, ByteTokenizer(), max_length=64)
    assert "1 of 3 records have no target token" in caplog.text and "records 0" in caplog.text
    assert "truncation" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        encode_records(recs, ByteTokenizer(), max_length=5)
    assert "1 of 3 records lost every target token to truncation at 5 tokens" in caplog.text
    assert "records 1" in caplog.text


# -- item 9: train checks every key that changes the run -------------------------------------------------------


@pytest.mark.parametrize("key, value", [("optimizer", "sgd"), ("weight_decay", 0.1), ("max_grad_norm", 0.5),
                                        ("max_length", 8)])
def test_train_resume_refuses_a_changed_key(tmp_path, capsys, key, value):
    cfg = _train_config(tmp_path, out_dir="run")
    assert run_cli(capsys, ["train", "--config", cfg, "--no-progress"])[0] == 0
    cfg = _train_config(tmp_path, out_dir="run", **{key: value})
    rc, o, e = run_cli(capsys, ["train", "--config", cfg, "--no-progress"])
    shown = "data.t" if key == "max_length" else key  # max_length changes the records' tokens
    assert rc == 2 and "another configuration" in e and shown in error_line(e), e


# -- item 10: standard input ---------------------------------------------------------------------------------


def test_data_from_standard_input(tmp_path, capsys, monkeypatch):
    import io

    text = "".join(json.dumps(r) + "\n" for r in tiny_records(5))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    rc, o, e = run_cli(capsys, ["score", "--model", "tiny", "--data", "-", "--out", str(tmp_path / "s"), "--no-progress"])
    assert rc == 0 and "scored 5 records" in o, e


# -- item 12: Hugging Face Hub ids from a local cache, offline -----------------------------------------------


def _hub_cache(root: Path, repo: str, src: str, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """``src``'s files in the hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    d = root / ("models--" + repo.replace("/", "--"))
    snap = d / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), snap / f)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(rev)
    return snap


def test_hub_ids_resolve_from_the_local_cache_offline(llama_dir, tmp_path):
    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(cache, "gradsel-test/tiny-llama", llama_dir, rev)
    # a PEFT adapter folder whose base is the hub id
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(str(adapter))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "gradsel-test/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}, {"prompt": "the", "response": "dog ran"}])
    train_cfg = _write(tmp_path / "run.json", json.dumps({"model": "gradsel-test/tiny-llama", "batch_size": 2,
                                                          "tasks": [{"name": "t", "train": data}]}))
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'kernels'}", OMP_NUM_THREADS="1")
    script = (
        "import sys; from gradsel_core.cli import main\n"
        f"for model, out, extra in [('gradsel-test/tiny-llama', 's1', ['--revision', '{rev}']), "
        f"({str(adapter)!r}, 's2', []), ('gradsel-test/not-cached', 's3', [])]:\n"
        f"    rc = main(['score', '--model', model, '--data', {data!r}, '--out', {str(tmp_path)!r} + '/' + out, "
        "'--no-progress', '--json'] + extra)\n"
        "    print('RC', rc, flush=True)\n"
        f"print('RC', main(['train', '--config', {train_cfg!r}, '--dry-run', '--json']), flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    rcs = re.findall(r"^RC (\d+)$", r.stdout, re.M)
    assert rcs == ["0", "0", "2", "0"], (r.stdout, r.stderr[-3000:])
    assert json.loads(r.stdout.splitlines()[-2])["tasks"][0]["records"] == 2  # train's model key takes Hub ids too
    first = json.loads(r.stdout.splitlines()[0])
    assert first["records"] == 2
    assert "--model gradsel-test/not-cached: not a local directory, and the Hub id could not be resolved" in r.stderr
    assert "HF_HUB_OFFLINE=1 is set" in r.stderr
    s1, s2 = ScoreStore.open(str(tmp_path / "s1")), ScoreStore.open(str(tmp_path / "s2"))
    assert s1.meta["model"]["class"] == "LlamaForCausalLM" and "lora" in json.dumps(s2.meta["model"]["params"])


# -- item 13, 14: progress, --json, --dry-run -------------------------------------------------------------------


def test_json_dry_run_and_progress(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(10))
    out = str(tmp_path / "s")
    score = ["score", "--model", "tiny", "--data", data, "--out", out]

    def one_json(argv):
        rc, o, e = run_cli(capsys, argv)
        assert rc == 0, e
        assert o.count("\n") == 1, o
        return json.loads(o), e

    d, _ = one_json(score + ["--dry-run", "--json"])
    assert d["records"] == 10 and d["tokens"] > 0 and d["estimate_s"] > 0 and d["out_state"] == "new"
    assert len(d["run_key"]) == 64 and not os.path.exists(out)
    d, _ = one_json(score + ["--json"])
    assert d["records_scored"] == 10 and d["run_key"] and d["norm_median"] > 0
    d, _ = one_json(score + ["--dry-run", "--json"])
    assert d["out_state"] == "complete: nothing to score"
    d, _ = one_json(["inspect", out, "--json", "--by", "task", "--policy", "median_band"])
    assert d["records"] == 10 and sum(d["histogram"]["counts"]) == 10 and set(d["histogram"]["groups"]) == {"a", "b"}
    d, _ = one_json(["select", "--scores", out, "--out", str(tmp_path / "k.jsonl"), "--json"])
    assert d["kept"] == d["written"] and d["groups"][-1]["label"] == "all"
    ref = str(tmp_path / "ref.safetensors")
    rc, o, e = run_cli(capsys, ["reference", "--model", "tiny", "--data", data, "--out", ref])
    assert rc == 0 and "reference gradient" in e and "sample/s" in e, e  # a progress bar with a rate
    d, _ = one_json(["reference", "--model", "tiny", "--data", data, "--out", ref, "--json"])
    assert d["records"] == 10 and d["norm"] > 0
    probe = open(tmp_path / "probe", "w")
    probe.close()
    assert stat.S_IMODE(os.stat(ref).st_mode) == stat.S_IMODE(os.stat(tmp_path / "probe").st_mode)  # like any file
    cfg = _train_config(tmp_path, out_dir="run")
    d, _ = one_json(["train", "--config", cfg, "--dry-run", "--json"])
    assert d["tasks"][0]["records"] == 6 and d["estimate_train_s"] > 0 and not os.path.exists(tmp_path / "run")
    rc, o, e = run_cli(capsys, ["train", "--config", cfg])
    assert rc == 0 and "task 1/1 t" in e and "sample/s" in e and "{}" not in e, e
    assert "after task t:" in o and "results in" in o


# -- item 15, 16: help and docs agree with the code; a fast start ---------------------------------------------


def test_policy_help_and_readme_synopsis_match_the_code():
    from gradsel_core.selection import policy_names

    parser = build_parser()
    subs = parser._actions[-1].choices
    for cmd in ("select", "inspect"):
        help_text = subs[cmd].format_help()
        for name in policy_names():
            assert name in help_text, (cmd, name)
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("gradsel score --model"):]
    block = block[:block.index("```")]
    flags = {o for a in subs["score"]._actions for o in a.option_strings if o.startswith("--")} - {"--help", "--debug"}
    missing = sorted(f for f in flags if f not in block)
    assert not missing, f"README's gradsel score synopsis lacks {missing}"


def test_help_version_inspect_and_select_do_not_import_torch(tmp_path, capsys):
    """No torch for --help, --version, inspect and select, and each starts within 0.5 s of the floor any numpy
    CLI pays (an interpreter importing numpy), timed in the same run: the best of 3, as this shared CPU is noisy."""
    import time

    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(4))
    out = str(tmp_path / "s")
    assert run_cli(capsys, ["score", "--model", "tiny", "--data", data, "--out", out, "--no-progress"])[0] == 0
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'kernels'}")

    def best(args):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
            times.append(time.perf_counter() - t0)
            assert r.returncode == 0, (args, r.stderr[-2000:])
        return min(times)

    floor = best(["-c", "import numpy, json, argparse"])
    code = ("import sys; from gradsel_core.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert rc in (0, None), rc\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n")
    for argv in (["--help"], ["--version"], ["inspect", out],
                 ["select", "--scores", out, "--out", str(tmp_path / "k.jsonl"), "--data", data]):
        t = best(["-c", code, *argv])
        assert t - floor < 0.5, (argv, round(t, 3), round(floor, 3))
