"""Which parameters a score is taken over."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Union

from torch import nn

LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

ParamSpec = Union[str, Iterable[str], Callable[[str, nn.Parameter], bool]]


def is_lora_name(name: str) -> bool:
    """True for PEFT LoRA parameter names (``...lora_A.default.weight``, ``...lora_embedding_B.default``)."""
    parts = name.split(".")
    return any(m in parts for m in LORA_MARKERS)


def select_params(model: nn.Module, params: ParamSpec = "trainable") -> Dict[str, nn.Parameter]:
    """Resolve ``params`` to an ordered ``{name: parameter}`` dict (tied parameters appear once).

    ``params``: ``"trainable"`` (requires_grad), ``"all"``, ``"lora"`` (PEFT names), a list of names,
    or ``callable(name, param) -> bool``. Selecting nothing raises ``ValueError``.
    """
    named = list(model.named_parameters())  # deduplicated: a tied weight appears under its first name
    if isinstance(params, str):
        if params == "trainable":
            chosen = {n: p for n, p in named if p.requires_grad}
        elif params == "all":
            chosen = dict(named)
        elif params == "lora":
            chosen = {n: p for n, p in named if is_lora_name(n)}
        else:
            raise ValueError(
                f"params={params!r} is not understood; use 'trainable', 'all', 'lora', a list of parameter "
                "names, or a callable(name, param) -> bool"
            )
    elif callable(params):
        chosen = {n: p for n, p in named if params(n, p)}
    else:
        wanted = list(params)
        bad = [w for w in wanted if not isinstance(w, str)]
        if bad:
            raise TypeError(f"params list must hold parameter names (str), got {bad[:3]}")
        by_name = dict(named)
        # tied aliases (e.g. GPT-2 'lm_head.weight') resolve to their canonical name
        alias = {n: n for n in by_name}
        for n, p in model.named_parameters(remove_duplicate=False):
            for cn, cp in named:
                if cp is p:
                    alias.setdefault(n, cn)
                    break
        missing = [w for w in wanted if w not in alias]
        if missing:
            raise ValueError(
                f"unknown parameter names {missing[:5]}; the model has e.g. {_examples(named)}"
            )
        chosen = {}
        for w in wanted:
            chosen[alias[w]] = by_name[alias[w]]
    if not chosen:
        raise ValueError(
            f"params={_describe(params)} selects no parameter of {type(model).__name__}; "
            f"its parameters are e.g. {_examples(named)}"
        )
    return chosen


def _examples(named, k: int = 6) -> str:
    names = [n for n, _ in named]
    shown = ", ".join(names[:k])
    return f"[{shown}{', ...' if len(names) > k else ''}] ({len(names)} in all, {sum(p.requires_grad for _, p in named)} trainable)"


def _describe(params: ParamSpec) -> str:
    if isinstance(params, str):
        return repr(params)
    if callable(params):
        return getattr(params, "__name__", "callable")
    return repr(list(params))[:80]
