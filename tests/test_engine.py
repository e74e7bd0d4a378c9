"""Engine foundation: semantics of the API, the loop reference, and vmap == loop."""
from __future__ import annotations

import pytest
import torch
from conftest import (VOCAB, Classifier, assert_close_rel, build, classifier_loss, lm_batch, params_for,
                      tiny_gpt)

import gradsel_core as gs
from gradsel_core.batching import causal_lm_losses


def subset(name, model):
    """A parameter subset: every other selected parameter name."""
    names = list(gs.GradNormEngine(model, params=params_for(name)).params)
    return names[::2]


# -- the reference itself ------------------------------------------------------------------------------


def test_loop_matches_a_hand_written_per_sample_gradient():
    model = tiny_gpt()
    batch = lm_batch()
    res = gs.GradNormEngine(model, backend="loop", per_param=True).score(batch)
    for b in range(4):
        ids = batch["input_ids"][b:b + 1]
        mask = batch["attention_mask"][b:b + 1]
        logits = model(ids, attention_mask=mask)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
        tok = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        n = int((labels[0, 1:] != -100).sum())
        loss = tok / max(n, 1)
        if n == 0:
            assert float(res.norms[b]) == 0.0 and float(res.losses[b]) == 0.0
            continue  # no target: nothing to differentiate
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        want = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))
        assert abs(float(res.norms[b]) - float(want)) <= 1e-5 * float(want)
        lv = loss.item()
        assert abs(float(res.losses[b]) - lv) <= 1e-6 * max(1.0, lv)
        assert int(res.tokens[b]) == n


# -- vmap == loop ----------------------------------------------------------------------------------------


def test_vmap_equals_loop_full_params(lm_name):
    model = build(lm_name)
    batch = lm_batch()
    kw = dict(params=params_for(lm_name), per_param=True)
    ref = gs.GradNormEngine(model, backend="loop", **kw).score(batch)
    got = gs.GradNormEngine(model, backend="vmap", **kw).score(batch)
    assert_close_rel(got.norms, ref.norms, 1e-5, lm_name)
    assert_close_rel(got.losses, ref.losses, 1e-5, lm_name)
    assert torch.equal(got.tokens, ref.tokens)
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], 1e-5, n)


def test_vmap_equals_loop_param_subset(lm_name):
    model = build(lm_name)
    batch = lm_batch()
    names = subset(lm_name, model)
    ref = gs.GradNormEngine(model, params=names, backend="loop").score(batch)
    got = gs.GradNormEngine(model, params=names, backend="vmap").score(batch)
    assert_close_rel(got.norms, ref.norms, 1e-5, lm_name)
    assert ref.norms.abs().sum() > 0


def test_vmap_equals_loop_fp64():
    model = tiny_gpt().double()
    batch = lm_batch()
    ref = gs.GradNormEngine(model, backend="loop").score(batch)
    got = gs.GradNormEngine(model, backend="vmap").score(batch)
    assert ref.norms.dtype == torch.float32 and ref.losses.dtype == torch.float32
    assert_close_rel(got.norms, ref.norms, 1e-6, "fp64")


def test_custom_loss_fn_classifier():
    torch.manual_seed(0)
    model = Classifier()
    batch = lm_batch(B=5, padding=True)
    batch["labels"] = torch.tensor([0, 1, 2, 1, 0])
    ref = gs.GradNormEngine(model, loss_fn=classifier_loss, backend="loop").score(batch)
    got = gs.GradNormEngine(model, loss_fn=classifier_loss, backend="vmap").score(batch)
    assert_close_rel(got.norms, ref.norms, 1e-5, "classifier")
    assert torch.equal(ref.tokens, batch["attention_mask"].sum(1))
    assert (ref.norms > 0).all()


def test_hf_model_output_and_plain_tensor_are_both_handled():
    model = build("llama")
    batch = lm_batch()

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw).logits

    a = gs.GradNormEngine(model, backend="loop").score(batch)
    b = gs.GradNormEngine(Plain(model), backend="loop").score(batch)
    assert_close_rel(b.norms, a.norms, 1e-6, "plain tensor output")


# -- batch semantics --------------------------------------------------------------------------------------


def test_zero_target_sample_and_padding_semantics():
    model = tiny_gpt()
    batch = lm_batch()
    res = gs.GradNormEngine(model, backend="vmap").score(batch)
    assert res.tokens.tolist() == [9, 4, 0, 7]  # T=10: full; 5 real tokens; 1 token; 8 after a left pad of 2
    assert float(res.norms[2]) == 0.0 and float(res.losses[2]) == 0.0
    assert torch.isfinite(res.norms).all() and torch.isfinite(res.losses).all()


def test_padding_does_not_change_a_sample_score():
    """A right-padded sample scores the same as the same sample alone without padding."""
    model = tiny_gpt()
    batch = lm_batch()
    n = int(batch["attention_mask"][1].sum())
    alone = {"input_ids": batch["input_ids"][1:2, :n]}
    a = gs.GradNormEngine(model, backend="loop").score(batch)
    b = gs.GradNormEngine(model, backend="loop").score(alone)
    assert abs(float(a.norms[1]) - float(b.norms[0])) <= 1e-5 * float(b.norms[0])


def test_labels_given_explicitly_and_sum_reduction():
    model = tiny_gpt()
    batch = lm_batch(padding=False)
    labels = batch["input_ids"].clone()
    labels[:, :4] = -100  # prompt masked
    batch["labels"] = labels
    mean = gs.GradNormEngine(model, backend="loop").score(batch)
    summ = gs.GradNormEngine(model, backend="vmap", loss_reduction="sum").score(batch)
    assert mean.tokens.tolist() == [6] * 4  # targets at positions 4..9
    assert_close_rel(summ.norms, mean.norms * 6, 1e-5, "sum = mean * tokens")
    assert_close_rel(summ.losses, mean.losses * 6, 1e-6, "sum loss")


def test_batch_of_one_and_empty_batch():
    model = tiny_gpt()
    batch = lm_batch()
    one = {k: v[:1] for k, v in batch.items()}
    ref = gs.GradNormEngine(model, backend="loop").score(batch)
    for backend in ("loop", "vmap", "ghost", "auto"):
        r1 = gs.GradNormEngine(model, backend=backend).score(one)
        assert r1.norms.shape == (1,)
        assert_close_rel(r1.norms, ref.norms[:1], 1e-5, backend)
        empty = {"input_ids": torch.zeros(0, 10, dtype=torch.long)}
        r0 = gs.GradNormEngine(model, backend=backend, per_param=True).score(empty)
        assert r0.norms.shape == (0,) and r0.losses.shape == (0,) and r0.tokens.shape == (0,)
        assert r0.norms.dtype == torch.float32 and r0.tokens.dtype == torch.int64
        assert all(v.shape == (0,) for v in r0.per_param.values())


def test_chunk_size_does_not_change_results():
    model = tiny_gpt()
    batch = lm_batch(B=5)
    full = gs.GradNormEngine(model, backend="vmap").score(batch)
    for cs in (1, 2, 5):
        got = gs.GradNormEngine(model, backend="vmap", chunk_size=cs).score(batch)
        assert_close_rel(got.norms, full.norms, 1e-6, f"chunk_size={cs}")


def test_per_param_sums_to_norm_squared(lm_name):
    model = build(lm_name)
    res = gs.GradNormEngine(model, params=params_for(lm_name), backend="vmap", per_param=True).score(lm_batch())
    total = sum(res.per_param.values())
    assert_close_rel(total, res.norms.double() ** 2, 1e-5, "per_param sum")
    assert all(v.dtype == torch.float32 and v.shape == (4,) for v in res.per_param.values())


def test_causal_lm_losses_length_one_sequence():
    logits = torch.randn(3, 1, 7, requires_grad=True)
    losses, tokens = causal_lm_losses(logits, torch.zeros(3, 1, dtype=torch.long))
    assert losses.tolist() == [0.0] * 3 and tokens.tolist() == [0] * 3


# -- side effects -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["loop", "vmap", "ghost"])
def test_no_side_effects(backend):
    model = tiny_gpt(dropout=0.5)
    model.train()
    model.blocks[0].eval()  # a mixed mode must be restored exactly
    frozen = model.blocks[1].fc.weight
    frozen.requires_grad_(False)
    sentinel = torch.full_like(model.wte.weight, 7.0)
    model.wte.weight.grad = sentinel.clone()
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = lm_batch()
    with torch.no_grad():
        a = gs.GradNormEngine(model, params="all", backend=backend).score(batch)
    b = gs.GradNormEngine(model, params="all", backend=backend).score(batch)
    assert torch.equal(a.norms, b.norms), "scoring must be deterministic (dropout off)"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert frozen.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not frozen)
    assert torch.equal(model.wte.weight.grad, sentinel)
    assert all(p.grad is None for n, p in model.named_parameters() if p is not model.wte.weight)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert a.norms.gt(0).sum() == 3


# -- params selection -------------------------------------------------------------------------------------


def test_params_specs():
    model = build("peft_llama")
    lora = gs.GradNormEngine(model, params="lora").params
    assert lora and all("lora_" in n for n in lora)
    assert any("lora_embedding_A" in n for n in lora)
    assert set(gs.GradNormEngine(model, params="trainable").params) == set(lora)
    allp = gs.GradNormEngine(model, params="all").params
    assert len(allp) > len(lora)
    fn = gs.GradNormEngine(model, params=lambda n, p: n.endswith("norm.weight")).params
    assert fn and all(n.endswith("norm.weight") for n in fn)


def test_tied_alias_name_resolves():
    model = build("gpt2")
    names = list(gs.GradNormEngine(model, params=["lm_head.weight"]).params)
    assert names == ["transformer.wte.weight"]


# -- bad input ----------------------------------------------------------------------------------------------


def test_selecting_nothing_shows_real_names():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="wte.weight"):
        gs.GradNormEngine(model, params=lambda n, p: False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="selects no parameter"):
        gs.GradNormEngine(model)
    with pytest.raises(ValueError, match="unknown parameter names"):
        gs.GradNormEngine(model, params=["nope.weight"])
    with pytest.raises(ValueError, match="params='bogus'"):
        gs.GradNormEngine(model, params="bogus")


@pytest.mark.parametrize(
    "batch, exc, match",
    [
        ({"input_ids": torch.zeros(2, 5)}, TypeError, "integer token ids"),
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, ValueError,
         "attention_mask"),
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 6, dtype=torch.long)},
         ValueError, "labels"),
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 5)}, TypeError, "labels"),
        ({"input_ids": torch.zeros(5, dtype=torch.long)}, ValueError, r"\[B, T\]"),
        ({"input_ids": [[1, 2]]}, TypeError, "torch.Tensor"),
        ({"attention_mask": torch.ones(2, 5)}, ValueError, "input_ids"),
        ([1, 2, 3], TypeError, "mapping"),
    ],
)
def test_bad_batches_raise(batch, exc, match):
    engine = gs.GradNormEngine(tiny_gpt())
    with pytest.raises(exc, match=match):
        engine.score(batch)


def test_output_without_logits_needs_loss_fn():
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 4)

        def forward(self, input_ids, attention_mask=None):
            return {"hidden": self.emb(input_ids)}

    with pytest.raises(ValueError, match="loss_fn"):
        gs.GradNormEngine(Embed(), backend="loop").score(lm_batch())


def test_bad_engine_arguments():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="backend"):
        gs.GradNormEngine(model, backend="fast")
    with pytest.raises(ValueError, match="loss_reduction"):
        gs.GradNormEngine(model, loss_reduction="max")
    with pytest.raises(ValueError, match="chunk_size"):
        gs.GradNormEngine(model, chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        gs.GradNormEngine(Classifier(), loss_fn=lambda o, b: o.sum(), backend="loop").score(lm_batch())


def test_per_sample_grad_norms_shorthand():
    model = tiny_gpt()
    batch = lm_batch()
    a = gs.per_sample_grad_norms(model, batch, backend="loop")
    b = gs.GradNormEngine(model, backend="loop").score(batch).norms
    assert torch.equal(a, b)
