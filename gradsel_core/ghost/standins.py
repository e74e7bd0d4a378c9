"""Stand-ins: during the scored forward each selected parameter's slot holds a leaf sharing its storage, so
any use the rules do not account for shows up as that leaf's gradient (``None``, at no cost, when there is none)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .failures import HiddenUseError


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


def hidden_uses(model: nn.Module, params: Dict[str, nn.Parameter], forward: Callable[[], torch.Tensor]) -> List[str]:
    """The selected parameters the model uses other than through a module slot (a list, dict or closure holds
    the Parameter): ``forward()`` runs with every slot holding a stand-in, so only such a use reaches the real
    Parameter, and autograd reports it (``None``, at no cost, when there is none). One forward."""
    slots = parameter_slots(model, params)
    subs = {n: make_stand_in(params[n]) for n in slots}
    try:
        for n, ss in slots.items():
            for s in ss:
                s.holder._parameters[s.key] = subs[n]
        with torch.enable_grad():
            total = forward()
    finally:
        for n, ss in slots.items():
            for s in ss:
                s.holder._parameters[s.key] = params[n]
    names = [n for n, p in params.items() if p.requires_grad]
    if not names or not total.requires_grad:
        return []
    grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
    return [n for n, g in zip(names, grads) if g is not None]


# model -> the selected names and the model's hooks under which no hidden use was found (``assert_no_hidden_uses``)
_CLEAN: WeakIdKeyDictionary = WeakIdKeyDictionary()


def assert_no_hidden_uses(model: nn.Module, params: Dict[str, nn.Parameter], forward: Callable[[], torch.Tensor]) -> None:
    """Raise :class:`HiddenUseError` when :func:`hidden_uses` finds any; once per model (and selection, params,
    hooks), for the backends that have no capture of their own (``vmap``, ghost's two-pass mode)."""
    from .layout import hooks_signature

    key = (tuple((n, id(p)) for n, p in params.items()), hooks_signature(model))
    if _CLEAN.get(model) == key or not can_stand_in(params):
        return
    from ..types import BufferSnapshot

    snapshot = BufferSnapshot(model)  # the check's plain forward leaves the buffers as it found them
    try:
        found = hidden_uses(model, params, forward)
    finally:
        snapshot.restore()
    if found:
        raise HiddenUseError(found)
    _CLEAN[model] = key
