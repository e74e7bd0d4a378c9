"""The fused LM head: chunked Linear head + token cross-entropy + per-sample norms, never B × T × V logits.

At LLM vocabularies (V = 128,256 for Llama 3, 151,936 for Qwen 2.5) the logits and their gradient dominate
the memory of a scored forward and backward. Write A = h[:, :-1] (B, T', d) for the head input at the positions
that predict a token, W (V, d) for the head weight and G (B, T', V) for the gradient of Σ_b L_b with respect
to the logits: G = c_{b,t} (softmax − onehot(target)), times the derivative of the final-logit soft-capping or
scaling. Two loops compute what the engine needs without ever holding G whole:

* **token loop** (``_row_pass``; one pass, rows × V logits at a time), used when no Gram over tokens is
  needed: a frozen head (LoRA: only the input gradient Σ G W) or the direct form of the head's norm. For the
  direct form, sample b's head gradient D_b = Σ_t g_t a_tᵀ (V, d) is accumulated over its token chunks, one
  sample at a time (the memory of one weight gradient, which a plain backward holds too): ||D_b||², ⟨D_b, V_r⟩
  and, for a head tied to the input embedding, its rows at the input ids U_{b,t} = D_b[x_t]. Three
  head-sized matmuls, like a plain forward + backward.
* **vocabulary loop** (``_vocab_pass``: two passes over tiles of r token rows × c vocabulary columns, sized by
  ``tile_sizes`` from TILE_ELEMENTS), used for the Gram form (T' (d + V) < d V): pass 1 is the online
  log-sum-exp per token block; pass 2 forms G of each tile and accumulates Σ_c G_c W_c, the Gram Σ_c G_c G_cᵀ
  (norm ⟨AAᵀ, GGᵀ⟩) over groups of whole samples, a bias's Σ_t g_t, the reference dots Σ_t g_t·(V_c a_t), and
  the tied rows through P[b, s, t] = G_b[s, x_t] (U = Pᵀ A); a sample longer than a token block gets its
  gradient by vocabulary blocks D_c = Σ_k G_{k,c}ᵀ A_k instead. Four head-sized matmuls.

The cross term of a tied embedding (ids x_t, output gradients δ_t) with the head is Σ_t δ_t · U_t
(``docs/norm-math.md``). In filtered training the masked head gradient Σ_b m_b G_bᵀ A_b is recomputed chunk by
chunk for the kept samples only (pass 2 over ρ·B samples, with the stored log-sum-exp); in two-pass filtering
the ordinary second backward gets Σ_b w_b ∇_b of a trainable head from ``_HeadParamGrad``, computed the same way.

The path never runs the head's forward and stops its callers' forward at the head, so anything that would run
there (hooks on the head, global module hooks, an instance-level ``forward``, forward or backward hooks on a module
whose forward calls the head) makes it step aside (``hooks_on``, ``ancestor_hooks``). And, like a rule, it checks
itself once per model (``check_model``): the model's own logits on a slice of the batch must be the known final step
applied to the head's output, on the head's input read as (B, T, d).

c_{b,t} is 1/n_b (``loss_reduction="mean"``, n_b the sample's target tokens) or 1 (``"sum"``), 0 where the
label is -100 and at the last position. The head's forward never runs: a pre-hook on it takes its input h and
stops the model's forward there (nothing after the head is needed: the library's loss is computed here).
Hence the path is used only for models whose computation after the head is known (``HEADS``): plain logits,
Gemma 2's final soft-capping z = s·tanh(y/s) (dz/dy = 1 − (z/s)²) and Cohere's scaling z = s·y; any other
model, a custom ``loss_fn``, a head that is not exactly ``nn.Linear`` (a LoRA-wrapped head) keeps today's
path, with the reason in ``GradNormEngine.coverage()``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .. import dispatch
from ..batching import IGNORE_INDEX
from ..factors import _INNER, EmbRows, Factor, gram_is_cheaper

log = logging.getLogger(__name__)

# model_type -> what the model's forward does to the head's output before returning the logits
HEADS: Dict[str, str] = {
    "gpt2": "none", "llama": "none", "mistral": "none", "qwen2": "none", "qwen3": "none", "gemma": "none",
    "phi3": "none", "gemma2": "softcap", "cohere": "scale",
}
# auto: used when the vocabulary and the logits the full-logits path would hold (B·T·V elements) are at least
# this large. From ``benchmarks/bench_head.py --cases`` over V 2,048-32,000 and B·T 512-2,048 (one thread,
# glibc's default allocator, head-20261203T154901Z): a frozen head (LoRA; the one-pass token loop, two
# head-sized matmuls like a plain forward+backward) was faster than the full-logits path in all 10 cases,
# from V = 2,048 and 2^21 logits up; a trainable head (three or four head-sized matmuls) in all 3 cases from
# 2^24 logits, and in 3 of the 7 below (slower in 4, by up to 14%).
MIN_VOCAB = {"frozen": 2048, "trainable": 4096}
MIN_LOGITS = {"frozen": 1 << 21, "trainable": 1 << 24}  # B·T·V: 8 MiB / 64 MiB of fp32 logits

# the memory budget of the vocabulary loop: elements of one (token block × vocabulary block) tile (a few such
# tensors are alive at once: the logits, their gradient, a reference's products), at least MIN_CHUNK vocabulary
# columns per tile; and elements of the Gram buffers (K, T', T') of a group of K samples (at least one sample)
TILE_ELEMENTS = 1 << 22
MIN_CHUNK = 256
GRAM_ELEMENTS = 1 << 24
# elements of one (tokens × V) logits chunk of the one-pass token loop (``_row_pass``)
ROW_CHUNK_ELEMENTS = 1 << 23


def pays(vocab: int, tokens: int, trainable: bool) -> bool:
    """``fused_head=None``'s rule: whether the fused head is used at this vocabulary and B·T (``tokens``), for a
    head whose parameters are scored (``trainable``) or not."""
    kind = "trainable" if trainable else "frozen"
    return vocab >= MIN_VOCAB[kind] and tokens * vocab >= MIN_LOGITS[kind]


def tile_sizes(rows: int, V: int, d: int, chunk: Optional[int] = None, block: Optional[int] = None) -> Tuple[int, int]:
    """(vocabulary block c, token block r) of the vocabulary loop for ``rows`` token rows: r · c ≤ TILE_ELEMENTS
    where the budget allows c ≥ MIN_CHUNK (all rows in one block while they fit, then blocks of rows)."""
    if chunk is None:
        chunk = max(MIN_CHUNK, min(V, TILE_ELEMENTS // max(1, rows, d)))
    chunk = max(1, min(V, chunk))
    if block is None:
        block = TILE_ELEMENTS // chunk
    return chunk, max(1, min(max(rows, 1), block))


@dataclass
class HeadSpec:
    """A model's LM head as the fused path sees it."""

    module: nn.Linear
    name: str  # the head module's name in the model
    post: str  # "none" | "softcap" | "scale"
    value: float = 1.0  # the soft-capping s or the logit scale s
    vocab: int = 0


def _base(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # PEFT
    return get() if callable(get) else model


def find_head(model: nn.Module) -> Tuple[Optional[HeadSpec], str]:
    """The model's fusable LM head, or (None, why not)."""
    from ..models import TinyGPT

    base = _base(model)
    if isinstance(base, TinyGPT):
        post, value = "none", 1.0
    else:
        cfg = getattr(base, "config", None)
        mtype = getattr(cfg, "model_type", None)
        cls = type(base).__name__
        if mtype not in HEADS or not cls.endswith(("ForCausalLM", "LMHeadModel")):
            return None, (f"{cls} (model_type {mtype!r}) is not a causal LM whose computation after the head "
                          f"is known ({sorted(HEADS)})")
        post = HEADS[mtype]
        value = 1.0
        if post == "softcap":
            cap = getattr(cfg, "final_logit_softcapping", None)
            post, value = ("none", 1.0) if cap is None else ("softcap", float(cap))
        elif post == "scale":
            value = float(getattr(cfg, "logit_scale", 1.0))
    get_out = getattr(base, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else getattr(base, "lm_head", None)
    if type(head) is not nn.Linear:
        return None, f"the output head is {type(head).__name__}, not exactly nn.Linear (e.g. a LoRA-wrapped head)"
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None:
        return None, "the output head is not a submodule of the model"
    return HeadSpec(head, name, post, value, head.out_features), ""


# -- the chunk loop --------------------------------------------------------------------------------------


@dataclass
class HeadCore:
    """What the chunk loop needs to (re)compute the logit gradient of any tile (a block of token rows × a block of
    the vocabulary) for any samples."""

    A: torch.Tensor  # (B, T', d) head input at the predicting positions (T' = T − 1), detached
    W: torch.Tensor  # (V, d) head weight, detached
    bias: Optional[torch.Tensor]  # (V,) or None
    target: torch.Tensor  # (B, T') int64, -100 where not counted
    coef: torch.Tensor  # (B, T') acc dtype: d(Σ_b L_b)/d(token loss)
    post: str
    value: float
    acc: torch.dtype
    lse: Optional[torch.Tensor] = None  # (B, T') acc, after pass 1
    chunk: int = 0  # vocabulary block c
    kernel: bool = False  # both passes ran in the Triton kernels (gradsel_kernels._head)
    block: int = 0  # token block r (rows of the flattened (B·T') tokens per tile); 0: TILE_ELEMENTS // chunk

    @property
    def V(self) -> int:
        return self.W.shape[0]

    def rows_per_tile(self, rows: int) -> int:
        return tile_sizes(rows, self.V, self.W.shape[1], self.chunk, self.block or None)[1]

    def logits(self, A: torch.Tensor, c0: int, c1: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(raw y, final z) of the chunk [c0, c1) in the accumulation dtype: (..., c) each. y is computed in
        the model's dtype, as the model's own head would."""
        y = A @ self.W[c0:c1].t()  # (..., c) model dtype
        if self.bias is not None:
            y = y + self.bias[c0:c1]
        y = y.to(self.acc)
        if self.post == "softcap":
            z = torch.tanh(y / self.value) * self.value
        elif self.post == "scale":
            z = y * self.value
        else:
            z = y
        return y, z

    def tile_grad(self, a: torch.Tensor, tgt: torch.Tensor, coef: torch.Tensor, lse: torch.Tensor, c0: int,
                  c1: int) -> torch.Tensor:
        """G of one tile: the gradient of Σ_b L_b w.r.t. the raw logits [c0, c1) of the token rows ``a`` (..., d)
        with their targets, coefficients and log-sum-exp (...,). Returns (..., c) in acc."""
        _, z = self.logits(a, c0, c1)  # a fresh tensor: overwritten in place by G
        deriv = 1 - (z / self.value) ** 2 if self.post == "softcap" else None
        g = z.sub_(lse.unsqueeze(-1)).exp_()  # (..., c) softmax
        local = tgt - c0
        inside = (local >= 0) & (local < c1 - c0)  # (...)
        g.scatter_add_(-1, local.clamp(0, c1 - c0 - 1).unsqueeze(-1), -inside.to(g.dtype).unsqueeze(-1))
        g.mul_(coef.unsqueeze(-1))
        if deriv is not None:
            g.mul_(deriv)
        elif self.post == "scale":
            g.mul_(self.value)
        return g

    def flat(self, index: Optional[torch.Tensor] = None):
        """(A (N, d), target (N,), coef (N,), lse (N,)) over the token rows of the samples ``index`` (all when
        None), N = K·T' rows, sample-major."""
        sel = (lambda x: x) if index is None else (lambda x: x[index])
        A, tgt, coef, lse = sel(self.A), sel(self.target), sel(self.coef), sel(self.lse)
        return A.reshape(-1, A.shape[-1]), tgt.reshape(-1), coef.reshape(-1), lse.reshape(-1)

    def tiles(self, index: Optional[torch.Tensor] = None) -> Iterator[Tuple[int, int, int, int, torch.Tensor]]:
        """Pass 2 over the tiles: (c0, c1, r0, r1, G (r, c)) for the flattened token rows [r0, r1) of the samples
        ``index`` (all when None; row n is sample n // T') and the vocabulary block [c0, c1); vocabulary outer."""
        A, tgt, coef, lse = self.flat(index)
        N = A.shape[0]
        r = self.rows_per_tile(N)
        for c0 in range(0, self.V, self.chunk):
            c1 = min(c0 + self.chunk, self.V)
            for r0 in range(0, N, r):
                r1 = min(r0 + r, N)
                yield c0, c1, r0, r1, self.tile_grad(A[r0:r1], tgt[r0:r1], coef[r0:r1], lse[r0:r1], c0, c1)


def _targets(labels: torch.Tensor, reduction: str, acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target (B, T−1), coef (B, T−1), tokens (B,)) as ``batching.causal_lm_losses`` defines the loss."""
    target = labels[:, 1:]  # (B, T−1): logits at t predict the label at t+1
    valid = target != IGNORE_INDEX
    tokens = valid.sum(1)  # (B,)
    coef = valid.to(acc)
    if reduction == "mean":
        coef = coef / tokens.clamp(min=1).to(acc).unsqueeze(1)
    return target, coef, tokens


def pass_lse(core: HeadCore) -> torch.Tensor:
    """Pass 1: per-token losses' parts, online over the vocabulary blocks, one token block at a time. Returns
    the per-sample losses (B,) (weighted by ``coef``, i.e. the library's per-sample loss) and stores the
    log-sum-exp in ``core``."""
    B, Tp, d = core.A.shape
    A = core.A.reshape(-1, d)  # (N, d)
    target = core.target.reshape(-1)
    N = A.shape[0]
    dev = A.device
    lse = torch.empty(N, dtype=core.acc, device=dev)
    zt = torch.zeros(N, dtype=core.acc, device=dev)  # the target's logit
    r = core.rows_per_tile(N)
    for r0 in range(0, N, r):
        r1 = min(r0 + r, N)
        m = torch.full((r1 - r0,), -torch.inf, dtype=core.acc, device=dev)
        s = torch.zeros(r1 - r0, dtype=core.acc, device=dev)
        tgt = target[r0:r1]
        for c0 in range(0, core.V, core.chunk):
            c1 = min(c0 + core.chunk, core.V)
            _, z = core.logits(A[r0:r1], c0, c1)  # (r, c)
            local = tgt - c0
            inside = (local >= 0) & (local < c1 - c0)
            zt[r0:r1] += torch.where(inside, z.gather(1, local.clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1), 0.0)
            m_new = torch.maximum(m, z.amax(-1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new.unsqueeze(-1)).sum(-1)
            m = m_new
        lse[r0:r1] = m + torch.log(s)
    core.lse = lse.view(B, Tp)
    tok = torch.where(core.target != IGNORE_INDEX, core.lse - zt.view(B, Tp), 0.0)  # (B, T') as F.cross_entropy
    return (tok * core.coef).sum(1)  # (B,)


@dataclass
class HeadOut:
    losses: torch.Tensor  # (B,) acc
    grad_h: torch.Tensor  # (B, T, d) in h's dtype
    sq: Dict[str, torch.Tensor] = field(default_factory=dict)  # "weight"/"bias" -> (B,)
    dots: Dict[str, torch.Tensor] = field(default_factory=dict)  # "weight"/"bias" -> (B, R)
    rows: Optional[torch.Tensor] = None  # (B, T, d) U: the weight gradient's rows at ``ids``


def head_pass(h: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
              reduction: str = "mean", post: str = "none", value: float = 1.0, want: Tuple[str, ...] = (),
              refs: Optional[Dict[str, torch.Tensor]] = None, ids: Optional[torch.Tensor] = None,
              chunk: Optional[int] = None, use_triton: bool = False, block: Optional[int] = None
              ) -> Tuple[HeadCore, HeadOut]:
    """Everything the engine needs from the head, never building (B, T, V).

    h (B, T, d) head input; W (V, d); bias (V,) or None; labels (B, T) (-100 ignored). ``want``: the head
    parameters to score ("weight", "bias"); ``refs``: role -> (R, *shape) references; ``ids`` (B, T): the
    ids of a tied embedding's use, for the cross term (rows U of the weight gradient at the ids).
    ``use_triton``: when no head parameter is scored (a frozen head: losses and the gradient at h only), the
    Triton kernels compute both passes on CUDA (``dispatch.head_loss_grad`` decides; else the torch loop).
    ``chunk`` / ``block``: the vocabulary loop's tile (c vocabulary columns × r token rows); by default from the
    memory budget (``tile_sizes``)."""
    h = h.detach()
    W = W.detach()
    bias = bias.detach() if bias is not None else None
    B, T, d = h.shape
    V = W.shape[0]
    acc = torch.float64 if torch.float64 in (h.dtype, W.dtype) else torch.float32
    refs = refs or {}
    if T < 2:
        core = HeadCore(h[:, :0], W, bias, labels[:, :0], torch.zeros(B, 0, dtype=acc, device=h.device),
                        post, value, acc, torch.zeros(B, 0, dtype=acc, device=h.device), 1)
        zero = torch.zeros(B, dtype=acc, device=h.device)
        out = HeadOut(zero, torch.zeros_like(h), {r: zero.clone() for r in want},
                      {r: torch.zeros(B, refs[r].shape[0], dtype=acc, device=h.device) for r in want if r in refs},
                      torch.zeros(B, ids.shape[1], d, dtype=acc, device=h.device) if ids is not None else None)
        return core, out
    target, coef, _ = _targets(labels, reduction, acc)
    A = h[:, :-1]  # (B, T', d)
    Tp = T - 1
    chunk, _ = tile_sizes(B * Tp, V, d, chunk, block)
    core = HeadCore(A, W, bias, target, coef, post, value, acc, chunk=chunk, block=block or 0)
    if not want:
        fused = dispatch.head_loss_grad(A, W, bias, target, coef, post, value, use_triton)
        if fused is not None:
            core.lse, tok, grad = fused  # (B, T') fp32 each; grad (B, T', d) fp32
            core.kernel = True
            grad_h = torch.zeros_like(h)
            grad_h[:, :-1] = grad.to(h.dtype)
            return core, HeadOut(tok.sum(1), grad_h)
    if not ("weight" in want and gram_is_cheaper(Tp, d, V)):
        return core, _row_pass(core, want, refs, ids, h)
    return core, _vocab_pass(core, want, refs, ids, h)


def _vocab_pass(core: HeadCore, want: Tuple[str, ...], refs: Dict[str, torch.Tensor], ids: Optional[torch.Tensor],
                h: torch.Tensor) -> HeadOut:
    """The vocabulary loop, tiled (token block × vocabulary block), for the Gram form of the head weight's norm
    (T' (d + V) < d V). Pass 1 (``pass_lse``) is the online log-sum-exp per token block. Pass 2 runs per group:

    * K whole samples whose K·T' rows fit one token block and whose Gram buffers fit GRAM_ELEMENTS: per
      vocabulary block c, G_c (K, T', c) gives Σ_c G_c W_c, the Gram Σ_c G_c G_cᵀ (norm ⟨AAᵀ, GGᵀ⟩ once the
      group is done), a bias's Σ_t g_t, the reference dots Σ_t g_t·(V_c a_t) and the tied rows through
      P[b, s, t] = G_b[s, x_t] (U = Pᵀ A);
    * a sample longer than a token block (split over blocks k): per vocabulary block c its head gradient's
      block D_c = Σ_k G_{k,c}ᵀ A_k (c, d), so ||D||² = Σ_c ||D_c||², ⟨D, V⟩ = Σ_c ⟨D_c, V_c⟩ and the tied rows
      D[x_t] are read from the block holding x_t. Exact, in c·d memory (the direct form by vocabulary blocks).

    All sums run in the accumulation dtype; nothing of size B·T'·V or V·d is held."""
    A, W, acc = core.A, core.W, core.acc
    B, Tp, d = A.shape
    V, dev = core.V, A.device
    losses = pass_lse(core)
    lse = core.lse
    A_acc = A.to(acc)
    grad = torch.zeros(B, Tp, d, dtype=acc, device=dev)
    sq = {r: torch.zeros(B, dtype=acc, device=dev) for r in want}
    dots = {r: torch.zeros(B, refs[r].shape[0], dtype=acc, device=dev) for r in want if r in refs}
    tied = ids is not None and "weight" in want
    Tt = ids.shape[1] if tied else 0
    U = torch.zeros(B, Tt, d, dtype=acc, device=dev) if tied else None
    r = core.rows_per_tile(B * Tp)
    blocks = [(c0, min(c0 + core.chunk, V)) for c0 in range(0, V, core.chunk)]
    if Tp <= r:  # whole samples per token block: the Gram over each sample's tokens
        per = max(1, min(r // Tp, GRAM_ELEMENTS // max(1, Tp * max(Tp, Tt))))
        for b0 in range(0, B, per):
            b1 = min(b0 + per, B)
            K = b1 - b0
            a = A_acc[b0:b1]  # (K, T', d)
            GG = torch.zeros(K, Tp, Tp, dtype=acc, device=dev)
            P = torch.zeros(K, Tp, Tt, dtype=acc, device=dev) if tied else None  # P[b, s, t] = G_b[s, x_t]
            for c0, c1 in blocks:
                g = core.tile_grad(A[b0:b1], core.target[b0:b1], core.coef[b0:b1], lse[b0:b1], c0, c1)  # (K, T', c)
                Wc = W[c0:c1].to(acc)  # (c, d)
                grad[b0:b1].view(-1, d).addmm_(g.view(-1, c1 - c0), Wc)  # Σ_c G_c W_c
                GG.baddbmm_(g, g.transpose(1, 2))  # Σ_c G_c G_cᵀ  (K, T', T')
                if "weight" in refs:
                    for i, v in enumerate(refs["weight"]):
                        av = a @ v[c0:c1].to(acc).t()  # (K, T', c)
                        dots["weight"][b0:b1, i] += (av * g).sum(dim=(1, 2))
                if P is not None:
                    local = ids[b0:b1] - c0
                    inside = ((local >= 0) & (local < c1 - c0)).to(acc)  # (K, Tt)
                    cols = g.gather(2, local.clamp(0, c1 - c0 - 1).unsqueeze(1).expand(K, Tp, -1))  # (K, T', Tt)
                    P += cols * inside.unsqueeze(1)
                if "bias" in want:
                    _bias_block(g.sum(1), sq, dots, refs, slice(b0, b1), c0, c1)  # Σ_t g_t (K, c)
            sq["weight"][b0:b1] = (torch.bmm(a, a.transpose(1, 2)) * GG).sum(dim=(1, 2))  # ⟨AAᵀ, GGᵀ⟩
            if P is not None:
                U[b0:b1] = torch.bmm(P.transpose(1, 2), a)  # (K, Tt, d)
            del GG, P
    else:  # a sample spans several token blocks: its gradient by vocabulary blocks
        for b in range(B):
            for c0, c1 in blocks:
                Wc = W[c0:c1].to(acc)
                D = torch.zeros(c1 - c0, d, dtype=acc, device=dev)  # (c, d)
                rs = torch.zeros(1, c1 - c0, dtype=acc, device=dev) if "bias" in want else None
                for t0 in range(0, Tp, r):
                    t1 = min(t0 + r, Tp)
                    g = core.tile_grad(A[b, t0:t1], core.target[b, t0:t1], core.coef[b, t0:t1], lse[b, t0:t1],
                                       c0, c1)  # (r, c)
                    grad[b, t0:t1].addmm_(g, Wc)
                    D.addmm_(g.t(), A_acc[b, t0:t1])
                    if rs is not None:
                        rs += g.sum(0)
                sq["weight"][b] += D.pow(2).sum()
                if "weight" in refs:
                    dots["weight"][b] += torch.einsum("cd,rcd->r", D, refs["weight"][:, c0:c1].to(acc))
                if U is not None:
                    local = ids[b].long() - c0
                    inside = (local >= 0) & (local < c1 - c0)  # (Tt,)
                    U[b][inside] = D[local[inside]]
                if rs is not None:
                    _bias_block(rs, sq, dots, refs, slice(b, b + 1), c0, c1)
    grad_h = torch.zeros_like(h)
    grad_h[:, :-1] = grad.to(h.dtype)
    return HeadOut(losses, grad_h, sq, dots, U)


def _bias_block(rs: torch.Tensor, sq: Dict[str, torch.Tensor], dots: Dict[str, torch.Tensor],
                refs: Dict[str, torch.Tensor], rows: slice, c0: int, c1: int) -> None:
    """A bias's per-sample gradient block Σ_t g_t (K, c) of the vocabulary block [c0, c1): its squared norm and
    reference dots add up over the blocks."""
    sq["bias"][rows] += rs.pow(2).sum(1)
    if "bias" in refs:
        dots["bias"][rows] += rs @ refs["bias"][:, c0:c1].to(rs.dtype).t()


def _softmax_grad_(core: HeadCore, z: torch.Tensor, tgt: torch.Tensor, cf: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole rows of final logits z (r, V), overwritten in place by their gradient G = cf · (softmax − onehot)
    (times the post-processing's derivative): five passes over z, no (r, V) temporaries beyond a soft-capping's
    derivative. Returns (G, log-sum-exp (r,), the rows' weighted token losses (r,))."""
    V = z.shape[1]
    valid = tgt != IGNORE_INDEX
    safe = tgt.clamp(0, V - 1).unsqueeze(1)  # (r, 1)
    zt = z.gather(1, safe).squeeze(1)  # the target's logit
    deriv = 1 - (z / core.value) ** 2 if core.post == "softcap" else None
    m = z.amax(-1)  # (r,)
    z.sub_(m.unsqueeze(1)).exp_()  # e^{z − m}
    s = z.sum(-1)
    lse = m + torch.log(s)
    tok = torch.where(valid, lse - zt, 0.0) * cf  # (r,) as F.cross_entropy(ignore_index)
    z.mul_((cf / s).unsqueeze(1))  # cf · softmax
    z.scatter_add_(1, safe, -(valid.to(z.dtype) * cf).unsqueeze(1))
    if deriv is not None:
        z.mul_(deriv)
    elif core.post == "scale":
        z.mul_(core.value)
    return z, lse, tok


def _row_pass(core: HeadCore, want: Tuple[str, ...], refs: Dict[str, torch.Tensor], ids: Optional[torch.Tensor],
              h: torch.Tensor) -> HeadOut:
    """One pass over chunks of tokens with the whole vocabulary (rows × V logits at a time), where no Gram over
    tokens is needed: no head parameter is scored (a frozen head: only the gradient at h), or the direct form
    (T' (d + V) ≥ d V). The direct form accumulates sample b's head gradient D_b = Σ_t g_t a_tᵀ (V, d) over its
    token chunks, one sample at a time: the memory of one weight gradient, which a plain backward also holds.
    Three matmuls of the head's size (logits, Σ G W, D), as a plain forward + backward. Stores the
    log-sum-exp in ``core`` (for the masked gradient)."""
    A, W, acc = core.A, core.W, core.acc
    B, Tp, d = A.shape
    V = core.V
    dev = A.device
    rows = max(1, ROW_CHUNK_ELEMENTS // V)
    lse = torch.zeros(B, Tp, dtype=acc, device=dev)
    losses = torch.zeros(B, dtype=acc, device=dev)
    grad = torch.zeros(B, Tp, d, dtype=acc, device=dev)
    sq = {r: torch.zeros(B, dtype=acc, device=dev) for r in want}
    dots = {r: torch.zeros(B, refs[r].shape[0], dtype=acc, device=dev) for r in want if r in refs}
    U = torch.zeros(B, ids.shape[1], d, dtype=acc, device=dev) if ids is not None and "weight" in want else None
    W_acc = W.to(acc)  # (V, d) (no copy when W is already in acc)
    per_sample = bool(want)
    # the units of work: one sample's token chunks (per-sample sums), or chunks of the flattened rows
    spans = [(b, t0, min(t0 + rows, Tp)) for b in range(B) for t0 in range(0, Tp, rows)] if per_sample else \
        [(None, r0, min(r0 + rows, B * Tp)) for r0 in range(0, B * Tp, rows)]
    A_flat = A.reshape(B * Tp, d) if not per_sample else None
    D = bsum = None
    for k, (b, r0, r1) in enumerate(spans):
        if per_sample:
            if r0 == 0:
                D = torch.zeros(V, d, dtype=acc, device=dev) if "weight" in want else None
                bsum = torch.zeros(V, dtype=acc, device=dev) if "bias" in want else None
            a = A[b, r0:r1]  # (r, d)
            tgt, cf = core.target[b, r0:r1], core.coef[b, r0:r1]
        else:
            a = A_flat[r0:r1]
            tgt, cf = core.target.reshape(-1)[r0:r1], core.coef.reshape(-1)[r0:r1]
        _, z = core.logits(a, 0, V)  # (r, V)
        g, m, tok = _softmax_grad_(core, z, tgt, cf)  # g: z's storage, (r, V)
        del z
        if per_sample:
            lse[b, r0:r1] = m
            losses[b] += tok.sum()
            grad[b, r0:r1] = g @ W_acc
            if D is not None:
                D.addmm_(g.t(), a.to(acc))  # Σ_t g_t a_tᵀ
            if bsum is not None:
                bsum += g.sum(0)
            last = k + 1 == len(spans) or spans[k + 1][0] != b
            if last:
                if D is not None:
                    sq["weight"][b] = D.pow(2).sum()
                    if "weight" in refs:
                        dots["weight"][b] = torch.einsum("vd,rvd->r", D, refs["weight"].to(acc))
                    if U is not None:
                        U[b] = D[ids[b].long()]  # the gradient's rows at the tied embedding's ids
                if bsum is not None:
                    sq["bias"][b] = bsum.pow(2).sum()
                    if "bias" in refs:
                        dots["bias"][b] = refs["bias"].to(acc) @ bsum
        else:
            lse.view(-1)[r0:r1] = m
            losses.index_add_(0, torch.arange(r0, r1, device=dev) // Tp, tok)
            grad.view(-1, d)[r0:r1] = g @ W_acc
    core.lse = lse
    grad_h = torch.zeros_like(h)
    grad_h[:, :-1] = grad.to(h.dtype)
    return HeadOut(losses, grad_h, sq, dots, U)


def masked_weight_grad(core: HeadCore, w: torch.Tensor, index: Optional[torch.Tensor], role: str) -> torch.Tensor:
    """Σ_k w_k ∇_{index_k} of the head weight (V, d) or bias (V,), recomputed tile by tile (pass 2 over the
    selected samples only)."""
    acc = core.acc
    d = core.A.shape[-1]
    out = torch.zeros((core.V, d) if role == "weight" else (core.V,), dtype=acc, device=core.A.device)
    Tp = core.A.shape[1]
    if Tp == 0:
        return out
    A = (core.A if index is None else core.A[index]).reshape(-1, d).to(acc)  # (N, d)
    wrow = w.to(acc).repeat_interleave(Tp)  # (N,): sample k's weight on each of its rows
    for c0, c1, r0, r1, g in core.tiles(index):  # g (r, c)
        g.mul_(wrow[r0:r1, None])
        if role == "weight":
            out[c0:c1].addmm_(g.t(), A[r0:r1])  # (c, d)
        else:
            out[c0:c1] += g.sum(0)
    return out


@dataclass
class HeadFactor(Factor):
    """One use of the head weight or bias, computed by the chunk loop: the squared norms, dots and (weight)
    rows at the tied embedding's ids are precomputed; the masked gradient is recomputed chunk by chunk."""

    core: HeadCore
    role: str  # "weight" | "bias"
    sq: torch.Tensor  # (B,)
    dots: Optional[torch.Tensor] = None  # (B, R) against ``ref``
    ref: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None  # (B, Tt)
    rows: Optional[torch.Tensor] = None  # (B, Tt, d)

    @property
    def shape(self):
        return (self.core.V, self.core.A.shape[-1]) if self.role == "weight" else (self.core.V,)

    def sq_norm(self, use_triton: bool = False) -> torch.Tensor:
        return self.sq

    def dot(self, V: torch.Tensor) -> torch.Tensor:
        if self.dots is not None and V is self.ref:
            return self.dots
        # another reference: one more tiled pass (Σ_c ⟨G_cᵀA, V_c⟩), rows summed into their samples
        acc = self.core.acc
        B, Tp, d = self.core.A.shape
        A = self.core.A.reshape(-1, d).to(acc)  # (N, d)
        out = torch.zeros(B, V.shape[0], dtype=acc, device=A.device)
        for c0, c1, r0, r1, g in self.core.tiles():
            if self.role == "weight":
                per_row = torch.einsum("nc,rcd,nd->nr", g, V[:, c0:c1].to(acc), A[r0:r1])  # (r, R)
            else:
                per_row = g @ V[:, c0:c1].to(acc).t()
            out.index_add_(0, torch.arange(r0, r1, device=A.device) // Tp, per_row)
        return out

    def dense(self) -> torch.Tensor:
        """(B, V, d) explicit per-sample gradients, chunk by chunk (tests and rare cross terms only)."""
        B = self.core.A.shape[0]
        return torch.stack([masked_weight_grad(self.core, torch.ones(1, device=self.sq.device),
                                               torch.tensor([b], device=self.sq.device), self.role)
                            for b in range(B)]) if B else torch.zeros(0, *self.shape, dtype=self.core.acc)

    def weighted_sum(self, w: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        return masked_weight_grad(self.core, w, index, self.role)


def _emb_head(e: EmbRows, f: HeadFactor):
    """Tied embedding and head: Σ_t δ_t · U_t with U_t the head gradient's row at x_t (norm-math.md)."""
    if e.transposed or f.role != "weight" or f.rows is None or f.ids is None or e.ids.shape != f.ids.shape \
            or not torch.equal(e.ids.long(), f.ids.long()):
        return None  # the dense fallback (exact, (B, V, d))
    return (e._g().to(f.rows.dtype) * f.rows).sum(dim=(1, 2))


_INNER[(EmbRows, HeadFactor)] = _emb_head


# -- the loss node -----------------------------------------------------------------------------------------


class _HeadLoss(torch.autograd.Function):
    """losses (B,) as a function of h: the backward hands Σ_b ∂(go_b L_b)/∂h = go_b · grad_h[b] to the backbone,
    and (once, in the activation backward) the head's factors to the capture."""

    @staticmethod
    def forward(ctx, h, anchor, losses, grad_h, on_backward):  # noqa: D401
        ctx.grad_h, ctx.on_backward = grad_h, on_backward
        return losses.clone()

    @staticmethod
    def backward(ctx, go):
        ctx.on_backward()
        gh = ctx.grad_h * go.to(ctx.grad_h.dtype).view(-1, *([1] * (ctx.grad_h.dim() - 1)))
        return gh, None, None, None, None


class _HeadParamGrad(torch.autograd.Function):
    """Zeros (B,) added to the losses, as a function of the head's weight and bias: its backward hands them
    Σ_b go_b ∇_b (``masked_weight_grad``, recomputed tile by tile). For two-pass filtering, whose ordinary
    backward of Σ_b w_b L_b must reach the head. The activation backward (``autograd.grad`` to the taps) and the
    layout probe never run it: no path from this node leads to a tap."""

    @staticmethod
    def forward(ctx, core, weight, bias):  # noqa: D401
        ctx.core = core
        return torch.zeros(core.A.shape[0], dtype=core.acc, device=core.A.device)

    @staticmethod
    def backward(ctx, go):
        core = ctx.core
        gw = masked_weight_grad(core, go, None, "weight").to(core.W.dtype) if ctx.needs_input_grad[1] else None
        gb = masked_weight_grad(core, go, None, "bias").to(core.bias.dtype) if ctx.needs_input_grad[2] else None
        return None, gw, gb


class _HeadReached(Exception):
    def __init__(self, h: torch.Tensor):
        super().__init__("LM head reached")
        self.h = h


@dataclass
class HeadInput:
    """The scored forward stopped at the head: its input h (B, T, d), in the graph of the backbone."""

    h: torch.Tensor
    head: HeadSpec


def hooks_on(module: nn.Module, own: Iterable[int] = ()) -> str:
    """Why the fused path cannot stand in for ``module``'s own call ("" when it can). The fused path never runs
    the head's forward, so anything that would run with it (its own or global forward, forward-pre and backward
    hooks, an instance-level ``forward``) would be skipped and the numbers silently wrong. ``own``: the handle
    ids of the capture's own hooks (not the user's)."""
    from torch.nn.modules import module as _m

    mine = set(own)

    def users(hooks: Dict[int, Any]) -> bool:
        return any(k not in mine for k in hooks)

    found = [what for what, present in (
        ("forward hooks", users(module._forward_hooks)), ("forward pre-hooks", users(module._forward_pre_hooks)),
        ("backward hooks", module._backward_hooks), ("backward pre-hooks", module._backward_pre_hooks),
        ("global forward hooks", _m._global_forward_hooks),
        ("global forward pre-hooks", _m._global_forward_pre_hooks),
        ("global backward hooks", _m._global_backward_hooks),
        ("global backward pre-hooks", _m._global_backward_pre_hooks),
        ("an instance-level forward", "forward" in module.__dict__)) if present]
    return ", ".join(found)


def ancestor_hooks(model: nn.Module, name: str, own: Iterable[int] = ()) -> str:
    """The modules around the head (``model`` down to the head's parent) whose forward the fused path cuts short:
    hooks that run after their forward (forward hooks, backward hooks) would never run. ("" when none.)"""
    mine = set(own)
    found, mod, path = [], model, ""
    for part in [""] + name.split(".")[:-1]:
        if part:
            mod = getattr(mod, part, None)
            path = f"{path}.{part}" if path else part
            if not isinstance(mod, nn.Module):
                break
        if any(k not in mine for k in mod._forward_hooks) or mod._backward_hooks or mod._backward_pre_hooks:
            found.append(f"{path or 'the model'} ({type(mod).__name__})")
    return ", ".join(found)


# model -> (key, why not or "") of its head check (``check_model``): one check per model, class, head and forward
HEAD_VERDICTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
CHECK_SAMPLES = 2  # the head check's forward runs on the batch's first samples only


def _check_key(model: nn.Module, head: HeadSpec) -> Tuple[Any, ...]:
    base = _base(model)
    inst = tuple(id(m.__dict__.get("forward")) for m in (model, base))
    return (type(model), type(base), inst, head.name, id(head.module), head.post, head.value, head.vocab,
            tuple(head.module.weight.shape))


def check_model(ghost: Any, batch: Any, weights_in_graph: bool = False) -> None:
    """The fused head's self-check, like a rule's: it assumes that the model's logits are post(h Wᵀ + b) with h
    the head's input read as (B, T, d) and post the family's known final step (``HEADS``). A subclass whose
    forward changes the logits after the head, a time-major head input (even with T == B) or a different final
    step would make that silently wrong. So, once per model (again when its class, an instance-level forward,
    the head or its post-processing change), the model's own forward runs on the batch's first
    ``CHECK_SAMPLES`` samples (no grad, buffers restored) and its logits are compared with that formula on the
    head's input as the head saw it. On a mismatch the fused head is off for the model, with the reason in
    ``coverage()``. Run outside the capture, before the scored forward."""
    model = ghost.spec.model
    head, _ = decide(ghost, batch, weights_in_graph)
    if head is None:
        return
    key = _check_key(model, head)
    seen = HEAD_VERDICTS.get(model)
    if seen is not None and seen[0] == key:
        return
    from ..batching import extract_logits
    from ..rules.base import output_matches
    from ..types import BufferSnapshot

    n = min(CHECK_SAMPLES, batch.batch_size)
    if n == 0 or batch.seq_len == 0:
        return  # nothing to compare: checked on the next batch with tokens
    sub = batch.select(slice(0, n))
    seen_in: List[torch.Tensor] = []
    def take(mod: nn.Module, args: Tuple[Any, ...]) -> None:
        seen_in.append(args[0])

    handle = head.module.register_forward_pre_hook(take)
    snapshot = BufferSnapshot(model)
    why = ""
    dev = batch.full["input_ids"].device
    try:
        # (the RNG as it was: in train mode the check's dropout masks must not shift the user's random stream)
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            logits = extract_logits(model(**sub.model_inputs))
        x = seen_in[0] if seen_in else None
        if x is None or x.dim() != 3 or tuple(x.shape[:2]) != (n, batch.seq_len):
            why = (f"the head's input was {None if x is None else tuple(x.shape)}, not (B, T, d) = "
                   f"({n}, {batch.seq_len}, d)")
        else:
            with torch.no_grad():
                y = F.linear(x, head.module.weight, head.module.bias)  # (n, T, V)
                z = torch.tanh(y / head.value) * head.value if head.post == "softcap" else \
                    y * head.value if head.post == "scale" else y  # (in the model's dtype, as its forward does)
            if not output_matches(z.to(logits.dtype) if z.dtype != logits.dtype else z, logits):
                why = ("the model's logits are not its head's output followed by the known final step (a forward "
                       "that changes the logits after the head, or a head input that is not (B, T, d))")
    except Exception as e:  # noqa: BLE001 - unchecked is not used: the full-logits path is exact
        why = f"its self-check could not run on the batch's first {n} sample(s) ({type(e).__name__}: {str(e)[:120]})"
    finally:
        handle.remove()
        snapshot.restore()
    HEAD_VERDICTS[model] = (key, why)
    if why:
        log.warning("fused LM head off for %s: %s; scoring through full logits (exact)", type(model).__name__, why)


def decide(ghost: Any, batch: Any, weights_in_graph: bool, cap: Any = None) -> Tuple[Optional[HeadSpec], str]:
    """Whether this scored forward uses the fused head: (spec, "") or (None, why not). Remembered on the
    ghost backend for ``coverage()``. ``cap``: the capture in force (its stand-ins sit in the parameters' slots)."""
    setting = getattr(ghost, "fused_head", None)
    if setting is False:
        return None, "off (fused_head=False)"
    spec = ghost.spec
    if spec.loss_fn is not None:
        return None, "off: a custom loss_fn (the fused path computes the library's token cross-entropy)"
    if batch.labels is None:
        return None, "off: no labels"
    head, why = find_head(spec.model)
    if head is None:
        return None, "off: " + why
    if any(type(p).__name__ == "DTensor" for p in head.module.parameters()):
        return None, "off: the head's weight is sharded (FSDP2 / tensor parallel)"
    own = [h.id for h in getattr(cap, "handles", ())]
    hooked = hooks_on(head.module, own)
    if hooked:
        return None, f"off: the head has {hooked} (the fused path never runs the head's forward)"
    around = ancestor_hooks(spec.model, head.name, own)
    if around:
        return None, (f"off: forward or backward hooks on {around}, which the fused path would skip (it stops the "
                      "forward at the head)")
    seen = HEAD_VERDICTS.get(spec.model)
    if seen is not None and seen[1] and seen[0] == _check_key(spec.model, head):
        return None, f"off: {seen[1]}"
    # the selected parameters of the head, by identity with the real parameters or (inside the capture) with
    # the stand-ins that sit in their slots
    known = {id(p): g for g, p in spec.params.items()}
    if cap is not None:
        known.update({id(s): g for g, s in cap.stand_ins.items()})
    names = {n: known[id(p)] for n, p in head.module.named_parameters() if id(p) in known}
    plan = ghost.plan
    mp = plan.modules.get(id(head.module))
    for g in names.values():
        # (a tied weight may also be op-tracked for its other uses, e.g. Gemma 2's scaled embedding: fine, the
        # head's own use is the Linear rule's)
        if g in ghost.moved or mp is None or mp.rule is None or g not in mp.names.values():
            return None, f"off: the head parameter {g} is not scored by the Linear rule"
    if setting is None:
        tokens, kind = batch.batch_size * batch.seq_len, "trainable" if names else "frozen"
        if not pays(head.vocab, tokens, bool(names)):
            return None, (f"off: does not pay at vocabulary {head.vocab} and B·T = {tokens} for a {kind} head "
                          f"(on from V ≥ {MIN_VOCAB[kind]} and B·T·V ≥ {MIN_LOGITS[kind]})")
    return head, ""


def _run_to_head(model: nn.Module, batch: Any, head: HeadSpec) -> Any:
    """The model's forward stopped by a pre-hook at the head's input: :class:`HeadInput`, or the model's own
    outputs when the head was not called on the (B, T, d) hidden states."""
    B, T = batch.batch_size, batch.seq_len

    def stop(mod, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 3 and tuple(x.shape[:2]) == (B, T):
            raise _HeadReached(x)
        return None  # any other call (logits_to_keep, a second use) runs as usual

    handle = head.module.register_forward_pre_hook(stop, prepend=True)
    try:
        return model(**batch.model_inputs)
    except _HeadReached as r:
        return HeadInput(r.h, head)
    finally:
        handle.remove()


def head_forward(ghost: Any, batch: Any, weights_in_graph: bool = False, cap: Any = None) -> Any:
    """The scored forward (inside the capture). With the fused head: the backbone only, stopped by a pre-hook
    at the head's input, returned as :class:`HeadInput`; otherwise the model's own outputs."""
    model = ghost.spec.model
    head, why = decide(ghost, batch, weights_in_graph, cap)
    if head is None:
        ghost.head_status = why
        return model(**batch.model_inputs)
    out = _run_to_head(model, batch, head)
    if not isinstance(out, HeadInput):
        ghost.head_status = "off: the head was not called on the (B, T, d) hidden states"
    return out


def hidden_use_forward(ghost: Any, batch: Any, total_of: Callable[[Any], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The forward of two-pass mode's hidden-use check (``standins.assert_no_hidden_uses``, once per model). With
    the fused head: the backbone only, stopped at the head's input, and Σ h, so that the check never builds the
    (B, T, V) logits (nothing after the head uses a parameter in the models of ``HEADS``, and the head's own use
    is through its slot); otherwise ``total_of`` the model's outputs."""
    model = ghost.spec.model
    head, _ = decide(ghost, batch, True)
    if head is None:
        return lambda: total_of(model(**batch.model_inputs))

    def forward() -> torch.Tensor:
        out = _run_to_head(model, batch, head)
        return out.h.sum() if isinstance(out, HeadInput) else total_of(out)

    return forward


def head_losses(ghost: Any, cap: Any, batch: Any, inp: HeadInput) -> Tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), tokens (B,)) from the head input by the chunk loop (outside the capture: the real
    parameters are back in their slots). The losses' backward continues into the backbone with Σ_c G_c W_c and
    hands the head's factors to the capture."""
    h, head = inp.h, inp.head
    B, T = batch.batch_size, batch.seq_len
    ghost.head_status = (f"on: fused chunked LM head + cross-entropy at {head.name} (V = {head.vocab}"
                         f"{', soft-capped' if head.post == 'softcap' else ''}"
                         f"{', scaled' if head.post == 'scale' else ''}; torch chunks)")
    mod = head.module
    params = ghost.spec.params
    roles = {role: g for role, p in (("weight", mod.weight), ("bias", mod.bias)) if p is not None
             for g, q in params.items() if q is p}
    refs = {role: cap.refs[g] for role, g in roles.items() if g in cap.refs}
    tied = "weight" in roles and any(
        rec.names and roles["weight"] in rec.names.values() for rec in cap.records) \
        or ("weight" in roles and roles["weight"] in cap.track)
    ids = batch.full["input_ids"] if tied else None
    core, res = head_pass(h, mod.weight, mod.bias, batch.labels, ghost.spec.loss_reduction, head.post,
                          head.value, tuple(roles), refs, ids, use_triton=cap.use_triton)
    if core.kernel:
        ghost.head_status = ghost.head_status.replace("; torch chunks)", "; Triton kernels)")
    from .capture import Record

    mp = cap.plan.modules.get(id(mod))
    if roles:
        cap.records.append(Record(mp, None))  # the head's use, counted for the cross terms
    done: List[bool] = []

    def on_backward():
        if done or cap.closed or getattr(cap, "probing", False):
            return  # the layout probe's backward, or a later backward (two-pass) through the same graph
        done.append(True)
        try:
            for role, g in roles.items():
                cap._add(g, HeadFactor(core, role, res.sq[role], res.dots.get(role), refs.get(role),
                                       ids if role == "weight" else None, res.rows if role == "weight" else None))
        except BaseException as e:  # errors raised inside autograd lose their type
            cap.error = e

    anchor = cap._anchor_for(h)
    losses = _HeadLoss.apply(h, anchor, res.losses, res.grad_h, on_backward)
    if getattr(cap, "weights_in_graph", False) and any(p is not None and p.requires_grad for p in (mod.weight,
                                                                                                  mod.bias)):
        # two-pass filtering: the ordinary backward that follows reaches the head's weight through this node
        losses = losses + _HeadParamGrad.apply(core, mod.weight, mod.bias)
    tokens = (batch.labels[:, 1:] != IGNORE_INDEX).sum(1) if T >= 2 else \
        torch.zeros(B, dtype=torch.int64, device=h.device)
    return losses, tokens
