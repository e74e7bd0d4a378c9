"""Activations whose dim 0 is not the batch: flattened tokens (OPT), routed tokens (mixture of experts), and
time-major layouts. Ghost scores them at rule speed when the row -> sample map is proven
(``gradsel_core.ghost.rows``), and otherwise refuses or falls back: never a wrong number."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, assert_close_rel, lm_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_filtered import plain_grads_on
from test_trust import exact, filtered_grad_is_exact
from torch import nn

import gradsel_core as gs
from gradsel_core.factors import Grouped, Outer, Sliced, weighted_total
from gradsel_core.ghost.rows import Rows, flatten_rows

D = 8


# -- the row map ------------------------------------------------------------------------------------------


def test_flatten_rows_proves_only_batch_major_views():
    x = torch.randn(3, 5, D)
    r = flatten_rows(x.reshape(15, D), 3)
    assert r is not None and r.per == 5 and r.seg.tolist() == [i // 5 for i in range(15)]
    assert flatten_rows(x.transpose(0, 1).reshape(15, D), 3) is None  # a copy: time-major rows
    assert flatten_rows(x[:, :4].reshape(12, D), 3) is None  # not contiguous: a copy
    assert flatten_rows(x.reshape(15, D).clone(), 3) is None  # no base to prove it with
    assert flatten_rows(x.view(-1, 3), 3) is None  # a row would straddle two samples (40 % 3 != 0)
    assert flatten_rows(x.reshape(15, D), 5) is None  # dim 0 of the base is not the batch


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), n=st.integers(0, 12), d=st.integers(1, 5), p=st.integers(1, 5),
       seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_padded_rows_give_the_per_sample_sums(B, n, d, p, seed, dtype):
    """Outer over zero-padded routed rows == Σ_{rows of b} g aᵀ per sample, by a loop."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, B, (n,), generator=g)
    A, G = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, p, generator=g, dtype=dtype)
    rows = Rows(seg)
    f = Outer(rows.btd(A, B), rows.btd(G, B))
    ref = torch.stack([(G[seg == b].t() @ A[seg == b]) for b in range(B)])  # (B, p, d)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(f.dense(), ref, atol=tol, rtol=tol)
    assert torch.allclose(f.sq_norm(), ref.pow(2).sum((1, 2)), atol=tol * 10, rtol=tol * 10)


def test_grouped_factor_matches_its_dense_form():
    """Pseudo-samples b·E + e: norms, dots, masked sums and cross terms agree with the explicit gradients."""
    g = torch.Generator().manual_seed(0)
    B, E, n, d, p = 3, 4, 17, 5, 6
    seg = torch.randint(0, B, (n,), generator=g)
    expert = torch.randint(0, E, (n,), generator=g)
    A, G = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, p, generator=g, dtype=torch.float64)
    rows = Rows(seg * E + expert)
    f = Grouped(Outer(rows.btd(A, B * E), rows.btd(G, B * E)), B, E, (E, p, d))
    dense = torch.zeros(B, E, p, d, dtype=torch.float64)
    for i in range(n):
        dense[seg[i], expert[i]] += torch.outer(G[i], A[i])
    assert torch.allclose(f.dense(), dense)
    assert torch.allclose(f.sq_norm(), dense.pow(2).sum((1, 2, 3)))
    V = torch.randn(2, E, p, d, generator=g, dtype=torch.float64)
    assert torch.allclose(f.dot(V), torch.einsum("bepd,repd->br", dense, V))
    w, index = torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor([2, 0])
    assert torch.allclose(weighted_total([f], w, index), 0.5 * dense[2] + 2.0 * dense[0])
    assert torch.allclose(f.inner(f), f.sq_norm())


# -- flattened tokens -------------------------------------------------------------------------------------


class OptLike(nn.Module):
    """OPT's decoder MLP: tokens flattened to (B·T, d) before the norm and both Linears."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1)[None, :, None]  # causal mixing
        shape = h.shape
        flat = h.reshape(-1, D)  # (B·T, d)
        flat = flat + self.fc2(F.relu(self.fc1(self.norm(flat))))
        return self.head(flat.view(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flattened_tokens_are_scored_by_the_rules(dtype, caplog):
    torch.manual_seed(0)
    model = OptLike().to(dtype)
    with caplog.at_level(logging.WARNING):
        eng = exact(model, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert {e.how for e in eng.coverage().entries} == {"rule"}
    assert eng.ghost.follow_rows  # fc2's input came through relu: rows were followed
    assert not [r for r in caplog.records if r.name.startswith("gradsel")], "no warning for a proven layout"
    filtered_grad_is_exact(OptLike())


class SeqFirstNorm(nn.Module):
    """A norm over a time-major (T, B, d) activation: its dim 0 is not the batch."""

    def __init__(self, rms=False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm = nn.RMSNorm(D) if rms else nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).transpose(0, 1).contiguous()  # (T, B, d)
        return self.head(self.norm(h).transpose(0, 1))


@pytest.mark.parametrize("rms", [False, True])
def test_time_major_norms_are_refused_not_misread(rms):
    """The LayerNorm / RMSNorm rules once reshaped any input to (B, -1, d): a (T, B, d) input was read as
    the wrong samples. Now ghost refuses it, and auto is exact."""
    torch.manual_seed(0)
    model = SeqFirstNorm(rms)
    with pytest.raises(gs.UnsupportedModule):
        gs.GradNormEngine(model, backend="ghost").score(lm_batch())
    exact(model, backend="auto")


# -- routed tokens: mixture of experts --------------------------------------------------------------------


def _route(router_logits, k):
    probs = router_logits.softmax(-1)
    w, idx = probs.topk(k, dim=-1)  # (N, k)
    return w / w.sum(-1, keepdim=True), idx


class ExpertLinears(nn.Module):
    """A mixture-of-experts block with per-expert nn.Linear modules (the pre-fusion transformers layout):
    each expert sees only the rows routed to it, ``flat[token_idx]``."""

    def __init__(self, E=4, k=2, shuffle=None):
        super().__init__()
        self.E, self.k, self.shuffle = E, k, shuffle
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
                                     for _ in range(E))

    def forward(self, h):
        flat = h.view(-1, D)  # (N, d)
        w, idx = _route(self.router(flat), self.k)
        out = torch.zeros_like(flat)
        for e in range(self.E):
            token_idx, pos = torch.where(idx == e)
            x = flat[token_idx]
            if self.shuffle:  # an op that permutes rows: their samples are no longer known
                if self.shuffle == "copy":  # in place: the tensor keeps its identity, not its rows
                    x = x.clone()
                    x.copy_(x.flip(0))
                else:
                    x = x.flip(0)
                token_idx = token_idx.flip(0)
                pos = pos.flip(0)
            y = self.experts[e](x) * w[token_idx, pos, None]
            out.index_add_(0, token_idx, y)
        return out.view_as(h)


class MoELM(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.moe = ExpertLinears(**kw)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, T, d)
        return self.head(h + self.moe(h))


class FusedExperts(nn.Module):
    """Experts fused as 3-D parameters (transformers' MixtralExperts / GptOssExperts), with an eager loop
    over ``P[e]`` (``style="linear"``: ``F.linear(x, P[e])``; ``"matmul"``: ``x @ P[e] + b[e]``) or one
    ``grouped_mm`` over rows sorted by expert (``"grouped"``, with gathered biases)."""

    def __init__(self, style="linear", E=4, k=2):
        super().__init__()
        self.style, self.E, self.k = style, E, k
        self.router = Router(E)
        I = 2 * D  # noqa: E741
        if style == "linear":
            self.gate_up = nn.Parameter(torch.randn(E, 2 * I, D) * 0.3)  # (E, 2I, d): F.linear form
            self.down = nn.Parameter(torch.randn(E, D, I) * 0.3)
        else:
            self.gate_up = nn.Parameter(torch.randn(E, D, 2 * I) * 0.3)  # (E, d, 2I): x @ P[e]
            self.down = nn.Parameter(torch.randn(E, I, D) * 0.3)
            self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * I) * 0.1)
            self.down_bias = nn.Parameter(torch.randn(E, D) * 0.1)

    def experts(self, flat, w, idx):
        out = torch.zeros_like(flat)
        for e in range(self.E):
            token_idx, pos = torch.where(idx == e)
            if token_idx.numel() == 0:
                continue
            x = flat[token_idx]
            if self.style == "linear":
                gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.down[e])
            else:
                gu = x @ self.gate_up[e] + self.gate_up_bias[e]
                gate, up = gu[..., ::2], gu[..., 1::2]
                y = (up.clamp(-5, 5) + 1) * (gate * torch.sigmoid(gate * 1.7)) @ self.down[e] + self.down_bias[e]
            out.index_add_(0, token_idx, y * w[token_idx, pos, None])
        return out

    def grouped(self, flat, w, idx):
        N = flat.shape[0]
        expert_ids, perm = torch.sort(idx.reshape(-1))  # (N·k,)
        x = flat[perm // self.k]
        offs = torch.cumsum(torch.bincount(expert_ids, minlength=self.E), 0).to(torch.int32)
        gu = torch._grouped_mm(x, self.gate_up, offs=offs)
        gu.add_(self.gate_up_bias[expert_ids])
        gate, up = gu.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down, offs=offs) + self.down_bias[expert_ids]
        y = y * w.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return y[inv].view(N, self.k, D).sum(1)

    def forward(self, h):
        flat = h.view(-1, D)
        w, idx = self.router(flat, self.k)
        out = self.grouped(flat, w, idx) if self.style == "grouped" else self.experts(flat, w, idx)
        return out.view_as(h)


class FusedLM(nn.Module):
    def __init__(self, style="linear"):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.moe = FusedExperts(style)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.head(h + self.moe(h))


class Router(nn.Module):
    """A router whose weight is used through F.linear in its own forward (no norm rule)."""

    def __init__(self, E):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) * 0.5)

    def forward(self, flat, k):
        return _route(F.linear(flat, self.weight), k)


def _moe_batch(B=4, T=10):
    return lm_batch(B=B, T=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_expert_linear_modules_at_rule_speed(dtype):
    torch.manual_seed(0)
    model = MoELM().to(dtype)
    eng = exact(model, batch=_moe_batch(), rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert {e.how for e in eng.coverage().entries} == {"rule"}
    filtered_grad_is_exact(MoELM())


@pytest.mark.parametrize("shuffle", ["flip", "copy"])
@pytest.mark.parametrize("B,T", [(4, 10), (1, 6), (3, 1), (4, 2)])
def test_rows_whose_samples_are_lost_are_refused_not_guessed(B, T, shuffle):
    """flip(0) permutes the routed rows: nothing proves their samples (at B = 4, T = 2 an expert may get
    exactly B rows). The experts climb to fallbacks; vmap cannot run the block's data-dependent routing, so
    ghost refuses, and auto is exact."""
    torch.manual_seed(0)
    batch = lm_batch(B=B, T=T)
    with pytest.raises(gs.UnsupportedModule):
        gs.GradNormEngine(MoELM(shuffle=shuffle), backend="ghost").score(batch)
    torch.manual_seed(0)
    exact(MoELM(shuffle=shuffle), backend="auto", batch=batch)


# (torch._grouped_mm has no float64 kernel: "Expected mat_a to be Float32, BFloat16 or Float16")
@pytest.mark.parametrize("style,dtype", [("linear", torch.float32), ("linear", torch.float64),
                                         ("matmul", torch.float32), ("matmul", torch.float64),
                                         ("grouped", torch.float32)])
def test_fused_expert_weights_through_their_op_uses(style, dtype):
    torch.manual_seed(0)
    model = FusedLM(style).to(dtype)
    eng = exact(model, batch=_moe_batch(), rtol=1e-5 if dtype == torch.float32 else 1e-10)
    counts = eng.coverage().counts()
    assert "module fallback" not in counts and "whole-model vmap" not in counts, counts
    assert counts.get("op", 0) >= 3


@pytest.mark.parametrize("style", ["linear", "matmul", "grouped"])
@pytest.mark.parametrize("mode", ["one_backward", "two_pass"])
def test_fused_experts_filtered_gradient_is_exact(style, mode):
    torch.manual_seed(0)
    model = FusedLM(style)
    batch = _moe_batch()
    res = gs.filtered_backward(model, batch, policy="drop_top", ratio=0.5, loss_filter_std=None, mode=mode)
    params = dict(model.named_parameters())
    got = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    want = plain_grads_on(model, batch, res.kept, params)
    for n in params:
        assert_close_rel(got[n], want[n], 1e-5, f"filtered grad {n}")


@pytest.mark.parametrize("style", ["linear", "grouped"])
def test_fused_experts_reference_dots(style):
    torch.manual_seed(0)
    model = FusedLM(style)
    batch = _moe_batch()
    ref = gs.reference_gradient(model, [lm_batch(B=3, T=10, seed=7)])
    got = gs.GradNormEngine(model, backend="ghost").score(batch, reference=ref)
    want = gs.GradNormEngine(model, backend="loop").score(batch, reference=ref)
    assert_close_rel(got.dots, want.dots, 1e-5, "dots")


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_transformers_moe_families_without_module_fallbacks(fam, impl):
    """The router and the fused experts of transformers' MoE blocks, in both experts implementations."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from families import build_family, family_batch

    model = build_family(fam)
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = impl
    if fam == "gpt_oss" and impl == "eager":
        # its attention sinks need a fallback over the decoder layer, which vmap cannot run around the
        # eager experts loop: ghost refuses, auto is exact
        with pytest.raises(gs.UnsupportedModule):
            gs.GradNormEngine(model, backend="ghost").score(family_batch())
        exact(model, backend="auto", batch=family_batch())
        return
    eng = exact(model, batch=family_batch())
    for e in eng.coverage().entries:
        if ".mlp." in e.param and "shared" not in e.param:
            assert e.how in ("rule", "op"), (e.param, e.how, e.detail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sliced_inner_products_equal_the_dense_gradients(dtype):
    """Two uses of slices of one fused (E, p, d) weight: their inner product is that of the dense (B, E, p, d)
    gradients: zero for different experts, the slice's inner product for the same one (in the input dtype)."""
    torch.manual_seed(0)
    B, T, d, p, E = 3, 5, 4, 6, 3
    parts = [Outer(torch.randn(B, T, d, dtype=dtype), torch.randn(B, T, p, dtype=dtype)) for _ in range(3)]
    u, v, w = (Sliced(f, e, (E, p, d)) for f, e in zip(parts, (0, 2, 0)))
    for a, b in ((u, v), (u, w)):
        got = a.inner(b)
        want = (a.dense() * b.dense()).flatten(1).sum(1)
        assert got.dtype == dtype and got.shape == (B,)
        assert_close_rel(got, want, 1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.count_nonzero(u.inner(v)) == 0 and torch.count_nonzero(u.inner(w)) == B
