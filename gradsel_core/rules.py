"""The registry of per-layer norm rules, kept in one place.

A rule sees one call of one module: its positional inputs and the gradient of Σ_b L_b with respect to
the module's output (which, restricted to sample b, is sample b's own output gradient, since samples
are independent). It returns a factor (``gradsel_core.factors``) for each of the module's selected
parameters it was asked about. Rules return results; nothing is stored on modules or parameters.

    @register_norm_rule(MyLayer)
    def my_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]: ...

Modules can be named by class, by dotted class path (``"transformers.pytorch_utils.Conv1D"``, so the
library need not be imported), or matched by a predicate (look-alikes such as ``*RMSNorm``).
Parameters with no rule are computed exactly by the torch.func fallback in ``gradsel_core.backends.ghost``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .factors import Dense, EmbRows, Factor, Outer, RowSum, Stacked
from .rows import Rows


@dataclass
class ModuleCall:
    """One call of a module during the scored forward."""

    module: nn.Module
    name: str
    args: Tuple[Any, ...]  # positional inputs (tensors detached)
    kwargs: Dict[str, Any]
    grad_output: Optional[torch.Tensor] = None  # (B, ..., p) gradient of Σ_b L_b w.r.t. the output
    batch_size: int = 0
    output: Optional[torch.Tensor] = None  # the module's (first) output, detached: kept for rules that check
    # their recomputation against it (``keeps_output``)
    rows: Optional[Rows] = None  # input 0's row -> sample map when it is a proven flatten or routed rows
    # (``gradsel_core.rows``); a ``rowwise`` rule's output rows are the same

    def input(self, i: int = 0) -> torch.Tensor:
        x = self.args[i] if i < len(self.args) else None
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModule(f"module {self.name} ({type(self.module).__name__}) was called without a tensor input")
        return x


class UnsupportedModule(RuntimeError):
    """The ghost engine cannot score this module exactly; the message says what to do."""


class LayoutError(UnsupportedModule):
    """A tensor's dim 0 is not the batch and no row -> sample map is known for it."""


RuleFn = Callable[[ModuleCall, Sequence[str]], Dict[str, Factor]]

_BY_TYPE: Dict[Union[type, str], RuleFn] = {}
_PREDICATES: List[Tuple[Callable[[nn.Module], bool], RuleFn]] = []


def register_norm_rule(*targets: Union[type, str], predicate: Optional[Callable[[nn.Module], bool]] = None):
    """Register ``fn(call, names) -> {local_param_name: Factor}`` for module types, dotted class
    names, or modules matching ``predicate``. A later registration for the same target replaces the earlier."""

    def deco(fn: RuleFn) -> RuleFn:
        for t in targets:
            _BY_TYPE[t] = fn
        if predicate is not None:
            _PREDICATES.append((predicate, fn))
        return fn

    return deco


def rule_status(module: nn.Module) -> Tuple[Optional[RuleFn], str]:
    """The rule for ``module`` and why: ``(rule, "rule")``, ``(None, "overridden")`` when a registered base
    class's rule does not apply because ``type(module)`` overrides its ``forward``, or ``(None, "none")``.

    A rule describes one class's forward. It applies to that class, and to a subclass that does not
    override ``forward`` (or registers a rule of its own). Predicates (look-alikes) are checked last."""
    for cls in type(module).__mro__:
        fn = _BY_TYPE.get(cls) or _BY_TYPE.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            if type(module).forward is not cls.forward:
                return None, "overridden"
            return fn, "rule"
    for pred, fn in _PREDICATES:
        if pred(module):
            return fn, "rule"
    return None, "none"


def find_rule(module: nn.Module) -> Optional[RuleFn]:
    """The rule that applies to ``module`` (see :func:`rule_status`), or None."""
    return rule_status(module)[0]


# -- helpers --------------------------------------------------------------------------------------------


def as_btd(x: torch.Tensor, B: int, name: str, rows: Optional[Rows] = None, last: Optional[int] = None) -> torch.Tensor:
    """(B, ..., d) -> (B, T', d) with T' the product of the middle dims; (B, d) -> (B, 1, d).

    With ``rows`` (a proven row -> sample map of x's dim 0, ``gradsel_core.rows``): flattened or routed rows
    -> (B, T', d), zero-padded. ``last``: the trailing size d when it spans several dims (LayerNorm)."""
    d = last if last is not None else (x.shape[-1] if x.dim() else 1)
    if rows is not None and x.dim() >= 1 and x.shape[0] == rows.n:
        return rows.btd(x, B, d)
    if x.dim() < 2 or x.shape[0] != B:
        raise LayoutError(
            f"module {name} saw a tensor of shape {tuple(x.shape)} whose dim 0 is not the batch ({B}) and is "
            "not a provable flatten of it; pass backend='vmap', or register a rule that knows its layout"
        )
    return x.reshape(B, -1, d)


def rowwise(fn: RuleFn) -> RuleFn:
    """Mark a rule whose module maps row i of its input to row i of its output (Linear, norms): a known
    row map of the input then carries over to the output."""
    fn.rowwise = True
    return fn


def _only(names: Sequence[str], allowed: Sequence[str], call: ModuleCall) -> None:
    extra = [n for n in names if n not in allowed]
    if extra:
        raise UnsupportedModule(f"no rule for parameters {extra} of {call.name} ({type(call.module).__name__})")


# -- built-in rules -------------------------------------------------------------------------------------


def _linear_like(call: ModuleCall, names: Sequence[str], transposed: bool) -> Dict[str, Factor]:
    _only(names, ("weight", "bias"), call)
    B = call.batch_size
    A = as_btd(call.input(), B, call.name, call.rows)  # (B, T, d)
    G = as_btd(call.grad_output, B, call.name, call.rows)  # (B, T, p)
    out: Dict[str, Factor] = {}
    if "weight" in names:
        out["weight"] = Outer(A, G, transposed=transposed)
    if "bias" in names:
        out["bias"] = RowSum(G)
    return out


@register_norm_rule(nn.Linear)
@rowwise
def linear_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = x Wᵀ + b on (B, ..., d) or (B, d) inputs: W -> Outer(A, G), b -> Σ_t g_t."""
    return _linear_like(call, names, transposed=False)


@register_norm_rule("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")
@rowwise
def conv1d_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """HF GPT-2 Conv1D, y = x W + b with W stored (d, p): the Linear rule, transposed."""
    return _linear_like(call, names, transposed=True)


@register_norm_rule(nn.Embedding)
def embedding_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """Rows gathered by ids: Σ_v ||Σ_{t: x_t = v} g_t||², padding_idx rows get no gradient."""
    _only(names, ("weight",), call)
    m: nn.Embedding = call.module
    if m.scale_grad_by_freq or m.max_norm is not None:
        raise UnsupportedModule(
            f"{call.name}: nn.Embedding with scale_grad_by_freq/max_norm couples samples; pass backend='vmap'"
        )
    B = call.batch_size
    ids = call.input()
    G = call.grad_output
    if ids.shape[0] != B:
        raise UnsupportedModule(f"{call.name}: ids of shape {tuple(ids.shape)} for a batch of {B}")
    ids = ids.reshape(B, -1)  # (B, T)
    G = G.reshape(B, ids.shape[1], -1)  # (B, T, d)
    return {"weight": EmbRows(ids, G, m.num_embeddings, m.padding_idx)}


# HF embeddings whose forward is ``super().forward(ids) * self.embed_scale``: the Embedding rule with g·scale
_SCALED_EMBEDDINGS = tuple(
    f"transformers.models.{mod}.modeling_{mod}.{cls}" for mod, cls in (
        ("gemma", "GemmaTextScaledWordEmbedding"), ("gemma3", "Gemma3TextScaledWordEmbedding"),
        ("gemma3n", "Gemma3nTextScaledWordEmbedding"), ("gemma4", "Gemma4TextScaledWordEmbedding"),
        ("vaultgemma", "VaultGemmaTextScaledWordEmbedding"), ("t5gemma2", "T5Gemma2TextScaledWordEmbedding"),
        ("bart", "BartScaledWordEmbedding"), ("mbart", "MBartScaledWordEmbedding"),
        ("biogpt", "BioGptScaledWordEmbedding"), ("pegasus_x", "PegasusXScaledWordEmbedding"),
        ("bigbird_pegasus", "BigBirdPegasusScaledWordEmbedding"),
    ))


@register_norm_rule(*_SCALED_EMBEDDINGS)
def scaled_embedding_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = E[x] · s with s = ``embed_scale`` (Gemma: √d): the Embedding rule with output gradient s·g."""
    m = call.module
    scale = getattr(m, "embed_scale", None)
    if scale is None:
        raise UnsupportedModule(f"{call.name}: a scaled embedding without embed_scale")
    s = scale.to(call.grad_output.dtype) if isinstance(scale, torch.Tensor) else float(scale)
    scaled = ModuleCall(m, call.name, call.args, call.kwargs, call.grad_output * s, call.batch_size)
    return embedding_rule(scaled, names)


@register_norm_rule(nn.LayerNorm)
@rowwise
def layernorm_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """γ: Σ_t x̂_t ⊙ g_t with x̂ = (x - μ)/√(σ² + ε) (recomputed in fp32); β: Σ_t g_t."""
    _only(names, ("weight", "bias"), call)
    m: nn.LayerNorm = call.module
    B = call.batch_size
    k = len(m.normalized_shape)
    x = call.input()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    dims = tuple(range(x.dim() - k, x.dim()))
    xhat = (xf - xf.mean(dims, keepdim=True)) * torch.rsqrt(xf.var(dims, unbiased=False, keepdim=True) + m.eps)
    n = int(torch.Size(m.normalized_shape).numel())
    X = as_btd(xhat, B, call.name, call.rows, last=n)  # (B, T, n)
    G = as_btd(call.grad_output, B, call.name, call.rows, last=n)  # (B, T, n)
    out: Dict[str, Factor] = {}
    if "weight" in names:
        out["weight"] = RowSum(G, X, shape=tuple(m.normalized_shape))
    if "bias" in names:
        out["bias"] = RowSum(G, shape=tuple(m.normalized_shape))
    return out


def _rms_eps(m: nn.Module, x: torch.Tensor) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(m, attr, None)
        if eps is not None:
            return float(eps)
    return float(torch.finfo(x.dtype).eps)  # nn.RMSNorm(eps=None)


def _is_rmsnorm_lookalike(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(w, nn.Parameter)
        and w.dim() == 1
        and any(hasattr(m, a) for a in ("variance_epsilon", "eps", "epsilon"))
    )


@register_norm_rule(nn.RMSNorm, predicate=_is_rmsnorm_lookalike)
@rowwise
def rmsnorm_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = w ⊙ x̂ (or (1 + w) ⊙ x̂) with x̂ = x/√(mean(x²) + ε), computed in fp32 and cast back to the
    input dtype as HF's LlamaRMSNorm does: w -> Σ_t x̂_t ⊙ g_t."""
    _only(names, ("weight",), call)
    m = call.module
    B = call.batch_size
    x = call.input()
    n = m.weight.numel()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _rms_eps(m, x))).to(x.dtype)
    G = as_btd(call.grad_output, B, call.name, call.rows, last=n)  # (B, T, n)
    return {"weight": RowSum(G, as_btd(xhat, B, call.name, call.rows, last=n))}


@register_norm_rule("peft.tuners.lora.layer.Embedding")
def peft_lora_embedding_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """PEFT LoRA on an embedding: out = E[x] + s·(A.T[x]) Bᵀ with A (r, V), B (d, r).

    lora_embedding_B: Outer(A.T[x], s·g)   (d, r);  lora_embedding_A: rows of Aᵀ at x with gradient
    s·g B, stored transposed (r, V). The LoRA-Linear factors need no rule of their own: PEFT keeps them
    as nn.Linear submodules, scored by the Linear rule with their own inputs and output gradients."""
    m = call.module
    B = call.batch_size
    ids = call.input()
    if ids.shape[0] != B:
        raise UnsupportedModule(f"{call.name}: ids of shape {tuple(ids.shape)} for a batch of {B}")
    ids = ids.reshape(B, -1)  # (B, T)
    G = call.grad_output.reshape(B, ids.shape[1], -1)  # (B, T, d)
    out: Dict[str, Factor] = {}
    embed_scale = m._get_embed_scale() if hasattr(m, "_get_embed_scale") else None
    for local in names:
        kind, _, adapter = local.partition(".")
        if kind not in ("lora_embedding_A", "lora_embedding_B") or adapter not in m.active_adapters:
            raise UnsupportedModule(f"no rule for parameter {local} of {call.name} (inactive or unknown adapter)")
        if adapter in getattr(m, "lora_variant", {}) or m.input_fns.get(adapter) or m.output_fns.get(adapter):
            raise UnsupportedModule(f"{call.name}: LoRA variants (DoRA, TP hooks) are not covered by the rule")
        A = m.lora_embedding_A[adapter]  # (r, V)
        Bw = m.lora_embedding_B[adapter]  # (d, r)
        s = m.scaling[adapter]
        if embed_scale is not None:
            s = embed_scale.to(G.dtype) * s
        sg = G * s  # (B, T, d)
        if kind == "lora_embedding_B":
            after_a = F.embedding(ids, A.detach().t())  # (B, T, r)
            out[local] = Outer(after_a, sg)
        else:
            out[local] = EmbRows(ids, sg @ Bw.detach(), A.shape[1], None, transposed=True)  # (B, T, r)
    return out


# -- nn.MultiheadAttention ---------------------------------------------------------------------------------


def _mha_masks(m: nn.MultiheadAttention, call: ModuleCall, B: int, L: int, S: int, dtype) -> Optional[torch.Tensor]:
    """The additive (B, H, L, S) mask F.multi_head_attention_forward applies (attn_mask + key_padding_mask)."""
    H = m.num_heads
    mask = None
    am = call.kwargs.get("attn_mask", call.args[5] if len(call.args) > 5 else None)
    kpm = call.kwargs.get("key_padding_mask", call.args[3] if len(call.args) > 3 else None)
    if call.kwargs.get("is_causal", False) and am is None:
        raise UnsupportedModule(f"{call.name}: is_causal without attn_mask")
    if am is not None:
        am = torch.zeros_like(am, dtype=dtype).masked_fill(am, float("-inf")) if am.dtype == torch.bool else am.to(dtype)
        mask = am.reshape(1, 1, L, S) if am.dim() == 2 else am.reshape(B, H, L, S)
    if kpm is not None:
        kpm = torch.zeros_like(kpm, dtype=dtype).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm.to(dtype)
        kpm = kpm.reshape(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


@register_norm_rule(nn.MultiheadAttention)
def mha_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """nn.MultiheadAttention, recomputed from its inputs with the projections' outputs as leaves:
    out = softmax((X_q W_qᵀ)(X_k W_kᵀ)ᵀ/√d_h + mask)(X_v W_vᵀ) W_oᵀ, per head. One extra attention
    forward+backward of this module (activations only) gives G_q, G_k, G_v, G_o; then the Linear factors:
    in_proj_weight = [G_qᵀX_q; G_kᵀX_k; G_vᵀX_v] (Stacked), out_proj = G_outᵀ O. ``bias_k``/``bias_v`` are
    per-sample dense (1, 1, E). The recomputation is checked against the module's actual output and the rule
    refuses (the module falls back) when they differ: a mask or option it does not model."""
    m: nn.MultiheadAttention = call.module
    B = call.batch_size
    if m.training and m.dropout > 0:
        raise UnsupportedModule(f"{call.name}: attention dropout in train mode is random; the rule cannot recompute it")
    if m.add_zero_attn:
        raise UnsupportedModule(f"{call.name}: add_zero_attn is not modelled")
    q_in, k_in, v_in = (call.kwargs.get(k, call.args[i] if i < len(call.args) else None)
                        for i, k in enumerate(("query", "key", "value")))
    if any(not isinstance(t, torch.Tensor) or t.dim() != 3 for t in (q_in, k_in, v_in)):
        raise UnsupportedModule(f"{call.name}: unbatched or missing query/key/value")
    if not m.batch_first:
        q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))  # (B, T, E)
    if q_in.shape[0] != B or k_in.shape[0] != B:
        raise UnsupportedModule(f"{call.name}: query of shape {tuple(q_in.shape)} for a batch of {B}")
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    acc = torch.float64 if q_in.dtype == torch.float64 else q_in.dtype
    if m._qkv_same_embed_dim:
        Wq, Wk, Wv = m.in_proj_weight.detach().chunk(3)
    else:
        Wq, Wk, Wv = (w.detach() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    bq, bk, bv = m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None else (None, None, None)
    Wo = m.out_proj.weight.detach()
    bo = m.out_proj.bias.detach() if m.out_proj.bias is not None else None
    G = call.grad_output
    G = (G if m.batch_first else G.transpose(0, 1)).to(acc)  # (B, L, E)
    with torch.enable_grad():
        q = F.linear(q_in, Wq, bq).detach().requires_grad_()  # (B, L, E)
        k = F.linear(k_in, Wk, bk).detach().requires_grad_()  # (B, S, E)
        v = F.linear(v_in, Wv, bv).detach().requires_grad_()  # (B, S, E)
        leaves = [q, k, v]
        kk, vv = k, v
        extra = {}
        if m.bias_k is not None:
            extra["bias_k"] = m.bias_k.detach().expand(B, 1, E).clone().requires_grad_()
            extra["bias_v"] = m.bias_v.detach().expand(B, 1, E).clone().requires_grad_()
            kk, vv = torch.cat([k, extra["bias_k"]], 1), torch.cat([v, extra["bias_v"]], 1)
            leaves += [extra["bias_k"], extra["bias_v"]]
        L, S = q.shape[1], kk.shape[1]
        mask = _mha_masks(m, call, B, L, S - (1 if m.bias_k is not None else 0), q.dtype)
        if mask is not None and m.bias_k is not None:
            mask = F.pad(mask, (0, 1))
        heads = lambda t: t.reshape(B, t.shape[1], H, hd).transpose(1, 2)  # noqa: E731 (B, H, T, hd)
        att = torch.softmax(heads(q) @ heads(kk).transpose(-1, -2) / math.sqrt(hd)
                            + (mask if mask is not None else 0.0), dim=-1)  # (B, H, L, S)
        o = (att @ heads(vv)).transpose(1, 2).reshape(B, L, E)  # (B, L, E)
        o_leaf = o.detach().requires_grad_()
        out = F.linear(o_leaf, Wo, bo)  # (B, L, E)
        if call.output is not None:
            ref = call.output if m.batch_first else call.output.transpose(0, 1)
            tol = 1e-10 if acc == torch.float64 else (1e-4 if acc == torch.float32 else 2e-2)
            if not torch.allclose(out.detach(), ref.to(out.dtype), rtol=tol, atol=tol * float(ref.abs().max() + 1)):
                raise UnsupportedModule(f"{call.name}: the recomputed attention differs from the module's output "
                                        "(an option the rule does not model)")
        go = torch.autograd.grad(out, o_leaf, G)[0]  # (B, L, E)
        grads = torch.autograd.grad(o, leaves, go, allow_unused=True)
    gq, gk, gv = grads[:3]
    res: Dict[str, Factor] = {}
    for local in names:
        if local == "in_proj_weight":
            res[local] = Stacked((Outer(q_in, gq), Outer(k_in, gk), Outer(v_in, gv)), dim=0)
        elif local == "in_proj_bias":
            res[local] = Stacked((RowSum(gq), RowSum(gk), RowSum(gv)), dim=0)
        elif local in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            x, g = {"q": (q_in, gq), "k": (k_in, gk), "v": (v_in, gv)}[local[0]]
            res[local] = Outer(x, g)
        elif local == "out_proj.weight":
            res[local] = Outer(o.detach(), G)
        elif local == "out_proj.bias":
            res[local] = RowSum(G)
        elif local in ("bias_k", "bias_v"):
            g = grads[3 if local == "bias_k" else 4]
            res[local] = Dense(g.reshape(B, 1, 1, E))
        else:
            raise UnsupportedModule(f"no rule for parameter {local} of {call.name}")
    return res


mha_rule.claims = ("out_proj.weight", "out_proj.bias")  # scored here: MultiheadAttention uses them functionally
mha_rule.keeps_output = True
