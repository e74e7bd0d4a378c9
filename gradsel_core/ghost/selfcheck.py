"""Rules check themselves: a rule describes one module's forward, so before it scores a module the module's
output is recomputed by the rule's own formula (``NormRule.check``) from the call's inputs and parameters and
compared with the output the tap saw. The verdict is cached per module and invalidated when the module's class,
its forward or forward-pre hooks, an instance-level ``forward``, the rule, or its parameter shapes change: the
check costs one recomputation per module, not one per batch.

Forward hooks that run after the module (``register_forward_hook``) change what the tap sees: a hook that
returns a new output or writes into it makes the rule's formula describe the wrong function (and a hook such as
``torch.where(m, y, y.detach())`` changes the gradient without changing the value). So for a module with forward
hooks, every call also checks that the output reaching the tap is the very tensor ``forward`` returned, not
modified in place; otherwise the module moves to its exact fallback, which runs the hooks.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.utils.weak import WeakIdKeyDictionary

from ..rules import ModuleCall, NormRule
from ..rules.base import output_matches


# module -> the key (``check_key``) under which its rule reproduced its output. One cache for the process, so an
# engine built per step (``gs.filtered_backward``) does not check again; the key says when a verdict is stale.
VERDICTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def hook_ids(module: nn.Module) -> Tuple[Tuple[int, ...], ...]:
    """The handles of ``module``'s own forward and forward-pre hooks. (Global hooks come and go, e.g. with
    ``FlopCounterMode``: they are not part of the key; their effect on the output is checked on every call.)"""
    return (tuple(module._forward_pre_hooks), tuple(module._forward_hooks))


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether hooks run after ``module.forward`` returns (they may replace or modify its output)."""
    return bool(module._forward_hooks) or bool(_module._global_forward_hooks)


def check_key(module: nn.Module, rule: NormRule) -> Tuple[Any, ...]:
    """What a verdict depends on. Computed before the capture registers its own hooks."""
    inst_forward = module.__dict__.get("forward")
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    return (type(module), id(rule), id(inst_forward) if inst_forward is not None else None, hook_ids(module), shapes)


def self_check(rule: NormRule, call: ModuleCall, output: torch.Tensor) -> Optional[str]:
    """None when ``rule.check`` reproduces ``output``; otherwise why not. (Rules with ``keeps_output`` check
    themselves when they run; a rule without ``check`` is trusted as registered.)"""
    if rule.check is None:
        return None
    x = call.args[0] if call.args else None
    w = getattr(call.module, "weight", None)
    pieces = [slice(None)]
    if rule.rowwise and isinstance(x, torch.Tensor) and x.dim() >= 3 and output.dim() >= 3 \
            and x.shape[0] == output.shape[0] and isinstance(w, torch.Tensor) and w.dim() < x.dim():
        # a row-wise rule on (B, ..., d): recompute a few samples at a time (no output-sized temporary)
        step = max(1, (1 << 22) // max(1, output[0].numel()))
        pieces = [slice(i, i + step) for i in range(0, x.shape[0], step)]
    for sl in pieces:
        sub = call if sl == slice(None) else ModuleCall(call.module, call.name, (x[sl],) + tuple(call.args[1:]),
                                                        call.kwargs, batch_size=call.batch_size)
        try:
            with torch.no_grad():
                expected = rule.check(sub)
        except Exception as e:  # noqa: BLE001 - a formula that cannot even run does not describe the module
            return f"the rule's formula fails on this call ({type(e).__name__}: {str(e)[:120]})"
        if not output_matches(expected, output[sl]):
            return ("the output recomputed by the rule's formula differs from the module's output (its forward, a "
                    "forward hook or an instance-level forward computes something else)")
    return None
