"""``nn.MultiheadAttention``: recomputed from its inputs, checked against its output."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModule
from ..factors import Dense, Factor, Outer, RowSum, Stacked
from .base import ModuleCall, register_norm_rule




def _mha_masks(m: nn.MultiheadAttention, call: ModuleCall, B: int, L: int, S: int, dtype) -> Optional[torch.Tensor]:
    """The additive (B, H, L, S) mask F.multi_head_attention_forward applies (attn_mask + key_padding_mask)."""
    H = m.num_heads
    mask = None
    am = call.kwargs.get("attn_mask", call.args[5] if len(call.args) > 5 else None)
    kpm = call.kwargs.get("key_padding_mask", call.args[3] if len(call.args) > 3 else None)
    if call.kwargs.get("is_causal", False) and am is None:
        raise UnsupportedModule(f"{call.name}: is_causal without attn_mask")
    if am is not None:
        am = torch.zeros_like(am, dtype=dtype).masked_fill(am, float("-inf")) if am.dtype == torch.bool else am.to(dtype)
        mask = am.reshape(1, 1, L, S) if am.dim() == 2 else am.reshape(B, H, L, S)
    if kpm is not None:
        kpm = torch.zeros_like(kpm, dtype=dtype).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm.to(dtype)
        kpm = kpm.reshape(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


@register_norm_rule(nn.MultiheadAttention, keeps_output=True,
                    claims=("out_proj.weight", "out_proj.bias"))  # MultiheadAttention uses out_proj functionally
def mha_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """nn.MultiheadAttention, recomputed from its inputs with the projections' outputs as leaves:
    out = softmax((X_q W_qᵀ)(X_k W_kᵀ)ᵀ/√d_h + mask)(X_v W_vᵀ) W_oᵀ, per head. One extra attention
    forward+backward of this module (activations only) gives G_q, G_k, G_v, G_o; then the Linear factors:
    in_proj_weight = [G_qᵀX_q; G_kᵀX_k; G_vᵀX_v] (Stacked), out_proj = G_outᵀ O. ``bias_k``/``bias_v`` are
    per-sample dense (1, 1, E). The recomputation is checked against the module's actual output and the rule
    refuses (the module falls back) when they differ: a mask or option it does not model."""
    m: nn.MultiheadAttention = call.module
    B = call.batch_size
    if m.training and m.dropout > 0:
        raise UnsupportedModule(f"{call.name}: attention dropout in train mode is random; the rule cannot recompute it")
    if m.add_zero_attn:
        raise UnsupportedModule(f"{call.name}: add_zero_attn is not modelled")
    q_in, k_in, v_in = (call.kwargs.get(k, call.args[i] if i < len(call.args) else None)
                        for i, k in enumerate(("query", "key", "value")))
    if any(not isinstance(t, torch.Tensor) or t.dim() != 3 for t in (q_in, k_in, v_in)):
        raise UnsupportedModule(f"{call.name}: unbatched or missing query/key/value")
    if not m.batch_first:
        q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))  # (B, T, E)
    if q_in.shape[0] != B or k_in.shape[0] != B:
        raise UnsupportedModule(f"{call.name}: query of shape {tuple(q_in.shape)} for a batch of {B}")
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    acc = torch.float64 if q_in.dtype == torch.float64 else q_in.dtype
    if m._qkv_same_embed_dim:
        Wq, Wk, Wv = m.in_proj_weight.detach().chunk(3)
    else:
        Wq, Wk, Wv = (w.detach() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    bq, bk, bv = m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None else (None, None, None)
    Wo = m.out_proj.weight.detach()
    bo = m.out_proj.bias.detach() if m.out_proj.bias is not None else None
    G = call.grad_output
    G = (G if m.batch_first else G.transpose(0, 1)).to(acc)  # (B, L, E)
    with torch.enable_grad():
        q = F.linear(q_in, Wq, bq).detach().requires_grad_()  # (B, L, E)
        k = F.linear(k_in, Wk, bk).detach().requires_grad_()  # (B, S, E)
        v = F.linear(v_in, Wv, bv).detach().requires_grad_()  # (B, S, E)
        leaves = [q, k, v]
        kk, vv = k, v
        extra = {}
        if m.bias_k is not None:
            extra["bias_k"] = m.bias_k.detach().expand(B, 1, E).clone().requires_grad_()
            extra["bias_v"] = m.bias_v.detach().expand(B, 1, E).clone().requires_grad_()
            kk, vv = torch.cat([k, extra["bias_k"]], 1), torch.cat([v, extra["bias_v"]], 1)
            leaves += [extra["bias_k"], extra["bias_v"]]
        L, S = q.shape[1], kk.shape[1]
        mask = _mha_masks(m, call, B, L, S - (1 if m.bias_k is not None else 0), q.dtype)
        if mask is not None and m.bias_k is not None:
            mask = F.pad(mask, (0, 1))
        heads = lambda t: t.reshape(B, t.shape[1], H, hd).transpose(1, 2)  # noqa: E731 (B, H, T, hd)
        att = torch.softmax(heads(q) @ heads(kk).transpose(-1, -2) / math.sqrt(hd)
                            + (mask if mask is not None else 0.0), dim=-1)  # (B, H, L, S)
        o = (att @ heads(vv)).transpose(1, 2).reshape(B, L, E)  # (B, L, E)
        o_leaf = o.detach().requires_grad_()
        out = F.linear(o_leaf, Wo, bo)  # (B, L, E)
        if call.output is not None:
            ref = call.output if m.batch_first else call.output.transpose(0, 1)
            tol = 1e-10 if acc == torch.float64 else (1e-4 if acc == torch.float32 else 2e-2)
            if not torch.allclose(out.detach(), ref.to(out.dtype), rtol=tol, atol=tol * float(ref.abs().max() + 1)):
                raise UnsupportedModule(f"{call.name}: the recomputed attention differs from the module's output "
                                        "(an option the rule does not model)")
        go = torch.autograd.grad(out, o_leaf, G)[0]  # (B, L, E)
        grads = torch.autograd.grad(o, leaves, go, allow_unused=True)
    gq, gk, gv = grads[:3]
    res: Dict[str, Factor] = {}
    for local in names:
        if local == "in_proj_weight":
            res[local] = Stacked((Outer(q_in, gq), Outer(k_in, gk), Outer(v_in, gv)), dim=0)
        elif local == "in_proj_bias":
            res[local] = Stacked((RowSum(gq), RowSum(gk), RowSum(gv)), dim=0)
        elif local in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            x, g = {"q": (q_in, gq), "k": (k_in, gk), "v": (v_in, gv)}[local[0]]
            res[local] = Outer(x, g)
        elif local == "out_proj.weight":
            res[local] = Outer(o.detach(), G)
        elif local == "out_proj.bias":
            res[local] = RowSum(G)
        elif local in ("bias_k", "bias_v"):
            g = grads[3 if local == "bias_k" else 4]
            res[local] = Dense(g.reshape(B, 1, 1, E))
        else:
            raise UnsupportedModule(f"no rule for parameter {local} of {call.name}")
    return res

