"""FSDP2 (fully_shard) under torchrun, 2 ranks, gloo on CPU: two-pass in-step selection and sharded scoring
equal a single process with the same global batch / the same data."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover - depends on the torch build
    pytest.skip("torch.distributed is not available", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "dist"))

import gradsel_core as gs  # noqa: E402
from fsdp_common import LR, RATIO, STEPS, global_batch, local_batch, score_records, tiny_llama  # noqa: E402

WORLD = 2


def torchrun(*args, timeout=300):
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` with this checkout first
    on the path; fails the test with the workers' output when it does not exit 0."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def test_two_pass_training_equals_single_process(tmp_path, one_thread):
    torchrun(os.path.join(HERE, "dist", "fsdp_worker.py"), "train", str(tmp_path))
    run = torch.load(tmp_path / "train.pt")
    assert run["world"] == WORLD and len(run["steps"]) == STEPS

    # single process, unsharded: the same global batch, each rank's micro-batch selected on its own
    ref = tiny_llama().train()
    params = dict(ref.named_parameters())
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for step, ranks in enumerate(run["steps"]):
        gb = global_batch(step)
        total = 0.0
        for r, got in enumerate(ranks):
            mb = local_batch(gb, r, WORLD)
            scored = gs.GradNormEngine(ref, backend="loop").score(mb)  # the reference norms
            np.testing.assert_allclose(got["norms"], scored.norms.numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got["losses"], scored.losses.numpy(), rtol=1e-6, atol=1e-7)
            kept = gs.keep_mask(scored.norms, scored.losses, policy="median_band", ratio=RATIO, loss_filter_std=None)
            assert got["kept"] == kept.tolist(), f"step {step} rank {r}: another selection"
            assert sum(got["kept"]) == int(RATIO * mb["input_ids"].shape[0])
            from gradsel_core.batching import per_sample_losses, prepare_batch

            prepared = prepare_batch(mb, lm_loss=True)
            losses, _ = per_sample_losses(ref(**prepared.model_inputs), prepared, None, "mean")
            total = total + losses[kept].mean() / WORLD  # FSDP averages the ranks' gradients
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    init = dict(tiny_llama().named_parameters())
    num = den = 0.0
    for n, p in params.items():
        got = run["state"][n]
        want_delta = (p.detach() - init[n].detach()).double()
        got_delta = (got - init[n].detach()).double()
        num += float((got_delta - want_delta).pow(2).sum())
        den += float(want_delta.pow(2).sum())
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert den > 0
    assert (num / den) ** 0.5 < 1e-4, f"relative error of the 3-step update {(num / den) ** 0.5:.3g}"


def test_sharded_scoring_store_equals_single_process(tmp_path, one_thread):
    from gradsel_core.store import ScoreStore, read_manifest

    torchrun(os.path.join(HERE, "dist", "fsdp_worker.py"), "score", str(tmp_path))
    sharded = ScoreStore.open(str(tmp_path / "store"))
    single = gs.score_dataset(tiny_llama(), score_records(), str(tmp_path / "single"), batch_size=4, shard_size=8,
                              progress=False)
    assert len(sharded) == len(single) == 28
    assert list(sharded.ids) == list(single.ids)
    np.testing.assert_allclose(sharded.norms, single.norms, rtol=1e-5, atol=0)
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    m_sh, m_one = read_manifest(str(tmp_path / "store")), read_manifest(str(tmp_path / "single"))
    assert m_sh["model"] == m_one["model"]  # the same model identity: either can resume the other
