"""Run under ``torchrun --nproc_per_node N`` (gloo, CPU) by tests/test_fsdp.py; writes results for the test.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun/fsdp_worker.py fsdp|ddp OUT
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # fsdp_common

import gradsel_core as gs  # noqa: E402
from gradsel_core.integrations.fsdp import shard_decoder_layers  # noqa: E402
from fsdp_common import LR, RATIO, STEPS, global_batch, local_batch, tiny_llama  # noqa: E402


def full_state(model):
    # every rank gathers every parameter (collective), in the same order
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def train(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama()
    shard_decoder_layers(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        batch = local_batch(global_batch(step), rank, world)
        res = gs.filtered_backward(model, batch, policy="median_band", ratio=RATIO, loss_filter_std=None)
        assert res.n_kept > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(gather_step(res, world))
    state = full_state(model)
    if rank == 0:
        torch.save({"steps": steps, "state": state, "world": world}, os.path.join(out, "train.pt"))


def gather_step(res, world: int) -> list:
    """Every rank's kept mask, norms and losses of one filtered step."""
    got = [None] * world
    dist.all_gather_object(got, {"kept": res.kept.tolist(), "norms": res.norms.tolist(),
                                 "losses": res.losses.tolist()})
    return got


def ddp(out: str) -> None:
    """The same run with DistributedDataParallel instead of FSDP2: two-pass through DDP's own all-reduce."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(tiny_llama().train())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        batch = local_batch(global_batch(step), rank, world)
        res = gs.filtered_backward(model, batch, policy="median_band", ratio=RATIO, loss_filter_std=None,
                                   mode="two_pass")
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(gather_step(res, world))
    state = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    if rank == 0:
        torch.save({"steps": steps, "state": state, "world": world}, os.path.join(out, "train.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        {"fsdp": train, "ddp": ddp}[sys.argv[1]](sys.argv[2])
        dist.barrier()  # both ranks done (rank 0 saving) before the process group is torn down
    finally:
        dist.destroy_process_group()
