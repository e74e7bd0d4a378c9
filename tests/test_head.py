"""The fused LM head (gradsel_core/ghost/head.py): exact against the per-sample loop and against autograd.

Vocabulary blocks are forced small (13 columns) and token blocks too (``tiles``: whole samples in groups, or 3
rows that split a sample), so that every quantity crosses tile boundaries."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradsel_core as gs
from gradsel_core.backends.loop import score_loop
from gradsel_core.batching import causal_lm_losses, prepare_batch
from gradsel_core.ghost import head as H
from gradsel_core.ghost import score_ghost
from gradsel_core.types import scoring_mode

V = 97
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(H, "TILE_ELEMENTS", 13 * 3)  # tiles of 3 token rows (they split samples) ...
    monkeypatch.setattr(H, "MIN_CHUNK", 13)  # ... × 13 vocabulary columns: 97 = 7 blocks of 13 + 6
    monkeypatch.setattr(H, "ROW_CHUNK_ELEMENTS", 2 * V)  # 2 tokens per chunk (one-pass token loop)


@pytest.fixture(params=["split", "groups"])
def tiles(request, monkeypatch):
    """The vocabulary loop's token blocks: 3 rows (every sample split over blocks: its head gradient by
    vocabulary blocks), or whole samples, two per group (the Gram over tokens, group by group)."""
    if request.param == "groups":
        monkeypatch.setattr(H, "TILE_ELEMENTS", 13 * 15)  # 15 rows: one or two whole samples per block
        monkeypatch.setattr(H, "GRAM_ELEMENTS", 60)  # (K, T', T') Gram buffers: K = 1 or 2
    return request.param


@pytest.fixture(params=["direct", "gram"])
def form(request, monkeypatch):
    """Both head loops: the one-pass token loop (direct form, or no head parameter) and the two-pass
    vocabulary loop (Gram form), whatever the cost rule would pick."""
    monkeypatch.setattr(H, "gram_is_cheaper", lambda T, d, p: request.param == "gram")
    return request.param


def _hf(family: str, tie: bool):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                            eos_token_id=2, tie_word_embeddings=tie)
        return tf.GPT2LMHeadModel(cfg)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **common))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common))
    if family == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**common))
    if family == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=8, **common))
    if family == "gemma2":
        cfg = tf.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, **common)  # small cap: tanh bends
        cfg._attn_implementation = "eager"
        return tf.Gemma2ForCausalLM(cfg)
    if family == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.37, **common))
    raise KeyError(family)


def _batch(B=3, T=9, seed=1, minus100=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B >= 2:
        mask[1, T - 3:] = 0  # right padding
        ids[1, T - 3:] = 0
    labels = gs.batching.default_labels(ids, mask)
    if minus100 and B >= 1:
        labels[0, 2:4] = -100  # a prompt span
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _raw(model, batch, fused: bool, backend="ghost", params="trainable", reduction="mean", refs=None):
    eng = gs.GradNormEngine(model, params=params, backend=backend, loss_reduction=reduction, fused_head=fused)
    prepared = prepare_batch(batch, lm_loss=True)
    if refs is not None:
        from gradsel_core.reference import stack_references
        from gradsel_core.types import acc_dtype

        refs = stack_references(refs, eng.params, acc_dtype(eng.params))
    with scoring_mode(model, eng.params):
        if backend == "loop":
            raw = score_loop(eng.spec, prepared, refs)
        else:
            raw = score_ghost(eng.ghost, prepared, strict=True, refs=refs)
    return eng, raw


def _assert_close(fast, ref, dtype, what):
    scale = ref.abs().max().clamp(min=1e-30)
    err = ((fast.double() - ref.double()).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def _head_calls(model, monkeypatch):
    """Calls of the head's forward, counted through ``nn.Linear.forward`` itself (a hook on the head would make
    the fused path step aside: it never runs the head's forward, so it refuses heads with hooks)."""
    calls = []
    head, real = model.get_output_embeddings(), torch.nn.Linear.forward

    def forward(self, x):
        if self is head:
            calls.append(1)
        return real(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", forward)
    return calls


def _checked(model, batch, calls):
    """Run the fused head's once-per-model self-check (its forward runs the head on the first
    ``CHECK_SAMPLES`` samples), then reset the head-call count: what follows must never run the head."""
    H.HEAD_VERDICTS.pop(model, None)
    H.check_model(gs.GradNormEngine(model, backend="ghost", fused_head=True).ghost, prepare_batch(batch, lm_loss=True))
    assert calls == [1] and H.HEAD_VERDICTS[model][1] == "", (calls, H.HEAD_VERDICTS.get(model))
    calls.clear()


CASES = [("gpt2", True), ("llama", False), ("llama", True), ("qwen2", True), ("gemma", True), ("gemma2", True),
         ("cohere", False), ("qwen3", True), ("mistral", False), ("phi3", False)]


def test_every_listed_family_is_tested():
    assert {f for f, _ in CASES} == set(H.HEADS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family,tie", CASES)
def test_full_params_match_the_loop(family, tie, dtype, form, tiles, monkeypatch):
    model = _hf(family, tie).to(dtype)
    batch = _batch()
    calls = _head_calls(model, monkeypatch)
    _checked(model, batch, calls)
    for reduction in ("mean", "sum"):
        calls.clear()
        eng, fast = _raw(model, batch, True, reduction=reduction)
        assert not calls, "the fused path must never run the head's forward"
        assert eng.ghost.head_status.startswith("on"), eng.ghost.head_status
        _, ref = _raw(model, batch, False, backend="loop", reduction=reduction)
        _assert_close(fast.losses, ref.losses, dtype, f"{family} losses")
        total_f = sum(fast.per_param_sq.values())
        total_r = sum(ref.per_param_sq.values())
        _assert_close(total_f, total_r, dtype, f"{family} {reduction} total")
        head = [n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight][0]
        _assert_close(fast.per_param_sq[head], ref.per_param_sq[head], dtype, f"{family} head {head}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_frozen_head_matches_the_loop(dtype):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_hf("llama", False), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                               "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    model = model.to(dtype)
    batch = _batch(B=2, T=7)
    eng, fast = _raw(model, batch, True)
    assert eng.ghost.head_status.startswith("on"), eng.ghost.head_status
    _, ref = _raw(model, batch, False, backend="loop")
    _assert_close(sum(fast.per_param_sq.values()), sum(ref.per_param_sq.values()), dtype, "lora total")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_pass_against_autograd_with_bias_softcap_and_scale(dtype, form, tiles):
    """The chunk loop alone: losses, gradient at h, weight and bias norms, dots, tied rows and the masked
    gradient, against explicit logits and per-sample autograd."""
    torch.manual_seed(3)
    B, T, d = 3, 6, 5
    h = torch.randn(B, T, d, dtype=dtype)
    W = torch.randn(V, d, dtype=dtype) * 0.5
    b = torch.randn(V, dtype=dtype) * 0.1
    labels = torch.randint(0, V, (B, T))
    labels[0, 1:3] = -100
    labels[2, :] = -100  # a sample with no target token: loss 0, gradient 0
    ids = torch.randint(0, V, (B, T))
    refs = {"weight": torch.randn(2, V, d, dtype=dtype), "bias": torch.randn(2, V, dtype=dtype)}
    for post, value in (("none", 1.0), ("softcap", 0.7), ("scale", 1.9)):
        for reduction in ("mean", "sum"):
            core, out = H.head_pass(h, W, b, labels, reduction, post, value, ("weight", "bias"), refs, ids)
            per_w, per_b, per_loss, per_gh = [], [], [], []
            for i in range(B):
                hi = h[i:i + 1].clone().requires_grad_(True)
                Wi, bi = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
                z = hi @ Wi.t() + bi
                z = torch.tanh(z / value) * value if post == "softcap" else (z * value if post == "scale" else z)
                loss = causal_lm_losses(z, labels[i:i + 1], reduction)[0].sum()
                gh, gw, gb = torch.autograd.grad(loss, (hi, Wi, bi), allow_unused=True)
                per_loss.append(loss.detach())
                per_gh.append(gh[0])
                per_w.append(gw)
                per_b.append(gb)
            gw, gb = torch.stack(per_w), torch.stack(per_b)  # (B, V, d), (B, V)
            what = f"{post}/{reduction}"
            _assert_close(out.losses, torch.stack(per_loss), dtype, what + " losses")
            _assert_close(out.grad_h, torch.stack(per_gh), dtype, what + " grad_h")
            _assert_close(out.sq["weight"], gw.pow(2).sum((1, 2)), dtype, what + " weight sq")
            _assert_close(out.sq["bias"], gb.pow(2).sum(1), dtype, what + " bias sq")
            _assert_close(out.dots["weight"], torch.einsum("bvd,rvd->br", gw, refs["weight"]), dtype, what + " dots")
            _assert_close(out.dots["bias"], gb @ refs["bias"].t(), dtype, what + " bias dots")
            _assert_close(out.rows, gw.gather(1, ids.unsqueeze(-1).expand(B, T, d)), dtype, what + " tied rows")
            wts = torch.tensor([0.3, -1.2], dtype=dtype)
            idx = torch.tensor([2, 0])
            _assert_close(H.masked_weight_grad(core, wts, idx, "weight"), (wts[:, None, None] * gw[idx]).sum(0),
                          dtype, what + " masked weight")
            _assert_close(H.masked_weight_grad(core, wts, idx, "bias"), (wts[:, None] * gb[idx]).sum(0),
                          dtype, what + " masked bias")
            assert float(out.sq["weight"][2]) == 0.0 and float(out.losses[2]) == 0.0


def test_gram_and_direct_forms_agree():
    """T' (d + V) < d V picks the Gram form for short sequences; both forms give the same norms."""
    torch.manual_seed(4)
    h, W = torch.randn(2, 4, 40, dtype=torch.float64), torch.randn(V, 40, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 4))
    from gradsel_core.factors import gram_is_cheaper

    assert gram_is_cheaper(3, 40, V)
    _, gram = H.head_pass(h, W, None, labels, want=("weight",))
    h2 = torch.randn(2, 60, 8, dtype=torch.float64)
    W2 = torch.randn(V, 8, dtype=torch.float64)
    labels2 = torch.randint(0, V, (2, 60))
    assert not gram_is_cheaper(59, 8, V)
    _, direct = H.head_pass(h2, W2, None, labels2, want=("weight",))
    for (hh, WW, ll), out in (((h, W, labels), gram), ((h2, W2, labels2), direct)):
        ref = []
        for i in range(2):
            Wi = WW.clone().requires_grad_(True)
            loss = causal_lm_losses(hh[i:i + 1] @ Wi.t(), ll[i:i + 1])[0].sum()
            ref.append(torch.autograd.grad(loss, Wi)[0].pow(2).sum())
        _assert_close(out.sq["weight"], torch.stack(ref), torch.float64, "form")


# Llama in fp32: HF's RMSNorm computes x̂ in fp32 even in an fp64 model, which the RMSNorm rule does in fp64
# (a ~1e-7 difference of the norm weights' gradient in fp64, with or without the fused head)
@pytest.mark.parametrize("family,tie,dtype", [("gpt2", True, torch.float64), ("llama", False, torch.float32),
                                              ("qwen2", True, torch.float32)])
def test_filtered_backward_grad_equals_plain_backward_of_kept(family, tie, dtype, form, tiles):
    model = _hf(family, tie).to(dtype).eval()  # (GPT-2 has dropout: the two runs must see the same model)
    batch = _batch(B=5, T=8)
    fb = gs.filtered.FilteredBackward(model, policy="keep_bottom", ratio=0.4, loss_filter_std=None, fused_head=True)
    res = fb.step(batch)
    assert fb.engine.ghost.head_status.startswith("on"), fb.engine.ghost.head_status
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    kept = res.kept.nonzero().squeeze(1)
    assert 0 < kept.numel() < 5
    # the kept samples' mean loss, on the same batch shape (Llama's rotary tables are fp32: a sub-batch of other
    # padding differs by ~1e-7 in fp64 with or without the fused head)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses, _ = causal_lm_losses(out.logits, batch["labels"])
    losses[kept].mean().backward()
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        _assert_close(got[n], p.grad, dtype, f"p.grad {n}")
    assert set(got) == {n for n, p in model.named_parameters() if p.grad is not None}


def test_two_pass_filtered_with_lora_frozen_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_hf("gpt2", True), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                          fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    model = model.double().eval()
    batch = _batch(B=4, T=8)
    fb = gs.filtered.TwoPassFilteredBackward(model, policy="keep_top", ratio=0.5, loss_filter_std=None,
                                             fused_head=True)
    res = fb.step(batch)
    assert fb.engine.ghost.head_status.startswith("on"), fb.engine.ghost.head_status
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got
    model.zero_grad(set_to_none=True)
    kept = res.kept.nonzero().squeeze(1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    causal_lm_losses(out.logits, batch["labels"])[0][kept].mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            _assert_close(got[n], p.grad, torch.float64, f"p.grad {n}")


def test_reference_dots_match_the_loop(form, tiles):
    model = _hf("gpt2", True).double()
    batch = _batch(B=3, T=8)
    torch.manual_seed(5)
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    eng, fast = _raw(model, batch, True, refs=ref)
    assert eng.ghost.head_status.startswith("on")
    _, slow = _raw(model, batch, False, backend="loop", refs=ref)
    _assert_close(sum(fast.dots.values()), sum(slow.dots.values()), torch.float64, "dots")


def test_score_api_coverage_and_edges():
    model = _hf("llama", True)
    eng = gs.GradNormEngine(model, backend="ghost", fused_head=True)
    batch = _batch()
    res = eng.score(batch)
    assert "LM head on" in eng.coverage().summary()
    ref = gs.GradNormEngine(model, backend="loop").score(batch)
    _assert_close(res.norms, ref.norms, torch.float32, "norms")
    # B = 1, T = 1 (no target token: zero loss and norm), B = 0
    one = {k: v[:1] for k, v in batch.items()}
    _assert_close(eng.score(one).norms, gs.GradNormEngine(model, backend="loop").score(one).norms, torch.float32, "B=1")
    short = {k: v[:, :1] for k, v in batch.items()}
    assert torch.equal(eng.score(short).norms, torch.zeros(3))
    empty = {k: v[:0] for k, v in batch.items()}
    assert eng.score(empty).norms.shape == (0,)
    # auto: a vocabulary of 97 does not pay; False: off; a custom loss_fn: off
    auto = gs.GradNormEngine(model, backend="ghost")
    auto.score(batch)
    assert auto.coverage().head.startswith("off: does not pay")
    off = gs.GradNormEngine(model, backend="ghost", fused_head=False)
    off.score(batch)
    assert off.coverage().head == "off (fused_head=False)"
    custom = gs.GradNormEngine(model, backend="ghost", fused_head=True,
                               loss_fn=lambda out, b: F.cross_entropy(out.logits[:, -1], b["input_ids"][:, 0],
                                                                      reduction="none"))
    custom.score(batch)
    assert "custom loss_fn" in custom.coverage().head


def test_unknown_model_steps_aside():
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2))
    H_spec, why = H.find_head(model)
    assert H_spec is not None
    from torch import nn

    class Scaled(nn.Module):  # a model that changes its logits after the head: not in HEADS
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids, attention_mask) * 2.0

    spec, why = H.find_head(Scaled())
    assert spec is None and "not a causal LM" in why


def test_score_dataset_and_cli_flag(tmp_path):
    """score_dataset gets the fused head through the engine: the same norms as the full-logits path."""
    import numpy as np

    from gradsel_core.commands.score import add_arguments

    model = _hf("qwen2", True)
    g = torch.Generator().manual_seed(2)
    records = [{"input_ids": torch.randint(3, V, (int(n),), generator=g).tolist()} for n in (5, 9, 7, 3)]
    on = gs.score_dataset(model, records, str(tmp_path / "on"), batch_size=2, progress=False, fused_head=True)
    off = gs.score_dataset(model, records, str(tmp_path / "off"), batch_size=2, progress=False, fused_head=False)
    np.testing.assert_allclose(on.norms, off.norms, rtol=1e-5)
    np.testing.assert_allclose(on.losses, off.losses, rtol=1e-5)
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "m", "--data", "d", "--out", "o", "--no-fused-head"])
    assert args.no_fused_head


@pytest.mark.parametrize("family,tie", [("llama", False), ("gemma2", True)])
def test_bf16_within_the_dtype_tolerance(family, tie):
    from gradsel_core.types import tolerance

    model = _hf(family, tie).to(torch.bfloat16)
    batch = _batch()
    eng, fast = _raw(model, batch, True)
    assert eng.ghost.head_status.startswith("on"), eng.ghost.head_status
    _, ref = _raw(model, batch, False, backend="loop")
    total_f, total_r = sum(fast.per_param_sq.values()), sum(ref.per_param_sq.values())
    err = ((total_f - total_r).abs() / total_r.abs()).max().item()
    assert err <= tolerance(torch.bfloat16), err


@pytest.mark.parametrize("family,tie,dtype", [("gpt2", True, torch.float64), ("llama", False, torch.float32)])
def test_two_pass_with_a_trainable_head_is_fused(family, tie, dtype, form, tiles, monkeypatch):
    """Two-pass filtering with a trainable head: the ordinary second backward reaches the head through the fused
    path's weight node (Σ_b w_b ∇_b, tile by tile), only there (not in the activation backward), and p.grad
    equals a plain backward of the kept samples' mean loss."""
    model = _hf(family, tie).to(dtype).eval()
    batch = _batch(B=4, T=8)
    calls = []
    real = H.masked_weight_grad
    monkeypatch.setattr(H, "masked_weight_grad", lambda core, w, index, role: calls.append(role) or
                        real(core, w, index, role))
    fb = gs.filtered.TwoPassFilteredBackward(model, policy="keep_top", ratio=0.5, loss_filter_std=None,
                                             fused_head=True, verify=False)  # (the check's per-sample backwards
    forwards = _head_calls(model, monkeypatch)  # run the head on one sample at a time)
    _checked(model, batch, forwards)
    res = fb.step(batch)
    assert fb.engine.ghost.head_status.startswith("on"), fb.engine.ghost.head_status
    assert not forwards, "neither the step nor its hidden-use check may run the head's forward (B×T×V logits)"
    assert calls == ["weight"], calls  # once, in the second backward (no bias in these heads)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    causal_lm_losses(out.logits, batch["labels"])[0][res.kept].mean().backward()
    head = model.get_output_embeddings().weight
    assert head.grad is not None
    for n, p in model.named_parameters():
        if p.grad is not None:
            _assert_close(got[n], p.grad, dtype, f"p.grad {n}")
    assert set(got) == {n for n, p in model.named_parameters() if p.grad is not None}


def test_two_pass_head_weight_node_with_bias_and_weights():
    """The weight node alone: its backward is Σ_b go_b ∇_b of the head weight and bias (autograd reference)."""
    torch.manual_seed(6)
    B, T, d = 3, 7, 4
    h = torch.randn(B, T, d, dtype=torch.float64)
    W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[1, :3] = -100
    core, _ = H.head_pass(h, W, b, labels, "mean", "softcap", 0.8, ("weight", "bias"))
    w = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    gw, gb = torch.autograd.grad((H._HeadParamGrad.apply(core, W, b) * w).sum(), (W, b))
    z = torch.tanh((h[:, :-1] @ W.t() + b) / 0.8) * 0.8
    rw, rb = torch.autograd.grad((causal_lm_losses(torch.cat([z, z[:, :1]], 1), labels)[0] * w).sum(), (W, b))
    _assert_close(gw, rw, torch.float64, "weight")
    _assert_close(gb, rb, torch.float64, "bias")


def test_two_pass_hidden_use_check_stops_at_the_head_and_still_finds_a_hidden_use():
    """Two-pass mode checks for parameters used outside their module's slot with one forward, stopped at the
    fused head's input: a backbone parameter held in a Python list (used by a hook) is still refused."""
    model = _hf("llama", False).eval()
    mlp = model.model.layers[0].mlp
    held = [mlp.down_proj.weight]  # a selected parameter, also used outside its module's call
    mlp.register_forward_hook(lambda m, a, o: o + 0.01 * (a[0] @ held[0]) @ held[0].t())
    fb = gs.filtered.TwoPassFilteredBackward(model, policy="keep_top", ratio=0.5, loss_filter_std=None,
                                             fused_head=True, backend="ghost")
    with pytest.raises(gs.UnsupportedModule, match="Python list, dict or closure"):
        fb.step(_batch(B=4, T=8))


def _scale_logits(mod, args, out):
    out.logits = out.logits * 2
    return out


def _global_head_hook(head):
    return torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: o * 2 if m is head else None)


# what runs with the head's own call, or after its callers' forward: the fused path never runs the head's forward
# and stops the model's forward at the head, so each of these would be skipped (silently wrong before the check)
HOOKED = {
    "head forward hook": lambda m: m.lm_head.register_forward_hook(lambda mod, a, o: o * 2),
    "head forward pre-hook": lambda m: m.lm_head.register_forward_pre_hook(lambda mod, a: (a[0] * 1.5,)),
    "head full backward hook": lambda m: m.lm_head.register_full_backward_hook(lambda mod, gi, go: (gi[0] * 2,)),
    "head instance forward": lambda m: setattr(m.lm_head, "forward", (lambda f: lambda x: f(x) * 2)(m.lm_head.forward)),
    "model forward hook": lambda m: m.register_forward_hook(_scale_logits),
    "model backward pre-hook": lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
    "global forward hook": lambda m: _global_head_hook(m.lm_head),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(HOOKED))
def test_fused_head_steps_aside_for_hooks_it_would_skip(kind, dtype):
    """Even with fused_head=True, a head or a caller of it with hooks (or an instance-level forward) is scored by
    the ordinary path, which runs them, with the reason in coverage(); the norms equal the loop's."""
    model = _hf("llama", False).to(dtype)
    batch = _batch()
    handle = HOOKED[kind](model)
    try:
        eng = gs.GradNormEngine(model, backend="ghost", fused_head=True, verify=False)
        res = eng.score(batch)
        assert eng.coverage().head.startswith("off:") and "hook" in eng.coverage().head or \
            "instance-level forward" in eng.coverage().head, eng.coverage().head
        ref = gs.GradNormEngine(model, backend="loop").score(batch)
        _assert_close(res.norms, ref.norms, dtype, kind)
    finally:
        if handle is not None:
            handle.remove()


def test_hooks_of_the_capture_itself_do_not_turn_the_fused_head_off():
    assert H.hooks_on(torch.nn.Linear(2, 3)) == ""
    lin = torch.nn.Linear(2, 3)
    h = lin.register_forward_hook(lambda m, a, o: None)
    assert H.hooks_on(lin) == "forward hooks" and H.hooks_on(lin, [h.id]) == ""


def test_auto_rule_by_vocabulary_logits_and_trainability(monkeypatch):
    # the measured rule (head-20261203T154901Z): a frozen head from V 2,048 and B·T·V 2^21, a trainable one from
    # V 4,096 and 2^24
    assert H.pays(2048, 1024, trainable=False) and not H.pays(2048, 1023, trainable=False)
    assert not H.pays(1024, 1 << 20, trainable=False)
    assert H.pays(8192, 2048, trainable=True) and not H.pays(8192, 2047, trainable=True)
    assert not H.pays(16384, 512, trainable=True) and H.pays(16384, 512, trainable=False)
    assert not H.pays(2048, 1 << 20, trainable=True)
    # the engine asks the rule with the head's trainability: a frozen head on, the same head trainable off
    monkeypatch.setattr(H, "MIN_VOCAB", {"frozen": V, "trainable": V})
    monkeypatch.setattr(H, "MIN_LOGITS", {"frozen": 27 * V, "trainable": 27 * V + 1})  # B·T = 3·9 = 27
    model = _hf("llama", False)
    batch = _batch()
    trainable = gs.GradNormEngine(model, backend="ghost")
    trainable.score(batch)
    assert trainable.coverage().head.startswith("off: does not pay") and "trainable head" in trainable.coverage().head
    model.lm_head.weight.requires_grad_(False)
    frozen = gs.GradNormEngine(model, backend="ghost")
    res = frozen.score(batch)
    assert frozen.coverage().head.startswith("on"), frozen.coverage().head
    _assert_close(res.norms, gs.GradNormEngine(model, backend="loop").score(batch).norms, torch.float32, "frozen head")


def test_a_hook_on_the_backbone_keeps_the_fused_head():
    """The backbone's forward ends before the head is called: its hooks run as usual, and the fused head stays on."""
    model = _hf("llama", False)
    batch = _batch()

    def scale(mod, args, out):
        out.last_hidden_state = out.last_hidden_state * 1.5
        return out

    model.model.register_forward_hook(scale)
    eng = gs.GradNormEngine(model, backend="ghost", fused_head=True, verify=False)
    res = eng.score(batch)
    assert eng.coverage().head.startswith("on"), eng.coverage().head
    _assert_close(res.norms, gs.GradNormEngine(model, backend="loop").score(batch).norms, torch.float32, "backbone")


def _changed_logits_models():
    import transformers as tf

    class ScaledLlamaForCausalLM(tf.LlamaForCausalLM):  # a subclass: model_type and class name pass find_head
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5 + 0.1  # a temperature and an offset after the head
            return out

    class HalvedTinyGPT(gs.models.TinyGPT):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 0.5

    src = _hf("llama", False)
    llama = ScaledLlamaForCausalLM(src.config)
    llama.load_state_dict(src.state_dict())
    torch.manual_seed(0)
    tiny = HalvedTinyGPT(gs.models.TinyGPTConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2))
    return {"llama subclass": llama, "tinygpt subclass": tiny}


@pytest.mark.parametrize("kind", ["llama subclass", "tinygpt subclass"])
def test_fused_head_checks_the_models_logits_once(kind, caplog):
    """A model whose forward changes the logits after the head passes find_head (known family) but fails the
    fused head's self-check: its own logits differ from post(head(h)). The fused head is then off for that
    model, with the reason; the norms equal the loop's (before the check: silently off by the scaling)."""
    model = _changed_logits_models()[kind]
    batch = _batch()
    eng = gs.GradNormEngine(model, backend="ghost", fused_head=True, verify=False)
    res = eng.score(batch)
    assert "logits are not its head's output" in eng.coverage().head, eng.coverage().head
    _assert_close(res.norms, gs.GradNormEngine(model, backend="loop").score(batch).norms, torch.float32, kind)


def test_fused_head_check_runs_once_and_leaves_rng_and_buffers():
    model = _hf("llama", False)
    forwards = []
    model.model.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
    batch = _batch()
    eng = gs.GradNormEngine(model, backend="ghost", fused_head=True, verify=False)
    H.HEAD_VERDICTS.pop(model, None)
    rng = torch.get_rng_state()
    model.train()
    H.check_model(eng.ghost, prepare_batch(batch, lm_loss=True))
    assert torch.equal(rng, torch.get_rng_state())  # (train mode: the check's forward must not shift the stream)
    assert H.HEAD_VERDICTS[model][1] == "" and len(forwards) == 1
    model.eval()
    eng.score(batch)
    eng.score(batch)
    assert len(forwards) == 3 and eng.coverage().head.startswith("on")  # one scored forward per call, no re-check
