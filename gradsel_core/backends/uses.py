"""Every use of every selected parameter, accounted for.

A norm rule describes one module's forward. It silently misses a parameter's gradient when the parameter
is also used outside its owner's call (``logits = h @ self.wte.weight.T``, ``F.linear(h, self.lin.weight)``
next to ``self.lin(h)``, ``nn.MultiheadAttention`` reading ``out_proj.weight``), or when a subclass overrides
the ruled forward. Two mechanisms close that gap:

* **Stand-ins** (detection, ~free): during the scored forward each selected parameter's slot in its
  module(s) holds a *stand-in*, a leaf sharing the parameter's storage. A module scored by a module-level
  rule or fallback gets the real parameter back for the duration of its own call. Any other access reads the
  stand-in, so the backward can ask autograd for the stand-ins' gradients: ``None`` (nothing to do, no
  matmul is run) unless the parameter had an unaccounted use.
* **Op uses** (handling): for parameters known to be used outside a module-level rule, a
  ``TorchFunctionMode`` sees every torch call. ``F.linear(x, W, b)``, ``x @ W.T`` / ``x @ W`` and
  ``F.embedding(ids, W)`` on a stand-in become one more *use* of the parameter (its output is tapped, its
  factor is exact, cross terms with the other uses are added). Any other op on a stand-in is recorded with
  its place (module and source line) and still reaches the stand-in, so it cannot go unnoticed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@dataclass
class Place:
    """Where a parameter was used: the innermost enclosing module call and the source line."""

    module: str  # name in the model ('' for the root), or '?' when no module encloses it
    where: str  # file:line of the user's code
    op: str

    def __str__(self) -> str:
        mod = "the root module" if self.module == "" else ("no module" if self.module == "?" else self.module)
        return f"{self.op} in {mod} at {self.where}"


def find_place(module_names: Dict[int, str], op: str) -> Place:
    """Walk the Python stack up from the op to the first frame of a model's module, and to the first
    frame of code outside torch and gradsel (the line a user can look at)."""
    frame = sys._getframe(2)
    module, where = "?", "?"
    while frame is not None:
        fn = frame.f_code.co_filename
        if where == "?" and not fn.startswith(_TORCH_DIR) and not fn.startswith(_THIS_DIR):
            where = f"{os.path.basename(fn)}:{frame.f_lineno}"
        # the innermost module whose *forward* runs (a helper method of a module that is not called, such as
        # JetMoe's experts.map, does not enclose the use: its caller's forward does)
        owner = frame.f_locals.get("self") if module == "?" and frame.f_code.co_name == "forward" else None
        if isinstance(owner, nn.Module) and id(owner) in module_names:
            module = module_names[id(owner)]
        if module != "?" and where != "?":
            break
        frame = frame.f_back
    return Place(module, where, op)


@dataclass
class OpUse:
    """One recognised use of tracked parameters by a torch op (captured input; G arrives at the tap)."""

    kind: str  # "linear" (y = x Wᵀ + b), "matmul_t" (y = x W, W stored (d, p)), "embedding"
    params: Dict[str, str]  # role ("weight" / "bias") -> global parameter name
    x: torch.Tensor  # input (B, ..., d) or ids (B, T)
    place: Place
    num_rows: int = 0  # embedding V
    padding_idx: Optional[int] = None


def _getter_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", "") if type(func).__name__ == "method-wrapper" else ""


_TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose}


class UseTracker(TorchFunctionMode):
    """Turns ops on tracked stand-ins into uses; records the place of any other op on them.

    ``tap(out, use)`` routes a recognised op's output through the capture's tap and returns it;
    ``tracked`` maps id(stand-in) -> global name (the stand-ins stay alive in the capture)."""

    def __init__(self, tracked: Dict[int, str], tap: Callable[[torch.Tensor, OpUse], torch.Tensor],
                 module_names: Dict[int, str], batch_size: int, real: Optional[Dict[int, torch.Tensor]] = None):
        super().__init__()
        self.tracked = tracked
        self.real = real  # id(stand-in) -> the parameter: computed with, so an ordinary backward reaches it
        self.tap = tap
        self.module_names = module_names
        self.B = batch_size
        # id(view) -> (name, the view kept alive, the stand-in it transposes)
        self.transposed: Dict[int, Tuple[str, torch.Tensor, torch.Tensor]] = {}
        self.unrecognised: Dict[str, List[Place]] = {}

    # -- helpers ------------------------------------------------------------------------------------
    def _weight(self, t: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What a recognised op computes with: the stand-in detached (scoring: no weight gradient, and the
        stand-in stays unreached), or the real parameter (``real``: an ordinary backward follows)."""
        if self.real is None:
            return t.detach()
        if base is None:
            return self.real[id(t)]
        return self.real[id(base)].t()  # a transposed view of the stand-in

    def _name(self, t: Any) -> Optional[str]:
        return self.tracked.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _any_tracked(self, args, kwargs) -> List[str]:
        found = []
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor):
                n = self.tracked.get(id(v))
                if n is None and id(v) in self.transposed:
                    n = self.transposed[id(v)][0]
                if n is not None:
                    found.append(n)
            elif isinstance(v, (list, tuple)):
                found += self._any_tracked(v, {})
        return found

    def _note(self, names: List[str], op: str) -> None:
        place = find_place(self.module_names, op)
        for n in names:
            self.unrecognised.setdefault(n, []).append(place)

    # -- the mode -----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.tracked:
            return func(*args, **kwargs)
        if func is F.linear:
            return self._linear(func, args, kwargs)
        if func is F.embedding:
            return self._embedding(func, args, kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2 and not kwargs:
            out = self._matmul(func, args)
            if out is not None:
                return out
        getter = _getter_name(func)
        if getter in ("T", "mT") or func in _TRANSPOSES:
            src = self._name(args[0]) if args else None
            if src is not None and args[0].dim() == 2 and (getter or self._is_full_transpose(func, args, kwargs)):
                out = func(*args, **kwargs)
                self.transposed[id(out)] = (src, out, args[0])
                return out
        if getter:  # .dtype, .shape, .device ...: no use
            return func(*args, **kwargs)
        names = self._any_tracked(args, kwargs)
        if names:
            self._note(names, getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    @staticmethod
    def _is_full_transpose(func, args, kwargs) -> bool:
        if func in (torch.Tensor.t, torch.t):
            return True
        dims = list(args[1:3]) + [kwargs.get(k) for k in ("dim0", "dim1") if k in kwargs]
        return len(dims) == 2 and sorted(d % 2 for d in dims) == [0, 1]

    def _linear(self, func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        wn, bn = self._name(w), self._name(b)
        others = [n for n in self._any_tracked((x,), {}) if n not in (wn, bn)]
        if (wn is None and bn is None) or others or not isinstance(x, torch.Tensor) or x.dim() < 2:
            names = self._any_tracked(args, kwargs)
            if names:
                self._note(names, "linear")
            return func(*args, **kwargs)
        out = func(x, self._weight(w) if wn else w, self._weight(b) if bn is not None else b)
        roles = {}
        if wn:
            roles["weight"] = wn
        if bn:
            roles["bias"] = bn
        return self.tap(out, OpUse("linear", roles, x.detach(), find_place(self.module_names, "linear")))

    def _matmul(self, func, args):
        x, w = args
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() < 2:
            return None
        if id(w) in self.transposed:  # x @ W.T with W (p, d): the Linear form
            name, _, base = self.transposed[id(w)]
            out = func(x, self._weight(w, base))
            return self.tap(out, OpUse("linear", {"weight": name}, x.detach(), find_place(self.module_names, "x @ W.T")))
        name = self._name(w)
        if name is not None and w.dim() == 2 and self._name(x) is None:  # x @ W with W (d, p)
            out = func(x, self._weight(w))
            return self.tap(out, OpUse("matmul_t", {"weight": name}, x.detach(), find_place(self.module_names, "x @ W")))
        return None

    def _embedding(self, func, args, kwargs):
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        ids, w = bound.get("input"), bound.get("weight")
        wn = self._name(w)
        if wn is None or bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or \
                self._any_tracked((ids,), {}):
            tracked = self._any_tracked(args, kwargs)
            if tracked:
                self._note(tracked, "embedding")
            return func(*args, **kwargs)
        bound["weight"] = self._weight(w)
        out = func(**bound)
        pad = bound.get("padding_idx")
        if pad is not None and pad < 0:
            pad += w.shape[0]
        use = OpUse("embedding", {"weight": wn}, ids, find_place(self.module_names, "embedding"),
                    num_rows=w.shape[0], padding_idx=pad)
        return self.tap(out, use)
