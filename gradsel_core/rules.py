"""The registry of per-layer norm rules, kept in one place.

A rule sees one call of one module: its positional inputs and the gradient of Σ_b L_b with respect to
the module's output (which, restricted to sample b, is sample b's own output gradient, since samples
are independent). It returns a factor (``gradsel_core.factors``) for each of the module's selected
parameters it was asked about. Rules return results; nothing is stored on modules or parameters.

    @register_norm_rule(MyLayer)
    def my_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]: ...

Modules can be named by class, by dotted class path (``"transformers.pytorch_utils.Conv1D"``, so the
library need not be imported), or matched by a predicate (look-alikes such as ``*RMSNorm``).
Parameters with no rule are computed exactly by the torch.func fallback in ``gradsel_core.ghost``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .factors import EmbRows, Factor, Outer, RowSum


@dataclass
class ModuleCall:
    """One call of a module during the scored forward."""

    module: nn.Module
    name: str
    args: Tuple[Any, ...]  # positional inputs (tensors detached)
    kwargs: Dict[str, Any]
    grad_output: Optional[torch.Tensor] = None  # (B, ..., p) gradient of Σ_b L_b w.r.t. the output
    batch_size: int = 0

    def input(self, i: int = 0) -> torch.Tensor:
        x = self.args[i] if i < len(self.args) else None
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModule(f"module {self.name} ({type(self.module).__name__}) was called without a tensor input")
        return x


class UnsupportedModule(RuntimeError):
    """The ghost engine cannot score this module exactly; the message says what to do."""


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


def as_btd(x: torch.Tensor, B: int, name: str) -> torch.Tensor:
    """(B, ..., d) -> (B, T', d) with T' the product of the middle dims; (B, d) -> (B, 1, d)."""
    if x.dim() < 2 or x.shape[0] != B:
        raise UnsupportedModule(
            f"module {name} saw a tensor of shape {tuple(x.shape)} whose dim 0 is not the batch ({B}); "
            "pass backend='vmap', or register a rule that knows its layout"
        )
    return x.reshape(B, -1, x.shape[-1])


def _only(names: Sequence[str], allowed: Sequence[str], call: ModuleCall) -> None:
    extra = [n for n in names if n not in allowed]
    if extra:
        raise UnsupportedModule(f"no rule for parameters {extra} of {call.name} ({type(call.module).__name__})")


# -- built-in rules -------------------------------------------------------------------------------------


def _linear_like(call: ModuleCall, names: Sequence[str], transposed: bool) -> Dict[str, Factor]:
    _only(names, ("weight", "bias"), call)
    B = call.batch_size
    A = as_btd(call.input(), B, call.name)  # (B, T, d)
    G = as_btd(call.grad_output, B, call.name)  # (B, T, p)
    out: Dict[str, Factor] = {}
    if "weight" in names:
        out["weight"] = Outer(A, G, transposed=transposed)
    if "bias" in names:
        out["bias"] = RowSum(G)
    return out


@register_norm_rule(nn.Linear)
def linear_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
    """y = x Wᵀ + b on (B, ..., d) or (B, d) inputs: W -> Outer(A, G), b -> Σ_t g_t."""
    return _linear_like(call, names, transposed=False)


@register_norm_rule("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")
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
    X = xhat.reshape(B, -1, n)  # (B, T, n)
    G = call.grad_output.reshape(B, -1, n)  # (B, T, n)
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
    return {"weight": RowSum(call.grad_output.reshape(B, -1, n), xhat.reshape(B, -1, n))}


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
