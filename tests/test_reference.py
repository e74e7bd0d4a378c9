"""Per-sample alignment with a reference direction: dots and cosines, exact against the loop."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, build, lm_batch, params_for
from test_trust import CalledAndFunctional, FunctionalTying, MHAVariants, SubclassNet

import gradsel_core as gs
from gradsel_core.errors import UsageError


def _ref(model, params="trainable", seed=7, B=3):
    return gs.reference_gradient(model, [lm_batch(B=B, seed=seed)], params=params)


def _check(model, params="trainable", backends=("ghost", "vmap", "auto"), batch=None, rtol=1e-5):
    batch = batch if batch is not None else lm_batch()
    refs = [_ref(model, params), _ref(model, params, seed=11)]
    ref = gs.GradNormEngine(model, params=params, backend="loop").score(batch, reference=refs)
    assert ref.dots.shape == (batch["input_ids"].shape[0], 2)
    for backend in backends:
        got = gs.GradNormEngine(model, params=params, backend=backend).score(batch, reference=refs)
        assert_close_rel(got.dots, ref.dots, rtol, f"{backend} dots")
        assert_close_rel(got.cosines, ref.cosines, rtol, f"{backend} cosines")
        one = gs.GradNormEngine(model, params=params, backend=backend).score(batch, reference=refs[0])
        assert one.dots.shape == (batch["input_ids"].shape[0],)
        assert_close_rel(one.dots, ref.dots[:, 0], rtol, f"{backend} single reference")


def test_dots_equal_the_loop_on_the_model_zoo(lm_name):
    """Full parameters and LoRA (peft_llama): Linear, Conv1D, Embedding, norms, tied weights, LoRA."""
    model = build(lm_name)
    _check(model, params_for(lm_name), backends=("ghost", "auto"))


def test_dots_vmap_and_full_params_of_a_lora_model():
    _check(build("peft_llama"), "all", backends=("vmap", "ghost"))


@pytest.mark.parametrize("cls", [FunctionalTying, CalledAndFunctional, SubclassNet])
def test_dots_through_op_uses_and_overridden_forwards(cls):
    torch.manual_seed(0)
    _check(cls(), backends=("ghost",))


def test_dots_through_multihead_attention_and_module_fallbacks():
    torch.manual_seed(0)
    batch = lm_batch(padding=False)
    _check(MHAVariants(False, True, need_weights=False), batch=batch, backends=("ghost",))


def test_dots_fp64():
    model = build("gpt2").double()
    _check(model, backends=("ghost",), rtol=1e-10)


def test_own_gradient_gives_cosine_one_and_zero_target_gives_zero():
    model = build("tinygpt")
    batch = lm_batch()  # sample 2 has a single token: no target, zero gradient
    own = gs.reference_gradient(model, [{k: v[:1] for k, v in batch.items()}])
    res = gs.GradNormEngine(model, backend="ghost").score(batch, reference=own)
    assert abs(float(res.cosines[0]) - 1.0) < 1e-5
    assert float(res.dots[2]) == 0.0 and float(res.cosines[2]) == 0.0
    assert torch.isfinite(res.cosines).all()
    zero = {n: torch.zeros_like(t) for n, t in own.items()}
    res0 = gs.GradNormEngine(model, backend="ghost").score(batch, reference=zero)
    assert float(res0.cosines.abs().max()) == 0.0 and torch.isfinite(res0.cosines).all()


def test_reference_gradient_is_the_mean_per_sample_gradient_and_round_trips(tmp_path):
    model = build("tinygpt")
    batches = [lm_batch(B=3, seed=1), lm_batch(B=2, seed=2)]
    ref = gs.reference_gradient(model, batches)
    assert ref.count == 5 and ref.fingerprint
    # by hand: mean over the 5 samples of each sample's own loss gradient
    from gradsel_core.batching import per_sample_losses, prepare_batch

    model.zero_grad()
    total = 0
    for b in batches:
        p = prepare_batch(b, lm_loss=True)
        losses, _ = per_sample_losses(model(**p.model_inputs), p, None, "mean")
        total = total + losses.sum()
    (total / 5).backward()
    for n, prm in model.named_parameters():
        assert_close_rel(ref[n], prm.grad, 1e-5, n)
    model.zero_grad()
    path = tmp_path / "ref.safetensors"
    ref.save(str(path))
    back = gs.ReferenceGradient.load(str(path))
    assert back.fingerprint == ref.fingerprint and back.count == 5 and back.digest() == ref.digest()
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(UsageError, match="bad.safetensors"):
        gs.ReferenceGradient.load(str(tmp_path / "bad.safetensors"))


def test_reference_must_match_the_scored_parameters():
    model = build("tinygpt")
    ref = _ref(model)
    names = list(ref)
    with pytest.raises(UsageError, match="missing"):
        gs.GradNormEngine(model, backend="ghost").score(lm_batch(), reference={n: ref[n] for n in names[1:]})
    with pytest.raises(UsageError, match="shape"):
        bad = dict(ref)
        bad[names[0]] = bad[names[0]][..., :1]
        gs.GradNormEngine(model, backend="ghost").score(lm_batch(), reference=bad)


def test_empty_batch_with_a_reference():
    model = build("tinygpt")
    ref = _ref(model)
    empty = {"input_ids": torch.zeros(0, 5, dtype=torch.long)}
    res = gs.GradNormEngine(model).score(empty, reference=ref)
    assert res.dots.shape == (0,) and res.cosines.shape == (0,)


def test_score_dataset_stores_dots_and_cosines_and_refuses_another_reference(tmp_path):
    model = build("tinygpt")
    records = [{"input_ids": lm_batch(B=1, seed=s, padding=False)["input_ids"][0].tolist(), "id": s} for s in range(6)]
    ref = _ref(model)
    store = gs.score_dataset(model, records, str(tmp_path / "s"), batch_size=4, reference=ref, progress=False)
    eng = gs.GradNormEngine(model, backend="loop")
    for i, r in enumerate(records):
        res = eng.score({"input_ids": torch.tensor([r["input_ids"]])}, reference=ref)
        assert abs(float(store.dots[i]) - float(res.dots[0])) <= 1e-5 * max(1.0, abs(float(res.dots[0])))
        assert abs(float(store.cosines[i]) - float(res.cosines[0])) <= 1e-5
    again = gs.ScoreStore.open(str(tmp_path / "s"))
    assert again.meta["config"]["reference"]["references"][0]["digest"] == ref.digest()
    assert (again.cosines == store.cosines).all()
    other = _ref(model, seed=99)
    with pytest.raises(gs.StoreConflictError, match="reference"):
        gs.score_dataset(model, records, str(tmp_path / "s"), batch_size=4, reference=other, progress=False)
    with torch.no_grad():  # a reference from other weights is refused
        next(model.parameters()).add_(1.0)
    with pytest.raises(UsageError, match="other weights"):
        gs.score_dataset(model, records, str(tmp_path / "t"), batch_size=4, reference=ref, progress=False)


def test_cli_reference_then_score(tmp_path, capsys):
    import json

    from gradsel_core.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i} ", "response": "no, I cannot help with that" if i % 2 else
                                        "sure, here you go"}) + "\n" for i in range(6)))
    ref_path = tmp_path / "ref.safetensors"
    assert main(["reference", "--model", "tiny", "--data", str(data), "--out", str(ref_path)]) == 0
    assert "reference over 6 records" in capsys.readouterr().out
    assert main(["score", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "s"), "--no-progress",
                 "--reference", str(ref_path)]) == 0
    out = capsys.readouterr().out
    assert "cosine with the reference" in out
    store = gs.ScoreStore.open(str(tmp_path / "s"))
    assert store.cosines.shape == (6,) and (abs(store.cosines) <= 1 + 1e-5).all()
    assert main(["reference", "--model", "tiny", "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_reference_policies_on_cosines():
    import numpy as np

    scores = {"norms": np.ones(10), "losses": np.ones(10), "cosines": np.linspace(-0.9, 0.9, 10)}
    sel = gs.select(scores, policy="drop_opposed", ratio=0.3)
    assert sel.kept_ids.tolist() == list(range(3, 10))  # the three most opposed dropped
    band = gs.select(scores, policy="project_band", ratio=0.2)
    assert sorted(band.kept_ids.tolist()) == [4, 5]  # closest to the median cosine
    two = {**scores, "cosines": np.stack([scores["cosines"], -scores["cosines"]], 1)}
    assert gs.select(two, policy="drop_opposed", ratio=0.3, reference=1).kept_ids.tolist() == list(range(7))
    with pytest.raises(ValueError, match="score with a reference"):
        gs.select({"norms": np.ones(4), "losses": np.ones(4)}, policy="drop_opposed", ratio=0.5)
    # combinable with the loss pre-filter: an explicit value applies
    lossy = {**scores, "losses": np.array([0.0] + [1.0] * 8 + [9.0])}
    assert 9 not in gs.select(lossy, policy="drop_opposed", ratio=0.3, loss_filter_std=1.0).kept_ids


@pytest.mark.parametrize("mode", ["one_backward", "two_pass"])
def test_filtered_backward_with_a_reference_keeps_by_cosine_and_is_exact(mode):
    model = build("tinygpt")
    batch = lm_batch(padding=False)
    ref = _ref(model)
    res = gs.GradNormEngine(model, backend="loop").score(batch, reference=ref)
    model.zero_grad()
    out = gs.filtered_backward(model, batch, policy="drop_opposed", ratio=0.5, reference=ref, mode=mode)
    assert_close_rel(out.cosines, res.cosines, 1e-5, "cosines in the step")
    expect = torch.zeros(4, dtype=torch.bool)
    expect[torch.argsort(res.cosines, descending=True)[:2]] = True  # the two least opposed kept
    assert torch.equal(out.kept.cpu(), expect)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    from gradsel_core.batching import per_sample_losses, prepare_batch

    sub = prepare_batch({k: v[expect] for k, v in batch.items()}, lm_loss=True)
    per_sample_losses(model(**sub.model_inputs), sub, None, "mean")[0].mean().backward()
    for n, p in model.named_parameters():
        assert_close_rel(got[n], p.grad, 1e-5, n)
