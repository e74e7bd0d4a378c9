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
from fsdp_common import LR, RATIO, STEPS, global_batch, local_batch, tiny_llama  # noqa: E402

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


def _score_data(path, n=20):
    import json

    from conftest import WORDS

    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"id": f"p{i}", "prompt": "Q : what is " + WORDS[10 + i % 4] + " ?",
                         "response": "A : " + " ".join(WORDS[i % 9: i % 9 + 2 + i % 4])})
        else:
            rows.append({"id": f"t{i}", "text": " ".join(WORDS[i: i + 3 + i % 6])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gradsel_score_fsdp_store_equals_single_process(tmp_path, one_thread):
    """`gradsel score --fsdp` under torchrun (score_dataset on a fully_shard model) writes the store a single
    process writes. 20 records, shards of 6, batches of 3: shards of 2, 2, 2 and 1 batches, so rank 0 scores
    4 batches and rank 1 scores 3 and pads one collective forward."""
    from conftest import make_llama_dir

    from gradsel_core.cli import main
    from gradsel_core.store import ScoreStore, read_manifest

    model_dir = make_llama_dir(tmp_path / "llama")
    data = _score_data(tmp_path / "d.jsonl")
    common = ["--model", model_dir, "--data", data, "--batch-size", "3", "--shard-size", "6", "--no-progress"]
    torchrun("-m", "gradsel_core.cli", "score", "--fsdp", "--out", str(tmp_path / "sharded"), *common)
    assert main(["score", "--out", str(tmp_path / "single"), *common]) == 0
    sharded, single = ScoreStore.open(str(tmp_path / "sharded")), ScoreStore.open(str(tmp_path / "single"))
    assert len(sharded) == len(single) == 20
    assert list(sharded.ids) == list(single.ids)
    np.testing.assert_allclose(sharded.norms, single.norms, rtol=1e-5, atol=0)
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    assert np.all(sharded.norms > 0)
    # the same model identity (whole-weight hash, the model's own class): either run can resume the other
    assert read_manifest(str(tmp_path / "sharded"))["model"] == read_manifest(str(tmp_path / "single"))["model"]


def test_gradsel_score_fsdp_needs_torchrun(tmp_path, capsys):
    from conftest import make_llama_dir

    from gradsel_core.cli import main

    data = _score_data(tmp_path / "d.jsonl", n=2)
    rc = main(["score", "--fsdp", "--model", make_llama_dir(tmp_path / "m"), "--data", data, "--out",
               str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "torchrun" in capsys.readouterr().err
