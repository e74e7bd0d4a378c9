"""The length-debiased score ||grad sum_t l_t|| / sqrt(n_tokens) (issue #22 item 6), against the per-sample
loop reference scored with loss_reduction="sum"."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_rel, lm_batch, tiny_gpt

import gradsel_core as gs
from gradsel_core.selection import norm_per_token

# fp32: the computation's error. fp64: the model computes in fp64, but ScoreResult.norms are float32 (a
# relative rounding of 6e-8 each, on both sides)
TOL = {torch.float32: 2e-5, torch.float64: 2.5e-7}


def reference_key(model, batch):
    """||grad sum_t l_t|| / sqrt(n) from the loop backend with loss_reduction="sum" (n >= 1: a sample with no
    target token has a zero gradient)."""
    res = gs.GradNormEngine(model, backend="loop", loss_reduction="sum").score(batch)
    return res.norms.double() / res.tokens.double().clamp(min=1).sqrt(), res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,padding", [(6, True), (1, False), (5, False)])
def test_from_mean_and_from_sum_equal_the_loop_reference(dtype, B, padding):
    model = tiny_gpt().to(dtype).eval()
    batch = lm_batch(B=B, T=9, padding=padding)
    want, _ = reference_key(model, batch)
    for reduction in ("mean", "sum"):
        res = gs.GradNormEngine(model, backend="ghost", loss_reduction=reduction).score(batch)
        got = torch.from_numpy(norm_per_token(res.norms, res.tokens, reduction))
        assert_close_rel(got, want, TOL[dtype], f"norm_per_token from {reduction} ({dtype})")
    if padding:  # the zero-target sample: zero gradient, score 0
        assert float(want[2]) == 0.0


def test_keep_mask_and_filtered_backward_rank_by_it():
    model = tiny_gpt().eval()
    batch = lm_batch(B=8, T=10, padding=True, seed=3)
    want, ref = reference_key(model, batch)
    order = np.argsort(want.numpy(), kind="stable")
    res = gs.filtered_backward(model, batch, policy="keep_bottom", ratio=0.5, score="norm_per_token")
    assert sorted(torch.nonzero(res.kept).squeeze(1).tolist()) == sorted(order[:4].tolist())
    assert res.summary["score"] == "norm_per_token"
    mean_res = gs.GradNormEngine(model, backend="loop").score(batch)
    m = gs.keep_mask(mean_res.norms, mean_res.losses, policy="keep_top", ratio=0.25, tokens=mean_res.tokens,
                     score="norm_per_token", loss_reduction="mean")
    assert sorted(torch.nonzero(m).squeeze(1).tolist()) == sorted(order[-2:].tolist())
    two = gs.filtered_backward(model, batch, policy="keep_bottom", ratio=0.5, score="norm_per_token", mode="two_pass")
    assert torch.equal(two.kept, res.kept)


def test_empty_batch_and_refusals():
    empty = gs.keep_mask(torch.zeros(0), torch.zeros(0), tokens=torch.zeros(0, dtype=torch.long),
                         score="norm_per_token", loss_reduction="mean")
    assert empty.shape == (0,)
    d = {"norms": [1.0, 2.0], "losses": [1.0, 1.0], "tokens": [1, 4]}
    with pytest.raises(ValueError, match="loss_reduction='mean' or 'sum'"):
        gs.select(d, score="norm_per_token")
    with pytest.raises(ValueError, match="already length-debiased"):
        gs.select(d, score="norm_per_token", loss_reduction="mean", length_normalize=True)
    with pytest.raises(ValueError, match="score must be one of"):
        gs.select(d, score="norm_per_tokens")
    with pytest.raises(ValueError, match="needs per-sample token counts"):
        gs.select({"norms": [1.0], "losses": [1.0]}, score="norm_per_token", loss_reduction="sum")
    with pytest.raises(gs.UsageError, match="custom loss_fn"):
        gs.FilteredBackward(tiny_gpt(), score="norm_per_token", loss_fn=lambda out, batch: out.sum())
    with pytest.raises(ValueError, match="score='norm_per_token' applies to norms"):
        gs.select({**d, "cosines": [0.1, 0.2]}, policy="drop_opposed", score="norm_per_token", loss_reduction="mean")


def test_select_on_a_store_reads_the_reduction(tmp_path):
    tokens = np.array([1, 4, 9, 16])
    norms = np.array([4.0, 2.0, 1.0, 1.0], dtype=np.float32)  # mean-reduced: keys 4, 4, 3, 4
    for reduction, want in (("mean", [2]), ("sum", [3])):  # sum-reduced: keys 4, 1, 1/3, 1/4
        store = gs.ScoreStore.from_arrays(tmp_path / reduction, norms, np.ones(4), tokens, loss_reduction=reduction)
        sel = gs.select(store, policy="keep_bottom", ratio=0.25, score="norm_per_token")
        assert sel.kept_ids.tolist() == want and sel.summary["score"] == "norm_per_token"


def test_select_on_a_score_result_reads_its_reduction():
    model = tiny_gpt().eval()
    batch = lm_batch(B=8, T=10, padding=True, seed=5)
    want, _ = reference_key(model, batch)
    lowest = sorted(np.argsort(want.numpy(), kind="stable")[:4].tolist())
    for reduction in ("mean", "sum"):
        res = gs.GradNormEngine(model, loss_reduction=reduction).score(batch)
        assert res.loss_reduction == reduction
        sel = gs.select(res, policy="keep_bottom", ratio=0.5, score="norm_per_token")
        assert sel.kept_ids.tolist() == lowest
    custom = gs.GradNormEngine(model, loss_fn=lambda out, b: out.float().mean(dim=(1, 2))).score(batch)
    assert custom.loss_reduction is None
    with pytest.raises(ValueError, match="pass loss_reduction"):
        gs.select(custom, score="norm_per_token")
