"""Stand-ins: during the scored forward each selected parameter's slot holds a leaf sharing its storage, so
any use the rules do not account for shows up as that leaf's gradient (``None``, at no cost, when there is none)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from torch import nn


@dataclass
class Slot:
    """Where a parameter is registered: ``holder._parameters[key]``."""

    holder: nn.Module
    key: str


def parameter_slots(model: nn.Module, params: Dict[str, nn.Parameter]) -> Dict[str, List[Slot]]:
    """Every registration of every selected parameter (a tied weight has several)."""
    by_id = {id(p): n for n, p in params.items()}
    slots: Dict[str, List[Slot]] = {}
    seen = set()
    for mod in model.modules():
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        for key, p in mod._parameters.items():
            if p is not None and id(p) in by_id:
                slots.setdefault(by_id[id(p)], []).append(Slot(mod, key))
    return slots


def can_stand_in(params: Dict[str, nn.Parameter]) -> bool:
    """Stand-ins need plain parameters: sharded ones (FSDP2 DTensors) swap their own slots."""
    return all(type(p) is nn.Parameter or type(p).__name__ == "Parameter" for p in params.values()) and not any(
        type(p.data).__name__ == "DTensor" for p in params.values())


def make_stand_in(p: nn.Parameter) -> nn.Parameter:
    """A leaf sharing ``p``'s storage, requiring grad: a use of it shows up as its gradient."""
    return nn.Parameter(p.detach(), requires_grad=True)
