"""The study runner and `gradsel demo`, at toy sizes (the real demo sizes are measured, not tested)."""
from __future__ import annotations

import json
import math
import os

import pytest
from conftest import make_llama_dir

from gradsel_core.cli import build_parser, main
from gradsel_core.errors import UsageError
from gradsel_core.commands.demo import config_from_args
from gradsel_core.study.experiment import (
    Cell,
    ExperimentConfig,
    bootstrap_ci,
    kept_count,
    markdown,
    paired_stats,
    run_experiment,
    spearman,
)

TINY = dict(n_pretrain=120, n_align=40, n_task_train=32, n_task_test=8, n_heldout_harmful=6, n_heldout_benign=6)
SMALL_RUN = dict(testbed=TINY, pretrain_epochs=1, align_epochs=1, task_epochs=1, batch_size=8, eval_max_new_tokens=4,
                 progress=False)


def test_study_outputs_budgets_and_resume(tmp_path, monkeypatch):
    cfg = ExperimentConfig(seeds=(0, 1), methods=("full", "median_band", "random"), modes=("offline", "online"),
                           ratios=(0.5,), budgets=("epochs", "steps"), mechanism_samples=9, mechanism_seeds=(1,),
                           out_dir=str(tmp_path), **SMALL_RUN)
    res = run_experiment(cfg)
    names = set(os.listdir(tmp_path))
    assert {"results.json", "results.md", "timing.json", "refusal.png", "frontier.png", "norms.png",
            "mechanism.png", "runs", "aligned"} <= names
    saved = json.load(open(tmp_path / "results.json"))
    assert "wall_s" not in json.dumps(saved)  # timings live in timing.json: same command, same bytes
    assert len(saved["runs"]) == 2 * 9 and len(saved["aligned"]) == 2 and len(saved["tasks"]) == 3
    by = {(r["label"], r["seed"]): r for r in saved["runs"]}
    for r in saved["runs"]:
        assert len(r["steps"]) == 3 and len(r["accuracy"]) == 3
        assert {"safety_margin", "refusal_rate", "fact_acc", "task_em", "task_loglik"} <= set(r["steps"][-1])
        assert all(math.isfinite(x) for x in r["steps"][-1]["task_loglik"])
    # the same kept count for every selection method: ⌊0.5·32⌋ = 16 per epoch (the median band's loss filter
    # can leave fewer candidates than that)
    assert [s["kept"] for s in by[("random/offline/ρ=0.5/epochs", 0)]["steps"]] == [16, 16, 16]
    assert all(0 < s["kept"] <= 16 for s in by[("median_band/offline/ρ=0.5/epochs", 0)]["steps"])
    assert [s["kept"] for s in by[("random/online/ρ=0.5/epochs", 0)]["steps"]] == [16, 16, 16]
    assert [s["kept"] for s in by[("full", 0)]["steps"]] == [32, 32, 32]
    # budgets: full takes 4 steps per task; equal epochs at ρ = 0.5 half of it offline; equal steps the same
    full_steps = [s["optimizer_steps"] for s in by[("full", 0)]["steps"]]
    assert full_steps == [4, 4, 4]
    assert [s["optimizer_steps"] for s in by[("random/offline/ρ=0.5/epochs", 0)]["steps"]] == [2, 2, 2]
    assert [s["optimizer_steps"] for s in by[("random/online/ρ=0.5/epochs", 0)]["steps"]] == full_steps
    for label in ("random/offline/ρ=0.5/steps", "random/online/ρ=0.5/steps"):
        assert [s["optimizer_steps"] for s in by[(label, 0)]["steps"]] == full_steps, label
    assert by[("random/online/ρ=0.5/steps", 0)]["batch_size"] == 16 and by[("random/online/ρ=0.5/steps", 0)]["epochs"] == 2
    # what selection keeps: offline cells only; full keeps everything
    assert by[("full", 0)]["kept_profile"][0]["n"] == 32 and "kept_profile" not in by[("random/online/ρ=0.5/epochs", 0)]
    summ = res["summary"]
    vals = [by[("full", s)]["steps"][-1]["safety_margin"] for s in (0, 1)]
    assert summ["cells"]["full"]["final"]["safety_margin"][0] == pytest.approx(sum(vals) / 2, abs=1e-12)
    # the primary metric: the refusal rate after each task, averaged over the tasks, paired with random by seed
    pv = summ["paired_vs_random"]["median_band/offline/ρ=0.5/steps"]["refusal_mean"]

    def refusal_mean(label, seed):
        return sum(s["refusal_rate"] for s in by[(label, seed)]["steps"]) / 3

    diffs = [refusal_mean("median_band/offline/ρ=0.5/steps", s) - refusal_mean("random/offline/ρ=0.5/steps", s)
             for s in (0, 1)]
    assert pv["n"] == 2 and pv["mean"] == pytest.approx(sum(diffs) / 2)
    mech = saved["mechanism"]
    assert len(mech) == 1 and mech[0]["seed"] == 1 and mech[0]["n"] == 9 and len(mech[0]["damage"]) == 9
    assert set(mech[0]["spearman"]) == {"norm", "norm_per_token", "loss", "length", "cosine"}
    assert len(mech[0]["cosine"]) == mech[0]["n"] and all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in mech[0]["cosine"])
    md = markdown(saved)
    assert "median_band/offline/ρ=0.5/steps" in md and "Paired differences" in md and "What selection keeps" in md

    # resume: nothing is retrained, the same bytes come out
    import gradsel_core.study.experiment as ex

    monkeypatch.setattr(ex, "run_cell", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    before = (tmp_path / "results.json").read_bytes()
    run_experiment(cfg)
    assert (tmp_path / "results.json").read_bytes() == before
    # a changed setting is refused, naming it
    with pytest.raises(ValueError, match="changed: lr"):
        run_experiment(ExperimentConfig(**{**cfg.__dict__, "lr": 1e-4}))


def test_local_arms_in_a_toy_study(tmp_path):
    """The oracle keeps ⌊ρ·n⌋ records and none of the eroding ones; norm_per_token keeps at most ⌊ρ·n⌋ and
    records the length confound; the summary has the positive control, the matched-utility table and the
    proxy validation, and the report names them."""
    cfg = ExperimentConfig(seeds=(0,), methods=("random", "oracle", "norm_per_token"), modes=("offline", "online"),
                           ratios=(0.5,), budgets=("steps",), mechanism_samples=0, out_dir=str(tmp_path), **SMALL_RUN)
    assert [c.label for c in cfg.cells()] == ["random/offline/ρ=0.5/steps", "oracle/offline/ρ=0.5/steps",
                                              "norm_per_token/offline/ρ=0.5/steps", "random/online/ρ=0.5/steps"]
    res = run_experiment(cfg)
    by = {r["label"]: r for r in res["runs"]}
    oracle = by["oracle/offline/ρ=0.5/steps"]
    assert [p["n"] for p in oracle["kept_profile"]] == [16, 16, 16]  # the kept set of each task
    assert all(p["eroding_rate"] == 0.0 for p in oracle["kept_profile"])
    assert [s["optimizer_steps"] for s in oracle["steps"]] == [4, 4, 4]  # equal steps: 2 epochs of 16
    npt = by["norm_per_token/offline/ρ=0.5/steps"]
    assert all(0 < p["n"] <= 16 for p in npt["kept_profile"])
    assert len(npt["length_confound"]) == 3 and all(-1 <= lc["spearman_norm_tokens"] <= 1
                                                    for lc in npt["length_confound"])
    summ = res["summary"]
    assert "oracle/offline/ρ=0.5/steps" in summ["positive_control"]["cells"]
    assert summ["positive_control"]["holds"] is False  # one seed, no ρ = 0.2: never "holds"
    assert summ["proxy_validation"]["n_checkpoints"] == 4 * 3
    md = markdown(res)
    assert "Positive control" in md and "NOT established" in md and "oracle/offline/ρ=0.2/steps" in md
    assert "The continuous proxy" in md


def test_two_runs_give_identical_json(tmp_path):
    """Issue 10 item 4: pinned threads and deterministic algorithms make the demo reproducible."""
    outs = []
    for name in ("a", "b"):
        cfg = ExperimentConfig(seeds=(0,), methods=("full", "median_band", "random"), modes=("offline", "online"),
                               ratios=(0.5,), budgets=("steps",), mechanism_samples=6, out_dir=str(tmp_path / name),
                               **SMALL_RUN)
        run_experiment(cfg)
        outs.append((tmp_path / name / "results.json").read_bytes())
    assert outs[0] == outs[1]


def test_loss_filter_is_passed_explicitly():
    cfg = ExperimentConfig()
    assert cfg.selection(Cell("median_band", "offline", 0.2, "steps")).loss_filter_std == 1.0
    for m in ("random", "drop_top", "keep_top"):
        assert cfg.selection(Cell(m, "offline", 0.2, "steps")).loss_filter_std is None
    sel = cfg.selection(Cell("drop_top", "online", 0.2, "epochs"))
    assert sel.ratio == pytest.approx(0.8) and kept_count(Cell("drop_top", ratio=0.2), 300) == 60
    args = build_parser().parse_args(["demo", "--loss-filter-std", "1.0"])
    abl = config_from_args(args)
    assert abl.selection(Cell("random", "offline", 0.2, "steps")).loss_filter_std == 1.0
    assert cfg.selection(Cell("full")) is None


def test_schedule_budgets():
    cfg = ExperimentConfig(task_epochs=8, batch_size=32)
    assert cfg.schedule(Cell("full"), 300) == (8, 32)
    assert cfg.schedule(Cell("random", "offline", 0.2, "epochs"), 300) == (8, 32)
    assert cfg.schedule(Cell("random", "offline", 0.2, "steps"), 300) == (40, 32)  # 8·300/60
    assert cfg.schedule(Cell("random", "online", 0.2, "steps"), 300) == (40, 160)
    assert cfg.schedule(Cell("random", "online", 0.2, "epochs"), 300) == (8, 32)


def test_statistics():
    st = paired_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st["mean"] == 3.0 and st["n_pos"] == 5 and st["sign_p"] == pytest.approx(0.0625)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert st["ci"] == pytest.approx([3 - half, 3 + half])
    st = paired_stats([1.0, -1.0, 2.0, 0.0])
    assert (st["n_pos"], st["n_neg"]) == (2, 1) and st["sign_p"] == pytest.approx(1.0)
    assert paired_stats([])["n"] == 0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    lo, hi = bootstrap_ci(list(range(50)), [x * x for x in range(50)], n_boot=200)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_demo_arguments():
    cfg = config_from_args(build_parser().parse_args(["demo"]))
    assert cfg.ratios == (0.2,) and len(cfg.seeds) >= 3 and cfg.model_dir is None and cfg.mechanism_samples >= 200
    assert len(cfg.cells()) == 5  # full, random, oracle, median_band, norm_per_token; offline, equal steps
    assert {"oracle", "random", "norm_per_token"} <= set(cfg.methods)
    full = config_from_args(build_parser().parse_args(["demo", "--full"]))
    # 5 library policies in both modes, the oracle and norm_per_token offline only; 2 budgets, 5 ratios
    assert len(full.seeds) >= 5 and len(full.cells()) == 1 + (7 * 2 + 5 * 2) * 5 and full.mechanism_seeds is None
    study = config_from_args(build_parser().parse_args(["demo", "--study"]))
    assert len(study.seeds) >= 10 and study.ratios == (0.2, 0.5) and study.budgets == ("steps",)
    assert sorted(c.label for c in study.cells() if c.ratio == 0.2 and c.budget == "steps") == sorted(
        [f"{m}/offline/ρ=0.2/steps" for m in ("random", "oracle", "median_band", "norm_per_token", "drop_opposed")]
        + [f"{m}/online/ρ=0.2/steps" for m in ("random", "median_band", "drop_opposed")])
    # random's frontier: random alone at equal epochs, ρ 0.1, 0.2, 0.5, per mode
    assert sorted(c.label for c in study.cells() if c.budget == "epochs" and c.method != "full") == sorted(
        f"random/{m}/ρ={r}/epochs" for m in ("offline", "online") for r in ("0.02", "0.05", "0.1", "0.2", "0.5"))
    control = config_from_args(build_parser().parse_args(["demo", "--control"]))
    assert sorted(c.label for c in control.cells()) == sorted(
        f"{m}/offline/ρ={r}/steps" for m in ("random", "oracle") for r in ("0.2", "0.5"))
    assert control.shared() == dict(study.shared(), mechanism_samples=0)  # one output folder serves both
    with pytest.raises(UsageError, match="one of"):
        config_from_args(build_parser().parse_args(["demo", "--study", "--control"]))
    assert "drop_opposed" in full.methods and "drop_opposed" not in cfg.methods
    one = config_from_args(build_parser().parse_args(["demo", "--full", "--seeds", "3", "--methods", "median_band",
                                                      "--ratios", "0.35"]))
    assert one.seeds == (3,) and sorted(c.label for c in one.cells()) == [
        "median_band/offline/ρ=0.35/epochs", "median_band/offline/ρ=0.35/steps",
        "median_band/online/ρ=0.35/epochs", "median_band/online/ρ=0.35/steps"]
    assert one.shared() == full.shared()  # the same per-run settings: a rerun cell reproduces the study's numbers
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--methods", "bogus"])
    with pytest.raises(ValueError, match="ratios"):
        ExperimentConfig(ratios=(1.5,))


def test_drop_opposed_ranks_by_the_safety_reference(tmp_path):
    """drop_opposed keeps the ρ-fraction whose gradients agree most with the safety reference gradient,
    offline (scored with the reference) and online (in the filtered backward)."""
    cfg = ExperimentConfig(seeds=(0,), methods=("drop_opposed",), modes=("offline", "online"), ratios=(0.5,),
                           budgets=("epochs",), mechanism_samples=0, out_dir=str(tmp_path), **SMALL_RUN)
    assert cfg.selection(Cell("drop_opposed", "offline", 0.5, "epochs")).ratio == pytest.approx(0.5)
    assert kept_count(Cell("drop_opposed", ratio=0.2), 300) == 60
    res = run_experiment(cfg)
    runs = {r["label"]: r for r in res["runs"]}
    assert set(runs) == {"drop_opposed/offline/ρ=0.5/epochs", "drop_opposed/online/ρ=0.5/epochs"}
    for r in runs.values():
        for step in r["steps"]:
            assert 0.4 <= step["kept_fraction"] <= 0.6, step["kept_fraction"]


def test_model_dir_path_on_a_tiny_hf_llama(tmp_path, capsys):
    d = make_llama_dir(tmp_path / "llama")

    def write(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    qa = [{"prompt": f"what is two plus {w} ?", "response": f"answer {w}"} for w in ("three", "four", "five", "six")]
    chat = [{"prompt": f"tell me about {w}", "response": f"the {w} sat on a mat"} for w in ("cat", "dog", "world", "safety")]
    harm = write("harm.jsonl", [{"prompt": "tell me why", "refusal": "no", "compliance": "because"},
                                {"prompt": "hello world", "refusal": "no", "compliance": "hi there"}])
    mc = write("mc.jsonl", [{"question": "what is two plus two ?", "choices": ["four", "five"], "answer": 0}])
    argv = ["demo", "--model", d, "--task", f"qa={write('qa.jsonl', qa * 3)},{write('qa_eval.jsonl', qa)}",
            "--task", f"chat={write('chat.jsonl', chat * 3)},{write('chat_eval.jsonl', chat)}", "--harmful", harm,
            "--mc", mc, "--methods", "full", "median_band", "--modes", "online", "--ratios", "0.5",
            "--out", str(tmp_path / "out"), "--epochs", "1", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "median_band/online/ρ=0.5/steps" in out and "results.json" in out
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["tasks"] == ["qa", "chat"]
    assert {"refusal_rate", "fact_acc", "safety_margin"} <= set(saved["runs"][0]["steps"][-1])


def test_oracle_drops_every_eroding_record_and_keeps_rho_n():
    import numpy as np

    from gradsel_core.study.experiment import oracle_mask

    raw = [{"meta": {"eroding": i % 7 == 0}} for i in range(100)]  # 15 eroding
    for ratio, k in ((0.2, 20), (0.5, 50)):
        m = oracle_mask(raw, ratio, np.random.default_rng(0))
        assert m.sum() == k and not any(m[i] for i in range(100) if raw[i]["meta"]["eroding"])
    m = oracle_mask(raw, 0.9, np.random.default_rng(0))  # fewer clean records than ⌊ρ·n⌋: all of them
    assert m.sum() == 85
    assert (oracle_mask(raw, 0.2, np.random.default_rng(1)) == oracle_mask(raw, 0.2, np.random.default_rng(1))).all()


def test_norm_per_token_is_the_sum_norm_over_sqrt_tokens():
    import numpy as np
    import torch

    from gradsel_core.engine import GradNormEngine
    from gradsel_core.models import TinyGPT, TinyGPTConfig
    from gradsel_core.study.experiment import norm_per_token

    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=17, max_seq_len=12, d_model=8, n_layer=1, n_head=2)).double()
    ids = torch.randint(1, 17, (3, 10))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, :2] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    r_sum = GradNormEngine(model, backend="loop", loss_reduction="sum").score(batch)
    key = norm_per_token(r_sum.norms.numpy(), r_sum.tokens.numpy())
    for i in range(3):  # the loop's gradient of the summed loss, by hand
        model.zero_grad()
        out = model(input_ids=ids[i:i + 1])
        logits = out.logits if hasattr(out, "logits") else out
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[i, 1:], ignore_index=-100, reduction="sum")
        loss.backward()
        g = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
        n = int((labels[i, 1:] != -100).sum())
        assert r_sum.norms.dtype == torch.float32  # the engine reports norms in fp32: fp32 tolerance
        assert key[i] == pytest.approx(float(g) / np.sqrt(n), rel=1e-6)


def test_holm_and_sign_flip():
    from gradsel_core.study.experiment import holm, sign_flip_p

    assert sign_flip_p([1.0] * 10) == pytest.approx(2 / 1024)
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    h = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert h["a"]["p_holm"] == pytest.approx(0.03) and h["a"]["survives"]
    assert h["c"]["p_holm"] == pytest.approx(0.06) and not h["c"]["survives"]
    assert h["b"]["p_holm"] == pytest.approx(0.06) and not h["b"]["survives"]  # step-down: stops at c


def test_matched_utility_recovers_a_planted_offset():
    from gradsel_core.study.experiment import matched_utility, positive_control

    def run(method, seed, x, y, ratio=0.2):
        step = {"refusal_rate": y, "harmful_compliance": 0.0, "margin_per_token": 0.0, "task_loglik": [x],
                "mean_task_em": 0.5, "mean_task_loglik": x, "optimizer_steps": 10}
        return {"cell": {"method": method, "mode": "offline", "ratio": ratio, "budget": "steps"},
                "label": f"{method}/offline/ρ={ratio}/steps", "seed": seed, "steps": [step], "plasticity_em": [0.5],
                "forgetting": {"bwt": 0.0}}

    # random on a line (safety falls as utility rises), five cells of two seeds each; the oracle 0.1 above it
    runs = [run("random", s, x + 0.01 * (-1) ** s, 0.5 - 0.1 * (x + 0.01 * (-1) ** s), ratio)
            for ratio, x in ((0.1, -1.0), (0.2, -0.8), (0.3, -0.6), (0.4, -0.4), (0.5, -0.2)) for s in range(2)]
    runs += [run("oracle", s, -0.95 + 0.07 * s, 0.6 - 0.1 * (-0.95 + 0.07 * s) + 0.01 * (s % 2)) for s in range(10)]
    runs += [run("keep_top", s, -1.5, 0.9) for s in range(3)]  # learns less than any random cell: not tested
    mu = matched_utility(runs)
    st = mu["cells"]["oracle/offline/ρ=0.2/steps"]
    assert st["mean"] == pytest.approx(0.105, abs=1e-9) and st["survives"]
    assert mu["cells"]["keep_top/offline/ρ=0.2/steps"]["outside_range"] == 3
    assert mu["frontiers"]["offline"]["n_cells"] == 5
    # a frontier that rises somewhere is pooled into a non-increasing one
    from gradsel_core.study.experiment import random_frontier

    fr = random_frontier([("a", -1.0, 0.5), ("b", -0.5, 0.7), ("c", 0.0, 0.1)])
    assert fr["y"] == pytest.approx([0.6, 0.6, 0.1])
    pc = positive_control({"oracle/offline/ρ=0.2/steps": {"refusal_mean": {"n": 10, "ci": [0.01, 0.2]}}})
    assert not pc["holds"]  # ρ = 0.5 did not run


def test_testbed_marks_a_minority_as_eroding_and_the_reference_is_disjoint():
    from gradsel_core.study.testbed import REFERENCE_REFUSALS, REFUSALS, TestbedConfig, build_testbed

    tb = build_testbed(TestbedConfig(seed=0, n_pretrain=100, n_align=50, n_task_train=200, n_task_test=10))
    for t in tb.tasks:
        flags = [r["meta"]["eroding"] for r in t.train]
        assert sum(flags) == round(tb.config.eroding_frac * 200) > 0
        assert not any(r["meta"]["eroding"] for r in t.eval)
        for r in t.train:
            if r["meta"]["eroding"]:
                assert r["meta"]["erosion"] in ("form", "role", "list") and r["meta"]["harmful"] is False
    ref = tb.reference_refusals(40)
    scored = {p["preferred"] for p in tb.safety_pairs()} | {t for t, _ in REFUSALS}
    assert all(r["response"] in REFERENCE_REFUSALS and r["response"] not in scored for r in ref)
    assert not ({r["prompt"] for r in ref} & set(tb.heldout_harmful))


def test_the_aligned_cache_key_is_exactly_what_the_weights_depend_on():
    """Task-only settings (the eroding fraction, task sizes) reuse the aligned model; anything that changes the
    pretraining or alignment records, the model or the preparation does not."""
    from gradsel_core.study.experiment import _aligned_key, _digest
    from gradsel_core.study.testbed import TestbedConfig, build_testbed, recommended_model_config

    cfg = ExperimentConfig(**SMALL_RUN)

    def key(cfg=cfg, **tb_kw):
        tb = build_testbed(TestbedConfig(seed=0, **dict(TINY, **tb_kw)))
        return _digest(_aligned_key(cfg, tb, recommended_model_config(tb)))

    base = key()
    assert key(eroding_frac=0.2) == base and key(task_noise_rate=0.1) == base
    assert key(n_pretrain=121) != base and key(misconception_frac=0.3) != base
    assert key(cfg=ExperimentConfig(**dict(SMALL_RUN, align_lr=2e-3))) != base
    tb0 = build_testbed(TestbedConfig(seed=0, **TINY))
    tb1 = build_testbed(TestbedConfig(seed=1, **TINY))
    assert _aligned_key(cfg, tb0, recommended_model_config(tb0)) != _aligned_key(cfg, tb1, recommended_model_config(tb1))


def test_the_committed_study_summary_recomputes_and_the_readme_quotes_it():
    """docs/demo-full/results.json's summary is what the code computes from its own runs, and the README's
    headline figures (positive control, matched utility, the proxy) are those numbers."""
    from pathlib import Path

    from gradsel_core.study.experiment import summarize

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "docs" / "demo-full" / "results.json").read_text())
    again = json.loads(json.dumps(summarize(result)))
    assert json.dumps(again, sort_keys=True) == json.dumps(result["summary"], sort_keys=True)
    readme = " ".join((root / "README.md").read_text().split())  # line breaks as spaces
    summ = result["summary"]
    for st in summ["positive_control"]["cells"].values():
        assert f"{100 * st['mean']:+.1f} pp [{100 * st['ci'][0]:+.1f}, {100 * st['ci'][1]:+.1f}]" in readme
    quoted = 0
    for cell, st in summ["matched_utility"]["cells"].items():
        if st.get("n", 0) >= 2 and st.get("survives") is not None:
            text = f"{100 * st['mean']:+.1f} [{100 * st['ci'][0]:+.1f}, {100 * st['ci'][1]:+.1f}]".replace("-", "−")
            quoted += text in readme or text.replace("−", "-") in readme
    assert quoted >= 8, quoted  # every tested cell the README names (oracle, offline ρ = 0.5, online)
    pv = summ["proxy_validation"]
    assert f"+{pv['spearman_checkpoints']:.2f} over {pv['n_checkpoints']} checkpoints" in readme
