"""The ghost engine: exact per-sample gradient norms from one forward and one activation backward.

How it works (math in ``shared/design/norm-math.md``):

1. Every module that owns a selected parameter gets a forward hook for the scored forward only
   (registered per call, removed after, nothing stored on the module). The hook records the module's
   input and routes its output through an identity autograd node, a *tap*, tied to a scalar anchor.
2. ``torch.autograd.grad(Σ_b L_b, anchor)`` runs the backward. Only activation gradients are computed:
   no weight is an input of that call, so autograd skips every weight-gradient matmul, and it stops below
   the lowest tap. Each tap's backward receives G, the gradient w.r.t. its module's output, whose
   slice b is sample b's own output gradient.
3. On arrival, the module's norm rule (``gradsel_core.rules``) turns (input, G) into factors
   (``gradsel_core.factors``) and their squared norms are reduced at once, so activations and G are
   released as the backward proceeds (peak memory ≈ a plain backward). A parameter used by several calls
   (tied embeddings, a module called twice) keeps its factors until all uses have arrived, then adds the
   cross terms: ||Σ_u g_u||² = Σ_u ||g_u||² + 2 Σ_{u<v} ⟨g_u, g_v⟩.
4. Parameters without a rule are computed exactly by a torch.func fallback restricted to the module
   that owns them: ``vmap`` over samples of ``vjp`` of that module alone, fed with its captured inputs and
   output gradients.

Learned position embeddings fed ``position_ids`` of shape [1, T] are broadcast over the batch; their
hook expands the lookup to [B, T] so each sample gets its own gradient.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batching import PreparedBatch, per_sample_losses
from .engine import RawScores, acc_dtype
from .factors import Dense, Factor
from .rules import ModuleCall, RuleFn, UnsupportedModule, find_rule

if TYPE_CHECKING:
    from .engine import GradNormEngine

log = logging.getLogger(__name__)

_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _ways_out(what: str) -> str:
    return (
        f"{what}; pass backend='vmap' (exact, slower), or register a norm rule with "
        "@gradsel_core.register_norm_rule(ModuleType)"
    )


# -- which module scores which parameter ----------------------------------------------------------------


@dataclass
class ModulePlan:
    module: nn.Module
    name: str
    rule: Optional[RuleFn]  # None: torch.func fallback
    names: Dict[str, str] = field(default_factory=dict)  # local parameter name -> global name


@dataclass
class GhostPlan:
    modules: Dict[int, ModulePlan]  # id(module) -> plan
    root_fallback: List[str]  # selected parameters owned by the root module itself and without a rule

    @property
    def complete(self) -> bool:
        """Every selected parameter is scored by a rule or by a fallback smaller than the whole model."""
        return not self.root_fallback

    @property
    def fallback(self) -> Dict[str, List[str]]:
        return {p.name: sorted(p.names.values()) for p in self.modules.values() if p.rule is None}


def plan_claims(model: nn.Module, params: Dict[str, nn.Parameter]) -> GhostPlan:
    """Assign each selected parameter to the module(s) whose calls score it."""
    wanted = {id(p): n for n, p in params.items()}
    named = dict(model.named_modules())  # each module object once
    parent: Dict[int, Tuple[nn.Module, str, str]] = {}
    for mname, mod in named.items():
        for cname, child in mod.named_children():
            parent.setdefault(id(child), (mod, mname, cname))
    plans: Dict[int, ModulePlan] = {}
    root_fallback = []
    for mname, mod in named.items():
        for local, p in mod.named_parameters(recurse=False):
            if id(p) not in wanted:
                continue
            owner, owner_name, owner_local = mod, mname, local
            if isinstance(mod, _CONTAINERS) and id(mod) in parent:  # e.g. PEFT lora_embedding_A.<adapter>
                up, up_name, cname = parent[id(mod)]
                owner, owner_name, owner_local = up, up_name, f"{cname}.{local}"
            rule = find_rule(owner)
            plan = plans.setdefault(id(owner), ModulePlan(owner, owner_name, rule))
            plan.names[owner_local] = wanted[id(p)]
            if rule is None and owner is model:
                root_fallback.append(wanted[id(p)])
    return GhostPlan(plans, root_fallback)


# -- the tap: an identity node whose backward hands G to the capture ---------------------------------------


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, sink, key):  # noqa: D401
        ctx.sink, ctx.key = sink, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.sink(ctx.key, g)
        return g, None, None, None


@dataclass
class _Record:
    plan: ModulePlan
    call: ModuleCall
    leaves: List[int] = field(default_factory=list)  # output leaves tapped (fallback calls)
    grads: Dict[int, torch.Tensor] = field(default_factory=dict)


class GhostCapture:
    """Hooks for one scored forward, and the backward that reduces the norms.

    ``keep_factors=True`` keeps every factor (in-step selection needs them to build the masked gradient
    after the norms); otherwise single-use factors are reduced and dropped as G arrives.
    """

    def __init__(self, model: nn.Module, plan: GhostPlan, batch_size: int, use_triton: bool = False,
                 keep_factors: bool = False):
        self.model, self.plan, self.B = model, plan, batch_size
        self.use_triton, self.keep_factors = use_triton, keep_factors
        self.records: List[_Record] = []
        self.handles = []
        self.active = False
        self.anchor: Optional[torch.Tensor] = None
        self.uses: Dict[str, int] = {}
        self.sq: Dict[str, torch.Tensor] = {}
        self.factors: Dict[str, List[Factor]] = {}
        self.error: Optional[BaseException] = None

    # forward ----------------------------------------------------------------------------------------
    def __enter__(self) -> "GhostCapture":
        for plan in self.plan.modules.values():
            self.handles.append(plan.module.register_forward_hook(self._hook(plan), with_kwargs=True))
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _anchor_for(self, t: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            self.anchor = torch.zeros((), device=t.device, requires_grad=True)
        return self.anchor

    def _hook(self, plan: ModulePlan):
        def hook(mod, args, kwargs, output):
            if not self.active:
                return None
            B = self.B
            x = args[0] if args else None
            if (
                plan.rule is not None
                and B > 1
                and isinstance(output, torch.Tensor)
                and output.dim() > 0
                and output.shape[0] == 1
                and isinstance(x, torch.Tensor)
                and x.dim() > 0
                and x.shape[0] == 1
            ):
                # a [1, T] input broadcast over the batch (HF position_ids): score it per sample
                args = (x.expand(B, *x.shape[1:]),) + tuple(args[1:])
                output = output.expand(B, *output.shape[1:])
            det = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            call = ModuleCall(mod, plan.name, tuple(det(a) for a in args),
                              {k: det(v) for k, v in kwargs.items()} if plan.rule is None else {}, batch_size=B)
            key = len(self.records)
            rec = _Record(plan, call)
            self.records.append(rec)
            if plan.rule is not None:
                if not isinstance(output, torch.Tensor):
                    raise UnsupportedModule(_ways_out(f"module {plan.name} returned {type(output).__name__}, not a tensor"))
                if not output.requires_grad:
                    return output
                return _Tap.apply(output, self._anchor_for(output), self._sink, (key, 0))
            leaves, spec = tree_flatten(output)
            new = []
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.is_floating_point():
                    rec.leaves.append(i)
                    leaf = _Tap.apply(leaf, self._anchor_for(leaf), self._sink, (key, i))
                new.append(leaf)
            return tree_unflatten(new, spec)

        return hook

    # backward ---------------------------------------------------------------------------------------
    def _sink(self, key: Tuple[int, int], g: torch.Tensor) -> None:
        if self.error is not None:
            return
        rec = self.records[key[0]]
        try:
            if rec.plan.rule is None:
                rec.grads[key[1]] = g
                return
            rec.call.grad_output = g
            factors = rec.plan.rule(rec.call, list(rec.plan.names))
            missing = set(rec.plan.names) - set(factors)
            if missing:
                raise UnsupportedModule(_ways_out(f"the rule for {rec.plan.name} returned nothing for {sorted(missing)}"))
            for local, f in factors.items():
                self._add(rec.plan.names[local], f)
            rec.call.args, rec.call.grad_output = (), None  # release the activations now
        except BaseException as e:  # errors raised inside autograd lose their type: re-raise after
            self.error = e

    def _add(self, name: str, f: Factor) -> None:
        if self.keep_factors or self.uses.get(name, 0) > 1:
            self.factors.setdefault(name, []).append(f)  # reduced once all uses have arrived
            return
        sq = f.sq_norm(self.use_triton)
        self.sq[name] = sq if name not in self.sq else self.sq[name] + sq

    def backward(self, total: torch.Tensor, params: Dict[str, nn.Parameter]) -> None:
        """Run the activation backward of ``total`` = Σ_b L_b and reduce every norm."""
        self.uses = {}
        for rec in self.records:
            for g in rec.plan.names.values():
                self.uses[g] = self.uses.get(g, 0) + 1
        uncalled = [n for n in params if n not in self.uses]
        inputs = ([self.anchor] if self.anchor is not None else []) + [params[n] for n in uncalled]
        if total.requires_grad and inputs:
            grads = torch.autograd.grad(total, inputs, allow_unused=True)
            if self.error is not None:
                raise self.error
            for n, g in zip(uncalled, grads[len(inputs) - len(uncalled):]):
                if g is not None and bool(g.ne(0).any()):
                    raise UnsupportedModule(_ways_out(
                        f"parameter {n} reaches the loss without a call of the module that owns it "
                        "(it is used functionally elsewhere)"))
        for rec in self.records:
            if rec.plan.rule is None:
                for local, g in _fallback_grads(rec, self).items():
                    self._add(rec.plan.names[local], Dense(g))
        for name, fs in self.factors.items():
            self.sq[name] = shared_sq_norm(fs, self.use_triton)

    def per_param_sq(self, params: Dict[str, nn.Parameter], device: torch.device) -> Dict[str, torch.Tensor]:
        acc = acc_dtype(params)
        zero = torch.zeros(self.B, dtype=acc, device=device)
        return {n: self.sq[n].to(acc) if n in self.sq else zero for n in params}


def shared_sq_norm(fs: List[Factor], use_triton: bool = False) -> torch.Tensor:
    """||Σ_u g_u||² per sample for the uses u of one parameter, cross terms included."""
    total = None
    for i, fu in enumerate(fs):
        term = fu.sq_norm(use_triton)
        for fv in fs[i + 1:]:
            term = term + 2 * fu.inner(fv)
        total = term if total is None else total + term
    return total


def _fallback_grads(rec: _Record, cap: GhostCapture) -> Dict[str, torch.Tensor]:
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
        raise UnsupportedModule(_ways_out(f"module {plan.name} (no norm rule) has outputs not batched on dim 0"))

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
        raise UnsupportedModule(_ways_out(
            f"module {plan.name} of type {type(module).__name__} has no norm rule and its torch.func "
            f"fallback failed ({type(e).__name__}: {e})")) from e
    finally:
        cap.active = was


# -- the backend -----------------------------------------------------------------------------------------


def engine_plan(engine: "GradNormEngine") -> GhostPlan:
    plan = getattr(engine, "_ghost_plan", None)
    if plan is None:
        plan = engine._ghost_plan = plan_claims(engine.model, engine.params)
    return plan


def capture_forward(engine: "GradNormEngine", batch: PreparedBatch, use_triton: bool, keep_factors: bool):
    """Scored forward under a capture. Returns (capture, per-sample losses (B,), tokens (B,))."""
    cap = GhostCapture(engine.model, engine_plan(engine), batch.batch_size, use_triton, keep_factors)
    with cap:
        out = engine.model(**batch.model_inputs)
    losses, tokens = per_sample_losses(out, batch, engine.loss_fn, engine.loss_reduction)
    return cap, losses, tokens


def score_ghost(engine: "GradNormEngine", batch: PreparedBatch, use_triton: bool = False) -> RawScores:
    cap, losses, tokens = capture_forward(engine, batch, use_triton, keep_factors=False)
    cap.backward(losses.sum(), engine.params)
    device = batch.full["input_ids"].device
    return RawScores(per_param_sq=cap.per_param_sq(engine.params, device), losses=losses.detach(), tokens=tokens)
