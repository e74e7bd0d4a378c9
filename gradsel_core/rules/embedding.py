"""Embeddings: ``nn.Embedding`` (padding_idx) and HF scaled embeddings (Gemma, BART, BioGPT, ...)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModule
from ..factors import EmbRows, Factor
from .base import ModuleCall, only, register_norm_rule


def _embedding_output(call: ModuleCall) -> torch.Tensor:
    m = call.module
    return F.embedding(call.input(), m.weight, m.padding_idx)


@register_norm_rule(nn.Embedding, check=_embedding_output)
def embedding_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """Rows gathered by ids: Σ_v ||Σ_{t: x_t = v} g_t||², padding_idx rows get no gradient."""
    only(names, ("weight",), call)
    m: nn.Embedding = call.module
    if m.scale_grad_by_freq or m.max_norm is not None:
        raise UnsupportedModule(
            f"{call.name}: nn.Embedding with scale_grad_by_freq/max_norm couples samples; pass backend='vmap'"
        )
    B = call.batch_size
    ids = call.input()
    G = call.grad_output
    if ids.shape[0] != B:
        raise UnsupportedModule(f"{call.name}: ids of shape {tuple(ids.shape)} for a batch of {B}")
    ids = ids.reshape(B, -1)  # (B, T)
    G = G.reshape(B, ids.shape[1], -1)  # (B, T, d)
    return {"weight": EmbRows(ids, G, m.num_embeddings, m.padding_idx)}


# HF embeddings whose forward is ``super().forward(ids) * self.embed_scale``: the Embedding rule with g·scale
_SCALED_EMBEDDINGS = tuple(
    f"transformers.models.{mod}.modeling_{mod}.{cls}" for mod, cls in (
        ("gemma", "GemmaTextScaledWordEmbedding"), ("gemma3", "Gemma3TextScaledWordEmbedding"),
        ("gemma3n", "Gemma3nTextScaledWordEmbedding"), ("gemma4", "Gemma4TextScaledWordEmbedding"),
        ("vaultgemma", "VaultGemmaTextScaledWordEmbedding"), ("t5gemma2", "T5Gemma2TextScaledWordEmbedding"),
        ("bart", "BartScaledWordEmbedding"), ("mbart", "MBartScaledWordEmbedding"),
        ("biogpt", "BioGptScaledWordEmbedding"), ("pegasus_x", "PegasusXScaledWordEmbedding"),
        ("bigbird_pegasus", "BigBirdPegasusScaledWordEmbedding"),
    ))


def _scaled_embedding_output(call: ModuleCall) -> torch.Tensor:
    m = call.module
    scale = getattr(m, "embed_scale", None)
    if scale is None:
        raise UnsupportedModule(f"{call.name}: a scaled embedding without embed_scale")
    s = scale.to(m.weight.dtype) if isinstance(scale, torch.Tensor) else scale
    return F.embedding(call.input(), m.weight, m.padding_idx) * s


@register_norm_rule(*_SCALED_EMBEDDINGS, check=_scaled_embedding_output)
def scaled_embedding_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = E[x] · s with s = ``embed_scale`` (Gemma: √d): the Embedding rule with output gradient s·g."""
    m = call.module
    scale = getattr(m, "embed_scale", None)
    if scale is None:
        raise UnsupportedModule(f"{call.name}: a scaled embedding without embed_scale")
    s = scale.to(call.grad_output.dtype) if isinstance(scale, torch.Tensor) else float(scale)
    scaled = ModuleCall(m, call.name, call.args, call.kwargs, call.grad_output * s, call.batch_size)
    return embedding_rule(scaled, names)
