"""`gradsel score` / `gradsel inspect` end to end on a tiny local HF Llama (tokenizer built here), a PEFT
adapter directory and the built-in tiny model; and the data helpers behind them."""
from __future__ import annotations

import json
import re
import glob
import os

import numpy as np
import pytest
import torch

from gradsel_core import GradNormEngine
from gradsel_core.cli import main
from gradsel_core.data import (
    ByteTokenizer,
    collate,
    encode_record,
    load_model_and_tokenizer,
    model_max_length,
    read_jsonl,
)
from gradsel_core.store import ScoreStore, model_fingerprint
from gradsel_core.params import select_params
from conftest import WORDS, make_llama_dir

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    rows = []
    for i in range(12):
        if i % 2 == 0:
            rows.append({"id": f"t{i}", "text": " ".join(WORDS[i : i + 3 + i % 5]), "task": "chat"})
        else:
            rows.append({
                "id": f"p{i}", "prompt": "Q : what is two plus " + WORDS[10 + i % 4] + " ?",
                "response": "A : " + " ".join(WORDS[i % 7 : i % 7 + 2 + i % 3]), "task": "math",
            })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return str(path), rows


def test_score_cli_llama_text_and_prompt_response(llama_dir, data_file, tmp_path, capsys):
    path, rows = data_file
    out = str(tmp_path / "scores")
    rc = main(["score", "--model", llama_dir, "--data", path, "--out", out, "--batch-size", "4", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "scored 12 records" in captured.out and "NaN/inf: 0" in captured.out and "median" in captured.out
    store = ScoreStore.open(out)
    assert store.ids.tolist() == [r["id"] for r in rows]
    assert store.fields["task"].tolist() == [r["task"] for r in rows]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    for i, r in enumerate(rows):
        if "text" in r:
            n = len(tok.encode(r["text"], add_special_tokens=True))
            assert store.tokens[i] == n - 1  # every token but the first is a target
        else:
            n_resp = len(tok.encode(r["response"], add_special_tokens=False))
            assert store.tokens[i] == n_resp + 1  # response + EOS; prompt tokens are not counted
    assert np.isfinite(store.norms).all() and (store.norms > 0).all()
    assert store.meta["model"]["class"] == "LlamaForCausalLM"
    # the stored scores are the engine's scores on the encoded records
    model, tok2 = load_model_and_tokenizer(llama_dir)
    eng = GradNormEngine(model, backend="vmap")  # the reference for whatever "auto" chose
    for i in (0, 1):
        rec = encode_record(rows[i], tok2, 64)
        res = eng.score(collate([rec], pad_id=3))
        assert np.allclose(store.norms[i], res.norms.numpy(), rtol=1e-4, atol=1e-6)

    # another --batch-size changes no per-sample value: the store is resumed with its own plan (nothing to do);
    # a config that changes the numbers (--max-length) is refused, naming only that key; --overwrite replaces it
    rc = main(["score", "--model", llama_dir, "--data", path, "--out", out, "--batch-size", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0 and "nothing to score" in captured.out, captured.err
    assert ScoreStore.open(out).meta["config"]["batch_size"] == 4
    rc = main(["score", "--model", llama_dir, "--data", path, "--out", out, "--max-length", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "data.source.max_length" in err
    assert "special_tokens" not in err and "batch_size" not in err and "overwrite=True" not in err
    rc = main(["score", "--model", llama_dir, "--data", path, "--out", out, "--batch-size", "2", "--no-progress",
               "--overwrite", "--max-length", "4"])
    assert rc == 0
    short = ScoreStore.open(out)
    assert short.meta["config"]["batch_size"] == 2 and short.tokens.max() <= 3


def test_score_cli_peft_adapter_dir(llama_dir, data_file, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    adir = str(tmp_path / "adapter")
    peft_model.save_pretrained(adir)
    with open(os.path.join(adir, "adapter_config.json")) as f:
        assert os.path.abspath(json.load(f)["base_model_name_or_path"]) == os.path.abspath(llama_dir)
    out = str(tmp_path / "scores")
    rc = main(["score", "--model", adir, "--data", data_file[0], "--out", out, "--params", "lora",
               "--backend", "loop", "--batch-size", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    store = ScoreStore.open(out)
    names = [p["name"] for p in store.meta["model"]["params"]]
    assert names and all("lora_" in n for n in names)
    assert store.meta["config"]["params"] == "lora" and np.isfinite(store.norms).all()


def test_score_cli_tiny_and_inspect(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "hello world " * (i + 1), "source": "s%d" % (i % 2)} for i in range(9)]
    rows.append({"prompt": "Say hi:", "response": " hi", "source": "s0"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = str(tmp_path / "scores")
    rc = main(["score", "--model", "tiny", "--data", str(path), "--out", out, "--batch-size", "4", "--per-param"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "scored 10 records" in cap.out
    store = ScoreStore.open(out)
    assert store.ids.tolist() == list(range(10))
    assert store.tokens[0] == len("hello world ".encode())  # BOS + bytes: every byte is a target
    assert store.tokens[9] == len(" hi") + 1  # response bytes + EOS
    assert store.per_param is not None and store.fields["source"].tolist()[:2] == ["s0", "s1"]

    png = tmp_path / "hist.png"
    rc = main(["inspect", out, "--bins", "5", "--plot", str(png)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "records:  10" in text and "non-finite: 0" in text and "field:    source" in text
    assert "histogram of norms (5 bins" in text and text.count("#") > 0
    assert "per-parameter share" in text
    hist_lines = [l for l in text.splitlines() if l.startswith("  [")]
    assert len(hist_lines) == 5 and sum(int(l.split()[-1]) for l in hist_lines) == 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["inspect", out, "--log"])
    assert rc == 0 and "log scale" in capsys.readouterr().out

    shard = sorted(n for n in os.listdir(out) if n.startswith("shard-"))[0]
    p = os.path.join(out, shard)
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-3])
    rc = main(["inspect", out])
    assert rc == 2 and shard in capsys.readouterr().err


# -- data helpers --------------------------------------------------------------------------------------


def test_encode_record_and_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo" and tok.encode("a") == [256, 97]
    r = encode_record({"text": "abc", "id": 3, "lang": "en", "meta": {"x": 1}}, tok)
    assert r == {"input_ids": [256, 97, 98, 99], "labels": [256, 97, 98, 99], "attention_mask": [1] * 4,
                 "id": 3, "lang": "en"}
    r = encode_record({"prompt": "ab", "response": "c"}, tok)
    assert r["input_ids"] == [256, 97, 98, 99, 257] and r["labels"] == [-100, -100, -100, 99, 257]
    assert r["id"] is None
    r = encode_record({"prompt": "abcdef", "response": "g"}, tok, max_length=4)
    assert len(r["input_ids"]) == 4 and set(r["labels"]) == {-100}
    r = encode_record({"input_ids": [1, 2, 3]}, tok, max_length=2)
    assert r["input_ids"] == [1, 2] and r["labels"] == [1, 2]
    with pytest.raises(ValueError, match="'text', or 'prompt'"):
        encode_record({"question": "?"}, tok)
    with pytest.raises(ValueError, match="needs 'response'"):
        encode_record({"prompt": "?"}, tok)


def test_read_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: not valid JSON"):
        read_jsonl(str(p))
    p.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r":2: each line must be a JSON object"):
        read_jsonl(str(p))


def test_tiny_model_is_deterministic(llama_dir):
    m1, t1 = load_model_and_tokenizer("tiny")
    m2, _ = load_model_and_tokenizer("tiny")
    fp = lambda m: model_fingerprint(m, select_params(m))["content_sha256"]  # noqa: E731
    assert fp(m1) == fp(m2) and isinstance(t1, ByteTokenizer)
    assert model_max_length(m1) == 512
    m3, _ = load_model_and_tokenizer(llama_dir)
    assert model_max_length(m3) == 64
    with pytest.raises(FileNotFoundError, match="not 'tiny'"):
        load_model_and_tokenizer(os.path.join(llama_dir, "missing"))


def test_compact_records_collate_the_same():
    from gradsel_core.data import compact_record

    tok = ByteTokenizer()
    recs = [encode_record(r, tok, 16) for r in ({"text": "abcdef"}, {"prompt": "ab", "response": "cd"},
                                                  {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]})]
    compact = [compact_record(r) for r in recs]
    assert "labels" not in compact[0] and "attention_mask" not in compact[0] and "labels" in compact[1]
    assert compact[0]["input_ids"].dtype == np.int32 and "attention_mask" in compact[2]
    a, b = collate(recs, 258), collate(compact, 258)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_score_cli_under_torchrun_gloo(tmp_path, capsys):
    import subprocess
    import sys

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"x{i}", "text": "ab " * (1 + i % 9)}) for i in range(24)))
    common = ["--model", "tiny", "--data", str(path), "--batch-size", "2", "--shard-size", "4", "--no-progress"]
    assert main(["score", "--out", str(tmp_path / "one"), *common]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gradsel_core.cli", "score", "--out", str(tmp_path / "two"), *common],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scored 24 records") == 1  # rank 0 prints the summary
    one, two = ScoreStore.open(str(tmp_path / "one")), ScoreStore.open(str(tmp_path / "two"))
    assert two.meta["run"]["world_size"] == 2
    assert one.ids.tolist() == two.ids.tolist()
    assert np.array_equal(one.norms, two.norms) and np.array_equal(one.losses, two.losses)


# -- issue 11 / issue 10 item 7: the score CLI's errors and its one summary ---------------------------------


def _tiny_data(tmp_path, n=10):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "text": "ab " * (1 + i % 5)}) + "\n" for i in range(n)))
    return str(path)


def _score(*extra):
    return main(["score", "--model", "tiny", "--batch-size", "2", "--shard-size", "4", "--no-progress", *extra])


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("gradsel ")]
    assert len(lines) == 1, err
    return lines[0]


def test_score_prints_one_summary_counting_only_this_runs_records(tmp_path, capsys, caplog):
    data = _tiny_data(tmp_path, 10)
    out = str(tmp_path / "s")
    assert _score("--data", data, "--out", out) == 0
    cap = capsys.readouterr()
    lines = [l for l in cap.out.splitlines() if l.strip()]
    assert len(lines) == 1 and "scored" not in cap.err and "scored" not in caplog.text, (cap.out, cap.err)
    assert "params by rules" in lines[0], lines[0]  # the engine's coverage, in the same line
    assert lines[0].startswith("scored 10 records in ") and "samples/s" in lines[0] and "tokens/s" in lines[0]
    assert "10 records in the store" in lines[0]
    # a no-op resume reports no rate
    assert _score("--data", data, "--out", out) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("nothing to score: all 10 records were scored by an earlier run") and "samples/s" not in line and "tokens/s" not in line
    # a resumed run counts only what it scored
    m = json.loads(open(os.path.join(out, "manifest.json")).read())
    os.unlink(os.path.join(out, "manifest.json"))
    os.unlink(os.path.join(out, m["shards"][1]["file"]))
    assert _score("--data", data, "--out", out) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("scored 4 records (+6 from an earlier run) in ") and "10 records in the store" in line


def test_score_rejects_bad_numeric_arguments(tmp_path, capsys):
    data = _tiny_data(tmp_path)
    for flag, value in (("--max-length", "-5"), ("--max-length", "0"), ("--batch-size", "0"),
                        ("--shard-size", "-1"), ("--max-tokens", "x")):
        with pytest.raises(SystemExit) as e:
            _score("--data", data, "--out", str(tmp_path / "s"), flag, value)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be a positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_score_errors_name_the_file_line_record_or_argument(tmp_path, capsys, monkeypatch):
    data = _tiny_data(tmp_path)
    out = str(tmp_path / "s")
    cases = []

    def bad(i, content):
        p = tmp_path / f"bad{i}.jsonl"
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return ["--data", str(p), "--out", out]

    cases.append((bad(1, b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), r"bad1\.jsonl:2: not valid UTF-8 \(byte 0xe9"))
    cases.append((bad(2, '{"text": "ok"}\n{"text": "x", "id": 9223372036854775808}\n'),
                  r"bad2\.jsonl:2: id 9223372036854775808 does not fit in 64 bits"))
    cases.append((bad(3, '{"input_ids": [256, 1, 2]}\n{"input_ids": [1, 300, 2]}\n'),
                  r"record 1: input_ids\[1\] = 300 is outside the model's vocabulary \[0, 259\)"))
    cases.append((bad(4, '{"input_ids": [256, 1, 2]}\n{"input_ids": [1, -3, 2]}\n'), r"record 1: input_ids\[1\] = -3 is outside"))
    cases.append((bad(5, '{"input_ids": [256, 1, 2]}\n{"input_ids": []}\n'), r"record 1 has empty input_ids \(T = 0\)"))
    cases.append((["--data", str(tmp_path), "--out", out], r"--data .* is a directory; give a JSONL file"))
    cases.append((["--data", str(tmp_path / "missing.jsonl"), "--out", out], r"--data .*missing\.jsonl: no such file"))
    cases.append((["--data", data, "--out", data], r"--out .*d\.jsonl is a file, not a directory"))
    for argv, want in cases:
        assert _score(*argv) == 2, argv
        assert re.search(r"^gradsel score: error: .*" + want, _err(capsys)), (argv, want)
    assert not glob.glob(os.path.join(out, "shard-*"))  # streaming: a bad record's window is never written
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert _score("--data", data, "--out", out) == 2
    assert "environment variable WORLD_SIZE='two' is not an integer >= 1" in _err(capsys)
    monkeypatch.setenv("WORLD_SIZE", "0")
    assert _score("--data", data, "--out", out) == 2
    assert "WORLD_SIZE='0'" in _err(capsys)


def test_score_refuses_unwritable_out_and_a_held_lock(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    import gradsel_core.store as store_mod

    data = _tiny_data(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root writes anyway: then the check is exercised through os.access below
        os.chmod(ro, 0o555)
    else:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if os.path.abspath(p) == str(ro) else real_access(p, m))
    assert _score("--data", data, "--out", str(ro)) == 2
    assert re.search(r"--out .*ro is not writable; choose a writable directory", _err(capsys))
    assert _score("--data", data, "--out", str(ro / "sub")) == 2
    assert re.search(r"--out .*sub cannot be created \(.*ro is not writable\)", _err(capsys))
    monkeypatch.undo()
    os.chmod(ro, 0o755)
    # a read-only file system (what root meets too): the write error names the file
    real_replace = os.replace

    def erofs(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store_mod.os, "replace", erofs)
    assert _score("--data", data, "--out", str(ro)) == 2
    assert re.search(r"cannot write .*ro/\.gradsel-store: Read-only file system", _err(capsys))
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    # a second run while the first holds the lock
    out = tmp_path / "s"
    assert _score("--data", data, "--out", str(out)) == 0
    capsys.readouterr()
    fd = os.open(out / ".gradsel-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _score("--data", data, "--out", str(out)) == 2
        assert "is being written by another gradsel run" in _err(capsys)
    finally:
        os.close(fd)


def test_store_read_errors_exit_2_naming_the_key_or_file(tmp_path, capsys):
    data = _tiny_data(tmp_path)
    out = tmp_path / "s"
    assert _score("--data", data, "--out", str(out)) == 0
    capsys.readouterr()
    mpath = out / "manifest.json"
    good = mpath.read_text()
    m = json.loads(good)
    m["counts"]["records"] = "ten"
    mpath.write_text(json.dumps(m))
    assert main(["inspect", str(out)]) == 2
    assert "key 'counts.records' must be int, got str" in _err(capsys)
    mpath.write_text(good)
    (out / "columns.safetensors").write_text("[1, 2")
    assert main(["inspect", str(out)]) == 2
    assert "columns.safetensors" in _err(capsys)


def test_repair_cli_and_tokenizer_or_max_length_change_is_refused(tmp_path, capsys):
    data = _tiny_data(tmp_path)
    out = tmp_path / "s"
    assert _score("--data", data, "--out", str(out)) == 0
    ref = ScoreStore.open(str(out))
    capsys.readouterr()
    (out / "manifest.json").write_text("{ torn")
    assert main(["repair", str(out)]) == 0
    assert "rebuilt" in capsys.readouterr().out and np.array_equal(ScoreStore.open(str(out)).norms, ref.norms)
    assert main(["repair", str(tmp_path)]) == 2
    assert "not a gradsel score store" in _err(capsys)
    # the max length is part of the identity, even where it truncates nothing
    assert _score("--data", data, "--out", str(out), "--max-length", "500") == 2
    assert re.search(r"different dataset .*data\.source\.max_length", _err(capsys))


def test_tokenizer_change_is_refused(llama_dir, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[i : i + 4])}) + "\n" for i in range(6)))
    out = str(tmp_path / "s")
    common = ["--data", str(path), "--out", out, "--batch-size", "2", "--no-progress"]
    assert main(["score", "--model", llama_dir, *common]) == 0
    other = tmp_path / "llama2"
    shutil.copytree(llama_dir, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})  # a new token the data never uses
    tok.save_pretrained(str(other))
    capsys.readouterr()
    assert main(["score", "--model", str(other), *common]) == 2
    assert re.search(r"different dataset .*data\.source\.tokenizer", _err(capsys))
