"""The experiment runner and `gradsel demo`, at toy sizes (the real demo sizes are measured, not tested)."""
from __future__ import annotations

import json
import os

import pytest
from conftest import make_llama_dir

from gradsel_core.cli import main
from gradsel_core.commands.demo import config_from_args
from gradsel_core.experiment import ExperimentConfig, markdown, run_experiment
from gradsel_core.cli import build_parser

TINY = dict(n_pretrain=120, n_align=40, n_task_train=24, n_task_test=8, n_heldout_harmful=6, n_heldout_benign=6)


def test_testbed_experiment_outputs(tmp_path):
    cfg = ExperimentConfig(seeds=(0, 1), methods=(("full", "offline"), ("median_band", "offline"), ("random", "online")),
                           testbed=TINY, pretrain_epochs=1, align_epochs=1, task_epochs=1, batch_size=8,
                           eval_max_new_tokens=4, loss_filter_std=None, out_dir=str(tmp_path))
    res = run_experiment(cfg)
    assert sorted(os.listdir(tmp_path)) == ["norms.png", "refusal.png", "results.json", "results.md"]
    saved = json.load(open(tmp_path / "results.json"))
    assert len(saved["runs"]) == 6 and len(saved["aligned"]) == 2
    tasks = saved["tasks"]
    assert len(tasks) == 3
    by = {(r["method"], r["seed"]): r for r in saved["runs"]}
    for (method, seed), r in by.items():
        assert len(r["steps"]) == 3
        assert {"refusal_rate", "benign_refusal_rate", "fact_acc", "mean_task_acc"} <= set(r["steps"][-1])
        assert len(r["accuracy"]) == 3
    # the same kept count for every selection method: ⌊0.5·24⌋ = 12 per epoch
    assert [s["kept"] for s in by[("median_band/offline", 0)]["steps"]] == [12, 12, 12]
    assert [s["kept"] for s in by[("random/online", 0)]["steps"]] == [12, 12, 12]
    assert [s["kept"] for s in by[("full", 0)]["steps"]] == [24, 24, 24]
    md = markdown(saved)
    assert "median_band/offline" in md and "±" in md
    summ = res["summary"]["full"]["steps"][-1]["refusal_rate"]
    vals = [by[("full", s)]["steps"][-1]["refusal_rate"] for s in (0, 1)]
    assert abs(summ[0] - sum(vals) / 2) < 1e-12


def test_demo_arguments():
    args = build_parser().parse_args(["demo"])
    cfg = config_from_args(args)
    assert cfg.methods and len(cfg.seeds) >= 1 and cfg.model_dir is None
    full = config_from_args(build_parser().parse_args(["demo", "--full"]))
    assert len(full.seeds) >= 3 and len(full.methods) > len(cfg.methods)
    with pytest.raises(ValueError, match="unknown methods"):  # a UsageError: the CLI prints it in its one style
        config_from_args(build_parser().parse_args(["demo", "--methods", "bogus"]))


def test_model_dir_path_on_a_tiny_hf_llama(tmp_path, capsys):
    d = make_llama_dir(tmp_path / "llama")

    def write(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    qa = [{"prompt": f"what is two plus {w} ?", "response": f"answer {w}"} for w in ("three", "four", "five", "six")]
    chat = [{"prompt": f"tell me about {w}", "response": f"the {w} sat on a mat"} for w in ("cat", "dog", "world", "safety")]
    harm = write("harm.jsonl", [{"prompt": "tell me why"}, {"prompt": "hello world"}])
    mc = write("mc.jsonl", [{"question": "what is two plus two ?", "choices": ["four", "five"], "answer": 0}])
    argv = ["demo", "--model", d, "--task", f"qa={write('qa.jsonl', qa * 3)},{write('qa_eval.jsonl', qa)}",
            "--task", f"chat={write('chat.jsonl', chat * 3)}", "--harmful", harm, "--mc", mc,
            "--methods", "full", "median_band/online", "--out", str(tmp_path / "out"), "--epochs", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "median_band/online" in out and "results.json" in out
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["tasks"] == ["qa", "chat"]
    assert {"refusal_rate", "fact_acc"} <= set(saved["runs"][0]["steps"][-1])
