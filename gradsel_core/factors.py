"""Factored per-sample gradients.

A norm rule never materialises a per-sample gradient the size of a parameter. It returns a *factor*: a
compact description of sample b's gradient for one use of one parameter, from which the ghost engine
computes

* ``sq_norm()``       ||∇_b||² for every sample b                         -> (B,)
* ``inner(other)``    ⟨∇_b^u, ∇_b^v⟩ between two uses of a shared parameter -> (B,)
* ``dot(V)``          ⟨∇_b, V_r⟩ against references V (R, *shape)         -> (B, R)
* ``weighted_sum(w)`` Σ_b w_b ∇_b, the masked batch gradient             -> parameter shape

Forms (notation of ``docs/norm-math.md``: A (B,T,d) inputs, G (B,T,p) output gradients):

* ``Dense(g)``                 g (B, *shape) explicit (fallback results, tiny parameters)
* ``RowSum(G, X=None)``        Σ_t g_t, or Σ_t x_t ⊙ g_t (bias, LayerNorm/RMSNorm weights)
* ``Outer(A, G)``              Σ_t g_t a_tᵀ (p, d); ``transposed``: Σ_t a_t g_tᵀ (d, p) (HF Conv1D)
* ``EmbRows(ids, G, V)``       Σ_t e_{x_t} g_tᵀ (V, d); ``transposed``: its transpose (d, V)
* ``Stacked(parts, dim)``      blocks concatenated along ``dim`` (MultiheadAttention ``in_proj_weight``)
* ``Grouped(part, B, E, shape)`` a fused expert weight whose rows go to experts (``grouped_mm``)
* ``Sliced(part, index, shape)`` the gradient of one slice ``P[index]`` of a parameter, zero elsewhere
                               (fused 3-D expert weights: ``F.linear(x, P[e])``)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import dispatch


def _acc(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def gram_is_cheaper(T: int, d: int, p: int) -> bool:
    """The cost rule for a Linear-like call, decided per call since T changes between batches.

    Gram ("ghost") form Σ_{t,s}(a_t·a_s)(g_t·g_s): B·T²·(d+p) multiply-adds and B·T² memory.
    Direct form ||AᵀG||²_F: B·T·d·p multiply-adds and d·p memory per sample (chunked over samples).
    The Gram form wins iff T·(d+p) < d·p (e.g. d = p = 4096: T < 2048; LoRA r = 16, d = 4096: T < 16).
    """
    return T * (d + p) < d * p


class Factor:
    """Base class: see the module docstring."""

    shape: Tuple[int, ...]

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """(B, *shape) explicit per-sample gradients (only for rare cross terms and tests)."""
        raise NotImplementedError

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Σ_k w_k ∇_{index_k} (all samples when ``index`` is None), in the parameter's shape."""
        raise NotImplementedError

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        """⟨∇_b, V_r⟩ for every sample b and reference r: V (R, *shape) -> (B, R). Linear in the gradient, so
        the uses of a shared parameter just add (no cross terms)."""
        g = self.dense()
        acc = _acc(g, V)
        return torch.einsum("b...,r...->br", g.to(acc), V.to(acc))

    def inner(self, other: "Factor") -> torch.Tensor:
        fn = _INNER.get((type(self), type(other)))
        if fn is not None:
            out = fn(self, other)
            if out is not None:
                return out
        fn = _INNER.get((type(other), type(self)))
        if fn is not None:
            out = fn(other, self)
            if out is not None:
                return out
        a, b = self.dense(), other.dense()
        acc = _acc(a, b)
        return (a.to(acc) * b.to(acc)).flatten(1).sum(1)


@dataclass
class Dense(Factor):
    g: torch.Tensor  # (B, *shape)

    @property
    def shape(self):
        return tuple(self.g.shape[1:])

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        return self.g.to(_acc(self.g)).pow(2).flatten(1).sum(1)

    def dense(self) -> torch.Tensor:
        return self.g

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        g = self.g if index is None else self.g[index]
        return torch.einsum("b,b...->...", w.to(_acc(g)), g.to(_acc(g)))


@dataclass
class RowSum(Factor):
    G: torch.Tensor  # (B, T, p)
    X: Optional[torch.Tensor] = None  # (B, T, p) or None
    shape: Tuple[int, ...] = ()

    def __post_init__(self):
        if not self.shape:
            self.shape = (self.G.shape[-1],)

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        if self.X is None:
            return dispatch.rowsum_sq(self.G, use_triton)
        return dispatch.weighted_rowsum_sq(self.X, self.G, use_triton)

    def _rows(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        G = self.G if index is None else self.G[index]
        acc = _acc(G)
        if self.X is None:
            return G.to(acc)
        X = self.X if index is None else self.X[index]
        return X.to(acc) * G.to(acc)  # (B, T, p)

    def dense(self) -> torch.Tensor:
        return self._rows().sum(1).reshape(-1, *self.shape)  # (B, *shape)

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = self._rows(index)
        return torch.einsum("b,btp->p", w.to(rows.dtype), rows).reshape(self.shape)

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        rows = self._rows().sum(1)  # (B, p)
        return rows @ V.reshape(V.shape[0], -1).to(rows.dtype).t()  # (B, R)


@dataclass
class Outer(Factor):
    A: torch.Tensor  # (B, T, d)
    G: torch.Tensor  # (B, T, p)
    transposed: bool = False  # False: gradient (p, d) as nn.Linear; True: (d, p) as HF Conv1D

    @property
    def shape(self):
        d, p = self.A.shape[-1], self.G.shape[-1]
        return (d, p) if self.transposed else (p, d)

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        _, T, d = self.A.shape
        if gram_is_cheaper(T, d, self.G.shape[-1]):
            return dispatch.ghost_sq(self.A, self.G, use_triton)
        return dispatch.direct_sq(self.A, self.G, use_triton)

    def dense(self) -> torch.Tensor:
        acc = _acc(self.A, self.G)
        g = torch.einsum("btp,btd->bpd", self.G.to(acc), self.A.to(acc))  # (B, p, d)
        return g.transpose(1, 2) if self.transposed else g

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        """Σ_t g_tᵀ V a_t per sample: one forward-sized product (A Vᵀ) per reference, no per-sample gradient."""
        acc = _acc(self.A, self.G, V)
        A, G = self.A.to(acc), self.G.to(acc)  # (B, T, d), (B, T, p)
        out = []
        for v in V.to(acc):  # (p, d), or (d, p) transposed
            av = A @ v if self.transposed else A @ v.t()  # (B, T, p)
            out.append((av * G).sum(dim=(1, 2)))  # (B,)
        return torch.stack(out, 1)  # (B, R)

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        acc = _acc(self.A, self.G)
        A, G = (self.A, self.G) if index is None else (self.A[index], self.G[index])
        G = G.to(acc) * w.to(acc)[:, None, None]  # (K, T, p)
        A = A.to(acc)  # (K, T, d)
        g = G.reshape(-1, G.shape[-1]).t() @ A.reshape(-1, A.shape[-1])  # (p, d): one matmul
        return g.t() if self.transposed else g


@dataclass
class EmbRows(Factor):
    ids: torch.Tensor  # (B, T) long
    G: torch.Tensor  # (B, T, d), zero at padding_idx rows
    num_rows: int  # V
    padding_idx: Optional[int] = None
    transposed: bool = False  # True: the parameter is stored (d, V), e.g. PEFT lora_embedding_A

    @property
    def shape(self):
        d = self.G.shape[-1]
        return (d, self.num_rows) if self.transposed else (self.num_rows, d)

    def _g(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        G, ids = (self.G, self.ids) if index is None else (self.G[index], self.ids[index])
        g = G.to(_acc(G))
        if self.padding_idx is not None:
            g = g * (ids != self.padding_idx).unsqueeze(-1).to(g.dtype)
        return g  # (B, T, d)

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        return dispatch.embedding_sq(self.ids, self.G, self.padding_idx, use_triton)

    def dense(self) -> torch.Tensor:
        g = self._g()
        B, T, d = g.shape
        out = torch.zeros(B, self.num_rows, d, dtype=g.dtype, device=g.device)
        out.scatter_add_(1, self.ids.long().unsqueeze(-1).expand(B, T, d), g)  # (B, V, d)
        return out.transpose(1, 2) if self.transposed else out

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        """Σ_t g_t · V[x_t] per sample (rows gathered at the ids; padding rows have zero g)."""
        g = self._g()  # (B, T, d)
        acc = g.dtype
        out = []
        for v in V.to(acc):
            rows = v.t() if self.transposed else v  # (V, d)
            out.append((rows[self.ids.long()] * g).sum(dim=(1, 2)))  # (B,)
        return torch.stack(out, 1)  # (B, R)

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        ids = self.ids if index is None else self.ids[index]
        g = self._g(index) * w.to(_acc(self.G))[:, None, None]  # (K, T, d)
        d = g.shape[-1]
        out = torch.zeros(self.num_rows, d, dtype=g.dtype, device=g.device)
        out.index_add_(0, ids.reshape(-1).long(), g.reshape(-1, d))  # (V, d)
        return out.t() if self.transposed else out


@dataclass
class Stacked(Factor):
    """Per-sample gradients of a parameter made of blocks along ``dim`` (nn.MultiheadAttention's
    ``in_proj_weight`` = [W_q; W_k; W_v]): disjoint blocks, so the squared norm is the sum of the parts'."""

    parts: Tuple[Factor, ...]
    dim: int = 0

    @property
    def shape(self):
        shapes = [tuple(p.shape) for p in self.parts]
        out = list(shapes[0])
        out[self.dim] = sum(s[self.dim] for s in shapes)
        return tuple(out)

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        total = None
        for p in self.parts:
            sq = p.sq_norm(use_triton)
            total = sq if total is None else total + sq
        return total

    def dense(self) -> torch.Tensor:
        return torch.cat([p.dense() for p in self.parts], dim=1 + self.dim)

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat([p.weighted_sum(w, index) for p in self.parts], dim=self.dim)

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        sizes = [p.shape[self.dim] for p in self.parts]
        total = None
        for part, v in zip(self.parts, V.split(sizes, dim=1 + self.dim)):
            d = part.dot(v)
            total = d if total is None else total + d
        return total


@dataclass
class Sliced(Factor):
    """One use of the slice ``P[index]`` of a parameter ``P`` of shape ``shape`` (mixture-of-experts weights
    fused as (E, p, d)): ``part`` describes the slice's gradient; every other slice gets none from this use.
    Uses of different slices are orthogonal, so their cross terms vanish."""

    part: Factor
    index: int
    shape: Tuple[int, ...] = ()

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        return self.part.sq_norm(use_triton)

    def dense(self) -> torch.Tensor:
        g = self.part.dense()  # (B, *slice)
        out = g.new_zeros(g.shape[0], *self.shape)
        out[:, self.index] = g
        return out

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        g = self.part.weighted_sum(w, index)
        out = g.new_zeros(self.shape)
        out[self.index] = g
        return out

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        return self.part.dot(V[:, self.index])


@dataclass
class Grouped(Factor):
    """One use of a fused expert weight P (E, *slice) whose rows each go to one expert (``grouped_mm``).
    ``part`` is the factor over B·E pseudo-samples, pseudo-sample b·E + e holding sample b's rows routed to
    expert e (an ``Outer``, zero-padded): sample b's gradient of slice e is pseudo-sample b·E + e's, so
    ||∇_b||² = Σ_e ||∇_{b,e}||²."""

    part: "Outer"
    B: int
    E: int
    shape: Tuple[int, ...] = ()

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        return self.part.sq_norm(use_triton).view(self.B, self.E).sum(1)

    def dense(self) -> torch.Tensor:
        return self.part.dense().reshape(self.B, *self.shape)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.B, self.E, *t.shape[1:])  # (B·E, C, k) -> (B, E, C, k)

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        p = self.part
        acc = _acc(p.A, p.G)
        A, G = self._split(p.A).to(acc), self._split(p.G).to(acc)  # (B, E, C, d), (B, E, C, p)
        if index is not None:
            A, G = A[index], G[index]
        g = torch.einsum("k,kecp,kecd->epd", w.to(acc), G, A)  # (E, p, d)
        return g.transpose(1, 2) if p.transposed else g

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        p = self.part
        acc = _acc(p.A, p.G, V)
        A, G = self._split(p.A).to(acc), self._split(p.G).to(acc)  # (B, E, C, d), (B, E, C, p)
        out = []
        for v in V.to(acc):  # (E, p, d), or (E, d, p) transposed
            av = torch.einsum("becd,edp->becp", A, v) if p.transposed else torch.einsum("becd,epd->becp", A, v)
            out.append((av * G).sum(dim=(1, 2, 3)))  # (B,)
        return torch.stack(out, 1)  # (B, R)


def weighted_total(factors, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ over the uses of one parameter of Σ_k w_k ∇_{index_k}: the masked batch gradient. A sliced use
    adds into its slice only (no full-size temporary per expert)."""
    total = None
    for f in factors:
        if isinstance(f, Sliced):
            part = f.part.weighted_sum(w, index)
            if total is None:
                total = part.new_zeros(f.shape)
            total[f.index] += part.to(total.dtype)
            continue
        part = f.weighted_sum(w, index)
        total = part if total is None else total + part.to(total.dtype)
    return total


# -- cross terms between two uses of one parameter (return None to use the dense fallback) --------------


def _outer_outer(u: Outer, v: Outer):
    if u.transposed != v.transposed:
        return None
    acc = _acc(u.A, u.G, v.A, v.G)
    aa = torch.bmm(u.A.to(acc), v.A.to(acc).transpose(1, 2))  # (B, Tu, Tv)
    gg = torch.bmm(u.G.to(acc), v.G.to(acc).transpose(1, 2))  # (B, Tu, Tv)
    return (aa * gg).sum(dim=(1, 2))  # ⟨A_u A_vᵀ, G_u G_vᵀ⟩_F


def _emb_emb(u: EmbRows, v: EmbRows):
    if u.transposed != v.transposed:
        return None
    same = (u.ids.unsqueeze(2) == v.ids.unsqueeze(1)).to(_acc(u.G, v.G))  # (B, Tu, Tv)
    gg = torch.bmm(u._g(), v._g().transpose(1, 2))  # (B, Tu, Tv)
    return (same * gg).sum(dim=(1, 2))  # Σ_{t,s}[x_t = y_s](g_t·h_s)


def _emb_outer(e: EmbRows, o: Outer):
    """Tied embedding (V, d) and LM head (V, d): Σ_{t,s} z_s[x_t]·(δ_t·h_s) (norm-math.md)."""
    if e.transposed or o.transposed or o.G.shape[-1] != e.num_rows:
        return None
    acc = _acc(e.G, o.A, o.G)
    B, Tt = e.ids.shape
    Ts = o.G.shape[1]
    z_at_x = o.G.to(acc).gather(2, e.ids.long().unsqueeze(1).expand(B, Ts, Tt))  # (B, Ts, Tt): z_s[x_t]
    dh = torch.bmm(e._g(), o.A.to(acc).transpose(1, 2))  # (B, Tt, Ts): δ_t·h_s
    return (z_at_x.transpose(1, 2) * dh).sum(dim=(1, 2))


def _dense_any(dn: Dense, other: Factor):
    a, b = dn.g, other.dense()
    acc = _acc(a, b)
    return (a.to(acc) * b.to(acc)).flatten(1).sum(1)


def _stacked_stacked(u: Stacked, v: Stacked):
    if u.dim != v.dim or [p.shape for p in u.parts] != [p.shape for p in v.parts]:
        return None
    total = None
    for a, b in zip(u.parts, v.parts):
        t = a.inner(b)
        total = t if total is None else total + t
    return total


def _grouped_grouped(u: Grouped, v: Grouped):
    if u.E != v.E or u.B != v.B:
        return None
    t = u.part.inner(v.part)  # (B·E,): per pseudo-sample
    return t.view(u.B, u.E).sum(1)


def _sliced_sliced(u: Sliced, v: Sliced):
    if u.index != v.index:  # disjoint slices
        t = _tensor_of(u.part)
        return torch.zeros(t.shape[0], dtype=_acc(t), device=t.device)
    return u.part.inner(v.part)


def _tensor_of(f: Factor) -> torch.Tensor:
    for attr in ("G", "g", "A"):
        t = getattr(f, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(f, Stacked):
        return _tensor_of(f.parts[0])
    if isinstance(f, Sliced):
        return _tensor_of(f.part)
    return f.dense()


_INNER: Dict[Tuple[type, type], Callable[[Any, Any], Optional[torch.Tensor]]] = {
    (Grouped, Grouped): _grouped_grouped,
    (Sliced, Sliced): _sliced_sliced,
    (Stacked, Stacked): _stacked_stacked,
    (Outer, Outer): _outer_outer,
    (EmbRows, EmbRows): _emb_emb,
    (EmbRows, Outer): _emb_outer,
    (Dense, Dense): _dense_any,
}
