"""One scored forward and its activation backward: hooks, taps, the sink that reduces each G as it arrives,
and the cross terms of parameters with several uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import LayoutError, UnsupportedModule
from ..factors import Dense, Factor, Sliced
from ..rules import ModuleCall
from ..types import BufferSnapshot, acc_dtype
from .failures import HiddenUseError, RuleFailure, RuleFailures
from .fallback import fallback_grads
from .plan import ModulePlan, GhostPlan
from .rows import flatten_rows
from .layout import batch_dim, probe_weights, row_sq, rows_agree
from .selfcheck import check_key, has_forward_hooks, self_check
from .standins import Slot, can_stand_in, make_stand_in, parameter_slots
from .uses import OpUse, Place, UseTracker, use_factors

# -- the tap: an identity node whose backward hands G to the capture ---------------------------------------


def batch_broadcast(x) -> bool:
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
class Record:
    plan: Optional[ModulePlan]
    call: Optional[ModuleCall]
    use: Optional[OpUse] = None
    leaves: List[int] = field(default_factory=list)  # output leaves tapped (fallback calls)
    first: int = 0  # the output leaf a rule describes
    grads: Dict[int, torch.Tensor] = field(default_factory=dict)
    # a fallback module's buffers before its call: its recomputation starts from them (spectral_norm's power
    # iteration in train mode), so it computes what the forward did and leaves them as the forward did
    buffers_before: Optional[BufferSnapshot] = None
    # a fallback call: which flattened inputs (args, kwargs) carried gradient before they were detached (the
    # fallback's second layout candidate batches only those)
    grad_in: Tuple[bool, ...] = ()

    @property
    def names(self) -> Dict[str, str]:
        return self.use.params if self.use is not None else self.plan.names


class GhostCapture:
    """Hooks for one scored forward, and the backward that reduces the norms.

    ``keep_factors=True`` keeps every factor (in-step selection needs them to build the masked gradient
    after the norms); otherwise single-use factors are reduced and dropped as G arrives.
    """

    def __init__(self, model: nn.Module, plan: GhostPlan, params: Dict[str, nn.Parameter], batch_size: int,
                 use_triton: bool = False, keep_factors: bool = False, copy_taps: bool = False,
                 track: Optional[Set[str]] = None, stand_ins: bool = True,
                 refs: Optional[Dict[str, torch.Tensor]] = None, weights_in_graph: bool = False,
                 follow_rows: bool = False, checked: Optional[WeakIdKeyDictionary] = None,
                 find_hidden: bool = False):
        self.model, self.plan, self.params, self.B = model, plan, params, batch_size
        # module -> the key (``selfcheck.check_key``) under which its rule reproduced its output: the engine's
        # cache of verdicts, so a rule checks itself once per module (a fresh capture checks every module)
        self.checked = checked if checked is not None else WeakIdKeyDictionary()
        self._checks: Dict[int, Tuple[Any, bool, bool]] = {}  # id(module) -> (key, check value, check hooks)
        self._raw: Dict[int, Tuple[Any, Any]] = {}  # id(module) -> (output of forward, its grad_fn)
        # the layout probe (``layout``): weights c (B,) while probing, and each tap's row norms from the probe
        self.probing = False
        self._probe_c: Optional[torch.Tensor] = None
        self._probe_n: Dict[Tuple[int, int], torch.Tensor] = {}
        # find_hidden: a ruled or fallback module's own call gets a second stand-in, not the real Parameter, so the
        # real one is reached only by a use outside every slot (a list, dict, closure): the probe asks for its
        # gradient (``standins.hidden_uses``). Not with weights_in_graph (a later backward needs the real weights)
        self.window: Dict[str, nn.Parameter] = {}
        self.find_hidden = find_hidden and not weights_in_graph
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
        self.records: List[Record] = []
        self.buffers_before: List[BufferSnapshot] = []  # fallback modules' buffers at their pre-hooks
        self.handles: List[Any] = []  # torch.utils.hooks.RemovableHandle
        self.active = False
        self.anchor: Optional[torch.Tensor] = None
        self.uses: Dict[Any, int] = {}  # name -> uses; (name, slice index or None) -> uses
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
                if self.find_hidden:
                    self.window[name] = make_stand_in(self.params[name])
                for slot in slots:
                    slot.holder._parameters[slot.key] = s
        for plan in self.plan.modules.values():
            own = self._own_slots(plan)
            if plan.rule is not None:
                key = check_key(plan.module, plan.rule)
                hooks = has_forward_hooks(plan.module)
                self._checks[id(plan.module)] = (key, self.checked.get(plan.module) != key, hooks)
                if hooks:  # runs before the user's forward hooks: what forward itself returned
                    self.handles.append(plan.module.register_forward_hook(self._raw_hook, prepend=True))
            self.handles.append(plan.module.register_forward_pre_hook(self._pre_hook(own, plan)))
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

    def _pre_hook(self, own: List[Tuple[Slot, str]], plan: ModulePlan):
        has_buffers = plan.rule is None and any(True for _ in plan.module.buffers())

        def hook(mod, args):
            if self.active:
                for slot, g in own:
                    slot.holder._parameters[slot.key] = self.window.get(g, self.params[g])
                if has_buffers:
                    self.buffers_before.append(BufferSnapshot(mod))
            return None

        return hook

    def _raw_hook(self, mod, args, output):
        if self.active:
            first = next((v for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)), None)
            self._raw[id(mod)] = (first, first.grad_fn if first is not None else None)
        return None

    def _check_rule(self, plan: ModulePlan, mod, args, kwargs, output) -> None:
        """The rule's self-check (``selfcheck``): raises RuleFailure (the module moves to its fallback) when
        the rule does not describe this call."""
        key, value, hooks = self._checks.get(id(mod), (None, False, False))
        first = next((v for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)), None)
        why = None
        if hooks:
            raw, raw_fn = self._raw.pop(id(mod), (None, None))
            if first is None or first is not raw or first.grad_fn is not raw_fn:
                why = "a forward hook replaces or modifies its output (the rule describes its forward only)"
        if why is None and value and first is not None:
            det = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            call = ModuleCall(mod, plan.name, tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()},
                              batch_size=self.B)
            was, self.active = self.active, False  # modules the formula calls (a LoRA base layer) are not scored
            try:
                why = self_check(plan.rule, call, first)
            finally:
                self.active = was
            if why is None:
                self.checked[mod] = key
        if why is not None:
            raise RuleFailure(f"module {plan.name} ({type(mod).__name__}, rule {plan.rule.name}): {why}",
                              list(plan.names.values()), plan.name)

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
        if B > 1 and use.rows is None and out.dim() > 0 and out.shape[0] == 1 and batch_broadcast(use.x):
            use.x = use.x.expand(B, *use.x.shape[1:])  # a [1, T] lookup broadcast over the batch
            out = out.expand(B, *out.shape[1:])
        key = len(self.records)
        self.records.append(Record(None, None, use=use))
        return self._tap(out, (key, 0))

    def _hook(self, plan: ModulePlan, own: List[Tuple[Slot, str]]):
        def hook(mod, args, kwargs, output):
            if not self.active:
                return None
            for slot, g in own:
                slot.holder._parameters[slot.key] = self.stand_ins[g]
            if plan.rule is not None:
                try:
                    self._check_rule(plan, mod, args, kwargs, output)
                except RuleFailure as e:  # collected: the forward goes on, so one pass finds every such module
                    self.failures.append(e)
                    return None  # the output untapped: nothing is scored from this pass (backward raises first)
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
                and batch_broadcast(x)
            ):
                # a [1, T] input broadcast over the batch (HF position_ids): score it per sample
                args = (x.expand(B, *x.shape[1:]),) + tuple(args[1:])
                output = output.expand(B, *output.shape[1:])
            det = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            call = ModuleCall(mod, plan.name, tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()},
                              batch_size=B, rows=rows)
            key = len(self.records)
            rec = Record(plan, call)
            if plan.rule is None and self.buffers_before:
                rec.buffers_before = self.buffers_before.pop()
            if plan.rule is None:
                rec.grad_in = tuple(isinstance(v, torch.Tensor) and v.requires_grad
                                    for v in tree_flatten((args, kwargs))[0])
            self.records.append(rec)
            if plan.rule is not None:
                leaves, spec = tree_flatten(output)
                first = next((i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)), None)
                if first is None:
                    raise RuleFailure(f"module {plan.name} returned {type(output).__name__}, not a tensor",
                                      list(plan.names.values()), plan.name)
                rec.first = first
                if plan.rule.keeps_output:
                    call.output = leaves[first].detach()
                new = list(leaves)
                for i, leaf in enumerate(leaves):
                    # the rule sees the gradient of the first output; any other output that gets one is
                    # a use the rule does not describe (caught in the sink)
                    if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.is_floating_point():
                        new[i] = self._tap(leaf, (key, i))
                if rows is not None and plan.rule.rowwise and isinstance(new[first], torch.Tensor) \
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
        if self.probing:
            n = row_sq(g, self._batch_dim(rec, key))
            if n is not None:
                self._probe_n[key] = n
            return
        try:
            if self._probe_c is not None:
                self._check_layout(rec, key, g)
            if rec.use is not None:
                factors = use_factors(rec.use, g, self.B)
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

    @staticmethod
    def _batch_dim(rec: Record, key: Tuple[int, int]) -> int:
        return batch_dim(rec.plan.module) if rec.plan is not None and rec.plan.rule is not None else 0

    def _check_layout(self, rec: Record, key: Tuple[int, int], g: torch.Tensor) -> None:
        """The probe's verdict on one tap (``layout``): its rows must each belong to one sample."""
        n2 = self._probe_n.pop(key, None)
        c = self._probe_c
        if n2 is None or c is None:
            return
        n1 = row_sq(g, self._batch_dim(rec, key))
        rows = rec.use.rows if rec.use is not None else (rec.call.rows if rec.call is not None else None)
        if n1 is None or n1.shape != n2.shape:
            return
        if rows is not None and rows.n == n1.shape[0]:
            c_rows = c[rows.seg]
        elif n1.shape[0] == self.B:
            c_rows = c
        else:
            return  # rows of unknown samples: the rule refuses them itself (LayoutError)
        if not rows_agree(n1, n2, c_rows, g.dtype):
            where = rec.plan.name if rec.plan is not None else rec.use.place.module
            what = f"module {where}" if rec.plan is not None else f"{rec.use.place}"
            raise RuleFailure(f"{what}: the rows of its output gradient do not each belong to one sample (dim 0 of "
                              "size B is not the batch here: a time-major layout, or a shared row indexed by the "
                              "model)", list(rec.names.values()), where)

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

    def backward(self, total: torch.Tensor, retain_graph: bool = False,
                 probe: Optional[torch.Tensor] = None) -> Dict[str, List[Place]]:
        """Run the activation backward of ``total`` = Σ_b L_b and reduce every norm.

        ``probe``: the (B,) per-sample losses; first run the layout probe (``layout``): one more activation
        backward of Σ_b c_b L_b, after which every tap's rows are checked to belong to one sample each.

        Returns the parameters whose stand-ins got a gradient (uses nobody accounted for), with the places
        the tracker saw (empty for untracked parameters). Nothing is reduced then: the caller learns and
        runs the batch again."""
        if self.failures:  # rules that failed their self-check in the forward: move them all, run again
            raise RuleFailures(self.failures)
        self.uses = {}  # name -> uses; (name, slice index or None) -> uses
        for rec in self.records:
            for role, g in rec.names.items():
                index = rec.use.slices[role][0] if rec.use is not None and role in rec.use.slices else None
                self.uses[g] = self.uses.get(g, 0) + 1
                self.uses[(g, index)] = self.uses.get((g, index), 0) + 1
        names = list(self.stand_ins)
        inputs = ([self.anchor] if self.anchor is not None else []) + [self.stand_ins[n] for n in names]
        unaccounted: Dict[str, List[Place]] = {}
        if probe is not None and probe.requires_grad:
            layout = self.B >= 2 and self.anchor is not None  # one sample proves nothing about rows
            c = probe_weights(self.B, probe.dtype, probe.device) if layout else torch.ones_like(probe)
            hidden = [n for n in self.window if self.params[n].requires_grad]
            ins = ([self.anchor] if self.anchor is not None else []) + [self.params[n] for n in hidden]
            self.probing = True
            try:
                got = torch.autograd.grad((probe * c).sum(), ins, allow_unused=True, retain_graph=True) if ins else []
            finally:
                self.probing = False
            if not layout:
                self._probe_n.clear()
            else:
                self._probe_c = c
            found = [n for n, g in zip(hidden, got[len(ins) - len(hidden):]) if g is not None]
            if found:
                raise HiddenUseError(found)
        if total.requires_grad and inputs:
            grads = torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=retain_graph)
            self.closed = True
            if self.error is not None:
                raise self.error
            if self.failures:
                raise RuleFailures(self.failures)
            for n, gn in zip(names, grads[len(inputs) - len(names):]):
                if gn is not None:
                    places = self.tracker.unrecognised.get(n, []) if self.tracker is not None else []
                    unaccounted[n] = places
        if unaccounted:
            return unaccounted
        for rec in self.records:
            if rec.plan is not None and rec.plan.rule is None:
                after = BufferSnapshot(rec.plan.module) if rec.buffers_before is not None else None
                try:
                    if rec.buffers_before is not None:
                        rec.buffers_before.restore()
                    per_sample = fallback_grads(rec, self)
                except UnsupportedModule as e:
                    self.failures.append(RuleFailure(str(e), list(rec.plan.names.values()), rec.plan.name))
                    continue
                finally:
                    if after is not None:
                        after.restore()
                for local, grad in per_sample.items():
                    self._add(rec.plan.names[local], Dense(grad))
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
