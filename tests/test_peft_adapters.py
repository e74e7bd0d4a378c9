"""PEFT adapters: a relative ``base_model_name_or_path`` is taken from the adapter's folder; the trainer
saves LoRA runs as PEFT adapter folders (loadable by PEFT and by ``gradsel score``) and resumes from
them; checkpoint files get normal permissions."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from gradsel_core.cli import main
from gradsel_core.data import load_model_and_tokenizer
from gradsel_core.errors import UsageError
from gradsel_core.trainer import ContinualTrainer, LoRAConfig, Task
from conftest import make_llama_dir

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _records(n, seed, vocab=30):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(4, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": [1] + x + [2] + x[::-1], "labels": [-100] * (len(x) + 2) + x[::-1]})
    return out


def _tasks():
    return [Task("a", _records(12, 0), _records(4, 1)), Task("b", _records(12, 2), _records(4, 3))]


def _logits(model, seed=9):
    ids = torch.tensor([_records(1, seed)[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _hf_model(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir)


def test_adapter_relative_base_is_resolved_against_the_adapter_folder(llama_dir, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(_hf_model(llama_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    adir = tmp_path / "runs" / "adapter"
    pm.save_pretrained(str(adir))
    cfg_path = adir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = os.path.relpath(llama_dir, adir)  # "../../.../llama"
    cfg_path.write_text(json.dumps(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative path means nothing from here
    model, tok = load_model_and_tokenizer(str(adir))
    assert torch.allclose(_logits(model), _logits(pm), atol=1e-6)
    assert tok.eos_token == "</s>"
    # a path relative to the working directory still works when the adapter's folder has no such path
    cfg["base_model_name_or_path"] = os.path.relpath(llama_dir, tmp_path)
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    model, _ = load_model_and_tokenizer(str(adir))
    assert torch.allclose(_logits(model), _logits(pm), atol=1e-6)
    # neither: the error names the file and both places looked at
    cfg["base_model_name_or_path"] = "../no-such-base"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="adapter_config.json: base_model_name_or_path='../no-such-base'") as ei:
        load_model_and_tokenizer(str(adir))
    assert str(tmp_path / "runs" / "no-such-base") in str(ei.value) and str(tmp_path.parent / "no-such-base") in str(ei.value)


@pytest.mark.parametrize("use_peft", [True, False], ids=["peft-layers", "builtin-layers"])
def test_trainer_saves_lora_runs_as_peft_adapter_folders(llama_dir, tmp_path, use_peft, umask_022):
    from peft import PeftModel

    lora = LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"], use_peft=use_peft)
    tr = ContinualTrainer(_hf_model(llama_dir), _tasks(), lora=lora, lr=5e-2, batch_size=4, out_dir=str(tmp_path),
                          pad_id=3, checkpoint_format="peft")
    res = tr.run()
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["task-0", "task-1"]
    folder = ckpts / "task-1"
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(_mode(folder / f) == 0o644 for f in os.listdir(folder))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(llama_dir)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    trained = _logits(tr.model)
    assert not torch.allclose(trained, _logits(_hf_model(llama_dir)), atol=1e-4)  # the adapter did something
    # PEFT itself loads it onto a fresh base, and so does `gradsel score --model folder`
    loaded = PeftModel.from_pretrained(_hf_model(llama_dir), str(folder))
    assert torch.allclose(_logits(loaded), trained, atol=1e-5)
    via_cli_loader, _ = load_model_and_tokenizer(str(folder))
    assert torch.allclose(_logits(via_cli_loader), trained, atol=1e-5)
    # a rerun resumes from the adapter folder: nothing is retrained, the model is the trained one
    tr2 = ContinualTrainer(_hf_model(llama_dir), _tasks(), lora=lora, lr=5e-2, batch_size=4, out_dir=str(tmp_path),
                           pad_id=3, checkpoint_format="peft")
    res2 = tr2.run()
    assert torch.allclose(_logits(tr2.model), trained, atol=1e-6)
    assert np.array_equal(np.asarray(res2.accuracy), np.asarray(res.accuracy), equal_nan=True)


def test_full_model_checkpoints_get_normal_permissions(tmp_path, umask_022):
    from gradsel_core.models import TinyGPT, TinyGPTConfig

    torch.manual_seed(0)
    m = TinyGPT(TinyGPTConfig(vocab_size=32, d_model=16, n_layer=1, max_seq_len=16))
    ContinualTrainer(m, _tasks()[:1], batch_size=4, out_dir=str(tmp_path)).run()
    ckpt = tmp_path / "checkpoints" / "task-0.safetensors"
    assert _mode(ckpt) == 0o644 and _mode(tmp_path / "state.json") == 0o644


def test_peft_format_needs_lora(tmp_path):
    from gradsel_core.models import TinyGPT, TinyGPTConfig

    m = TinyGPT(TinyGPTConfig(vocab_size=32, d_model=16, n_layer=1, max_seq_len=16))
    with pytest.raises(UsageError, match="no 'lora' config"):
        ContinualTrainer(m, _tasks(), out_dir=str(tmp_path), checkpoint_format="peft")
    with pytest.raises(UsageError, match="'model' or 'peft'"):
        ContinualTrainer(m, _tasks(), out_dir=str(tmp_path), checkpoint_format="adapter")


def test_train_cli_checkpoint_format_peft(llama_dir, tmp_path, capsys, umask_022):
    rows = [{"prompt": "what is two plus three ?", "response": "five"}, {"text": "the cat sat on the mat"}] * 3
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": llama_dir, "tasks": [{"name": "t", "train": "t.jsonl", "eval": "t.jsonl"}],
           "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}, "checkpoint_format": "peft",
           "batch_size": 3, "out_dir": "run"}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    rc = main(["train", "--config", str(tmp_path / "run.json")])
    assert rc == 0, capsys.readouterr().err
    folder = tmp_path / "run" / "checkpoints" / "task-0"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == os.path.abspath(llama_dir)
    assert _mode(folder / "adapter_model.safetensors") == 0o644
    out = str(tmp_path / "scores")
    rc = main(["score", "--model", str(folder), "--data", str(tmp_path / "t.jsonl"), "--out", out, "--no-progress"])
    assert rc == 0, capsys.readouterr().err
