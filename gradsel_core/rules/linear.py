"""Linear-like layers: ``nn.Linear`` (2-D and N-D inputs, bias) and HF ``Conv1D`` (GPT-2, weight stored d×p)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..factors import Factor, Outer, RowSum
from .base import ModuleCall, as_btd, only, register_norm_rule


def _linear_like(call: ModuleCall, names: Sequence[str], transposed: bool) -> Dict[str, Factor]:
    only(names, ("weight", "bias"), call)
    B = call.batch_size
    A = as_btd(call.input(), B, call.name, call.rows)  # (B, T, d)
    G = as_btd(call.grad_output, B, call.name, call.rows)  # (B, T, p)
    out: Dict[str, Factor] = {}
    if "weight" in names:
        out["weight"] = Outer(A, G, transposed=transposed)
    if "bias" in names:
        out["bias"] = RowSum(G)
    return out


def _linear_output(call: ModuleCall) -> torch.Tensor:
    m = call.module
    return F.linear(call.input(), m.weight, m.bias)


def _conv1d_output(call: ModuleCall) -> torch.Tensor:
    m, x = call.module, call.input()
    y = x.reshape(-1, x.shape[-1]) @ m.weight  # (N, p)
    y = y + m.bias if m.bias is not None else y
    return y.reshape(*x.shape[:-1], m.weight.shape[-1])


@register_norm_rule(nn.Linear, rowwise=True, check=_linear_output)
def linear_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = x Wᵀ + b on (B, ..., d) or (B, d) inputs: W -> Outer(A, G), b -> Σ_t g_t."""
    return _linear_like(call, names, transposed=False)


@register_norm_rule("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D", rowwise=True,
                    check=_conv1d_output)
def conv1d_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """HF GPT-2 Conv1D, y = x W + b with W stored (d, p): the Linear rule, transposed."""
    return _linear_like(call, names, transposed=True)
