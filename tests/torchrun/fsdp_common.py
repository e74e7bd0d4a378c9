"""Model and data shared by tests/test_fsdp.py and the torchrun workers (identical on every process)."""
from __future__ import annotations

import torch

VOCAB = 61
STEPS = 3
RATIO = 0.5
LR = 0.5
GLOBAL_B = 8


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def global_batch(step: int, B: int = GLOBAL_B, T: int = 12):
    """Step ``step``'s global batch: random ids, right padding of varying length."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def local_batch(batch, rank: int, world: int):
    """Rank ``rank``'s contiguous slice of the global batch."""
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
