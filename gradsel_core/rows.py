"""Which sample each row of a flattened or routed activation belongs to.

Norm rules read activations batch-major: (B, T, d), slice b being sample b. Some models flatten tokens
before a layer (OPT: ``hidden_states.reshape(-1, d)`` before ``fc1``), and mixture-of-experts blocks go
further: the router sees (B·T, d) and each expert sees only the rows routed to it, ``hidden_states[idx]``.
The per-sample gradient of such a layer is still a sum over the rows of one sample; what is missing is the
map row -> sample. :class:`Rows` is that map, established only by proof, never guessed from a shape:

* a *batch-major flatten*: a contiguous view of a contiguous tensor whose dim 0 is the batch, covering it
  exactly (:func:`flatten_rows`): row i is sample ``i // per``;
* derived from a known map by an op that keeps or selects rows (``x[idx]``, ``F.linear``, elementwise ops,
  ``chunk`` on a later dim: ``gradsel_core.backends.uses``).

:meth:`Rows.btd` turns rows into the (B, T', d) layout the factors use: a reshape for a flatten, and for
routed rows a zero-padded (B, C, d) with C the largest count of rows of one sample (zero rows add nothing
to Σ_t g_t a_tᵀ, so every factor form stays exact).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


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
