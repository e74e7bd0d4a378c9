"""Which module scores which selected parameter: by its rule, through its op uses, or by a module fallback."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from torch import nn

from ..rules import NormRule, rule_status

_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


@dataclass
class ModulePlan:
    module: nn.Module
    name: str
    rule: Optional[NormRule]  # None: torch.func fallback
    names: Dict[str, str] = field(default_factory=dict)  # local parameter name -> global name
    why: str = ""  # why the module is scored by the fallback (empty: no rule registered)
    # fallback only: input signature (shapes, dtypes, B) -> the batch dims its inputs were proven to have
    # (``gradsel_core.ghost.fallback``: a layout is read from a shape only once the sum identity proves it)
    in_dims: Dict[Tuple[Any, ...], Tuple[Optional[int], ...]] = field(default_factory=dict)


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
        for local in (rule.claims if rule is not None else ()):
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


def common_module(names: List[str]) -> str:
    """The innermost module whose name is a prefix of all ``names`` ('' = the root)."""
    parts = [n.split(".") if n else [] for n in names]
    common: List[str] = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)
