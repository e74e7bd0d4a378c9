"""PEFT LoRA on an embedding. LoRA on a Linear needs no rule of its own: PEFT keeps its factors as
``nn.Linear`` submodules, scored by the Linear rule."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModule
from ..factors import EmbRows, Factor, Outer
from .base import ModuleCall, register_norm_rule


def _lora_embedding_output(call: ModuleCall) -> torch.Tensor:
    """base_layer(x) + Σ_a (A_aᵀ[x] B_aᵀ)·s_a (·embed_scale), PEFT's vanilla LoRA embedding."""
    m, x = call.module, call.input()
    out = m.base_layer(x)
    embed_scale = m._get_embed_scale() if hasattr(m, "_get_embed_scale") else None
    for adapter in m.active_adapters:
        if adapter not in m.lora_embedding_A:
            continue
        y = (F.embedding(x, m.lora_embedding_A[adapter].T) @ m.lora_embedding_B[adapter].T) * m.scaling[adapter]
        out = out + (y * embed_scale.to(y.dtype) if embed_scale is not None else y)
    return out


@register_norm_rule("peft.tuners.lora.layer.Embedding", check=_lora_embedding_output)
def peft_lora_embedding_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """PEFT LoRA on an embedding: out = E[x] + s·(A.T[x]) Bᵀ with A (r, V), B (d, r).

    lora_embedding_B: Outer(A.T[x], s·g)   (d, r);  lora_embedding_A: rows of Aᵀ at x with gradient
    s·g B, stored transposed (r, V). The LoRA-Linear factors need no rule of their own: PEFT keeps them
    as nn.Linear submodules, scored by the Linear rule with their own inputs and output gradients."""
    m = call.module
    B = call.batch_size
    ids = call.input()
    if ids.shape[0] != B:
        raise UnsupportedModule(f"{call.name}: ids of shape {tuple(ids.shape)} for a batch of {B}")
    ids = ids.reshape(B, -1)  # (B, T)
    G = call.grad_output.reshape(B, ids.shape[1], -1)  # (B, T, d)
    out: Dict[str, Factor] = {}
    embed_scale = m._get_embed_scale() if hasattr(m, "_get_embed_scale") else None
    base = m.get_base_layer() if hasattr(m, "get_base_layer") else m.base_layer
    if getattr(base, "max_norm", None) is not None or getattr(base, "scale_grad_by_freq", False):
        raise UnsupportedModule(f"{call.name}: LoRA on an embedding with max_norm/scale_grad_by_freq couples samples")
    pad = getattr(base, "padding_idx", None)  # PEFT looks A up with the base layer's padding_idx: no gradient there
    for local in names:
        kind, _, adapter = local.partition(".")
        if kind not in ("lora_embedding_A", "lora_embedding_B") or adapter not in m.active_adapters:
            raise UnsupportedModule(f"no rule for parameter {local} of {call.name} (inactive or unknown adapter)")
        if adapter in getattr(m, "lora_variant", {}) or m.input_fns.get(adapter) or m.output_fns.get(adapter):
            raise UnsupportedModule(f"{call.name}: LoRA variants (DoRA, TP hooks) are not covered by the rule")
        A = m.lora_embedding_A[adapter]  # (r, V)
        Bw = m.lora_embedding_B[adapter]  # (d, r)
        s = m.scaling[adapter]
        if embed_scale is not None:
            s = embed_scale.to(G.dtype) * s
        sg = G * s  # (B, T, d)
        if kind == "lora_embedding_B":
            after_a = F.embedding(ids, A.detach().t())  # (B, T, r)
            out[local] = Outer(after_a, sg)
        else:
            out[local] = EmbRows(ids, sg @ Bw.detach(), A.shape[1], pad, transposed=True)  # (B, T, r)
    return out
