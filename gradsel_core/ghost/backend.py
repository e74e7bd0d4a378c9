"""The retry/learning loop: what one engine learned about scoring its model, and the passes that learn it."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ..batching import PreparedBatch, per_sample_losses
from ..errors import UnsupportedModule, UsageError
from ..types import BufferSnapshot, CoverageEntry, RawScores, ScoringSpec
from .capture import GhostCapture
from .failures import Retry, RuleFailure, RuleFailures, grad_hooks, ways_out
from .head import HeadInput, check_model, head_forward, head_losses, hidden_use_forward
from .layout import PROVEN, hooks_signature
from .selfcheck import VERDICTS
from .plan import NO_RULE, GhostPlan, common_module, plan_claims
from .standins import assert_no_hidden_uses, can_stand_in
from .uses import Place

log = logging.getLogger(__name__)

# at most this many extra passes on one batch while learning how to score a model
MAX_PASSES = 8


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
        self.fused_head: Optional[bool] = None  # the fused LM head (ghost/head.py): None auto, False off, True on
        self.head_status = ""  # whether the last scored forward used it, and why not
        self._plan: Optional[GhostPlan] = None
        # module -> the key under which its rule reproduced its output (``selfcheck``): checked once per module
        self.checked = VERDICTS

    @property
    def plan(self) -> GhostPlan:
        if self._plan is None:
            # without stand-ins (sharded parameters) op uses cannot be seen: such modules use the fallback
            self._plan = plan_claims(self.spec.model, self.spec.params, self.moved,
                                     op_ok=can_stand_in(self.spec.params))
        return self._plan

    def refresh_params(self) -> List[str]:
        """Resolve the selected parameters by name again: a Parameter replaced since the engine was built
        (``model.resize_token_embeddings()``, a re-assigned ``weight``) is the one scored from now on, in place
        in the shared ``spec.params`` (so every backend and ``FilteredBackward`` see it), and the plan is made
        again. Returns the replaced names. A selected name the model no longer has is a :class:`UsageError`."""
        params = self.spec.params
        changed: List[str] = []
        for n, p in list(params.items()):
            try:
                cur = self.spec.model.get_parameter(n)
            except AttributeError:
                raise UsageError(f"the selected parameter {n} is no longer a parameter of the model; build a new "
                                 "engine (or FilteredBackward) for the changed model") from None
            if cur is not p:
                params[n] = cur
                changed.append(n)
        if changed:
            self._plan = None
            log.info("ghost: parameter(s) %s were replaced since the engine was built; scoring the new ones",
                     ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else ""))
        return changed

    def layout_signature(self) -> Tuple[Any, ...]:
        """What the layout probe's verdict depends on: the plan, what was learned, and the model's hooks."""
        plan = self.plan
        return (tuple(sorted((mp.name, id(mp.rule), tuple(sorted(mp.names.values()))) for mp in plan.modules.values())),
                tuple(sorted(plan.op_tracked)), tuple(sorted(self.track)), tuple(sorted(self.moved)),
                tuple(sorted(self.spec.params)), self.copy_taps, self.follow_rows, hooks_signature(self.spec.model))

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
            enclosing = "" if "?" in places else common_module(places + owners)
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
                    raise UnsupportedModule(ways_out(
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
        self.refresh_params()
        # gradient hooks on selected parameters: refused, naming them (one-backward filtering writes p.grad
        # itself, so post-accumulate hooks would be skipped there too)
        grad_hooks(self.spec.params, post_accumulate=keep_factors and not weights_in_graph)
        check_model(self, batch, weights_in_graph)  # the fused LM head's self-check (once per model)
        last = ""
        snapshot = BufferSnapshot(self.spec.model)  # a retry leaves the buffers as one forward does
        for _ in range(MAX_PASSES):
            refused = [n for n in self.plan.root_fallback if n in self.moved]
            if strict and refused:  # refused before a pass over the whole model is paid for
                why = "; ".join(sorted({self.moved[n][1] for n in refused}))
                raise UnsupportedModule(ways_out(
                    f"parameters {refused[:4]} can only be scored by a fallback over the whole model ({why})"))
            try:
                return self._attempt(batch, use_triton, keep_factors, retain_graph, refs, weights_in_graph)
            except Retry as r:
                last = str(r.__cause__ or r)[:200]
                snapshot.restore()
        raise UnsupportedModule(ways_out(
            f"scoring did not settle after {MAX_PASSES} passes moving parameters to fallbacks (last: {last})"))

    def _attempt(self, batch: PreparedBatch, use_triton: bool, keep_factors: bool, retain_graph: bool,
                 refs: Optional[Dict[str, torch.Tensor]] = None, weights_in_graph: bool = False):
        spec = self.spec
        sig = self.layout_signature()
        proven = PROVEN.get(spec.model, set())
        # what the first pass of a plan proves (``layout``): no hidden use (any B), the layout (B >= 2 only)
        hidden_done = (sig, "hidden") in proven
        layout_done = (sig, "layout") in proven or batch.batch_size < 2
        if weights_in_graph and not hidden_done:
            # the capture cannot look for hidden uses when the real weights must stay in the graph: one plain
            # forward does (once per model)
            assert_no_hidden_uses(spec.model, spec.params, hidden_use_forward(self, batch, lambda out: per_sample_losses(
                out, batch, spec.loss_fn, spec.loss_reduction)[0].sum()))  # (stopped at the fused head's input)
        cap = GhostCapture(spec.model, self.plan, spec.params, batch.batch_size, use_triton, keep_factors,
                           copy_taps=self.copy_taps, track=self.track, refs=refs, weights_in_graph=weights_in_graph,
                           follow_rows=self.follow_rows, checked=self.checked,
                           find_hidden=not hidden_done)
        try:
            with cap:  # the fused LM head (ghost/head.py) stops at the head's input: out is then a HeadInput
                out = head_forward(self, batch, weights_in_graph, cap)
        except RuleFailure as e:
            self._climb([e])
        except RuntimeError as e:
            if _is_inplace_view_error(e) and not self.copy_taps:
                self.copy_taps = True
                log.warning("ghost: the model writes into a module output in place (%s); taps copy outputs",
                            str(e).splitlines()[0][:160])
                raise Retry() from e
            raise
        if isinstance(out, HeadInput):  # the chunked head + cross-entropy, outside the capture
            losses, tokens = head_losses(self, cap, batch, out)
        else:
            losses, tokens = per_sample_losses(out, batch, spec.loss_fn, spec.loss_reduction)
        del out  # the outputs (logits: (B, T, V), the largest activation) must not outlive the backward's need
        try:
            unaccounted = cap.backward(losses.sum(), retain_graph,
                                       probe=None if hidden_done and layout_done else losses)
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
        proven = PROVEN.setdefault(spec.model, set())
        proven.add((sig, "hidden"))  # (two-pass: checked by assert_no_hidden_uses above)
        if batch.batch_size >= 2:  # the probe ran on this plan and every tap passed (``layout``)
            proven.add((sig, "layout"))
        return cap, losses, tokens


def score_ghost(backend: GhostBackend, batch: PreparedBatch, use_triton: bool = False,
                strict: bool = False, refs: Optional[Dict[str, torch.Tensor]] = None) -> RawScores:
    cap, losses, tokens = backend.run(batch, use_triton, keep_factors=False, strict=strict, refs=refs)
    device = batch.full["input_ids"].device
    return RawScores(per_param_sq=cap.per_param_sq(backend.spec.params, device), losses=losses.detach(),
                     tokens=tokens, dots=cap.per_param_dots(refs, device))
