"""FSDP2 (fully_shard) under torchrun, 2 ranks, gloo on CPU: two-pass in-step selection and sharded scoring
equal a single process with the same global batch / the same data."""
from __future__ import annotations

import os
import signal
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
sys.path.insert(0, os.path.join(HERE, "torchrun"))

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
    # its own session: on a timeout the whole group (torchrun and its ranks) is killed, so that no rank is left
    # behind to outlive the test, and the ranks' output says where they were
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s\n{stdout[-4000:]}\n{stderr[-8000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{stdout[-4000:]}\n{stderr[-8000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def reference_run(micro_batches, kept):
    """Single process, unsharded: SGD on, per step, the mean over ranks of each rank's kept-sample mean loss
    (FSDP averages the ranks' gradients). ``micro_batches[step][rank]``, ``kept[step][rank]``. Checks on
    the way that each rank's selection is the one a single process makes on that micro-batch. Returns the
    model."""
    from gradsel_core.batching import per_sample_losses, prepare_batch

    ref = tiny_llama().train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for step, ranks in enumerate(micro_batches):
        total = 0.0
        for r, mb in enumerate(ranks):
            scored = gs.GradNormEngine(ref, backend="loop").score(mb)  # the reference norms
            want = gs.keep_mask(scored.norms, scored.losses, policy="median_band", ratio=RATIO, loss_filter_std=None)
            assert kept[step][r] == want.tolist(), f"step {step} rank {r}: another selection"
            assert sum(kept[step][r]) == int(RATIO * mb["input_ids"].shape[0])
            prepared = prepare_batch(mb, lm_loss=True)
            losses, _ = per_sample_losses(ref(**prepared.model_inputs), prepared, None, "mean")
            total = total + losses[want].mean() / WORLD
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ref


def assert_same_parameters(state, ref):
    init = dict(tiny_llama().named_parameters())
    num = den = 0.0
    for n, p in ref.named_parameters():
        got = state[n]
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        want_delta = (p.detach() - init[n].detach()).double()
        got_delta = (got - init[n].detach()).double()
        num += float((got_delta - want_delta).pow(2).sum())
        den += float(want_delta.pow(2).sum())
    assert den > 0
    assert (num / den) ** 0.5 < 1e-4, f"relative error of the 3-step update {(num / den) ** 0.5:.3g}"


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_two_pass_training_equals_single_process(tmp_path, one_thread, engine):
    """FSDP2 (fully_shard per decoder layer) or DDP, 2 ranks: two-pass selection, 3 SGD steps."""
    torchrun(os.path.join(HERE, "torchrun", "fsdp_worker.py"), engine, str(tmp_path))
    run = torch.load(tmp_path / "train.pt")
    assert run["world"] == WORLD and len(run["steps"]) == STEPS
    micro = [[local_batch(global_batch(step), r, WORLD) for r in range(WORLD)] for step in range(STEPS)]
    for step, ranks in enumerate(run["steps"]):  # the norms and losses each rank computed under FSDP
        for r, got in enumerate(ranks):
            one = gs.GradNormEngine(tiny_llama(), backend="loop").score(micro[step][r]) if step == 0 else None
            if one is not None:
                np.testing.assert_allclose(got["norms"], one.norms.numpy(), rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(got["losses"], one.losses.numpy(), rtol=1e-6, atol=1e-7)
    ref = reference_run(micro, [[got["kept"] for got in ranks] for ranks in run["steps"]])
    assert_same_parameters(run["state"], ref)


@pytest.mark.parametrize("engine", [
    "ddp",
    pytest.param("fsdp", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate enables FSDP only "
                                                  "on accelerators (on CPU it falls back to DDP): needs 2 GPUs")),
])
def test_hf_trainer_under_torchrun_equals_single_process(tmp_path, one_thread, engine):
    """GradSelTrainer under torchrun, plain (multi-process DDP: one backward, gradients averaged by gradsel) or with
    TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2}) (two-pass): trains as a single process on the
    same micro-batches and kept samples would."""
    torchrun(os.path.join(HERE, "torchrun", "hf_worker.py"), engine, str(tmp_path))
    run = torch.load(tmp_path / "hf.pt", map_location="cpu")
    assert run["mode"] == ("two_pass" if engine == "fsdp" else "one_backward")
    seen = run["seen"]  # seen[rank][step]
    assert [len(s) for s in seen] == [STEPS] * WORLD
    micro = [[{k: torch.tensor(v) for k, v in seen[r][step]["batch"].items()} for r in range(WORLD)]
             for step in range(STEPS)]
    for step in range(STEPS):  # accelerate gave rank r the r-th slice of each global batch
        gb = global_batch(step)
        for r in range(WORLD):
            assert torch.equal(micro[step][r]["input_ids"], local_batch(gb, r, WORLD)["input_ids"])
    ref = reference_run(micro, [[seen[r][step]["kept"] for r in range(WORLD)] for step in range(STEPS)])
    assert_same_parameters(run["state"], ref)
    logs = [h for h in run["logs"] if "gradsel/kept_fraction" in h]
    assert len(logs) == STEPS and all(h["gradsel/kept_fraction"] == RATIO for h in logs)


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
