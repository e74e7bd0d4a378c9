"""filtered_backward(mode="two_pass"): the norms from the activation backward with the graph retained, then an
ordinary backward of the kept samples' masked mean loss. Single process; the torchrun runs are in test_fsdp.py.
Also: activation checkpointing with in-step filtering (non-reentrant works, reentrant is refused clearly)."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, build, lm_batch, tiny_gpt
from test_filtered import accumulation_matches_plain, plain_grads_on
from torch.utils.flop_counter import FlopCounterMode

import gradsel_core as gs
from gradsel_core.batching import per_sample_losses, prepare_batch
from gradsel_core.errors import UsageError


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tinygpt", "tinygpt_tied", "gpt2", "peft_llama"])
def test_two_pass_grad_equals_plain_backward_on_kept_samples(name):
    model = build(name).eval()
    batch = lm_batch(B=6, T=10, padding=False)
    spec = "lora" if name == "peft_llama" else "trainable"
    params = gs.GradNormEngine(model, params=spec).params
    res = gs.filtered_backward(model, batch, policy="median_band", ratio=0.5, params=spec, loss_filter_std=None,
                               mode="two_pass")
    assert res.n_kept == 3 and int(res.kept.sum()) == 3
    got = grads(model)
    assert set(got) == set(params)  # nothing outside the selected parameters got a gradient
    scored = gs.GradNormEngine(model, params=spec, backend="loop").score(batch)
    assert_close_rel(res.norms, scored.norms, 1e-5, "norms")
    assert abs(res.loss - float(scored.losses[res.kept].mean())) < 1e-5
    model.zero_grad(set_to_none=True)
    want = plain_grads_on(model, batch, res.kept, params)
    for n in params:
        assert_close_rel(got[n], want[n], 1e-5, n)
    # the same selection and update as the one-backward path
    model.zero_grad(set_to_none=True)
    one = gs.filtered_backward(model, batch, policy="median_band", ratio=0.5, params=spec, loss_filter_std=None,
                               mode="one_backward")
    assert torch.equal(one.kept, res.kept)
    for n in params:
        assert_close_rel(got[n], params[n].grad, 1e-5, n)


def test_two_pass_accumulates_scales_and_uses_the_fallback():
    from test_ghost import WithScale

    torch.manual_seed(0)
    model = WithScale()  # a parameter without a norm rule: torch.func fallback
    params = dict(model.named_parameters())
    micro = [lm_batch(B=5, seed=s, padding=True) for s in (1, 2)]
    fb = gs.TwoPassFilteredBackward(model, policy="keep_bottom", ratio=0.4, loss_filter_std=None)
    accumulation_matches_plain(model, fb, micro, params)


def test_two_pass_backward_fn_and_modes():
    model = tiny_gpt().eval()
    batch = lm_batch(B=6, padding=False)
    seen = []

    def backward_fn(loss):
        seen.append(float(loss.detach()))
        loss.backward()

    res = gs.filtered_backward(model, batch, ratio=0.5, loss_filter_std=None, backward_fn=backward_fn)  # auto
    assert len(seen) == 1 and seen[0] == pytest.approx(res.loss, rel=1e-6)  # the kept samples' mean loss
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(UsageError, match="mode="):
        gs.filtered_backward(model, batch, mode="twice")
    with pytest.raises(UsageError, match="two_pass"):
        gs.filtered_backward(model, batch, mode="one_backward", backward_fn=backward_fn)


def test_two_pass_nothing_kept_adds_nothing():
    model = tiny_gpt().eval()
    res = gs.filtered_backward(model, lm_batch(), ratio=0.0, mode="two_pass")
    assert res.n_kept == 0 and res.loss == 0.0
    assert all(p.grad is None for p in model.parameters())
    empty = gs.filtered_backward(model, {"input_ids": torch.zeros(0, 5, dtype=torch.long)}, mode="two_pass")
    assert empty.n_kept == 0 and empty.kept.shape == (0,)
    assert all(p.grad is None for p in model.parameters())


def test_two_pass_costs_a_plain_step_plus_the_scoring_backward():
    """Flops: the one-backward path is forward F + scoring backward S (activation backward and norms) + the
    kept samples' weight gradients; two-pass is a plain step (F + full backward) + S, with no second
    forward: two_pass <= plain + (one_backward - F)."""
    model = gs.models.TinyGPT(gs.models.TinyGPTConfig(vocab_size=512, d_model=64, n_layer=2, max_seq_len=32))
    batch = {"input_ids": torch.randint(0, 512, (8, 32))}
    prepared = prepare_batch(batch, lm_loss=True)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        per_sample_losses(model(**batch), prepared, None, "mean")
    with FlopCounterMode(display=False) as plain:
        per_sample_losses(model(**batch), prepared, None, "mean")[0].mean().backward()
    flops = {}
    for mode in ("one_backward", "two_pass"):
        gs.filtered_backward(model, batch, ratio=0.2, mode=mode)  # the first call pays the check
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as c:
            gs.filtered_backward(model, batch, ratio=0.2, mode=mode)
        flops[mode] = c.get_total_flops()
    F, P = fwd.get_total_flops(), plain.get_total_flops()
    assert flops["two_pass"] > P  # an extra backward...
    assert flops["two_pass"] <= P + (flops["one_backward"] - F)  # ...but no second forward


# -- activation checkpointing ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["one_backward", "two_pass"])
def test_non_reentrant_checkpointing(mode):
    model = build("llama").train()  # HF checkpoints only in train mode; this config has no dropout
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    batch = lm_batch(B=6, T=10, padding=False)
    params = dict(model.named_parameters())
    res = gs.filtered_backward(model, batch, ratio=0.5, loss_filter_std=None, mode=mode)
    got = grads(model)
    model.zero_grad(set_to_none=True)
    want = plain_grads_on(model, batch, res.kept, params)
    for n in params:
        assert_close_rel(got[n], want[n], 1e-5, n)


@pytest.mark.parametrize("mode", ["one_backward", "two_pass"])
def test_reentrant_checkpointing_is_refused_with_the_fix(mode):
    model = build("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(UsageError, match=r"'use_reentrant': False"):
        gs.filtered_backward(model, lm_batch(B=4, padding=False), ratio=0.5, mode=mode)


# -- one process group of one rank: fully_shard parameters are DTensors ------------------------------------


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialised already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fully_shard_one_rank(one_rank_group):
    from gradsel_core.integrations.fsdp import is_sharded, shard_decoder_layers

    model, ref = build("llama").eval(), build("llama").eval()
    shard_decoder_layers(model)
    assert is_sharded(model)
    with pytest.raises(UsageError, match="two_pass"):  # the one-backward path cannot write sharded gradients
        gs.FilteredBackward(model)
    batch = lm_batch(B=6, T=10, padding=False)
    res = gs.filtered_backward(model, batch, ratio=0.5, loss_filter_std=None)  # auto: two_pass
    assert res.n_kept == 3
    want = plain_grads_on(ref, batch, res.kept, dict(ref.named_parameters()))
    for n, p in model.named_parameters():
        assert_close_rel(p.grad.full_tensor(), want[n], 1e-5, n)
    with pytest.raises(UsageError, match="sharded already"):
        shard_decoder_layers(model)


def test_bench_two_pass_quick(tmp_path):
    """benchmarks/bench_two_pass.py runs end to end (--quick) and writes a row per case and method."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/bench_two_pass.py", "--quick", "--out-dir", str(tmp_path)],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("two-pass-*-quick.json")).read_text())["rows"]
    assert {(r["case"], r["method"]) for r in rows} == {(c, m) for c in ("quick-full", "quick-lora")
                                                        for m in ("plain", "one_backward", "two_pass")}
    for r in rows:
        assert r["median_s"] > 0 and len(r["all_s"]) == r["repeats"] == 2 and "torch_version" in r["env"]
        if r["method"] == "plain":
            assert r["ratio_to_plain"] == 1.0


def test_fsdp_helpers_without_a_process_group():
    from torch import nn

    from gradsel_core.integrations.fsdp import FullParams, decoder_layers, is_sharded, shard_decoder_layers

    model = tiny_gpt()
    assert decoder_layers(model) == list(model.blocks)  # no _no_split_modules: the largest ModuleList
    assert [type(m).__name__ for m in decoder_layers(build("llama"))] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(UsageError, match="decoder layers"):
        decoder_layers(nn.Linear(2, 2))
    with pytest.raises(UsageError, match="torchrun"):
        shard_decoder_layers(model)
    assert not is_sharded(model)
    params = dict(model.named_parameters())
    full = FullParams(params)
    assert list(full) == list(params) and len(full) == len(params) and full["lm_head.weight"] is params["lm_head.weight"]


def test_score_dataset_refuses_a_non_ghost_backend_on_a_sharded_model(one_rank_group, tmp_path):
    from gradsel_core.integrations.fsdp import shard_decoder_layers

    model = shard_decoder_layers(build("llama"))
    records = [{"input_ids": [3, 4, 5, 6]}, {"input_ids": [7, 8, 9]}]
    with pytest.raises(UsageError, match="ghost engine only"):
        gs.score_dataset(model, records, str(tmp_path / "s"), backend="vmap", progress=False)
    store = gs.score_dataset(model, records, str(tmp_path / "g"), progress=False)  # auto: ghost, on one rank
    single = gs.score_dataset(build("llama"), records, str(tmp_path / "one"), progress=False)
    assert list(store.norms) == pytest.approx(list(single.norms), rel=1e-5)
