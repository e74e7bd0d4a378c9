"""Never a wrong number: hand-written adversarial models, each scored by ghost / auto against the loop.

Each model breaks one assumption a norm rule makes (see docs/norm-math.md, "Trust"). The fast path must
be exact, or refuse (``backend="ghost"``), or move to an exact path with a warning (``backend="auto"``).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, assert_close_rel, lm_batch
from torch import nn

import gradsel_core as gs
from gradsel_core.engine import VerificationError

D = 8


def exact(model, backend="ghost", batch=None, rtol=1e-5, **kw):
    """Score with ``backend`` and the loop; assert per-parameter agreement; return the engine."""
    batch = batch if batch is not None else lm_batch()
    ref = gs.GradNormEngine(model, backend="loop", per_param=True, **kw).score(batch)
    eng = gs.GradNormEngine(model, backend=backend, per_param=True, **kw)
    got = eng.score(batch)
    assert_close_rel(got.norms, ref.norms, rtol, f"{type(model).__name__} norms")
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], rtol, n)
    assert_close_rel(got.losses, ref.losses, 1e-6, "losses")
    return eng


def filtered_grad_is_exact(model, batch=None, ratio=0.5):
    """filtered_backward's gradient == the plain gradient of the kept samples' mean loss."""
    batch = batch if batch is not None else lm_batch()
    model.zero_grad()
    res = gs.filtered_backward(model, batch, policy="drop_top", ratio=ratio, loss_filter_std=None)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    keep = res.kept.nonzero().squeeze(1)
    model.zero_grad()
    sub = {k: v[keep] for k, v in batch.items()}
    losses = gs.GradNormEngine(model, backend="loop").score  # noqa: F841 (reference below is by hand)
    from gradsel_core.batching import per_sample_losses, prepare_batch

    prepared = prepare_batch(sub, lm_loss=True)
    out = model(**prepared.model_inputs)
    loss, _ = per_sample_losses(out, prepared, None, "mean")
    loss.mean().backward()
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        assert n in got, f"{n}: no gradient from filtered_backward"
        assert_close_rel(got[n], p.grad, 1e-5, f"filtered grad {n}")
    model.zero_grad()


# -- subclasses that override a ruled forward ------------------------------------------------------------------


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.7


class ScaledEmbedding(nn.Embedding):
    """Gemma-style: the output scaled inside the subclass's own forward."""

    def forward(self, ids):
        return super().forward(ids) * (self.embedding_dim ** 0.5)


class OffsetPositions(nn.Embedding):
    """OPT-style learned positions: the ids are computed inside forward (mask cumsum + offset)."""

    def forward(self, attention_mask):
        pos = (torch.cumsum(attention_mask, dim=1) * attention_mask).long() - 1
        return super().forward(pos + 2)


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = ScaledEmbedding(VOCAB, D)
        self.pos = OffsetPositions(16, D)
        self.hidden = ScaledLinear(D, D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + self.pos(attention_mask)
        return self.out(torch.tanh(self.hidden(h)))


def test_subclass_overriding_forward_is_not_scored_by_the_base_rule():
    torch.manual_seed(0)
    model = SubclassNet()
    eng = exact(model, "ghost")
    cov = {e.param: e.how for e in eng.coverage().entries}
    assert cov["emb.weight"] == "op" and cov["hidden.weight"] == "op" and cov["out.weight"] == "rule"
    exact(model, "auto")
    filtered_grad_is_exact(model)


# -- uses outside the owner's call -----------------------------------------------------------------------------


class FunctionalTying(nn.Module):
    """Minimal-GPT weight tying: logits = h @ emb.weight.T (no lm_head module)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.block = nn.Linear(D, D)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.block(self.emb(input_ids)))
        return h @ self.emb.weight.T


class CalledAndFunctional(nn.Module):
    """A Linear called as a module whose weight is also used through F.linear, with another input."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        a = self.lin(h)
        b = F.linear(torch.sin(h), self.lin.weight)
        return self.out(torch.tanh(a) + b)


@pytest.mark.parametrize("cls", [FunctionalTying, CalledAndFunctional])
def test_functional_uses_are_scored_exactly_with_cross_terms(cls, caplog):
    torch.manual_seed(0)
    model = cls()
    with caplog.at_level(logging.WARNING):
        eng = exact(model, "ghost")
    assert "outside the call" in caplog.text
    assert all(e.how in ("rule", "op") for e in eng.coverage().entries)
    exact(model, "auto")
    filtered_grad_is_exact(model)


def test_detection_costs_nothing_when_there_is_no_outside_use(caplog):
    """A well-behaved model: no warning, every parameter by its rule, no extra pass."""
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=VOCAB, d_model=16, n_layer=1, max_seq_len=16))
    with caplog.at_level(logging.WARNING):
        eng = exact(model, "ghost")
    assert caplog.text == ""
    assert not eng.ghost.track and not eng.ghost.moved
    assert {e.how for e in eng.coverage().entries} == {"rule"}


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.out(self.lin(torch.tanh(self.lin(h))) + h)


def test_a_module_called_twice_with_different_inputs():
    torch.manual_seed(0)
    exact(UsedTwice(), "ghost")
    filtered_grad_is_exact(UsedTwice())


# -- in-place writes, no_grad parts, unused parameters ---------------------------------------------------------


class InPlaceOnOutputs(nn.Module):
    """Falcon-style: module outputs modified in place."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.a = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        y = self.a(h)
        y += h  # in place on a tapped output
        z = self.norm(y)
        z.mul_(2.0)
        return self.out(z)


def test_in_place_writes_on_module_outputs(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        eng = exact(InPlaceOnOutputs(), "ghost")
    assert eng.ghost.copy_taps and "in place" in caplog.text
    exact(InPlaceOnOutputs(), "auto")
    filtered_grad_is_exact(InPlaceOnOutputs())


class PartlyNoGrad(nn.Module):
    """A module called inside torch.no_grad() for part of each sample, and normally for all of it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.lin = nn.Linear(D, D)
        self.unused = nn.Linear(D, D)  # never called: its gradient is zero
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        with torch.no_grad():
            frozen = self.lin(h[:, :1])  # (B, 1, D): the first token only, no gradient
        return self.out(torch.tanh(self.lin(h)) + frozen)


def test_no_grad_part_and_parameter_without_gradient():
    torch.manual_seed(0)
    model = PartlyNoGrad()
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(lm_batch())
    assert float(ref.per_param["unused.weight"].abs().max()) == 0.0
    exact(model, "ghost")
    exact(model, "auto")


# -- auto never crashes where the loop scores ------------------------------------------------------------------


class VmapHostile(nn.Module):
    """A root-owned parameter (no rule: auto goes to vmap) and an in-place write into a fresh buffer,
    which vmap refuses: auto must end at the loop, exactly."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.gain = nn.Parameter(torch.ones(D))
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids) * self.gain
        buf = torch.zeros(h.shape[-1])
        buf += h.sum((0, 1)) * 0  # in-place into an unbatched tensor: vmap cannot
        return self.out(h + buf)


def test_auto_moves_down_to_the_loop(caplog):
    torch.manual_seed(0)
    model = VmapHostile()
    with pytest.raises(Exception):
        gs.GradNormEngine(model, backend="vmap").score(lm_batch())
    with caplog.at_level(logging.WARNING):
        eng = exact(model, "auto")
    assert eng.last_backend == "loop" and "backend='loop'" in caplog.text
    assert eng.coverage().counts() == {"loop": len(eng.params)}


# -- the safety net --------------------------------------------------------------------------------------------


class Doubler(nn.Module):
    """A look-alike with a deliberately wrong rule registered for it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D ** 0.5)

    def forward(self, x):
        return 2.0 * x @ self.weight.T


class DoublerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.d = Doubler()
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.tanh(self.d(self.emb(input_ids))))


def test_verify_catches_a_wrong_rule(caplog):
    from gradsel_core.rules import linear_rule, register_norm_rule
    from gradsel_core.rules import base as rules

    register_norm_rule(Doubler)(lambda call, names: linear_rule(call, names))  # misses the factor 2
    try:
        torch.manual_seed(0)
        model = DoublerNet()
        batch = lm_batch()
        with pytest.raises(VerificationError, match="d.weight"):
            gs.GradNormEngine(model, backend="ghost", verify=True).score(batch)
        ref = gs.GradNormEngine(model, backend="loop").score(batch)
        with caplog.at_level(logging.WARNING):
            eng = gs.GradNormEngine(model, backend="auto")
            got = eng.score(batch)
        assert "d.weight" in caplog.text and eng.last_backend == "vmap"
        assert_close_rel(got.norms, ref.norms, 1e-5, "after verify")
        # later batches stay on the exact backend, without checking again
        assert eng.score(lm_batch(seed=5)).backend == "vmap"
    finally:
        rules._BY_TYPE.pop(Doubler, None)


# -- edge cases --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["loop", "vmap", "ghost", "auto"])
def test_inference_mode_gives_the_right_norms(backend):
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=VOCAB, d_model=16, n_layer=1, max_seq_len=16))
    ref = gs.GradNormEngine(model, backend="loop").score(lm_batch())
    with torch.inference_mode():
        batch = lm_batch()
        got = gs.GradNormEngine(model, backend=backend).score(batch)
    assert float(ref.norms.min()) >= 0 and float(ref.norms.max()) > 0
    assert_close_rel(got.norms, ref.norms, 1e-5, backend)


def test_inference_mode_filtered_backward_sets_the_gradient():
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=VOCAB, d_model=16, n_layer=1, max_seq_len=16))
    with torch.inference_mode():
        res = gs.filtered_backward(model, lm_batch(), policy="drop_top", ratio=0.5, loss_filter_std=None)
    assert res.n_kept > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_inference_parameters_are_refused_clearly():
    with torch.inference_mode():
        model = nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="inference_mode"):
        gs.GradNormEngine(model, backend="loop", loss_fn=lambda o, b: o.sum(-1)).score(
            {"input_ids": torch.zeros(2, 4, dtype=torch.long)})


@pytest.mark.parametrize("backend", ["loop", "vmap", "ghost"])
def test_one_dimensional_position_ids_mean_one_shared_vector(backend):
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=VOCAB, d_model=16, n_layer=1, max_seq_len=16))
    B = T = 6
    batch = lm_batch(B=B, T=T, padding=False)
    pos = torch.tensor([0, 2, 4, 6, 8, 10])
    ref = gs.GradNormEngine(model, backend="loop").score({**batch, "position_ids": pos[None].expand(B, T)})
    got = gs.GradNormEngine(model, backend=backend).score({**batch, "position_ids": pos})
    assert_close_rel(got.norms, ref.norms, 1e-5, backend)
    with pytest.raises(ValueError, match="position_ids"):
        gs.GradNormEngine(model, backend=backend).score({**batch, "position_ids": torch.arange(T + 1)})


@pytest.mark.parametrize("backend", ["loop", "vmap", "ghost"])
def test_overflow_is_inf_and_nan_loss_is_nan_in_every_backend(backend):
    torch.manual_seed(0)
    model = FunctionalTying()

    def loss_fn(out, batch):  # (B,): a sample starting with token 1 overflows its gradient, 2 has a NaN loss
        first = batch["input_ids"][:, 0]
        scale = torch.where(first == 1, 1e30, torch.where(first == 2, float("nan"), 1.0))
        return out.float().pow(2).mean((1, 2)) * scale

    batch = lm_batch(padding=False)
    batch["input_ids"][0, 0], batch["input_ids"][2, 0] = 1, 2
    got = gs.GradNormEngine(model, backend=backend, loss_fn=loss_fn).score(batch)
    assert torch.isinf(got.norms[0]) and got.norms[0] > 0
    assert torch.isnan(got.norms[2])
    assert torch.isfinite(got.norms[[1, 3]]).all()


# -- whole families of layers --------------------------------------------------------------------------------------


class EncoderLM(nn.Module):
    """nn.TransformerEncoder (nn.MultiheadAttention reads out_proj.weight functionally)."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.out(h)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_models_are_exact(batch_first):
    torch.manual_seed(0)
    model = EncoderLM(batch_first)
    exact(model, "auto")
    eng = exact(model, "ghost") if batch_first else None
    if eng is not None:  # scored per module: the attention block alone falls back, not the whole model
        assert "whole-model vmap" not in eng.coverage().counts()


def test_coverage_summary_line():
    torch.manual_seed(0)
    model = SubclassNet()
    eng = gs.GradNormEngine(model, backend="ghost")
    eng.score(lm_batch())
    line = eng.coverage().summary()
    assert line.startswith("backend ghost:") and "by rules" in line and "by op uses" in line


class MHAVariants(nn.Module):
    """nn.MultiheadAttention called directly: key padding mask, causal mask, bias_k/bias_v, kdim/vdim."""

    def __init__(self, separate: bool, add_bias_kv: bool, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.emb = nn.Embedding(VOCAB, D)
        kv = D + 4 if separate else None
        self.kv = nn.Linear(D, kv) if separate else nn.Identity()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True, add_bias_kv=add_bias_kv, kdim=kv, vdim=kv)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)  # (B, T, D)
        T = h.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        kv = self.kv(h)
        a, w = self.mha(h, kv, kv, key_padding_mask=attention_mask == 0, attn_mask=causal,
                        need_weights=self.need_weights)
        return self.out(torch.tanh(a) + h)


@pytest.mark.parametrize("separate,add_bias_kv", [(False, False), (True, False), (False, True)])
def test_multihead_attention_rule_variants(separate, add_bias_kv):
    torch.manual_seed(0)
    batch = lm_batch(padding=False)
    batch["attention_mask"][1, 7:] = 0  # key padding (no fully masked rows)
    model = MHAVariants(separate, add_bias_kv, need_weights=False)
    eng = exact(model, "ghost", batch=batch)
    cov = {e.param: e.how for e in eng.coverage().entries}
    assert all(cov[n] == "rule" for n in cov if n.startswith("mha.")), cov
    filtered_grad_is_exact(model, batch=batch)


def test_multihead_attention_weights_used_downstream_fall_back():
    """need_weights=True and the weights feed the loss: the rule (output 0 only) must step aside."""

    class UsesWeights(MHAVariants):
        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids)
            a, w = self.mha(h, h, h, need_weights=True)
            return self.out(torch.tanh(a) + w.sum(-1, keepdim=True))

    torch.manual_seed(0)
    exact(UsesWeights(False, False, True), "ghost")
