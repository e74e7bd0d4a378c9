"""In-step filtering: the .grad it leaves equals a plain backward on the kept samples."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, build, lm_batch, tiny_gpt
from torch.utils.flop_counter import FlopCounterMode

import gradsel_core as gs
from gradsel_core.batching import per_sample_losses, prepare_batch


def plain_grads_on(model, batch, index, params, scale=1.0):
    """Reference: forward the kept samples only, mean of their per-sample losses, .backward()."""
    sub = {k: v[index] for k, v in batch.items()}
    prepared = prepare_batch(sub, lm_loss=True)
    out = model(**prepared.model_inputs)
    losses, _ = per_sample_losses(out, prepared, None, "mean")
    (losses.mean() * scale).backward()
    return {n: p.grad.clone() for n, p in params.items()}


def accumulation_matches_plain(model, fb, micro, params):
    """Steps of ``fb`` over micro-batches (loss scale 1/2 each) accumulate the plain gradient of every
    micro-batch's kept samples."""
    kept = [fb.step(mb, loss_scale=0.5).kept for mb in micro]
    got = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    for mb, k in zip(micro, kept):
        plain_grads_on(model, mb, k, params, scale=0.5)
    for n in params:
        assert_close_rel(got[n], params[n].grad, 1e-5, n)


@pytest.mark.parametrize("name", ["tinygpt", "tinygpt_tied", "gpt2", "peft_llama"])
def test_grad_equals_plain_backward_on_kept_samples(name):
    model = build(name).eval()
    batch = lm_batch(B=6, T=10, padding=False)
    spec = "lora" if name == "peft_llama" else "trainable"
    params = gs.GradNormEngine(model, params=spec).params
    res = gs.filtered_backward(model, batch, policy="median_band", ratio=0.5, params=spec, loss_filter_std=None)
    assert res.n_kept == 3 and res.kept.dtype == torch.bool and int(res.kept.sum()) == 3
    got = {n: p.grad.clone() for n, p in params.items()}
    scored = gs.GradNormEngine(model, params=spec, backend="loop").score(batch)
    assert_close_rel(res.norms, scored.norms, 1e-5, "norms")
    for p in model.parameters():
        p.grad = None
    want = plain_grads_on(model, batch, res.kept, params)
    for n in params:
        assert_close_rel(got[n], want[n], 1e-5, n)
    assert abs(res.loss - float(scored.losses[res.kept].mean())) < 1e-5


def test_grad_accumulation_over_micro_batches_and_loss_scale():
    model = tiny_gpt().eval()
    params = dict(model.named_parameters())
    micro = [lm_batch(B=5, seed=s, padding=False) for s in (1, 2)]
    fb = gs.FilteredBackward(model, policy="drop_top", ratio=0.4, loss_filter_std=None)
    accumulation_matches_plain(model, fb, micro, params)


def test_existing_grad_is_accumulated_not_replaced():
    model = tiny_gpt().eval()
    w = model.lm_head.weight
    w.grad = torch.ones_like(w)
    res = gs.filtered_backward(model, lm_batch(padding=False), ratio=0.5, loss_filter_std=None,
                               params=["lm_head.weight"])
    model2 = tiny_gpt().eval()
    want = plain_grads_on(model2, lm_batch(padding=False), res.kept, {"w": model2.lm_head.weight})["w"]
    assert_close_rel(w.grad - 1, want, 1e-5, "accumulated")
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")


def test_nothing_kept_adds_nothing():
    model = tiny_gpt().eval()
    res = gs.filtered_backward(model, lm_batch(), ratio=0.0)
    assert res.n_kept == 0 and res.loss == 0.0 and not res.kept.any()
    assert all(p.grad is None for p in model.parameters())


def test_rule_less_parameters_use_the_fallback():
    from test_ghost import WithScale

    torch.manual_seed(0)
    model = WithScale()
    batch = lm_batch(B=6, padding=False)
    params = dict(model.named_parameters())
    res = gs.filtered_backward(model, batch, policy="keep_bottom", ratio=0.5, loss_filter_std=None)
    got = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    want = plain_grads_on(model, batch, res.kept, params)
    for n in params:
        assert_close_rel(got[n], want[n], 1e-5, n)


def test_one_backward_only():
    """The filtered step costs about one plain step: no second backward (flop count). The check against the
    per-sample loop, the rules' self-checks and the layout probe are paid on the first call only (also through
    the function, on the same model)."""
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=512, d_model=64, n_layer=2, max_seq_len=32))
    batch = {"input_ids": torch.randint(0, 512, (8, 32))}
    with FlopCounterMode(display=False) as first:
        gs.filtered_backward(model, batch, ratio=0.2)
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as plain:
        out = model(**batch)
        prepared = prepare_batch(batch, lm_loss=True)
        per_sample_losses(out, prepared, None, "mean")[0].mean().backward()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as filt:
        gs.filtered_backward(model, batch, ratio=0.2)
    assert filt.get_total_flops() < 1.1 * plain.get_total_flops() < first.get_total_flops()
