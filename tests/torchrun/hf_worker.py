"""Run under ``torchrun --nproc_per_node 2`` by tests/test_fsdp.py: GradSelTrainer (HF Trainer) trains a tiny Llama
with in-step selection; rank 0 writes the result.

    ... hf_worker.py ddp OUT     # multi-process DDP (CPU: gloo): one backward, gradients averaged by gradsel
    ... hf_worker.py fsdp OUT    # an accelerate FSDP2 config: two-pass. Needs 2 GPUs: accelerate turns FSDP
                                      # on only for accelerators (on CPU it runs plain multi-process DDP)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fsdp_common import LR, RATIO, STEPS, global_batch, tiny_llama  # noqa: E402


class Steps(torch.utils.data.Dataset):
    """The global batches of fsdp_common, one record at a time (the sampler must not shuffle)."""

    def __init__(self):
        self.rows = []
        for step in range(STEPS):
            b = global_batch(step)
            for i in range(b["input_ids"].shape[0]):
                self.rows.append({k: v[i] for k, v in b.items()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main(engine: str, out: str) -> None:
    from transformers import TrainingArguments

    from gradsel_core.integrations.hf import GradSelTrainer

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=not torch.cuda.is_available(),
        save_strategy="no", disable_tqdm=True, seed=0, remove_unused_columns=False, dataloader_drop_last=True,
        ddp_timeout=180,  # a stuck collective raises (with a traceback) inside the test's 300 s
        **({"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                          "reshard_after_forward": True}} if engine == "fsdp" else {}),
    )

    class Recording(GradSelTrainer):
        seen = []

        def _get_train_sampler(self, *a, **k):  # the global batches in order: rank r gets its slice
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.seen.append({"batch": {k: v.tolist() for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                              "kept": self.gradsel_last.kept.tolist()})
            return loss

    trainer = Recording(model=tiny_llama(), args=args, train_dataset=Steps(),
                        selection={"policy": "median_band", "ratio": RATIO, "loss_filter_std": None})
    trainer.train()
    import torch.distributed as dist

    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, trainer.seen)
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
             for n, p in trainer.model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save({"seen": seen, "state": state, "mode": trainer.gradsel_mode,
                    "logs": trainer.state.log_history}, os.path.join(out, "hf.pt"))
    # Tear gloo down while the interpreter is alive: a process group left to interpreter exit can abort the
    # rank with SIGABRT ("terminate called without an active exception"; seen once in CI, pytorch#190489).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
