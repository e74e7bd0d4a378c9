"""Trust II, engine level: the safety net (per-parameter check on 3 distinct samples, every backend auto moves
to checked in turn, moves only on "cannot score this model"), no side effects (buffers, sample-mixing layers),
``filtered_backward`` through the engine's own path, encoder-decoder models.

Faults in a fast backend are injected by wrapping the engine's backend functions: the net is tested on its
own, whatever the rules do.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, assert_close_rel, lm_batch, tiny_gpt
from torch import nn

import gradsel_core as gs
import gradsel_core.engine as engine_mod
from gradsel_core.errors import UnsupportedModule, UsageError, VerificationError

D = 8
DTYPES = [torch.float32, torch.float64]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


class SmallShare(nn.Module):
    """A language model with a parameter whose share of the squared norm is ~1e-5: ``side.weight``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.side = nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, T, D)
        return self.out(torch.tanh(h + self.side(h * 1e-3)))


def small_share(dtype):
    torch.manual_seed(0)
    return SmallShare().to(dtype)


def wrong_on(name, factor, after=0):
    """A ``score_ghost`` that multiplies the squared norms of ``name`` by ``factor`` for samples >= ``after``."""
    real = engine_mod.score_ghost

    def fake(*args, **kwargs):
        raw = real(*args, **kwargs)
        sq = raw.per_param_sq[name].clone()
        sq[after:] = sq[after:] * factor
        raw.per_param_sq[name] = sq
        return raw

    return fake


def loop_scores(model, batch, **kw):
    return gs.GradNormEngine(model, backend="loop", per_param=True, **kw).score(batch)


# -- 1. the safety net -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_parameter_with_a_small_share_is_checked_against_its_own_norm(dtype, monkeypatch, caplog):
    model = small_share(dtype)
    batch = lm_batch(B=5)
    ref = loop_scores(model, batch)
    share = float((ref.per_param["side.weight"] / ref.norms.double().pow(2)).nan_to_num(0.0).max())
    assert 0 < share < 1e-4  # 100% off on this parameter moves the total by less than the old check's 1e-3
    monkeypatch.setattr(engine_mod, "score_ghost", wrong_on("side.weight", 2.0))
    with pytest.raises(VerificationError, match="side.weight"):
        gs.GradNormEngine(model, backend="ghost", verify=True).score(batch)
    with caplog.at_level(logging.WARNING):
        eng = gs.GradNormEngine(model, backend="auto", per_param=True)
        got = eng.score(batch)
    assert "side.weight" in caplog.text and got.backend == "vmap" and eng.verified
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], RTOL[dtype], n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_correct_fast_backend_passes_the_check(dtype):
    model = small_share(dtype)
    batch = lm_batch(B=6)
    eng = gs.GradNormEngine(model, backend="auto", per_param=True)
    got = eng.score(batch)
    assert got.backend == "ghost" and eng.verified
    ref = loop_scores(model, batch)
    for n in ref.per_param:
        assert_close_rel(got.per_param[n], ref.per_param[n], RTOL[dtype], n)


def prepared(batch):
    from gradsel_core.batching import prepare_batch

    return prepare_batch(batch, lm_loss=True)


def test_the_checked_samples_differ_in_length_and_are_distinct():
    batch = lm_batch(B=6, T=10)
    batch["attention_mask"][4, 7:] = 0
    idx, complete = engine_mod.verify_indices(prepared(batch))
    lengths = batch["attention_mask"][idx].sum(1).tolist()
    assert complete and len(set(lengths)) == 3
    assert 1 not in lengths  # sample 2 (one token, no target) is not taken while others have targets
    # unpadded: all of one length; three samples whose tokens differ
    flat = lm_batch(B=4, padding=False)
    idx, complete = engine_mod.verify_indices(prepared(flat))
    assert complete and len(idx) == 3
    # three copies of one sample and another: only two distinct samples
    twins = {"input_ids": torch.cat([flat["input_ids"][:1].repeat(3, 1), flat["input_ids"][1:2]])}
    idx, complete = engine_mod.verify_indices(prepared(twins))
    assert not complete and len(idx) == 2
    idx, complete = engine_mod.verify_indices(prepared(lm_batch(B=1)))
    assert not complete and idx.tolist() == [0]
    idx, complete = engine_mod.verify_indices(prepared({"input_ids": torch.zeros(0, 4, dtype=torch.long)}))
    assert not complete and idx.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batch_of_one_does_not_complete_verification(dtype, monkeypatch):
    """A fault that a B = 1 batch cannot show (here: every sample after the first is off, the way a (1, T, .)
    output indexed [0] is) passes a check on B = 1 and is caught on the first batch that can complete it."""
    model = small_share(dtype)
    monkeypatch.setattr(engine_mod, "score_ghost", wrong_on("side.weight", 3.0, after=1))
    eng = gs.GradNormEngine(model, backend="auto")
    one = lm_batch(B=1)
    assert eng.score(one).backend == "ghost" and not eng.verified
    two = lm_batch(B=2, seed=3)
    assert eng.score(two).backend == "vmap"  # B = 2 is checked on its samples: sample 1 shows the fault
    eng = gs.GradNormEngine(model, backend="auto")
    twins = {"input_ids": lm_batch(B=1, padding=False)["input_ids"].repeat(4, 1)}
    eng.score(twins)
    assert not eng.verified  # four copies of one sample are one distinct sample
    got = eng.score(lm_batch(B=5, seed=4))
    assert got.backend == "vmap" and eng.verified
    assert_close_rel(got.norms, loop_scores(model, lm_batch(B=5, seed=4)).norms, RTOL[dtype], "after the move")


def test_a_wrong_sample_is_caught_whichever_it_is(monkeypatch):
    """The fault is on one sample only (the last, of the shortest length with a target): the check picks it."""
    model = small_share(torch.float64)
    batch = lm_batch(B=4)  # lengths 10, 5, 1 (no target), 8
    monkeypatch.setattr(engine_mod, "score_ghost", wrong_on("emb.weight", 1.5, after=1))
    with pytest.raises(VerificationError, match="emb.weight"):
        gs.GradNormEngine(model, backend="ghost", verify=True).score(batch)


def fail_with(exc):
    def fake(*args, **kwargs):
        raise exc

    return fake


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_backend_auto_moves_to_is_checked_in_turn(dtype, monkeypatch, caplog):
    """ghost cannot score the model; vmap is wrong (injected): the check of vmap moves auto to the loop."""
    model = small_share(dtype)
    batch = lm_batch(B=4)
    ref = loop_scores(model, batch)
    monkeypatch.setattr(engine_mod, "score_ghost", fail_with(UnsupportedModule("no rule for this")))
    real_vmap = engine_mod.score_vmap

    def bad_vmap(*a, **k):
        raw = real_vmap(*a, **k)
        raw.per_param_sq["out.bias"] = raw.per_param_sq["out.bias"] * 1.01
        return raw

    monkeypatch.setattr(engine_mod, "score_vmap", bad_vmap)
    with caplog.at_level(logging.WARNING):
        eng = gs.GradNormEngine(model, backend="auto", per_param=True)
        got = eng.score(batch)
    assert got.backend == "loop" and "out.bias" in caplog.text and "no rule for this" in caplog.text
    assert "exact" not in caplog.text  # a backend moved to is not called exact before it is checked
    assert_close_rel(got.norms, ref.norms, RTOL[dtype], "loop")


@pytest.mark.parametrize("first", ["ghost", "vmap"])
def test_a_bad_batch_is_raised_and_auto_stays_on_its_fast_backend(first, monkeypatch):
    model = tiny_gpt()
    if first == "vmap":  # a plan that is not complete starts auto on vmap
        monkeypatch.setattr(engine_mod.GradNormEngine, "resolve_backend",
                            lambda self, prepared=None: self._settled or "vmap")
    eng = gs.GradNormEngine(model, backend="auto")
    good = lm_batch(B=4)
    assert eng.score(good).backend == first
    bad = lm_batch(B=4, seed=2)
    bad["input_ids"][1, 3] = VOCAB + 5  # token id >= vocab
    with pytest.raises((IndexError, RuntimeError)):
        eng.score(bad)
    assert eng._settled is None and eng.score(lm_batch(B=4, seed=3)).backend == first


def test_a_loss_fn_error_is_raised_and_auto_stays_on_ghost():
    from conftest import Classifier, classifier_loss

    torch.manual_seed(0)
    eng = gs.GradNormEngine(Classifier(), loss_fn=classifier_loss, backend="auto")
    batch = lm_batch(B=4)
    with pytest.raises(KeyError, match="labels"):
        eng.score(batch)  # no labels in the batch: the loss_fn's own error
    batch["labels"] = torch.tensor([0, 1, 2, 0])
    assert eng.score(batch).backend == "ghost" and eng.verified


def test_an_error_only_the_backend_raises_moves_auto_down(monkeypatch, caplog):
    """A non-UnsupportedModule error of ghost where a plain forward succeeds: the backend's, so auto moves."""
    model = tiny_gpt()
    monkeypatch.setattr(engine_mod, "score_ghost", fail_with(RuntimeError("a hook broke")))
    with caplog.at_level(logging.WARNING):
        got = gs.GradNormEngine(model, backend="auto").score(lm_batch())
    assert got.backend == "vmap" and "a hook broke" in caplog.text
    with pytest.raises(RuntimeError, match="a hook broke"):  # an explicit backend raises as is
        gs.GradNormEngine(model, backend="ghost").score(lm_batch())


class BatchCentering(nn.Module):
    """Mixes samples outside any norm layer: subtracts the batch mean of the hidden states."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, T, D)
        return self.out(h - 0.5 * h.mean(0, keepdim=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_model_that_mixes_samples_is_caught_by_the_check(dtype):
    torch.manual_seed(0)
    model = BatchCentering().to(dtype)
    batch = lm_batch(B=4)
    # refused: by the first pass's layout probe (each row of an output gradient must scale with its own
    # sample's loss weight), or else by the check against the loop (VerificationError)
    with pytest.raises(gs.UnsupportedModule):
        gs.GradNormEngine(model, backend="ghost", verify=True).score(batch)
    got = gs.GradNormEngine(model, backend="auto").score(batch)
    assert got.backend == "vmap"
    assert_close_rel(got.norms, loop_scores(model, batch).norms, RTOL[dtype], "vmap")


# -- 2. no side effects ------------------------------------------------------------------------------------------


class Counting(nn.Module):
    """Counts its forwards in a buffer (in eval mode too) and uses a weight functionally (a ghost retry)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.proj = nn.Linear(D, D)
        self.out = nn.Linear(D, VOCAB)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(D))

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        h = self.emb(input_ids)
        self.seen.mul_(0.5).add_(h.detach().mean((0, 1)))
        h = torch.tanh(self.proj(h)) + F.linear(h, self.proj.weight)  # a use outside proj's call
        return self.out(h)


@pytest.mark.parametrize("backend", ["auto", "ghost", "vmap"])
def test_state_moves_as_one_forward_does_through_retries_and_the_check(backend):
    torch.manual_seed(0)
    model = Counting()
    batch = lm_batch(B=4)
    plain = Counting()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain.eval()(**{k: v for k, v in batch.items()})
    eng = gs.GradNormEngine(model, backend=backend, verify=True)
    if backend == "vmap":  # vmap cannot write into a captured buffer: an explicit vmap says so, auto moves on
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            eng.score(batch)
        assert int(model.calls) == 0
        return
    eng.score(batch)
    assert int(model.calls) == 1 and torch.equal(model.seen, plain.seen)


def test_the_loop_leaves_buffers_as_found():
    torch.manual_seed(0)
    model = Counting()
    gs.GradNormEngine(model, backend="loop").score(lm_batch(B=4))
    assert int(model.calls) == 0 and float(model.seen.abs().sum()) == 0.0


class WithNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm = norm
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).transpose(1, 2)  # (B, D, T)
        return self.out(self.norm(h).transpose(1, 2))


MIXING = {
    "BatchNorm1d": lambda: nn.BatchNorm1d(D),
    "BatchNorm1d (no running stats)": lambda: nn.BatchNorm1d(D, track_running_stats=False),
    "InstanceNorm1d (running stats)": lambda: nn.InstanceNorm1d(D, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("kind", list(MIXING))
@pytest.mark.parametrize("how", ["score", "filtered"])
def test_layers_that_mix_samples_are_refused_before_any_forward(kind, how):
    torch.manual_seed(0)
    model = WithNorm(MIXING[kind]()).train()
    calls = []
    model.emb.register_forward_hook(lambda *a: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=r"module norm \(" + kind.split()[0]):
        if how == "score":
            gs.GradNormEngine(model, backend="auto").score(lm_batch())
        else:
            gs.filtered_backward(model, lm_batch(), policy="drop_top", ratio=0.5, loss_filter_std=None)
    assert not calls and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_layers_that_do_not_mix_samples_are_scored(dtype):
    torch.manual_seed(0)
    for norm in (nn.BatchNorm1d(D), nn.InstanceNorm1d(D, affine=True, track_running_stats=True),
                 nn.GroupNorm(2, D)):
        model = WithNorm(norm).to(dtype)
        if not isinstance(norm, nn.GroupNorm):
            with torch.no_grad():  # running statistics that are not the defaults
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
            model.eval()
        else:
            model.train()  # GroupNorm is per sample in train mode
        batch = lm_batch(B=4)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        got = gs.GradNormEngine(model, backend="auto").score(batch)
        assert got.backend in ("ghost", "vmap")
        assert_close_rel(got.norms, loop_scores(model, batch).norms, RTOL[dtype], type(norm).__name__)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- 3. filtered_backward through the engine's own path ----------------------------------------------------------


def plain_kept_grads(model, batch, kept, names, scale=1.0):
    """The reference: the gradient of the kept samples' mean loss, by a plain forward of the batch."""
    from gradsel_core.batching import per_sample_losses, prepare_batch

    params = dict(model.named_parameters())
    p = prepare_batch(batch, lm_loss=True)
    losses, _ = per_sample_losses(model(**p.model_inputs), p, None, "mean")
    w = kept.to(losses.dtype) * (scale / max(int(kept.sum()), 1))
    grads = torch.autograd.grad((losses * w).sum(), [params[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


def wrong_capture_on(monkeypatch, name, factor):
    """Every ghost capture (score() and filtered_backward alike) reports ``factor`` x the squared norms of ``name``."""
    from gradsel_core.ghost.capture import GhostCapture

    real = GhostCapture.per_param_sq

    def fake(self, params, device):
        sq = real(self, params, device)
        sq[name] = sq[name] * factor
        return sq

    monkeypatch.setattr(GhostCapture, "per_param_sq", fake)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["one_backward", "two_pass"])
@pytest.mark.parametrize("train", [False, True])
def test_filtered_backward_is_checked_and_moves_to_an_exact_step(dtype, mode, train, monkeypatch, caplog):
    model = small_share(dtype).train(train)
    batch = lm_batch(B=6)
    names = [n for n, _ in model.named_parameters()]
    wrong_capture_on(monkeypatch, "side.weight", 2.0)
    with pytest.raises(VerificationError, match="side.weight"):
        gs.FilteredBackward(model, policy="drop_top", ratio=0.5, loss_filter_std=None, backend="ghost",
                            verify=True).step(batch)
    assert all(p.grad is None for p in model.parameters())
    with caplog.at_level(logging.WARNING):
        res = gs.filtered_backward(model, batch, policy="drop_top", ratio=0.5, loss_filter_std=None, mode=mode)
    assert "side.weight" in caplog.text
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref = gs.GradNormEngine(model.eval(), backend="loop").score(batch)
    model.train(train)
    assert_close_rel(res.norms, ref.norms, RTOL[dtype], "norms")
    want = plain_kept_grads(model, batch, res.kept, names)
    for n in names:
        assert_close_rel(got[n], want[n], RTOL[dtype], n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_filtered_backward_on_a_model_that_mixes_samples_is_exact(dtype):
    """A batch-centering model: the one-backward path cannot be exact, the check says so, the step is exact."""
    torch.manual_seed(0)
    model = BatchCentering().to(dtype)
    batch = lm_batch(B=5)
    names = [n for n, _ in model.named_parameters()]
    fb = gs.FilteredBackward(model, policy="drop_top", ratio=0.4, loss_filter_std=None)
    res = fb.step(batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert fb.engine.last_backend == "vmap"
    assert_close_rel(res.norms, loop_scores(model, batch).norms, RTOL[dtype], "norms")
    want = plain_kept_grads(model, batch, res.kept, names)
    for n in names:
        assert_close_rel(got[n], want[n], RTOL[dtype], n)


def test_filtered_backward_raises_a_bad_batch_and_stays_on_ghost():
    model = tiny_gpt().eval()
    fb = gs.FilteredBackward(model, policy="drop_top", ratio=0.5, loss_filter_std=None)
    fb.step(lm_batch(B=4))
    bad = lm_batch(B=4, seed=2)
    bad["input_ids"][0, 1] = VOCAB
    with pytest.raises((IndexError, RuntimeError)):
        fb.step(bad)
    fb.step(lm_batch(B=4, seed=3))
    assert fb.engine.last_backend == "ghost" and fb.engine._settled is None


def test_filtered_norms_follow_score_on_nan_and_inf():
    """A sample whose gradient overflows is +inf, one whose loss is NaN is NaN: as in score()."""
    torch.manual_seed(0)
    model = SmallShare()

    def loss_fn(out, batch):  # (B,)
        first = batch["input_ids"][:, 0]
        scale = torch.where(first == 1, 1e30, torch.where(first == 2, float("nan"), 1.0))
        return out.float().pow(2).mean((1, 2)) * scale

    batch = lm_batch(B=5, padding=False)
    batch["input_ids"][0, 0], batch["input_ids"][2, 0] = 1, 2
    want = gs.GradNormEngine(model, loss_fn=loss_fn, backend="auto").score(batch).norms
    res = gs.filtered_backward(model, batch, policy="drop_top", ratio=0.4, loss_filter_std=None, loss_fn=loss_fn)
    assert torch.isinf(want[0]) and torch.isnan(want[2])
    assert torch.isinf(res.norms[0]) and res.norms[0] > 0 and torch.isnan(res.norms[2])
    assert_close_rel(res.norms[[1, 3, 4]], want[[1, 3, 4]], 1e-5, "finite norms")


def test_the_function_pays_the_check_once_per_model(monkeypatch):
    model = tiny_gpt().eval()
    calls = []
    real = engine_mod.score_loop
    monkeypatch.setattr(engine_mod, "score_loop", lambda *a, **k: calls.append(1) or real(*a, **k))
    for seed in (1, 2, 3):
        gs.filtered_backward(model, lm_batch(B=4, seed=seed), policy="drop_top", ratio=0.5, loss_filter_std=None)
    assert len(calls) == 1


class SpectralNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.hid = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(D, D))
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.tanh(self.hid(self.emb(input_ids))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["one_backward", "two_pass"])
def test_spectral_norm_in_train_mode_advances_as_one_forward(dtype, mode):
    import copy

    torch.manual_seed(0)
    model = SpectralNet().to(dtype).train()
    ref = copy.deepcopy(model)
    batch = lm_batch(B=6)
    names = [n for n, _ in model.named_parameters()]
    res = gs.filtered_backward(model, batch, policy="drop_top", ratio=0.5, loss_filter_std=None, mode=mode)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    want = plain_kept_grads(ref, batch, res.kept, names)  # one train-mode forward of the reference copy
    for (n, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), n
    for n in names:
        assert_close_rel(got[n], want[n], RTOL[dtype], n)
    # scoring (eval mode) leaves the power iteration where it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gs.GradNormEngine(model.eval(), backend="auto").score(batch)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- 4. encoder-decoder models ----------------------------------------------------------------------------------


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0))


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0))


SEQ2SEQ = {"bart": tiny_bart, "t5": tiny_t5}


def s2s_batch(B=4, seed=0):
    """Encoder inputs of several lengths (T 7), decoder targets of several lengths (T_dec 5), one without targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1 % B, 4:] = 0
    mask[(B - 1), 2:] = 0
    labels = torch.randint(3, VOCAB, (B, 5), generator=g)
    labels[0, 3:] = -100
    if B > 2:
        labels[2, :] = -100  # no target token: loss 0, gradient 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("name", list(SEQ2SEQ))
@pytest.mark.parametrize("dtype", DTYPES)
def test_seq2seq_loss_is_the_model_s_own_per_sample_loss(name, dtype):
    """Labels go to the decoder, each sample's loss is the mean over its own target tokens (no causal shift):
    HF's own loss of that sample alone."""
    model = SEQ2SEQ[name]().to(dtype).eval()
    batch = s2s_batch()
    res = gs.GradNormEngine(model, backend="loop").score(batch)
    assert res.tokens.tolist() == (batch["labels"] != -100).sum(1).tolist()
    for b in range(4):
        if int(res.tokens[b]) == 0:
            assert float(res.losses[b]) == 0.0 and float(res.norms[b]) == 0.0
            continue
        own = model(**{k: v[b:b + 1] for k, v in batch.items()}).loss
        assert abs(float(own) - float(res.losses[b])) <= 1e-5 * max(1.0, float(own))


@pytest.mark.parametrize("name", list(SEQ2SEQ))
@pytest.mark.parametrize("dtype", DTYPES)
def test_seq2seq_every_backend_is_exact(name, dtype):
    model = SEQ2SEQ[name]().to(dtype)
    batch = s2s_batch()
    ref = loop_scores(model, batch)
    backends = ["vmap", "auto"] + (["ghost"] if name == "bart" else [])
    for backend in backends:
        eng = gs.GradNormEngine(model, backend=backend, per_param=True)
        got = eng.score(batch)
        assert_close_rel(got.norms, ref.norms, RTOL[dtype], f"{name} {backend}")
        assert_close_rel(got.losses, ref.losses, RTOL[dtype], f"{name} {backend} losses")
        assert torch.equal(got.tokens, ref.tokens)
    if name == "t5":  # T5's relative attention bias: ghost refuses it clearly, auto is exact on vmap
        with pytest.raises(UnsupportedModule):
            gs.GradNormEngine(model, backend="ghost").score(batch)
    # B = 1 and empty
    one = {k: v[:1] for k, v in batch.items()}
    assert_close_rel(gs.GradNormEngine(model, backend="auto").score(one).norms, ref.norms[:1], RTOL[dtype], "B=1")
    empty = {k: v[:0] for k, v in batch.items()}
    assert gs.GradNormEngine(model, backend="auto").score(empty).norms.shape == (0,)


def test_seq2seq_is_never_scored_with_the_causal_shift():
    model = tiny_bart()
    batch = s2s_batch()
    with pytest.raises(UsageError, match="encoder-decoder.*labels"):
        gs.GradNormEngine(model, backend="auto").score({k: batch[k] for k in ("input_ids", "attention_mask")})
    with pytest.raises(UsageError, match="labels"):
        gs.GradNormEngine(model, backend="loop").score({**batch, "labels": batch["labels"][:, 0]})

    class NoShift(nn.Module):  # an encoder-decoder config, but no way to build the decoder's inputs
        config = model.config

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kw):
            return self.inner(**kw)

    with pytest.raises(UsageError, match="decoder_input_ids"):
        gs.GradNormEngine(NoShift(), backend="loop").score(batch)
    # given decoder_input_ids are used as they are
    dec = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    a = gs.GradNormEngine(NoShift(), backend="loop").score({**batch, "decoder_input_ids": dec})
    b = gs.GradNormEngine(model, backend="loop").score(batch)
    assert torch.equal(a.norms, b.norms)


@pytest.mark.parametrize("name", list(SEQ2SEQ))
@pytest.mark.parametrize("mode", ["one_backward", "two_pass"])
def test_seq2seq_filtered_backward(name, mode):
    model = SEQ2SEQ[name]().double().train()
    batch = s2s_batch(B=5)
    names = [n for n, _ in model.named_parameters()]
    res = gs.filtered_backward(model, batch, policy="drop_top", ratio=0.4, loss_filter_std=None, mode=mode)
    got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    assert_close_rel(res.norms, loop_scores(model.eval(), batch).norms, 1e-10, "norms")
    model.train()
    from gradsel_core.batching import add_decoder_inputs, per_sample_losses, prepare_batch

    p = add_decoder_inputs(prepare_batch(batch, lm_loss=True, seq2seq=True), model)
    losses, _ = per_sample_losses(model(**p.model_inputs), p, None, "mean")
    w = res.kept.double() / res.kept.sum()
    params = dict(model.named_parameters())
    want = torch.autograd.grad((losses * w).sum(), [params[n] for n in names], allow_unused=True)
    # against the largest gradient entry: a bias whose gradient is 0 in exact arithmetic (k_proj.bias under the
    # softmax) holds rounding noise (~1e-22) in both
    scale = max(float(g.abs().max()) for g in want if g is not None)
    for n, g in zip(names, want):
        if g is None:
            assert got[n] is None or float(got[n].abs().sum()) == 0.0
        else:
            err = float((got[n] - g).abs().max()) / scale
            assert err <= 1e-10, f"{n}: {err:.3g}"


def make_bart_dir(d) -> str:
    """A tiny random BART and a word-level tokenizer (BOS/EOS added around each text) saved into ``d``."""
    from transformers import BartConfig, BartForConditionalGeneration
    from conftest import save_word_tokenizer

    vocab = save_word_tokenizer(d, ["<pad>", "<s>", "</s>", "<unk>"], wrap=True)
    torch.manual_seed(0)
    BartForConditionalGeneration(BartConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)).save_pretrained(str(d))
    return str(d)


def test_seq2seq_score_dataset_and_the_cli(tmp_path, capsys):
    import json

    from transformers import AutoTokenizer

    from gradsel_core.cli import main
    from gradsel_core.data import load_model_and_tokenizer
    from gradsel_core.store import ScoreStore

    d = make_bart_dir(tmp_path / "bart")
    rows = [{"id": i, "prompt": p, "response": r} for i, (p, r) in enumerate([
        ("what is two plus three ?", "five"), ("tell me about the cat", "the cat sat on the mat"),
        ("hello", "hello world"), ("why", "because the dog sat"), ("a", "yes"),
    ])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError, match="encoder-decoder"):  # a text record has no target for the decoder
        model, tok = load_model_and_tokenizer(d)
        gs.score_dataset(model, [{"text": "the cat"}], str(tmp_path / "x"), tokenizer=tok)
    out = str(tmp_path / "scores")
    assert main(["score", "--model", d, "--data", str(data), "--out", out, "--batch-size", "3", "--no-progress"]) == 0
    capsys.readouterr()
    store = ScoreStore.open(out)
    assert store.meta["model"]["class"] == "BartForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(d)
    model, _ = load_model_and_tokenizer(d)
    for i, r in enumerate(rows):  # each record alone: prompt -> encoder, response (with BOS/EOS) -> labels
        enc = torch.tensor([tok.encode(r["prompt"])])
        lab = torch.tensor([tok.encode(r["response"])])
        assert store.tokens[i] == lab.shape[1]
        ref = gs.GradNormEngine(model, backend="loop").score({"input_ids": enc, "labels": lab})
        assert abs(float(store.norms[i]) - float(ref.norms[0])) <= 1e-5 * float(ref.norms[0])
        assert abs(float(store.losses[i]) - float(model(input_ids=enc, labels=lab).loss)) <= 1e-5


def test_an_error_of_the_batch_in_the_backward_does_not_move_auto():
    """A loss whose backward fails on one batch only (the forward and loss succeed): every backend fails on it,
    the error is raised, and the next batch runs on ghost again."""

    class Fragile(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bad):
            ctx.bad = bad
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if ctx.bad:
                raise RuntimeError("this batch's backward fails")
            return g, None

    def loss_fn(out, batch):
        bad = bool((batch["input_ids"] == 1).any())
        return Fragile.apply(out, bad).float().pow(2).mean((1, 2))

    model = small_share(torch.float32)
    eng = gs.GradNormEngine(model, backend="auto", loss_fn=loss_fn)
    batch = lm_batch(B=4, padding=False)
    assert eng.score(batch).backend == "ghost"
    bad = lm_batch(B=4, seed=2, padding=False)
    bad["input_ids"][0, 0] = 1
    with pytest.raises(RuntimeError, match="backward fails"):
        eng.score(bad)
    assert eng._settled is None and eng.score(batch).backend == "ghost"


def test_seq2seq_reference_gradient_is_the_mean_of_the_scored_gradients():
    """reference_gradient uses the same seq2seq loss: Σ_i ⟨g_i, r⟩ / N = ||r||² with r = (1/N) Σ_i g_i."""
    model = tiny_bart().double()
    batch = s2s_batch()
    r = gs.reference_gradient(model, [batch])
    assert r.meta["loss"] == "seq2seq_lm"
    res = gs.GradNormEngine(model, backend="loop").score(batch, reference=r.grads)
    sq = sum(float(g.double().pow(2).sum()) for g in r.grads.values())
    assert abs(float(res.dots.double().sum()) / 4 - sq) <= 1e-6 * sq


def test_a_proven_move_survives_an_error_of_the_batch(monkeypatch):
    """ghost fails the check (proven: auto leaves it), vmap raises where a plain forward does not (not proven),
    the loop raises on the whole batch: the error is raised and the engine stays on vmap, never back on ghost."""
    model = small_share(torch.float64)
    monkeypatch.setattr(engine_mod, "score_ghost", wrong_on("side.weight", 2.0))
    monkeypatch.setattr(engine_mod, "score_vmap", fail_with(RuntimeError("vmap broke")))
    real_loop = engine_mod.score_loop

    def loop(spec, prepared, refs=None):
        if prepared.batch_size == 4:
            raise RuntimeError("the loop broke on this batch")
        return real_loop(spec, prepared, refs)

    monkeypatch.setattr(engine_mod, "score_loop", loop)
    eng = gs.GradNormEngine(model, backend="auto")
    with pytest.raises(RuntimeError, match="loop broke"):
        eng.score(lm_batch(B=4))
    assert eng._settled == "vmap"


def test_the_causal_trainer_refuses_an_encoder_decoder_model():
    from gradsel_core.trainer import ContinualTrainer

    with pytest.raises(UsageError, match="encoder-decoder"):
        ContinualTrainer(tiny_bart(), tasks=[])
