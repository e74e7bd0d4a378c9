"""The ghost engine against the per-sample loop reference."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import (VOCAB, Classifier, assert_close_rel, build, classifier_loss, lm_batch, params_for,
                      tiny_gpt)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gradsel_core as gs
from gradsel_core.factors import gram_is_cheaper
from gradsel_core.ghost import plan_claims


def test_ghost_equals_loop_per_param(lm_name):
    model = build(lm_name)
    batch = lm_batch()
    kw = dict(params=params_for(lm_name), per_param=True)
    ref = gs.GradNormEngine(model, backend="loop", **kw).score(batch)
    got = gs.GradNormEngine(model, backend="ghost", **kw).score(batch)
    assert got.backend == "ghost"
    assert_close_rel(got.norms, ref.norms, 1e-5, lm_name)
    assert_close_rel(got.losses, ref.losses, 1e-6, lm_name)
    assert torch.equal(got.tokens, ref.tokens)
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], 1e-5, n)


def test_ghost_full_params_of_a_lora_model():
    """All parameters of a PEFT model: base Linear/Embedding/RMSNorm and LoRA factors together."""
    model = build("peft_llama")
    batch = lm_batch()
    ref = gs.GradNormEngine(model, params="all", backend="loop").score(batch)
    got = gs.GradNormEngine(model, params="all", backend="ghost").score(batch)
    assert_close_rel(got.norms, ref.norms, 1e-5, "peft all")


def test_ghost_fp64():
    model = build("gpt2").double()
    batch = lm_batch()
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(batch)
    got = gs.GradNormEngine(model, backend="ghost", per_param=True).score(batch)
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], 1e-10, n)


def test_auto_picks_ghost_for_covered_models(lm_name):
    model = build(lm_name)
    engine = gs.GradNormEngine(model, params=params_for(lm_name))
    assert engine.resolve_backend() == "ghost"
    assert plan_claims(model, engine.params).complete


def test_learned_positions_with_broadcast_position_ids():
    """position_ids of shape [1, T] (HF style) must still give per-sample results."""
    model = tiny_gpt()
    batch = lm_batch(padding=False)
    batch["position_ids"] = torch.arange(10)[None]  # (1, T)
    names = ["wpe.weight"]
    ref = gs.GradNormEngine(model, params=names, backend="loop").score(batch)
    got = gs.GradNormEngine(model, params=names, backend="ghost").score(batch)
    assert_close_rel(got.norms, ref.norms, 1e-5, "wpe")
    assert len(set(round(float(v), 6) for v in ref.norms)) == 4  # genuinely per sample


def test_classifier_with_2d_linear_inputs():
    torch.manual_seed(0)
    model = Classifier()
    batch = lm_batch(B=5)
    batch["labels"] = torch.tensor([0, 1, 2, 1, 0])
    ref = gs.GradNormEngine(model, loss_fn=classifier_loss, backend="loop", per_param=True).score(batch)
    got = gs.GradNormEngine(model, loss_fn=classifier_loss, backend="ghost", per_param=True).score(batch)
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], 1e-5, n)


def test_bf16_model_within_1e2_of_fp64_reference():
    model = tiny_gpt(d_model=64)
    batch = lm_batch()
    ref = gs.GradNormEngine(_copy(model).double(), backend="loop").score(batch)
    got = gs.GradNormEngine(_copy(model).to(torch.bfloat16), backend="ghost").score(batch)
    assert got.norms.dtype == torch.float32
    assert_close_rel(got.norms, ref.norms, 1e-2, "bf16")


def _copy(m):
    import copy

    return copy.deepcopy(m)


# -- the fallback and its errors ---------------------------------------------------------------------------


class Scale(nn.Module):
    """A module with a bare parameter and no norm rule."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.zeros(d) + 0.1)

    def forward(self, x):
        return torch.tanh(x * self.gain) + self.shift


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.scale = Scale(16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1)[None, :, None]  # causal mixing
        return self.head(self.scale(h))


def test_fallback_for_a_module_without_rule():
    torch.manual_seed(0)
    model = WithScale()
    batch = lm_batch()
    engine = gs.GradNormEngine(model, backend="ghost", per_param=True)
    plan = plan_claims(model, engine.params)
    # no rule: first tried through its op uses; without stand-ins (sharded parameters) the module fallback
    assert set(plan.op_tracked) == {"scale.gain", "scale.shift"} and not plan.fallback
    assert plan_claims(model, engine.params, op_ok=False).fallback == {"scale": ["scale.gain", "scale.shift"]}
    assert gs.GradNormEngine(model).resolve_backend() == "ghost"  # auto: a module-level fallback is fine
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(batch)
    got = engine.score(batch)
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], 1e-5, n)
    # `h * gain` is no recognised op: gain moves to the module's fallback; `+ shift` is a bias use
    how = {e.param: (e.how, e.module) for e in engine.coverage().entries}
    assert how["scale.gain"] == ("module fallback", "scale")
    assert how["scale.shift"][0] == "op"


class RootParam(nn.Module):
    """A bare parameter owned by the root module: no module-level fallback is smaller than the model. Added
    as a bias it is a recognised op use; multiplied (``scale``), only the whole model can score it."""

    def __init__(self, scale=False):
        super().__init__()
        self.scale = scale
        self.emb = nn.Embedding(VOCAB, 8)
        self.bias = nn.Parameter(torch.randn(VOCAB) * 0.1)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        out = self.head(self.emb(input_ids))
        return out * self.bias if self.scale else out + self.bias


def test_root_level_bias_is_an_op_use():
    torch.manual_seed(0)
    model = RootParam()
    engine = gs.GradNormEngine(model, per_param=True)
    assert engine.resolve_backend() == "ghost"
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(lm_batch())
    got = engine.score(lm_batch())
    assert got.backend == "ghost" and engine.coverage().by("op")[0].param == "bias"
    assert_close_rel(got.per_param["bias"], ref.per_param["bias"], 1e-5, "bias")
    assert_close_rel(got.norms, ref.norms, 1e-5, "norms")


def test_root_level_parameter_makes_auto_use_vmap(caplog):
    torch.manual_seed(0)
    model = RootParam(scale=True)
    with pytest.raises(gs.UnsupportedModule, match="whole model"):
        gs.GradNormEngine(model, backend="ghost").score(lm_batch())
    engine = gs.GradNormEngine(model)
    ref = gs.GradNormEngine(model, backend="loop").score(lm_batch())
    with caplog.at_level(logging.WARNING):
        got = engine.score(lm_batch())
    assert got.backend == "vmap" and engine.resolve_backend() == "vmap"
    assert_close_rel(got.norms, ref.norms, 1e-5, "auto->vmap")


class Flattened(nn.Module):
    """A Linear fed (B*T, d) rows: batch-major (a view of the (B, T, d) activation, provably) or, with
    ``seq_major``, time-major (a copy of its transpose: rows are not in sample order, nothing proves them)."""

    def __init__(self, seq_major=False):
        super().__init__()
        self.seq_major = seq_major
        self.emb = nn.Embedding(VOCAB, 8)
        self.lin = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        h = self.emb(input_ids)  # (B, T, 8)
        if self.seq_major:
            return self.lin(h.transpose(0, 1).reshape(T * B, 8)).reshape(T, B, VOCAB).transpose(0, 1)
        return self.lin(h.reshape(B * T, 8)).reshape(B, T, VOCAB)


def test_batch_major_flatten_is_scored_by_the_rule():
    torch.manual_seed(0)
    model = Flattened()
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(lm_batch())
    engine = gs.GradNormEngine(model, backend="ghost", per_param=True)
    got = engine.score(lm_batch())
    assert {e.how for e in engine.coverage().entries} == {"rule"}
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], 1e-5, n)


def test_unknown_layout_errors_with_the_ways_out_and_auto_falls_back(caplog):
    torch.manual_seed(0)
    model = Flattened(seq_major=True)
    with pytest.raises(gs.UnsupportedModule, match=r"backend='vmap'.*register_norm_rule|register"):
        gs.GradNormEngine(model, backend="ghost").score(lm_batch())
    ref = gs.GradNormEngine(model, backend="loop").score(lm_batch())
    with caplog.at_level(logging.WARNING):
        got = gs.GradNormEngine(model, backend="auto").score(lm_batch())
    assert got.backend == "vmap" and "backend='vmap'" in caplog.text
    assert_close_rel(got.norms, ref.norms, 1e-5, "auto fallback")


class FunctionalUse(nn.Module):
    """Uses a submodule's weight without calling the submodule: must never be silently dropped."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return F.linear(h, self.proj.weight) @ self.emb.weight.t()


def test_parameter_used_outside_its_module_is_scored_as_one_more_use():
    """F.linear(h, proj.weight) with proj never called, and emb.weight tied functionally: op uses."""
    torch.manual_seed(0)
    model = FunctionalUse()
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(lm_batch())
    got = gs.GradNormEngine(model, backend="ghost", per_param=True).score(lm_batch())
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], 1e-5, n)


class UnknownFunctionalUse(nn.Module):
    """A Linear's bias added by hand at the root: an op without a rule, outside any module call."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.emb(input_ids))
        return self.proj(h) + self.proj.bias * h.mean(-1, keepdim=True)


def test_unknown_use_outside_the_owner_is_refused_by_ghost_and_exact_under_auto(caplog):
    torch.manual_seed(0)
    model = UnknownFunctionalUse()
    with pytest.raises(gs.UnsupportedModule, match=r"proj\.bias.*test_ghost\.py:\d+"):
        gs.GradNormEngine(model, backend="ghost").score(lm_batch())
    ref = gs.GradNormEngine(model, backend="loop").score(lm_batch())
    with caplog.at_level(logging.WARNING):
        got = gs.GradNormEngine(model, backend="auto").score(lm_batch())
    assert_close_rel(got.norms, ref.norms, 1e-5, "auto")
    assert "proj.bias" in caplog.text


def test_registering_a_rule():
    class MyLinear(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)
            self.out = MyLinear(8, VOCAB)

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.emb(input_ids))

    calls = []

    @gs.register_norm_rule(MyLinear)
    def my_rule(call, names):
        calls.append(call.name)
        from gradsel_core.rules import linear_rule

        return linear_rule(call, names)

    torch.manual_seed(0)
    net = Net()
    ref = gs.GradNormEngine(net, backend="loop").score(lm_batch())
    got = gs.GradNormEngine(net, backend="ghost").score(lm_batch())
    assert calls == ["out"]
    assert_close_rel(got.norms, ref.norms, 1e-5, "custom rule")


# -- cost: scoring skips the weight-gradient matmuls -----------------------------------------------------------


def test_ghost_does_fewer_flops_than_plain_forward_backward():
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=512, d_model=64, n_layer=2, max_seq_len=32))
    ids = torch.randint(0, 512, (4, 32))
    with FlopCounterMode(display=False) as plain:
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    model.zero_grad(set_to_none=True)
    eng = gs.GradNormEngine(model, backend="ghost")
    with FlopCounterMode(display=False) as first:
        eng.score({"input_ids": ids})  # the first batch also runs each rule's self-check (once per module)
    with FlopCounterMode(display=False) as ghost:
        eng.score({"input_ids": ids})
    with FlopCounterMode(display=False) as fwd:
        model(ids)
    assert ghost.get_total_flops() < plain.get_total_flops()
    # first batch only: the rules' self-checks recompute each ruled module's output (one forward) and the layout
    # probe runs one more activation backward (about one forward)
    assert first.get_total_flops() <= ghost.get_total_flops() + 2.02 * fwd.get_total_flops()
    # forward + activation backward (≈ 2 forwards) + reductions: well below the 3 forwards of a plain step
    assert ghost.get_total_flops() < 2.75 * fwd.get_total_flops()


def test_ghost_releases_the_model_outputs_before_the_activation_backward():
    """The outputs (an LM's logits, (B, T, V): the largest activation) are not kept through the backward."""
    import weakref

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

        def forward(self, input_ids):
            return self.out(self.emb(input_ids))  # (B, T, V)

    alive = []

    def loss_fn(outputs, batch):  # a sum saves nothing for its backward: only a reference keeps outputs
        ref = weakref.ref(outputs)
        outputs.register_hook(lambda g: alive.append(ref() is not None))
        return outputs.sum(dim=(1, 2))

    torch.manual_seed(0)
    model = Head()
    batch = {"input_ids": torch.randint(0, VOCAB, (3, 5))}
    got = gs.GradNormEngine(model, loss_fn=loss_fn, backend="ghost").score(batch)
    assert alive and not any(alive)  # released in every backward (the first batch's layout probe runs one more)
    ref = gs.GradNormEngine(model, loss_fn=loss_fn, backend="loop").score(batch)
    assert_close_rel(got.norms, ref.norms, 1e-5, "head")


def test_cost_rule():
    assert gram_is_cheaper(128, 256, 8192)
    assert not gram_is_cheaper(4096, 256, 256)
    assert not gram_is_cheaper(512, 4096, 16)  # LoRA factor at LLM length: direct
    assert gram_is_cheaper(8, 4096, 16)


# -- property-based: random architectures --------------------------------------------------------------------


class RandNet(nn.Module):
    def __init__(self, V, d, h, bias, pad, tie, reuse, rms):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=pad)
        self.pos = nn.Embedding(16, d)
        self.ln = nn.LayerNorm(d)
        self.lin1 = nn.Linear(d, h, bias=bias)
        self.lin2 = nn.Linear(h, d, bias=bias)
        self.norm = nn.RMSNorm(d) if rms else nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        self.reuse = reuse

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        x = self.emb(input_ids) + self.pos(torch.arange(T)[None])  # (B, T, d)
        for _ in range(2 if self.reuse else 1):
            x = x + self.lin2(torch.tanh(self.lin1(self.ln(x))))
            x = torch.cumsum(x, dim=1) / torch.arange(1, T + 1)[None, :, None]  # causal mixing
        return self.head(self.norm(x))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 5), T=st.integers(1, 9), d=st.integers(1, 12), h=st.integers(1, 12), V=st.integers(3, 20),
    bias=st.booleans(), pad=st.booleans(), tie=st.booleans(), reuse=st.booleans(), rms=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ghost_equals_loop_random_architectures(B, T, d, h, V, bias, pad, tie, reuse, rms, seed):
    torch.manual_seed(seed)
    model = RandNet(V, d, h, bias, 0 if pad else None, tie, reuse, rms).double()
    ids = torch.randint(0, V, (B, T))
    lengths = torch.randint(0, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # right padding, some samples empty
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(batch)
    got = gs.GradNormEngine(model, backend="ghost", per_param=True).score(batch)
    for n in ref.per_param:
        a, b = got.per_param[n].double(), ref.per_param[n].double()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9 * (1 + float(b.abs().max()))), (n, a, b)
    assert torch.allclose(got.norms, ref.norms, rtol=1e-5, atol=1e-6)
