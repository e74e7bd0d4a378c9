"""The continual trainer: selection modes, LoRA, outputs, resume."""
from __future__ import annotations

import json
import os

import pytest
import torch

import gradsel_core as gs
from gradsel_core.trainer import ContinualTrainer, LoRAConfig, SelectionConfig, Task, apply_lora, teacher_forced_scores


def make_records(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(2, 6, (1,), generator=g))
        x = torch.randint(3, 12, (L,), generator=g).tolist()
        y = sorted(x) if kind == "sort" else x[::-1]
        out.append({"input_ids": [1] + x + [2] + y, "labels": [-100] * (L + 2) + y})
    return out


def tasks():
    return [Task("sort", make_records("sort", 40, 0), make_records("sort", 12, 1)),
            Task("rev", make_records("rev", 40, 2), make_records("rev", 12, 3))]


def model():
    torch.manual_seed(0)
    return gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=16, d_model=16, n_layer=1, max_seq_len=16))


def test_offline_selection_keeps_the_policy_count_and_writes_outputs(tmp_path):
    tr = ContinualTrainer(model(), tasks(), selection={"policy": "median_band", "ratio": 0.25, "loss_filter_std": None},
                          mode="offline", batch_size=8, out_dir=str(tmp_path), evaluators={"const": lambda m: {"x": 1.0}})
    res = tr.run()
    assert [t["train"]["kept"] for t in res.per_task] == [10, 10]
    assert [sum(t["selection"]["kept_mask"]) for t in res.per_task] == [10, 10]
    assert len(res.accuracy) == 2 and res.accuracy[0][1] != res.accuracy[0][1]  # NaN above the diagonal
    assert set(res.forgetting) >= {"bwt", "fm", "max_drop", "avg_acc"}
    assert res.per_task[1]["evaluators"] == {"const": {"x": 1.0}}
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["task"] for l in lines if l["event"] == "task_end"] == ["sort", "rev"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["task-0.safetensors", "task-1.safetensors"]


def test_online_mode_filters_every_batch(tmp_path):
    tr = ContinualTrainer(model(), tasks()[:1], selection=SelectionConfig("median_band", ratio=0.5, loss_filter_std=None),
                          mode="online", batch_size=8, out_dir=str(tmp_path))
    res = tr.run()
    assert res.per_task[0]["train"]["kept"] == 20  # 5 batches of 8, 4 kept each
    assert res.per_task[0]["selection"]["mode"] == "online"


def test_training_changes_weights_and_full_mode_uses_everything():
    m = model()
    before = m.lm_head.weight.detach().clone()
    res = ContinualTrainer(m, tasks()[:1], selection=None, batch_size=8, lr=1e-2).run()
    assert res.per_task[0]["train"]["kept_fraction"] == 1.0
    assert not torch.equal(before, m.lm_head.weight)


def test_learns_a_task():
    """Sanity: the loop optimises (exact match on the training task rises above zero)."""
    m = model()
    t = Task("sort", make_records("sort", 64, 0), make_records("sort", 64, 0))
    assert teacher_forced_scores(m, t.eval)["token_accuracy"] < 0.3
    ContinualTrainer(m, [t], lr=1e-2, epochs=20, batch_size=16, max_grad_norm=None).run()
    assert teacher_forced_scores(m, t.eval)["token_accuracy"] > 0.6


@pytest.mark.parametrize("use_peft", [True, False])
def test_lora_keeps_peft_names_and_freezes_the_base(use_peft):
    m = apply_lora(model(), LoRAConfig(r=2, use_peft=use_peft))
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A.default.weight" in n or ".lora_B.default.weight" in n for n in trainable)
    assert "blocks.0.attn.qkv.lora_A.default.weight" in trainable
    assert not any("lm_head" in n for n in trainable)
    batch = {"input_ids": torch.randint(0, 16, (3, 8))}
    ref = gs.GradNormEngine(m, params="lora", backend="loop").score(batch)
    got = gs.GradNormEngine(m, params="lora", backend="ghost").score(batch)
    assert torch.allclose(got.norms, ref.norms, rtol=1e-5)


def test_builtin_and_peft_lora_name_the_same_parameters():
    a = apply_lora(model(), LoRAConfig(r=2, use_peft=True))
    b = apply_lora(model(), LoRAConfig(r=2, use_peft=False))
    names = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert names(a) == names(b)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    kw = dict(selection="drop_top", batch_size=8, seed=3)
    full = ContinualTrainer(model(), tasks(), out_dir=str(tmp_path / "a"), **kw).run()
    calls = []

    def crash_on_second_task(m):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash during task 1")
        return {}

    with pytest.raises(KeyboardInterrupt):
        ContinualTrainer(model(), tasks(), out_dir=str(tmp_path / "b"), evaluators={"e": crash_on_second_task},
                         **kw).run()
    assert json.load(open(tmp_path / "b" / "state.json"))["done"] == 1
    resumed = ContinualTrainer(model(), tasks(), out_dir=str(tmp_path / "b"), evaluators={"e": lambda m: {}},
                               **kw).run()
    assert len(resumed.per_task) == 2
    assert resumed.accuracy[1] == full.accuracy[1]
    end_lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl") if '"task_end"' in l]
    assert [l["task"] for l in end_lines] == ["sort", "rev"]


def test_resume_refuses_another_configuration(tmp_path):
    ContinualTrainer(model(), tasks()[:1], batch_size=8, out_dir=str(tmp_path)).run()
    with pytest.raises(ValueError, match="another configuration"):
        ContinualTrainer(model(), tasks()[:1], batch_size=4, out_dir=str(tmp_path)).run()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ContinualTrainer(model(), tasks(), mode="sometimes")
    with pytest.raises(ValueError, match="unknown key"):
        ContinualTrainer(model(), tasks(), selection={"polcy": "x"})
    with pytest.raises(ValueError, match="tasks is empty"):
        ContinualTrainer(model(), [])


def test_train_cli_from_a_config(tmp_path):
    from gradsel_core.cli import main

    def write(name, recs):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)

    write("a_train.jsonl", [{"prompt": f"add {i} {i + 1}", "response": str(2 * i + 1)} for i in range(16)])
    write("a_eval.jsonl", [{"prompt": f"add {i} {i + 1}", "response": str(2 * i + 1)} for i in range(4)])
    write("harm.jsonl", [{"prompt": "how to steal a car"}])
    write("mc.jsonl", [{"question": "sky?", "choices": ["blue", "green"], "answer": 0}])
    cfg = {"model": "tiny", "tasks": [{"name": "add", "train": "a_train.jsonl", "eval": "a_eval.jsonl"}],
           "selection": {"policy": "median_band", "ratio": 0.5}, "mode": "online", "batch_size": 8,
           "safety": {"harmful_prompts": "harm.jsonl", "mc": "mc.jsonl"}, "out_dir": "run"}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "run.json")]) == 0
    end = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"task_end"' in l]
    assert end[0]["train"]["kept"] == 8
    assert set(end[0]["evaluators"]) == {"refusal", "mc"}
    assert 0.0 <= end[0]["evaluators"]["refusal"]["refusal_rate"] <= 1.0
