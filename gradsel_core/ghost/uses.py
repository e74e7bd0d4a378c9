"""Every use of every selected parameter, accounted for.

A norm rule describes one module's forward. It silently misses a parameter's gradient when the parameter
is also used outside its owner's call (``logits = h @ self.wte.weight.T``, ``F.linear(h, self.lin.weight)``
next to ``self.lin(h)``, ``nn.MultiheadAttention`` reading ``out_proj.weight``), or when a subclass overrides
the ruled forward. Two mechanisms close that gap:

* **Stand-ins** (detection, ~free; ``gradsel_core.ghost.standins``): during the scored forward each selected parameter's slot in its
  module(s) holds a *stand-in*, a leaf sharing the parameter's storage. A module scored by a module-level
  rule or fallback gets the real parameter back for the duration of its own call. Any other access reads the
  stand-in, so the backward can ask autograd for the stand-ins' gradients: ``None`` (nothing to do, no
  matmul is run) unless the parameter had an unaccounted use.
* **Op uses** (handling): for parameters known to be used outside a module-level rule, a
  ``TorchFunctionMode`` sees every torch call. ``F.linear(x, W, b)``, ``x @ W.T`` / ``x @ W``, ``y + b``
  (a 1-D bias) and ``F.embedding(ids, W)`` on a stand-in, or on a slice ``P[e]`` of one (fused 3-D
  mixture-of-experts weights), become one more *use* of the parameter (its output is tapped, its factor is
  exact, cross terms with the other uses are added). Any other op on a stand-in is recorded with its place
  (module and source line) and still reaches the stand-in, so it cannot go unnoticed.
* **Rows** (layout): the same mode keeps, for activations whose dim 0 is not the batch, the proven map row
  -> sample (``gradsel_core.ghost.rows``): from a batch-major flatten, through ops that keep or select rows
  (``x[idx]``, ``F.linear``, elementwise ops, ``chunk``/``split`` and slices on later dims, reshapes that keep
  dim 0). An op outside that list drops the map, and a use that needs it is then refused, never guessed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import LayoutError, UnsupportedModule
from ..factors import EmbRows, Factor, Grouped, Outer, RowSum, Sliced
from ..rules import as_btd
from .failures import RuleFailure
from .rows import Rows, flatten_rows, follow_rows

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    kind: str  # "linear" (y = x Wᵀ + b), "matmul_t" (y = x W, W stored (d, p)), "bias" (y = z + b), "embedding"
    params: Dict[str, str]  # role ("weight" / "bias") -> global parameter name
    x: Optional[torch.Tensor]  # input (B, ..., d) or ids (B, T); None for "bias"
    place: Place
    num_rows: int = 0  # embedding V
    padding_idx: Optional[int] = None
    rows: Optional[Rows] = None  # x's (and the output's) row -> sample map when dim 0 is not the batch
    slices: Dict[str, Tuple[int, Tuple[int, ...]]] = field(default_factory=dict)  # role -> (index, P's shape)
    # for a use of a slice P[index]
    groups: Optional[Tuple[torch.Tensor, int]] = None  # (expert of each row (n,), E): a fused (E, ...) weight
    # whose rows go to experts (grouped_mm, or a gathered bias b[expert_ids])
    shape: Tuple[int, ...] = ()  # the parameter's shape (grouped uses)


def _getter_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", "") if type(func).__name__ == "method-wrapper" else ""


_TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose}

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_INPLACE_ADDS = {torch.Tensor.add_, torch.Tensor.__iadd__}
# grouped matmuls over experts (transformers' default "grouped_mm" experts implementation)
_GROUPED = {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}


def _scalar_index(idx: Any) -> Optional[int]:
    """``e`` when ``P[idx]`` picks one entry of dim 0: a Python int or a 0-d integer tensor."""
    if isinstance(idx, bool):
        return None
    if isinstance(idx, int):
        return idx
    if isinstance(idx, torch.Tensor) and idx.dim() == 0 and not idx.is_floating_point() and idx.dtype != torch.bool:
        return int(idx)
    return None


class UseTracker(TorchFunctionMode):
    """Turns ops on tracked stand-ins into uses; records the place of any other op on them.

    ``tap(out, use)`` routes a recognised op's output through the capture's tap and returns it;
    ``tracked`` maps id(stand-in) -> global name (the stand-ins stay alive in the capture)."""

    def __init__(self, tracked: Dict[int, str], tap: Callable[[torch.Tensor, OpUse], torch.Tensor],
                 module_names: Dict[int, str], batch_size: int, real: Optional[Mapping[int, torch.Tensor]] = None,
                 rows: Optional[WeakIdKeyDictionary] = None, follow_rows: bool = False):
        super().__init__()
        self.tracked = tracked
        # tensor -> Rows: the row -> sample map of activations whose dim 0 is not the batch (shared with the
        # capture's module hooks); follow_rows keeps the mode on for it even with nothing tracked
        self.rows = rows if rows is not None else WeakIdKeyDictionary()
        self.follow_rows = follow_rows
        # id(slice) -> (name, index, the slice kept alive, the stand-in it slices)
        self.sliced: Dict[int, Tuple[str, int, torch.Tensor, torch.Tensor]] = {}
        # id(gathered bias b[expert_ids]) -> (its use, the tensor kept alive): rows assigned where it is added
        self.gathered: Dict[int, Tuple[OpUse, torch.Tensor]] = {}
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
        if id(t) in self.sliced:
            _, index, _, stand_in = self.sliced[id(t)]
            return self.real[id(stand_in)][index]
        if base is None:
            return self.real[id(t)]
        return self.real[id(base)].transpose(-2, -1)  # a transposed view of the stand-in

    def _slice_of(self, t: Any) -> Optional[Tuple[str, int, Tuple[int, ...]]]:
        """(name, index, P's shape) when ``t`` is a slice ``P[index]`` of a tracked stand-in."""
        if not isinstance(t, torch.Tensor) or id(t) not in self.sliced:
            return None
        name, index, _, stand_in = self.sliced[id(t)]
        return name, index, tuple(stand_in.shape)

    def rows_of(self, t: Any) -> Optional[Rows]:
        """The proven row -> sample map of ``t`` (registered, or a batch-major flatten), or None."""
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        r = self.rows.get(t)
        if r is not None and r.n == t.shape[0]:
            return r
        if t.shape[0] != self.B:
            return flatten_rows(t, self.B)
        return None

    def _name(self, t: Any) -> Optional[str]:
        return self.tracked.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _weight_name(self, t: Any) -> Optional[str]:
        """The tracked parameter ``t`` is, or is a slice of."""
        n = self._name(t)
        if n is None and isinstance(t, torch.Tensor) and id(t) in self.sliced:
            n = self.sliced[id(t)][0]
        return n

    def _any_tracked(self, args, kwargs) -> List[str]:
        found = []
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor):
                n = self.tracked.get(id(v))
                if n is None and id(v) in self.transposed:
                    n = self.transposed[id(v)][0]
                if n is None and id(v) in self.sliced:
                    n = self.sliced[id(v)][0]
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
        if not self.tracked and not self.follow_rows:
            return func(*args, **kwargs)
        if self.tracked:
            out = self._use(func, args, kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        follow_rows(self, func, args, kwargs, out)
        return out

    def _use(self, func, args, kwargs):
        """A recognised use of a tracked parameter (its tapped output), or NotImplemented after noting
        any other op on one."""
        if func is F.linear:
            return self._linear(func, args, kwargs)
        if func is F.embedding:
            return self._embedding(func, args, kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2 and not kwargs:
            out = self._matmul(func, args)
            if out is not None:
                return out
        if func in _ADDS and len(args) == 2 and not kwargs:
            out = self._bias_add(func, args)
            if out is not None:
                return out
        if func in _GROUPED:
            out = self._grouped(func, args, kwargs)
            if out is not None:
                return out
        if (func in _ADDS or func in _INPLACE_ADDS) and len(args) == 2 and self.gathered:
            for mine, other in ((args[0], args[1]), (args[1], args[0])):
                if isinstance(mine, torch.Tensor) and id(mine) in self.gathered and \
                        self.gathered[id(mine)][1] is mine:  # z + b[expert_ids]: the bias rows are z's rows
                    use = self.gathered[id(mine)][0]
                    use.rows = self.rows_of(other) if isinstance(other, torch.Tensor) and \
                        other.shape[0] == mine.shape[0] else None
                    if use.rows is not None:
                        self.rows[mine] = use.rows
        getter = _getter_name(func)
        if getter in ("T", "mT") or func in _TRANSPOSES:
            src = self._name(args[0]) if args else None
            if src is not None and args[0].dim() in (2, 3) and (getter in ("T", "mT") and args[0].dim() == 2
                                                                 or getter == "mT"
                                                                 or self._is_full_transpose(func, args, kwargs)):
                out = func(*args, **kwargs)
                self.transposed[id(out)] = (src, out, args[0])
                return out
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            src = self._name(args[0])
            index = _scalar_index(args[1])
            if src is not None and index is not None and args[0].dim() >= 2:
                out = func(*args, **kwargs)  # P[e]: one expert's weight (or bias)
                self.sliced[id(out)] = (src, index, out, args[0])
                return out
            idx = args[1]
            if src is not None and args[0].dim() == 2 and isinstance(idx, torch.Tensor) and idx.dim() == 1 \
                    and not idx.is_floating_point() and idx.dtype != torch.bool:
                # b[expert_ids]: a fused expert bias (E, p) gathered per row
                out = self._weight(args[0])[idx]
                use = OpUse("gather", {"bias": src}, None, find_place(self.module_names, "bias[expert_ids]"),
                            groups=(idx.detach(), args[0].shape[0]), shape=tuple(args[0].shape))
                out = self.tap(out, use)
                self.gathered[id(out)] = (use, out)
                return out
        if getter:  # .dtype, .shape, .device ...: no use
            return func(*args, **kwargs)
        names = self._any_tracked(args, kwargs)
        if names:
            self._note(names, getattr(func, "__name__", str(func)))
        return NotImplemented

    @staticmethod
    def _is_full_transpose(func, args, kwargs) -> bool:
        """Swaps the last two dims of a 2-D (``W.t()``) or 3-D (``P.transpose(-2, -1)``) parameter."""
        n = args[0].dim()
        if func in (torch.Tensor.t, torch.t):
            return n == 2
        dims = list(args[1:3]) + [kwargs.get(k) for k in ("dim0", "dim1") if k in kwargs]
        return len(dims) == 2 and all(isinstance(d, int) for d in dims) and \
            sorted(d % n for d in dims) == [n - 2, n - 1]

    def _grouped(self, func, args, kwargs):
        """``grouped_mm(x, W, offs=offs)``: rows offs[e-1]:offs[e] of x times expert e's weight, W (E, d, p)
        a stand-in (``x @ P[e]``) or the transposed view of one stored (E, p, d) (``x @ P[e]ᵀ``)."""
        names = ("mat_a", "mat_b", "offs", "bias", "out_dtype")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x, w, offs = bound.get("mat_a"), bound.get("mat_b"), bound.get("offs")
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or offs is None or bound.get("bias") is not None \
                or not isinstance(x, torch.Tensor) or x.dim() != 2 or self._weight_name(x) is not None:
            return None
        if id(w) in self.transposed:
            name, _, base = self.transposed[id(w)]
            kind, weight = "linear", self._weight(w, base)
        elif self._name(w) is not None:
            name, kind, weight = self._name(w), "matmul_t", self._weight(w)
        else:
            return None
        rows = self.rows_of(x)
        if rows is None:
            return None  # samples of the rows unknown: noted as an unrecognised op by the caller
        E = w.shape[0]
        expert = torch.searchsorted(offs.to(torch.long), torch.arange(x.shape[0], device=x.device), right=True)
        extra = {"out_dtype": bound["out_dtype"]} if bound.get("out_dtype") is not None else {}
        out = func(x, weight, offs=offs, **extra)
        shape = tuple(self.transposed[id(w)][2].shape) if kind == "linear" else tuple(w.shape)
        use = OpUse(kind, {"weight": name}, x.detach(), find_place(self.module_names, "grouped_mm"), rows=rows,
                    groups=(expert, E), shape=shape)
        return self._keep_rows(self.tap(out, use), rows)

    def _linear(self, func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        wn, bn = self._weight_name(w), self._weight_name(b)
        others = [n for n in self._any_tracked((x,), {}) if n not in (wn, bn)]
        rows = self.rows_of(x)
        slices = {role: sl for role, sl in (("weight", self._slice_of(w)), ("bias", self._slice_of(b))) if sl}
        if (wn is None and bn is None) or others or not isinstance(x, torch.Tensor) or x.dim() < 2 or \
                (slices and rows is None and x.dim() == 2):
            # (a slice on (n, d) rows of unknown samples: refused, since n == B can be a coincidence)
            names = self._any_tracked(args, kwargs)
            if names:
                self._note(names, "linear")
            out = func(*args, **kwargs)
            follow_rows(self, func, args, kwargs, out)
            return out
        out = func(x, self._weight(w) if wn else w, self._weight(b) if bn is not None else b)
        roles = {}
        if wn:
            roles["weight"] = wn
        if bn:
            roles["bias"] = bn
        use = OpUse("linear", roles, x.detach(), find_place(self.module_names, "linear"), rows=rows,
                    slices={r: (sl[1], sl[2]) for r, sl in slices.items()})
        return self._keep_rows(self.tap(out, use), rows)

    def _keep_rows(self, out: torch.Tensor, rows: Optional[Rows]) -> torch.Tensor:
        if rows is not None and isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == rows.n:
            self.rows[out] = rows
        return out

    def _matmul(self, func, args):
        x, w = args
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() < 2:
            return None
        rows = self.rows_of(x)
        if id(w) in self.transposed and w.dim() == 2:  # x @ W.T with W (p, d): the Linear form
            name, _, base = self.transposed[id(w)]
            out = func(x, self._weight(w, base))
            use = OpUse("linear", {"weight": name}, x.detach(), find_place(self.module_names, "x @ W.T"), rows=rows)
            return self._keep_rows(self.tap(out, use), rows)
        name = self._weight_name(w)
        sl = self._slice_of(w)
        if sl is not None and rows is None and x.dim() == 2:
            return None
        if name is not None and w.dim() == 2 and self._weight_name(x) is None:  # x @ W with W (d, p)
            out = func(x, self._weight(w))
            use = OpUse("matmul_t", {"weight": name}, x.detach(), find_place(self.module_names, "x @ W"), rows=rows,
                        slices={"weight": (sl[1], sl[2])} if sl else {})
            return self._keep_rows(self.tap(out, use), rows)
        return None

    def _bias_add(self, func, args):
        """``z + b`` (or ``b + z``) with b a tracked 1-D bias (or a slice of one) over z's last dim."""
        a, c = args
        z, b = (a, c) if self._weight_name(c) is not None else (c, a)
        name = self._weight_name(b)
        if name is None or not isinstance(z, torch.Tensor) or self._weight_name(z) is not None or b.dim() != 1 \
                or z.dim() < 2 or z.shape[-1] != b.shape[0] or not z.is_floating_point():
            return None
        rows = self.rows_of(z)
        sl = self._slice_of(b)
        if sl is not None and rows is None and z.dim() == 2:
            return None
        out = z + self._weight(b)
        use = OpUse("bias", {"bias": name}, None, find_place(self.module_names, "+ bias"), rows=rows,
                    slices={"bias": (sl[1], sl[2])} if sl else {})
        return self._keep_rows(self.tap(out, use), rows)

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


# -- the factors of an op use ------------------------------------------------------------------------------


def use_factors(use: OpUse, G: torch.Tensor, B: int) -> Dict[str, Factor]:
    """The factors of one recognised op use (see ``uses.OpUse``)."""
    try:
        if use.kind == "embedding":
            ids = use.x
            if ids.dim() == 0 or ids.shape[0] != B:
                raise UnsupportedModule(f"ids of shape {tuple(ids.shape)} for a batch of {B}")
            ids = ids.reshape(B, -1)  # (B, T)
            return {"weight": EmbRows(ids, G.reshape(B, ids.shape[1], -1), use.num_rows, use.padding_idx)}
        if use.groups is not None:
            return grouped_factors(use, G, B)
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


def grouped_factors(use: OpUse, G: torch.Tensor, B: int) -> Dict[str, Factor]:
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
