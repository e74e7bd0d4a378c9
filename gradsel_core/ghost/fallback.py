"""The exact torch.func fallback for a module without a rule: ``vmap`` over samples of the ``vjp`` of that
module alone, at its captured inputs and output gradients.

Which inputs are batched is not read from a shape. The output gradients' rows are proven by the loss-weight
probe (``gradsel_core.ghost.layout``), but a module's *inputs* can still hold a tensor whose dim 0 has the
batch's size without being the batch: a (T, d) rotary table or a (T, T) mask when T == B, a time-major
(T, B, d) activation. Sliced per sample, such a tensor gives every sample a wrong gradient with no error.

The proof is the sum identity: the per-sample gradients of a module whose inputs are sliced correctly add up
to the module's batch gradient, Σ_b g_b = ∂⟨f(θ; x), G⟩/∂θ (one more vjp of the module over the whole batch).
A mis-sliced input breaks it (it mixes one sample's cotangent with another's inputs). The check runs once per
input signature (shapes, dtypes and B) of each module, on the first batch that has it; a layout that fails it
is tried once more with only the inputs that carry gradient batched (a rotary table, a mask or position ids
computed without gradient are then shared), and a module that fails both is refused (``auto`` moves on to an
exact backend). A batch of one sample proves nothing and needs nothing (slicing dim 0 of size 1 is the
identity).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModule
from .failures import ways_out

if TYPE_CHECKING:
    from .capture import GhostCapture, Record

InDims = Tuple[Optional[int], ...]

# relative tolerance of the sum identity per parameter dtype: rounding of a sum over B samples against one
# batched reduction (a mis-sliced input is off by O(1), not by rounding). fp64 gets fp32's room: a module may
# compute in fp32 whatever its parameters' dtype (HF RMSNorms upcast to fp32 and back).
SUM_TOL = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def fallback_grads(rec: Record, cap: GhostCapture) -> Dict[str, torch.Tensor]:
    """Per-sample gradients (B, *shape) of a rule-less module's own selected parameters: vmap over
    samples of the vjp of that module alone, at its captured inputs and output gradients, with the inputs'
    batch dims proven by the sum identity (module docstring)."""
    plan, call, B = rec.plan, rec.call, cap.B
    module = plan.module
    if not rec.leaves or not rec.grads:
        return {}
    params = {local: module.get_parameter(local).detach() for local in plan.names}
    flat, spec = tree_flatten((call.args, call.kwargs))
    leaves = rec.leaves
    cot = [rec.grads.get(i) for i in leaves]  # None: that output got no gradient
    ref = next(g for g in cot if g is not None)
    if any(g is not None and (g.dim() == 0 or g.shape[0] != B) for g in cot):
        raise UnsupportedModule(ways_out(f"module {plan.name} (no norm rule) has outputs not batched on dim 0"))

    def call_module(p: Dict[str, torch.Tensor], args_flat: List[Any]) -> Tuple[torch.Tensor, ...]:
        args, kwargs = tree_unflatten(args_flat, spec)
        out_leaves, _ = tree_flatten(functional_call(module, p, args, kwargs))
        return tuple(out_leaves[i] for i in leaves)

    def per_sample_grads(in_dims: InDims) -> Dict[str, torch.Tensor]:
        def per_sample(flat_b, cot_b):
            outs, fn = vjp(lambda p: call_module(
                p, [v.unsqueeze(0) if d == 0 else v for v, d in zip(flat_b, in_dims)]), params)
            cts = tuple(torch.zeros_like(o) if c is None else c.unsqueeze(0).to(o.dtype) for o, c in zip(outs, cot_b))
            return fn(cts)[0]

        cot_dims = tuple(None if g is None else 0 for g in cot)
        cot_vals = tuple(torch.zeros((), device=ref.device) if g is None else g for g in cot)
        return vmap(per_sample, in_dims=(in_dims, cot_dims), randomness="error")(tuple(flat), cot_vals)

    def batch_grads() -> Dict[str, torch.Tensor]:
        res = vjp(lambda p: call_module(p, list(flat)), params)  # (outputs, vjp_fn)
        outs, fn = res[0], res[1]
        return fn(tuple(torch.zeros_like(o) if c is None else c.to(o.dtype) for o, c in zip(outs, cot)))[0]

    tensors = [isinstance(v, torch.Tensor) and v.dim() > 0 for v in flat]
    key = (B, tuple((tuple(v.shape), v.dtype) if t else None for v, t in zip(flat, tensors)))
    default: InDims = tuple(0 if t and v.shape[0] == B else None for v, t in zip(flat, tensors))
    grad_in = rec.grad_in if len(rec.grad_in) == len(flat) else (True,) * len(flat)
    with_grad: InDims = tuple(0 if d == 0 and g else None for d, g in zip(default, grad_in))
    was = cap.active
    cap.active = False
    try:
        with torch.enable_grad():
            known = plan.in_dims.get(key)
            if known is not None:
                return per_sample_grads(known)
            if B == 1:  # dim 0 of size 1: sliced or shared, the same tensor
                return per_sample_grads(default)
            return _proven(plan.in_dims, key, [default] + ([with_grad] if with_grad != default else []),
                           per_sample_grads, batch_grads, plan.name)
    except UnsupportedModule:
        raise
    except Exception as e:  # noqa: BLE001 - vmap failures are reported with the ways out
        raise UnsupportedModule(ways_out(
            f"module {plan.name} of type {type(module).__name__} has no norm rule and its torch.func "
            f"fallback failed ({type(e).__name__}: {e})")) from e
    finally:
        cap.active = was


def _proven(cache: Dict[Any, InDims], key: Any, candidates: List[InDims],
            per_sample_grads: Callable[[InDims], Dict[str, torch.Tensor]],
            batch_grads: Callable[[], Dict[str, torch.Tensor]], name: str) -> Dict[str, torch.Tensor]:
    """The per-sample gradients of the first candidate layout whose gradients add up to the batch gradient
    (the layout is then remembered for ``key``); :class:`UnsupportedModule` when none does."""
    full = batch_grads()
    tried = []
    for in_dims in candidates:
        try:
            got = per_sample_grads(in_dims)
        except Exception as e:  # noqa: BLE001 - a layout that cannot even run is not the layout
            if len(candidates) == 1 or in_dims is candidates[-1]:
                raise
            tried.append(f"{in_dims}: {type(e).__name__}")
            continue
        verdicts = {n: sums_to(g, full[n]) for n, g in got.items()}
        bad = [n for n, ok in verdicts.items() if ok is False]
        if not bad:
            if all(verdicts.values()):  # proven (a non-finite batch proves nothing: checked again next time)
                cache[key] = in_dims
            return got
        tried.append(f"{in_dims}: {bad[:2]} do not add up")
    raise UnsupportedModule(ways_out(
        f"module {name} (no norm rule): no layout of its inputs was proven (the per-sample gradients of its "
        f"parameters must add up to the batch gradient; batch dims tried per input: {'; '.join(tried)}). An input "
        "whose dim 0 has the batch's size without being the batch (a (T, d) table or a time-major activation "
        "with T == B) cannot be sliced per sample"))


def sums_to(per_sample: torch.Tensor, full: torch.Tensor) -> Optional[bool]:
    """Σ_b per_sample[b] == full, within rounding of the dtype (relative to the larger of the two sides'
    norms); None when either side is not finite (a NaN/inf loss is no evidence either way)."""
    s, f = per_sample.double().sum(0), full.double()
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(f).all())):
        return None
    tol = SUM_TOL.get(full.dtype, 3e-2)
    scale = max(float(torch.linalg.vector_norm(f)), float(torch.linalg.vector_norm(per_sample.double())))
    return float(torch.linalg.vector_norm(s - f)) <= tol * scale
