"""Which sample each row of a flattened or routed activation belongs to.

Norm rules read activations batch-major: (B, T, d), slice b being sample b. Some models flatten tokens
before a layer (OPT: ``hidden_states.reshape(-1, d)`` before ``fc1``), and mixture-of-experts blocks go
further: the router sees (B·T, d) and each expert sees only the rows routed to it, ``hidden_states[idx]``.
The per-sample gradient of such a layer is still a sum over the rows of one sample; what is missing is the
map row -> sample. :class:`Rows` is that map, established only by proof, never guessed from a shape:

* a *batch-major flatten*: a contiguous view of a contiguous tensor whose dim 0 is the batch, covering it
  exactly (:func:`flatten_rows`): row i is sample ``i // per``;
* derived from a known map by an op that keeps or selects rows (``x[idx]``, ``F.linear``, elementwise ops,
  ``chunk`` on a later dim: :func:`follow_rows`, below).

:meth:`Rows.btd` turns rows into the (B, T', d) layout the factors use: a reshape for a flatten, and for
routed rows a zero-padded (B, C, d) with C the largest count of rows of one sample (zero rows add nothing
to Σ_t g_t a_tᵀ, so every factor form stays exact).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .uses import UseTracker



class Rows:
    """The sample of every row of an (n, ...) tensor: ``seg`` (n,) long in [0, B).

    ``per`` > 0 marks a batch-major flatten (``seg == arange(n) // per``): :meth:`btd` is then a reshape."""

    def __init__(self, seg: torch.Tensor, per: int = 0):
        self.seg = seg
        self.per = per
        self._layout: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = None

    @property
    def n(self) -> int:
        return int(self.seg.shape[0])

    def take(self, idx: torch.Tensor) -> "Rows":
        """The rows ``x[idx]`` of a tensor whose rows are ``self`` (idx: 1-D integer or boolean)."""
        return Rows(self.seg[idx])

    def same(self, other: "Rows") -> bool:
        return other is self or (other.n == self.n and bool(torch.equal(other.seg, self.seg)))

    def _padding(self, B: int):
        """(order, sample, position, C): row order[k] goes to [sample[k], position[k]] of a (B, C) grid."""
        if self._layout is None:
            seg = self.seg
            counts = torch.bincount(seg, minlength=B)  # (B,)
            C = int(counts.max()) if seg.numel() else 0
            order = torch.argsort(seg, stable=True)  # (n,)
            sample = seg[order]  # (n,) sorted
            starts = torch.cumsum(counts, 0) - counts  # (B,)
            position = torch.arange(seg.numel(), device=seg.device) - starts[sample]  # (n,)
            self._layout = (order, sample, position, C)
        return self._layout

    def btd(self, x: torch.Tensor, B: int, last: Optional[int] = None) -> torch.Tensor:
        """x (n, ..., d) -> (B, T', d) batch-major (d = ``last`` or x's last dim); padding rows are zero."""
        d = last if last is not None else x.shape[-1]
        if x.shape[0] != self.n:
            raise ValueError(f"a tensor of {x.shape[0]} rows for a row map of {self.n}")
        if self.per:
            return x.reshape(B, -1, d)
        m = x[0].numel() // d if self.n else 1
        xr = x.reshape(self.n, m, d)  # (n, m, d): m positions per row
        order, sample, position, C = self._padding(B)
        out = xr.new_zeros(B, C, xr.shape[1], d)  # (B, C, m, d)
        out[sample, position] = xr[order]
        return out.reshape(B, C * xr.shape[1], d)  # (B, C·m, d)


def flatten_rows(x: torch.Tensor, B: int) -> Optional[Rows]:
    """The rows of ``x`` when it is provably a batch-major flatten of a batch tensor, else None.

    Proof: ``x`` is a contiguous view covering exactly the memory of its base, the base is contiguous with
    dim 0 = B (the batch), and each row of ``x`` lies within one sample's slice of the base. (Only a view
    can be proven: a copy has no base. Call on the tensor the model computed with, not on a ``detach()``.)"""
    base = getattr(x, "_base", None)
    if base is None or B <= 0 or x.dim() < 1 or x.numel() == 0:
        return None
    if not (x.is_contiguous() and base.is_contiguous() and base.dim() >= 1 and base.shape[0] == B
            and x.data_ptr() == base.data_ptr() and x.numel() == base.numel()):
        return None
    per_sample = base.numel() // B
    row = x.numel() // x.shape[0]
    if row == 0 or per_sample % row:
        return None
    per = per_sample // row
    return Rows(torch.arange(x.shape[0], device=x.device) // per, per=per)


# -- following rows through ops ---------------------------------------------------------------------------

# ops that map row i of every row-carrying operand to row i of the output (broadcast operands aside)
_ROWWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sigmoid, torch.tanh, torch.relu, torch.exp,
    torch.clamp, torch.pow, torch.square, torch.abs, torch.where,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div, torch.Tensor.neg,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.Tensor.__neg__, torch.Tensor.__pow__, torch.Tensor.pow,
    torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.relu, torch.Tensor.exp, torch.Tensor.abs,
    torch.Tensor.clamp, torch.Tensor.clamp_min, torch.Tensor.clamp_max, torch.Tensor.square,
    torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double,
    torch.Tensor.type_as, torch.Tensor.contiguous, torch.Tensor.clone,
    F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, F.softplus, F.leaky_relu, F.elu, F.mish, F.hardswish, F.dropout,
}
_SPLITS = {torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split}
_RESHAPES = {torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.flatten, torch.Tensor.flatten,
             torch.Tensor.unsqueeze, torch.unsqueeze}


def tensors_of(args, kwargs) -> List[torch.Tensor]:
    out = []
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [t for t in v if isinstance(t, torch.Tensor)]
    return out


def _keeps_dim0(idx: Any, ndim: int) -> bool:
    """``x[idx]`` leaves dim 0 whole: a tuple of slices/None/Ellipsis with a full slice (or an Ellipsis
    that covers it) at dim 0, and no tensor or int index there."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx) or not idx:
        return False
    if idx[0] is Ellipsis:
        explicit = sum(1 for i in idx[1:] if i is not None and i is not Ellipsis)
        return explicit < ndim
    return isinstance(idx[0], slice) and idx[0] == slice(None)


def _rows_index(idx: Any) -> Optional[torch.Tensor]:
    """The 1-D index tensor that selects the output's rows in ``x[idx]`` (advanced indexing at dim 0, with
    any further index tensors broadcast alongside it: ``w[token_idx, top_k_pos, None]``), or None."""
    first = idx[0] if isinstance(idx, tuple) and idx else idx
    if not isinstance(first, torch.Tensor) or first.dim() != 1 or first.is_floating_point():
        return None
    if isinstance(idx, tuple):
        tensors = [i for i in idx if isinstance(i, torch.Tensor)]
        if any(t.shape != first.shape for t in tensors) or first.dtype == torch.bool and len(tensors) > 1:
            return None
        seen_other = False
        for i in idx[1:]:  # index tensors adjacent to the first, then basic indexing only
            if isinstance(i, torch.Tensor):
                if seen_other:
                    return None
            elif i is Ellipsis or isinstance(i, list):
                return None
            else:
                seen_other = True
    return first


_INPLACE_ROWWISE = {"add_", "sub_", "mul_", "div_", "neg_", "clamp_", "clamp_min_", "clamp_max_", "sigmoid_",
                    "tanh_", "relu_", "exp_", "pow_", "__iadd__", "__isub__", "__imul__", "__itruediv__"}


def _inplace(func) -> Optional[str]:
    name = getattr(func, "__name__", "")
    if name == "__setitem__" or name in _INPLACE_ROWWISE or (name.endswith("_") and not name.endswith("__")):
        return name
    return None


def _same_rows_or_broadcast(tracker: "UseTracker", rows: Rows, ndim: int, operands) -> bool:
    """Every operand either has ``rows`` or broadcasts without dim 0."""
    for t in operands:
        r = tracker.rows_of(t) if t.dim() > 0 else None
        if r is not None:
            if t.dim() != ndim or not rows.same(r):
                return False
        elif t.dim() >= ndim and t.shape[0] != 1:
            return False
    return True


def follow_rows(tracker: "UseTracker", func, args, kwargs, out) -> None:
    """Carry row -> sample maps from an op's inputs to its output (see the module docstring)."""
    name = _inplace(func)
    if name is not None and args and isinstance(args[0], torch.Tensor):
        # an in-place write into a tensor with a map keeps it only if it is row-wise (x.add_(y) with y on the
        # same rows, or broadcast); anything else (x[idx] = v, x.copy_(y), index_add_) may move rows: dropped
        target = args[0]
        rows = tracker.rows.get(target)
        if rows is not None and not (name in _INPLACE_ROWWISE and _same_rows_or_broadcast(
                tracker, rows, target.dim(), [t for t in tensors_of(args[1:], kwargs)])):
            del tracker.rows[target]
        return
    if func is torch.Tensor.__getitem__ and len(args) == 2 and isinstance(out, torch.Tensor):
        rows = tracker.rows_of(args[0])
        if rows is None or out.dim() == 0:
            return
        sel = _rows_index(args[1])
        if sel is not None:
            if out.shape[0] == sel.numel() or sel.dtype == torch.bool:
                tracker.rows[out] = rows.take(sel)
        elif _keeps_dim0(args[1], args[0].dim()) and out.shape[0] == rows.n:
            tracker.rows[out] = rows
        return
    if func in _SPLITS and isinstance(out, (tuple, list)) and args:
        x = args[0]
        rows = tracker.rows_of(x)
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        if rows is not None and isinstance(dim, int) and dim % x.dim() != 0:
            for o in out:
                tracker.rows[o] = rows
        return
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return
    if func in _RESHAPES and args:
        rows = tracker.rows_of(args[0])
        if rows is not None and out.shape[0] == rows.n and args[0].shape[0] == rows.n:
            tracker.rows[out] = rows  # row-major order is kept: row i stays row i when dim 0 does
        return
    if func in (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
        rows = tracker.rows_of(x)
        if rows is not None and isinstance(w, torch.Tensor) and w.dim() <= 2 and x.dim() >= 2 \
                and out.shape[0] == rows.n and tracker.rows_of(w) is None:
            tracker.rows[out] = rows
        return
    if func not in _ROWWISE:
        return
    operands = tensors_of(args, kwargs)
    rows = next((r for r in (tracker.rows_of(t) for t in operands if t.dim() > 0) if r is not None), None)
    # (an operand whose rows are unknown and that does not broadcast over dim 0: no proof)
    if rows is not None and out.shape[0] == rows.n and _same_rows_or_broadcast(tracker, rows, out.dim(), operands):
        tracker.rows[out] = rows
