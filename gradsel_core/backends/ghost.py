"""The ghost backend: exact per-sample gradient norms from one forward and one activation backward.

How it works (math in ``docs/norm-math.md``):

1. Every module that owns a selected parameter and has a norm rule (or a module-level fallback) gets a
   forward hook for the scored forward only (registered per call, removed after, nothing stored on the
   module). The hook records the module's input and routes its output through an identity autograd node,
   a *tap*, tied to a scalar anchor.
2. ``torch.autograd.grad(Σ_b L_b, anchor)`` runs the backward. Only activation gradients are computed: no
   weight is an input of that call, so autograd skips every weight-gradient matmul. Each tap's backward
   receives G, the gradient w.r.t. its module's output, whose slice b is sample b's own output gradient.
3. On arrival, the module's rule (``gradsel_core.rules``) turns (input, G) into factors
   (``gradsel_core.factors``), reduced at once, so activations and G are released as the backward proceeds.
   A parameter with several uses (tied embeddings, a module called twice, a functional use) keeps its
   factors until all uses have arrived, then adds the cross terms ||Σ_u g_u||² = Σ_u ||g_u||² + 2 Σ ⟨g_u, g_v⟩.
4. Modules without a rule are first scored through their op uses (below); a parameter used by an op
   without a rule is computed exactly by a torch.func fallback restricted to its module: ``vmap`` over
   samples of ``vjp`` of the module alone, at its captured inputs and output gradients.
5. Every other use of a selected parameter is accounted for (``gradsel_core.backends.uses``): detected
   through stand-ins at no cost, then scored as an op use (``F.linear``, ``x @ W.T``, ``y + b``,
   ``F.embedding``, slices ``P[e]`` and ``grouped_mm`` of fused expert weights) or by moving the parameter
   to a module fallback that encloses all its uses. What cannot be scored exactly is refused with
   :class:`UnsupportedModule`, naming the parameter and the place.
6. Activations whose dim 0 is not the batch (OPT's (B·T, d) rows, tokens routed to experts) are read
   through a proven row -> sample map (``gradsel_core.rows``), carried by row-wise rules and, for models
   that need it, through ops by the same mode; rows without one are never read as samples.

A rule applies only to its registered class, or to a subclass that does not override ``forward``
(``rules.find_rule``). Subclasses of Linear / Embedding that override ``forward`` (Gemma's scaled embedding,
OPT's offset positions, a Linear that scales its output) are scored through their op uses.

:class:`GhostBackend` holds what one engine learned about its model (moved modules, op-tracked parameters,
taps that must copy because the model writes into module outputs in place); the first batch may take a few
extra passes to learn it, each with one warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from ..batching import PreparedBatch, per_sample_losses
from ..factors import Dense, EmbRows, Factor, Grouped, Outer, RowSum, Sliced
from ..rows import Rows, flatten_rows
from ..rules import LayoutError, ModuleCall, RuleFn, UnsupportedModule, as_btd, find_rule, rule_status
from ..types import CoverageEntry, RawScores, ScoringSpec, acc_dtype
from .uses import OpUse, Place, Slot, UseTracker, can_stand_in, make_stand_in, parameter_slots

log = logging.getLogger(__name__)

_CONTAINERS = (nn.ParameterDict, nn.ParameterList)
# at most this many extra passes on one batch while learning how to score a model
MAX_PASSES = 8


def _ways_out(what: str) -> str:
    return (
        f"{what}; pass backend='auto' (moves to an exact path), backend='vmap' (exact, slower), or register a "
        "norm rule with @gradsel_core.register_norm_rule(ModuleType)"
    )


class Retry(Exception):
    """Internal: the capture learned something about the model; run the batch again."""


# -- which module scores which parameter ----------------------------------------------------------------


@dataclass
class ModulePlan:
    module: nn.Module
    name: str
    rule: Optional[RuleFn]  # None: torch.func fallback
    names: Dict[str, str] = field(default_factory=dict)  # local parameter name -> global name
    why: str = ""  # why the module is scored by the fallback (empty: no rule registered)


@dataclass
class GhostPlan:
    modules: Dict[int, ModulePlan]  # id(module) -> plan
    op_tracked: Dict[str, str]  # global name -> why it is scored through its op uses
    root_fallback: List[str]  # selected parameters scored by a fallback over the whole model
    op_owner: Dict[str, str] = field(default_factory=dict)  # op-tracked name -> the module that owns it

    @property
    def complete(self) -> bool:
        """Every selected parameter is scored by a rule, op uses, or a fallback smaller than the model."""
        return not self.root_fallback

    @property
    def fallback(self) -> Dict[str, List[str]]:
        return {p.name: sorted(p.names.values()) for p in self.modules.values() if p.rule is None}


def _owner_of(mod: nn.Module, mname: str, local: str, parent: Dict[int, Tuple[nn.Module, str, str]]):
    if isinstance(mod, _CONTAINERS) and id(mod) in parent:  # e.g. PEFT lora_embedding_A.<adapter>
        up, up_name, cname = parent[id(mod)]
        return up, up_name, f"{cname}.{local}"
    return mod, mname, local


def plan_claims(model: nn.Module, params: Dict[str, nn.Parameter], moved: Optional[Dict[str, Tuple[str, str]]] = None,
                op_ok: bool = True) -> GhostPlan:
    """Assign each selected parameter to the module whose calls score it.

    ``moved``: global name -> (enclosing module name, reason), parameters taken from their owner to a
    module fallback (a rule that failed, or uses that only an enclosing module sees)."""
    moved = moved or {}
    wanted = {id(p): n for n, p in params.items()}
    named = dict(model.named_modules())  # each module object once
    parent: Dict[int, Tuple[nn.Module, str, str]] = {}
    for mname, mod in named.items():
        for cname, child in mod.named_children():
            parent.setdefault(id(child), (mod, mname, cname))
    plans: Dict[int, ModulePlan] = {}
    op_tracked: Dict[str, str] = {}
    op_owner: Dict[str, str] = {}
    root_fallback: List[str] = []
    done: Set[str] = set()

    def add_fallback(owner: nn.Module, owner_name: str, local: str, gname: str, why: str):
        plan = plans.setdefault(id(owner), ModulePlan(owner, owner_name, None, why=why))
        if plan.rule is not None:  # the owner's rule cannot score this one: the whole module falls back
            plan.rule, plan.why = None, why
        plan.names[local] = gname
        if owner is model:
            root_fallback.append(gname)

    # rules that score some of their children's parameters (nn.MultiheadAttention: out_proj)
    for mname, mod in named.items():
        if mname in {e for e, _ in moved.values()}:
            continue
        rule, _ = rule_status(mod)
        for local in getattr(rule, "claims", ()):
            try:
                p = mod.get_parameter(local)
            except AttributeError:
                continue
            gname = wanted.get(id(p))
            if gname is not None and gname not in moved:
                plans.setdefault(id(mod), ModulePlan(mod, mname, rule)).names[local] = gname
                done.add(gname)
    for gname, (enc, why) in moved.items():
        owner = named[enc]
        local = next(n for n, p in owner.named_parameters(remove_duplicate=False) if p is params[gname])
        add_fallback(owner, enc, local, gname, why)
        done.add(gname)
    for mname, mod in named.items():
        for local, p in mod.named_parameters(recurse=False):
            gname = wanted.get(id(p))
            if gname is None or gname in done:
                continue
            owner, owner_name, owner_local = _owner_of(mod, mname, local, parent)
            rule, status = rule_status(owner)
            if rule is None and status == "overridden" and op_ok:
                op_tracked[gname] = f"{type(owner).__name__} overrides the forward of a ruled class"
                continue
            if rule is None and op_ok:
                # no rule: try its op uses first (F.linear on routed rows, a slice of fused expert weights,
                # ...); any other op moves it to the module's fallback after one pass (quietly)
                op_tracked[gname] = NO_RULE
                op_owner[gname] = owner_name
                continue
            if rule is None:
                add_fallback(owner, owner_name, owner_local, gname,
                             "its forward overrides a ruled class" if status == "overridden" else "")
                continue
            plan = plans.setdefault(id(owner), ModulePlan(owner, owner_name, rule))
            plan.names[owner_local] = gname
    # a module that falls back for one parameter scores all of its selected parameters by the fallback
    return GhostPlan(plans, op_tracked, root_fallback, op_owner)


NO_RULE = "no norm rule: scored through its op uses"


def _common_module(names: List[str]) -> str:
    """The innermost module whose name is a prefix of all ``names`` ('' = the root)."""
    parts = [n.split(".") if n else [] for n in names]
    common: List[str] = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


# -- the tap: an identity node whose backward hands G to the capture ---------------------------------------


def _batch_broadcast(x) -> bool:
    """A [1, T] tensor that stands for every sample (HF ``position_ids``, or a (1, T, d) sequence the model
    broadcasts over the batch): scored per sample by expanding it to B. Not a (1, d) float row, which may be
    one routed token (expanding it would change what the model computes)."""
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1 and \
        (not x.is_floating_point() or x.dim() >= 3)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, sink, key, copy):  # noqa: D401
        ctx.sink, ctx.key = sink, key
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.sink(ctx.key, g)
        return g, None, None, None, None


@dataclass
class _Record:
    plan: Optional[ModulePlan]
    call: Optional[ModuleCall]
    use: Optional[OpUse] = None
    leaves: List[int] = field(default_factory=list)  # output leaves tapped (fallback calls)
    first: int = 0  # the output leaf a rule describes
    grads: Dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def names(self) -> Dict[str, str]:
        return self.use.params if self.use is not None else self.plan.names


class RuleFailure(UnsupportedModule):
    """A rule (or an op use) could not score a call: which parameters, and where."""

    def __init__(self, msg: str, params: List[str], module: str, layout: bool = False):
        super().__init__(msg)
        self.params, self.module = params, module
        self.layout = layout  # dim 0 was not the batch and no row map was known


class RuleFailures(UnsupportedModule):
    """Every rule or fallback that failed in one pass (all are moved at once)."""

    def __init__(self, failures: List[RuleFailure]):
        super().__init__("; ".join(str(f) for f in failures[:3]))
        self.failures = failures


class GhostCapture:
    """Hooks for one scored forward, and the backward that reduces the norms.

    ``keep_factors=True`` keeps every factor (in-step selection needs them to build the masked gradient
    after the norms); otherwise single-use factors are reduced and dropped as G arrives.
    """

    def __init__(self, model: nn.Module, plan: GhostPlan, params: Dict[str, nn.Parameter], batch_size: int,
                 use_triton: bool = False, keep_factors: bool = False, copy_taps: bool = False,
                 track: Optional[Set[str]] = None, stand_ins: bool = True,
                 refs: Optional[Dict[str, torch.Tensor]] = None, weights_in_graph: bool = False,
                 follow_rows: bool = False):
        self.model, self.plan, self.params, self.B = model, plan, params, batch_size
        # activation -> Rows (gradsel_core.rows), from module hooks and the tracker; follow_rows keeps the
        # tracker on for the whole forward to carry them through ops (learned after a layout failure)
        self.rows = WeakIdKeyDictionary()
        self.follow_rows = follow_rows
        # weights_in_graph: op uses compute with the real parameter, so a later ordinary backward (two-pass
        # filtering) reaches it; the activation backward still skips it (it is no input of that call)
        self.weights_in_graph = weights_in_graph
        self.closed = False  # set once the activation backward is done: taps are silent in a later backward
        self.refs = refs or {}  # name -> (R, *shape): references the per-sample gradients are dotted with
        self.dots: Dict[str, torch.Tensor] = {}
        self.use_triton, self.keep_factors, self.copy_taps = use_triton, keep_factors, copy_taps
        self.track = set(track or ()) | set(plan.op_tracked)
        self.records: List[_Record] = []
        self.handles = []
        self.active = False
        self.anchor: Optional[torch.Tensor] = None
        self.uses: Dict[str, int] = {}
        self.sq: Dict[str, torch.Tensor] = {}
        self.factors: Dict[str, List[Factor]] = {}
        self.error: Optional[BaseException] = None
        self.failures: List[RuleFailure] = []
        self.use_stand_ins = stand_ins and can_stand_in(params)
        self.slots: Dict[str, List[Slot]] = parameter_slots(model, params) if self.use_stand_ins else {}
        self.stand_ins: Dict[str, nn.Parameter] = {}
        self.tracker: Optional[UseTracker] = None
        self.module_names = {id(m): n for n, m in model.named_modules()}

    # forward ----------------------------------------------------------------------------------------
    def __enter__(self) -> "GhostCapture":
        if self.use_stand_ins:
            for name, slots in self.slots.items():
                s = self.stand_ins[name] = make_stand_in(self.params[name])
                for slot in slots:
                    slot.holder._parameters[slot.key] = s
        for plan in self.plan.modules.values():
            own = self._own_slots(plan)
            self.handles.append(plan.module.register_forward_pre_hook(self._pre_hook(own)))
            self.handles.append(plan.module.register_forward_hook(self._hook(plan, own), with_kwargs=True))
        tracked = {id(self.stand_ins[n]): n for n in self.track if n in self.stand_ins}
        if tracked or self.follow_rows:
            real = {id(self.stand_ins[n]): self.params[n] for n in self.track if n in self.stand_ins}
            self.tracker = UseTracker(tracked, self._tap_use, self.module_names, self.B,
                                      real if self.weights_in_graph else None, rows=self.rows,
                                      follow_rows=self.follow_rows)
            self.tracker.__enter__()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for name, slots in self.slots.items():
            for slot in slots:
                slot.holder._parameters[slot.key] = self.params[name]

    def _own_slots(self, plan: ModulePlan) -> List[Tuple[Slot, str]]:
        """The slots inside ``plan.module`` of the parameters it scores: real inside its own call."""
        if not self.use_stand_ins:
            return []
        inside = {id(m) for m in plan.module.modules()}
        return [(s, g) for g in plan.names.values() for s in self.slots.get(g, ()) if id(s.holder) in inside]

    def _pre_hook(self, own: List[Tuple[Slot, str]]):
        def hook(mod, args):
            if self.active:
                for slot, g in own:
                    slot.holder._parameters[slot.key] = self.params[g]
            return None

        return hook

    def _anchor_for(self, t: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            self.anchor = torch.zeros((), device=t.device, requires_grad=True)
        return self.anchor

    def _tap(self, t: torch.Tensor, key: Tuple[int, int]) -> torch.Tensor:
        return _Tap.apply(t, self._anchor_for(t), self._sink, key, self.copy_taps)

    def _tap_use(self, out: torch.Tensor, use: OpUse) -> torch.Tensor:
        """A recognised op use (``uses.UseTracker``): record it and tap its output."""
        if not self.active or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out  # (the tap, tied to the anchor, is what makes a use of a detached weight reach G)
        B = self.B
        if B > 1 and use.rows is None and out.dim() > 0 and out.shape[0] == 1 and _batch_broadcast(use.x):
            use.x = use.x.expand(B, *use.x.shape[1:])  # a [1, T] lookup broadcast over the batch
            out = out.expand(B, *out.shape[1:])
        key = len(self.records)
        self.records.append(_Record(None, None, use=use))
        return self._tap(out, (key, 0))

    def _hook(self, plan: ModulePlan, own: List[Tuple[Slot, str]]):
        def hook(mod, args, kwargs, output):
            if not self.active:
                return None
            for slot, g in own:
                slot.holder._parameters[slot.key] = self.stand_ins[g]
            B = self.B
            x = args[0] if args else None
            rows = None
            if plan.rule is not None and isinstance(x, torch.Tensor) and x.dim() > 0:
                # input 0's row -> sample map when its dim 0 is not the batch (or routed rows): proven only
                rows = self.rows.get(x) if self.tracker is None else self.tracker.rows_of(x)
                if rows is None and x.shape[0] != B:
                    rows = flatten_rows(x, B)
            if (
                plan.rule is not None
                and B > 1
                and rows is None
                and isinstance(output, torch.Tensor)
                and output.dim() > 0
                and output.shape[0] == 1
                and _batch_broadcast(x)
            ):
                # a [1, T] input broadcast over the batch (HF position_ids): score it per sample
                args = (x.expand(B, *x.shape[1:]),) + tuple(args[1:])
                output = output.expand(B, *output.shape[1:])
            det = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            call = ModuleCall(mod, plan.name, tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()},
                              batch_size=B, rows=rows)
            key = len(self.records)
            rec = _Record(plan, call)
            self.records.append(rec)
            if plan.rule is not None:
                leaves, spec = tree_flatten(output)
                first = next((i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)), None)
                if first is None:
                    raise RuleFailure(f"module {plan.name} returned {type(output).__name__}, not a tensor",
                                      list(plan.names.values()), plan.name)
                rec.first = first
                if getattr(plan.rule, "keeps_output", False):
                    call.output = leaves[first].detach()
                new = list(leaves)
                for i, leaf in enumerate(leaves):
                    # the rule sees the gradient of the first output; any other output that gets one is
                    # a use the rule does not describe (caught in the sink)
                    if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.is_floating_point():
                        new[i] = self._tap(leaf, (key, i))
                if rows is not None and getattr(plan.rule, "rowwise", False) and isinstance(new[first], torch.Tensor) \
                        and new[first].dim() > 0 and new[first].shape[0] == rows.n:
                    self.rows[new[first]] = rows  # row i of the output is row i of the input
                return new[0] if isinstance(output, torch.Tensor) else tree_unflatten(new, spec)
            leaves, spec = tree_flatten(output)
            new = []
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.is_floating_point():
                    rec.leaves.append(i)
                    leaf = self._tap(leaf, (key, i))
                new.append(leaf)
            return tree_unflatten(new, spec)

        return hook

    # backward ---------------------------------------------------------------------------------------
    def _sink(self, key: Tuple[int, int], g: torch.Tensor) -> None:
        if self.error is not None or self.closed:
            return
        rec = self.records[key[0]]
        try:
            if rec.use is not None:
                factors = _use_factors(rec.use, g, self.B)
                for role, f in factors.items():
                    self._add(rec.use.params[role], f)
                rec.use.x = None
                return
            if rec.plan.rule is None:
                rec.grads[key[1]] = g
                return
            if key[1] != rec.first:
                raise RuleFailure(f"module {rec.plan.name}: its output {key[1]} is used, and its rule describes "
                                  "output 0 only", list(rec.plan.names.values()), rec.plan.name)
            rec.call.grad_output = g
            try:
                factors = rec.plan.rule(rec.call, list(rec.plan.names))
            except UnsupportedModule as e:
                raise RuleFailure(str(e), list(rec.plan.names.values()), rec.plan.name,
                                  layout=isinstance(e, LayoutError)) from e
            missing = set(rec.plan.names) - set(factors)
            if missing:
                raise RuleFailure(f"the rule for {rec.plan.name} returned nothing for {sorted(missing)}",
                                  list(rec.plan.names.values()), rec.plan.name)
            for local, f in factors.items():
                self._add(rec.plan.names[local], f)
            rec.call.args, rec.call.kwargs, rec.call.grad_output, rec.call.output = (), {}, None, None  # release
        except RuleFailure as e:  # collected: every failing module of this pass is moved at once
            self.failures.append(e)
        except BaseException as e:  # errors raised inside autograd lose their type: re-raise after
            self.error = e

    def _shared(self, name: str, index: Optional[int]) -> bool:
        """Whether a use of ``name`` (of its slice ``index``) has cross terms with another use."""
        if index is None:
            return self.uses.get(name, 0) > 1
        return self.uses.get((name, index), 0) > 1 or self.uses.get((name, None), 0) > 0

    def _add(self, name: str, f: Factor) -> None:
        if name in self.refs:  # linear in the gradient: the uses of a shared parameter just add
            d = f.dot(self.refs[name])  # (B, R)
            self.dots[name] = d if name not in self.dots else self.dots[name] + d
        if self.keep_factors or self._shared(name, f.index if isinstance(f, Sliced) else None):
            self.factors.setdefault(name, []).append(f)  # reduced once all uses have arrived
            return
        sq = f.sq_norm(self.use_triton)
        self.sq[name] = sq if name not in self.sq else self.sq[name] + sq

    def backward(self, total: torch.Tensor, retain_graph: bool = False) -> Dict[str, List[Place]]:
        """Run the activation backward of ``total`` = Σ_b L_b and reduce every norm.

        Returns the parameters whose stand-ins got a gradient (uses nobody accounted for), with the places
        the tracker saw (empty for untracked parameters). Nothing is reduced then: the caller learns and
        runs the batch again."""
        self.uses = {}  # name -> uses; (name, slice index or None) -> uses
        for rec in self.records:
            for role, g in rec.names.items():
                index = rec.use.slices[role][0] if rec.use is not None and role in rec.use.slices else None
                self.uses[g] = self.uses.get(g, 0) + 1
                self.uses[(g, index)] = self.uses.get((g, index), 0) + 1
        names = list(self.stand_ins)
        inputs = ([self.anchor] if self.anchor is not None else []) + [self.stand_ins[n] for n in names]
        unaccounted: Dict[str, List[Place]] = {}
        if total.requires_grad and inputs:
            grads = torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=retain_graph)
            self.closed = True
            if self.error is not None:
                raise self.error
            if self.failures:
                raise RuleFailures(self.failures)
            for n, g in zip(names, grads[len(inputs) - len(names):]):
                if g is not None:
                    places = self.tracker.unrecognised.get(n, []) if self.tracker is not None else []
                    unaccounted[n] = places
        if unaccounted:
            return unaccounted
        for rec in self.records:
            if rec.plan is not None and rec.plan.rule is None:
                try:
                    grads = _fallback_grads(rec, self)
                except UnsupportedModule as e:
                    self.failures.append(RuleFailure(str(e), list(rec.plan.names.values()), rec.plan.name))
                    continue
                for local, g in grads.items():
                    self._add(rec.plan.names[local], Dense(g))
        if self.failures:
            raise RuleFailures(self.failures)
        for name, fs in self.factors.items():  # (a parameter may also have single uses reduced already)
            sq = shared_sq_norm(fs, self.use_triton)
            self.sq[name] = sq if name not in self.sq else self.sq[name] + sq
        return {}

    def per_param_dots(self, refs: Optional[Dict[str, torch.Tensor]], device) -> Optional[Dict[str, torch.Tensor]]:
        """name -> (B, R) dots with the references (zeros for a parameter that got no gradient)."""
        if not refs:
            return None
        return {n: self.dots[n] if n in self.dots else torch.zeros(self.B, V.shape[0], dtype=V.dtype, device=device)
                for n, V in refs.items()}

    def per_param_sq(self, params: Dict[str, nn.Parameter], device: torch.device) -> Dict[str, torch.Tensor]:
        acc = acc_dtype(params)
        zero = torch.zeros(self.B, dtype=acc, device=device)
        return {n: self.sq[n].to(acc) if n in self.sq else zero for n in params}


def _use_factors(use: OpUse, G: torch.Tensor, B: int) -> Dict[str, Factor]:
    """The factors of one recognised op use (see ``uses.OpUse``)."""
    try:
        if use.kind == "embedding":
            ids = use.x
            if ids.dim() == 0 or ids.shape[0] != B:
                raise UnsupportedModule(f"ids of shape {tuple(ids.shape)} for a batch of {B}")
            ids = ids.reshape(B, -1)  # (B, T)
            return {"weight": EmbRows(ids, G.reshape(B, ids.shape[1], -1), use.num_rows, use.padding_idx)}
        if use.groups is not None:
            return _grouped_factors(use, G, B)
        Gb = as_btd(G, B, str(use.place), use.rows)  # (B, T, p)
        out: Dict[str, Factor] = {}
        if "weight" in use.params:
            A = as_btd(use.x, B, str(use.place), use.rows)  # (B, T, d)
            out["weight"] = Outer(A, Gb, transposed=use.kind == "matmul_t")
        if "bias" in use.params:
            out["bias"] = RowSum(Gb)
        for role, (index, shape) in use.slices.items():
            out[role] = Sliced(out[role], index, shape)
        return out
    except UnsupportedModule as e:
        raise RuleFailure(f"{use.place}: {e}", list(use.params.values()), use.place.module,
                          layout=isinstance(e, LayoutError)) from e


def _grouped_factors(use: OpUse, G: torch.Tensor, B: int) -> Dict[str, Factor]:
    """A fused expert weight (E, ...) whose rows go to experts: factors over B·E pseudo-samples (sample b's
    rows routed to expert e), zero-padded; rows past the last group (expert id >= E) belong to none. A
    gathered bias b[expert_ids] is the embedding form (rows of b picked by id), per sample."""
    expert, E = use.groups
    if use.rows is None:
        raise LayoutError(f"the samples of the rows of {use.place} are not known")
    seg = use.rows.seg * E + expert  # (n,) pseudo-sample of each row
    x = use.x
    keep = expert < E
    if not bool(keep.all()):
        seg, G = seg[keep], G[keep]
        x = x[keep] if x is not None else None
    role = next(iter(use.params))
    if use.kind == "gather":  # rows of b[expert_ids]: the embedding form, rows grouped by sample
        by_sample = Rows(use.rows.seg[keep])
        ids = by_sample.btd(expert[keep].unsqueeze(-1), B).squeeze(-1)  # (B, C)
        return {role: EmbRows(ids, by_sample.btd(G, B), E)}  # G: (B, C, p)
    rows = Rows(seg)
    Gp = rows.btd(G, B * E)  # (B·E, C, p)
    part = Outer(rows.btd(x, B * E), Gp, transposed=use.kind == "matmul_t")  # A: (B·E, C, d)
    return {role: Grouped(part, B, E, use.shape)}


def shared_sq_norm(fs: List[Factor], use_triton: bool = False) -> torch.Tensor:
    """||Σ_u g_u||² per sample for the uses u of one parameter, cross terms included. Uses of different
    slices of a parameter (``Sliced``) are orthogonal: cross terms only within a slice, and with whole-
    parameter uses."""
    whole = [f for f in fs if not isinstance(f, Sliced)]
    by_slice: Dict[int, List[Factor]] = {}
    for f in fs:
        if isinstance(f, Sliced):
            by_slice.setdefault(f.index, []).append(f)
    total = None
    for group in [whole] + list(by_slice.values()):
        for i, fu in enumerate(group):
            term = fu.sq_norm(use_triton)
            for fv in group[i + 1:]:
                term = term + 2 * fu.inner(fv)
            total = term if total is None else total + term
    for fu in whole:
        for group in by_slice.values():
            for fv in group:
                total = total + 2 * fu.inner(fv)
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


def _is_inplace_view_error(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, RuntimeError) and "is a view" in msg and "inplace" in msg.replace("in-place", "inplace")


class GhostBackend:
    """What one engine knows about scoring its model with the ghost path, learned on the first batch.

    ``moved``: parameters taken from their owner's rule to a module fallback (name -> (module, why));
    ``track``: parameters with uses outside their owner's call, scored through their op uses;
    ``copy_taps``: the model writes into module outputs in place, so taps return copies, not views;
    ``follow_rows``: some layer saw rows of unknown samples, so row maps are followed through every op.
    ``strict``: raise instead of warning when a parameter must move to a fallback (never used for exactness:
    every move is exact; only the whole-model fallback is refused).
    """

    def __init__(self, spec: ScoringSpec):
        self.spec = spec
        self.moved: Dict[str, Tuple[str, str]] = {}
        self.track: Set[str] = set()
        self.copy_taps = False
        self.follow_rows = False  # carry row -> sample maps through every op (after a layout failure)
        self._plan: Optional[GhostPlan] = None

    @property
    def plan(self) -> GhostPlan:
        if self._plan is None:
            # without stand-ins (sharded parameters) op uses cannot be seen: such modules use the fallback
            self._plan = plan_claims(self.spec.model, self.spec.params, self.moved,
                                     op_ok=can_stand_in(self.spec.params))
        return self._plan

    def coverage(self) -> List[CoverageEntry]:
        plan = self.plan
        out: List[CoverageEntry] = []
        owner: Dict[str, Tuple[str, str, str]] = {}
        for mp in plan.modules.values():
            for g in mp.names.values():
                if mp.rule is not None:
                    owner[g] = ("rule", mp.name, getattr(mp.rule, "__name__", "rule"))
                else:
                    why = self.moved.get(g, ("", mp.why))[1] or "no norm rule"
                    owner[g] = ("whole-model vmap" if mp.module is self.spec.model else "module fallback",
                                mp.name, why)
        for g in self.spec.params:
            if g in plan.op_tracked:
                out.append(CoverageEntry(g, "op", "", plan.op_tracked[g]))
            elif g in owner:
                how, mod, detail = owner[g]
                if g in self.track and how == "rule":
                    detail += " + op uses outside its call"
                out.append(CoverageEntry(g, how, mod, detail))
            else:
                out.append(CoverageEntry(g, "op" if g in self.track else "rule", "",
                                         "used only outside module calls" if g in self.track else "never used"))
        return out

    # learning ---------------------------------------------------------------------------------------
    def _move(self, names: List[str], places: List[str], why: str, exact_target: bool = False,
              quiet: bool = False) -> None:
        """Move parameters to a fallback over the innermost module enclosing all their uses (``places``
        and their owners), or over ``places[0]`` itself with ``exact_target``."""
        plan = self.plan
        owners = []
        for g in names:
            for mp in plan.modules.values():
                if g in mp.names.values():
                    owners.append(mp.name)
        if exact_target:
            enclosing = places[0]
        else:
            enclosing = "" if "?" in places else _common_module(places + owners)
        for g in names:
            self.moved[g] = (enclosing, why)
            self.track.discard(g)
        self._plan = None
        where = "the whole model" if enclosing == "" else f"module {enclosing}"
        if quiet:
            return
        log.warning("ghost: %s: %s; scoring %s exactly by a torch.func fallback over %s",
                    ", ".join(names), why, "it" if len(names) == 1 else "them", where)

    def _climb(self, failures: List[RuleFailure]) -> None:
        """Move each failing call's parameters one step out: a rule to its module's own fallback, a module
        fallback (or an op use) to the enclosing module's fallback. Raises when a fallback over the whole
        model fails too (nothing left inside ghost); otherwise raises :class:`Retry`."""
        if not self.follow_rows and any(f.layout for f in failures):
            # a layer saw rows whose samples were not known: follow rows through the ops, then retry
            self.follow_rows = True
            log.info("ghost: %s saw flattened or routed rows; following row -> sample maps through its ops",
                     next(f.module for f in failures if f.layout) or "the model")
            raise Retry("following rows")
        moves: Dict[str, Tuple[List[str], str]] = {}
        fallback_at = {mp.name: set(mp.names.values()) for mp in self.plan.modules.values() if mp.rule is None}
        named = dict(self.spec.model.named_modules())
        for f in failures:
            here = f.module if f.module != "?" else ""
            already = set(f.params) <= fallback_at.get(here, set())
            if already:
                if here == "":
                    raise UnsupportedModule(_ways_out(
                        f"a fallback over the whole model cannot score {f.params[:3]} ({f})"))
                here = here.rpartition(".")[0]
            while here and isinstance(named.get(here), (nn.ModuleList, nn.ModuleDict)):
                here = here.rpartition(".")[0]  # containers are never called: their fallback would never run
            names, why = moves.setdefault(here, ([], f"{f.module}: {str(f).split(';')[0][:160]}"))
            names += [n for n in f.params if n not in names]
        for target, (names, why) in moves.items():
            self._move(names, [target], why, exact_target=True, quiet=True)
        targets = sorted(moves)
        first = moves[targets[0]][1]
        log.warning("ghost: %d module(s) cannot be scored by their rules or fallbacks (e.g. %s); scoring their "
                    "parameters exactly by torch.func fallbacks over %s", len(failures), first,
                    ", ".join(t or "the whole model" for t in targets[:4]) + (", ..." if len(targets) > 4 else ""))
        raise Retry(f"moved to fallbacks over {targets[:4]} ({first})")

    def _learn(self, unaccounted: Dict[str, List[Place]]) -> None:
        new = [n for n, places in unaccounted.items() if n not in self.track and n not in self.plan.op_tracked]
        if new:
            self.track.update(new)
            self._plan = None
            log.warning("ghost: %s %s used outside the call of the module that owns %s; scoring %s uses "
                        "(F.linear, x @ W.T, F.embedding) as extra uses with cross terms",
                        ", ".join(new), "is" if len(new) == 1 else "are", "it" if len(new) == 1 else "them",
                        "its" if len(new) == 1 else "their")
            return
        for n, places in unaccounted.items():
            where = "; ".join(sorted({str(p) for p in places})) or "an op gradsel cannot see"
            targets = [p.module for p in places] or ["?"]
            quiet = False
            if n in self.moved:  # its fallback module never ran around this use: one step further out
                prev = self.moved[n][0]
                targets = ["?"] if prev == "" else [prev.rpartition(".")[0]]
            elif self.plan.op_tracked.get(n) == NO_RULE:  # its op uses were only a first try
                owner = self.plan.op_owner[n]
                targets = [t for t in targets if t != "?"] + [owner]
                quiet = True
                log.info("ghost: %s (no norm rule) is used by %s; scoring it by a torch.func fallback", n, where)
            self._move([n], targets, f"used by an op without a rule ({where})", quiet=quiet)

    def run(self, batch: PreparedBatch, use_triton: bool, keep_factors: bool, strict: bool,
            retain_graph: bool = False, refs: Optional[Dict[str, torch.Tensor]] = None,
            weights_in_graph: bool = False):
        """Scored forward + activation backward, learning until every use is accounted for.

        Returns (capture, losses (B,), tokens (B,)). ``strict``: refuse (UnsupportedModule naming the
        parameter and the place) instead of falling back over the whole model."""
        last = ""
        for _ in range(MAX_PASSES):
            refused = [n for n in self.plan.root_fallback if n in self.moved]
            if strict and refused:  # refused before a pass over the whole model is paid for
                why = "; ".join(sorted({self.moved[n][1] for n in refused}))
                raise UnsupportedModule(_ways_out(
                    f"parameters {refused[:4]} can only be scored by a fallback over the whole model ({why})"))
            try:
                return self._attempt(batch, use_triton, keep_factors, retain_graph, refs, weights_in_graph)
            except Retry as r:
                last = str(r.__cause__ or r)[:200]
        raise UnsupportedModule(_ways_out(
            f"scoring did not settle after {MAX_PASSES} passes moving parameters to fallbacks (last: {last})"))

    def _attempt(self, batch: PreparedBatch, use_triton: bool, keep_factors: bool, retain_graph: bool,
                 refs: Optional[Dict[str, torch.Tensor]] = None, weights_in_graph: bool = False):
        spec = self.spec
        cap = GhostCapture(spec.model, self.plan, spec.params, batch.batch_size, use_triton, keep_factors,
                           copy_taps=self.copy_taps, track=self.track, refs=refs, weights_in_graph=weights_in_graph,
                           follow_rows=self.follow_rows)
        try:
            with cap:
                out = spec.model(**batch.model_inputs)
        except RuleFailure as e:
            self._climb([e])
        except RuntimeError as e:
            if _is_inplace_view_error(e) and not self.copy_taps:
                self.copy_taps = True
                log.warning("ghost: the model writes into a module output in place (%s); taps copy outputs",
                            str(e).splitlines()[0][:160])
                raise Retry() from e
            raise
        losses, tokens = per_sample_losses(out, batch, spec.loss_fn, spec.loss_reduction)
        try:
            unaccounted = cap.backward(losses.sum(), retain_graph)
        except RuleFailures as e:
            self._climb(e.failures)
        except RuntimeError as e:
            if _is_inplace_view_error(e) and not self.copy_taps:
                self.copy_taps = True
                raise Retry() from e
            raise
        if unaccounted:
            self._learn(unaccounted)
            raise Retry()
        return cap, losses, tokens


def score_ghost(backend: GhostBackend, batch: PreparedBatch, use_triton: bool = False,
                strict: bool = False, refs: Optional[Dict[str, torch.Tensor]] = None) -> RawScores:
    cap, losses, tokens = backend.run(batch, use_triton, keep_factors=False, strict=strict, refs=refs)
    device = batch.full["input_ids"].device
    return RawScores(per_param_sq=cap.per_param_sq(backend.spec.params, device), losses=losses.detach(),
                     tokens=tokens, dots=cap.per_param_dots(refs, device))
