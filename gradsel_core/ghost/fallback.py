"""The exact torch.func fallback for a module without a rule: ``vmap`` over samples of the ``vjp`` of that
module alone, at its captured inputs and output gradients."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModule
from .failures import ways_out

if TYPE_CHECKING:
    from .capture import GhostCapture, Record


def fallback_grads(rec: Record, cap: GhostCapture) -> Dict[str, torch.Tensor]:
    """Per-sample gradients (B, *shape) of a rule-less module's own selected parameters: vmap over
    samples of the vjp of that module alone, at its captured inputs and output gradients."""
    plan, call, B = rec.plan, rec.call, cap.B
    module = plan.module
    if not rec.leaves or not rec.grads:
        return {}
    params = {local: module.get_parameter(local).detach() for local in plan.names}
    flat, spec = tree_flatten((call.args, call.kwargs))
    in_dims = tuple(0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else None for v in flat)
    leaves = rec.leaves
    cot = [rec.grads.get(i) for i in leaves]  # None: that output got no gradient
    ref = next(g for g in cot if g is not None)
    if any(g is not None and (g.dim() == 0 or g.shape[0] != B) for g in cot):
        raise UnsupportedModule(ways_out(f"module {plan.name} (no norm rule) has outputs not batched on dim 0"))

    def per_sample(flat_b, cot_b):
        def f(p):
            args, kwargs = tree_unflatten(
                [v.unsqueeze(0) if d == 0 else v for v, d in zip(flat_b, in_dims)], spec)
            out_leaves, _ = tree_flatten(functional_call(module, p, args, kwargs))
            return tuple(out_leaves[i] for i in leaves)

        outs, fn = vjp(f, params)
        cts = tuple(torch.zeros_like(o) if c is None else c.unsqueeze(0).to(o.dtype) for o, c in zip(outs, cot_b))
        return fn(cts)[0]

    cot_dims = tuple(None if g is None else 0 for g in cot)
    cot_vals = tuple(torch.zeros((), device=ref.device) if g is None else g for g in cot)
    was = cap.active
    cap.active = False
    try:
        with torch.enable_grad():
            return vmap(per_sample, in_dims=(in_dims, cot_dims), randomness="error")(tuple(flat), cot_vals)
    except UnsupportedModule:
        raise
    except Exception as e:  # noqa: BLE001 - vmap failures are reported with the ways out
        raise UnsupportedModule(ways_out(
            f"module {plan.name} of type {type(module).__name__} has no norm rule and its torch.func "
            f"fallback failed ({type(e).__name__}: {e})")) from e
    finally:
        cap.active = was
