"""What the ghost engine learned went wrong on a pass: a rule or op use that cannot score a call, and the
signal to run the batch again."""
from __future__ import annotations

from typing import List

from ..errors import UnsupportedModule


def ways_out(what: str) -> str:
    return (
        f"{what}; pass backend='auto' (moves to an exact path), backend='vmap' (exact, slower), or register a "
        "norm rule with @gradsel_core.register_norm_rule(ModuleType)"
    )


class Retry(Exception):
    """Internal: the capture learned something about the model; run the batch again."""


class RuleFailure(UnsupportedModule):
    """A rule (or an op use) could not score a call: which parameters, and where."""

    def __init__(self, msg: str, params: List[str], module: str, layout: bool = False):
        super().__init__(msg)
        self.params, self.module = params, module
        self.layout = layout  # dim 0 was not the batch and no row map was known


class RuleFailures(UnsupportedModule):
    """Every rule or fallback that failed in one pass (all are moved at once)."""

    def __init__(self, failures: List[RuleFailure]):
        super().__init__("; ".join(str(f) for f in failures[:3]))
        self.failures = failures


class HiddenUseError(UnsupportedModule):
    """A selected parameter reaches the model's computation other than through its module attribute (a
    Python list, dict or closure holds the Parameter itself): neither the ghost capture nor ``torch.func``
    (``functional_call`` replaces module attributes only) sees that use. Only the per-sample loop is exact;
    ``backend="auto"`` moves straight to it."""

    only_loop = True

    def __init__(self, names: List[str]):
        super().__init__(
            f"parameter(s) {names[:4]} {'is' if len(names) == 1 else 'are'} used by the model other than through "
            "their module attribute (a Python list, dict or closure holds the Parameter): ghost and vmap cannot see "
            "that use and would miss its gradient; pass backend='loop' (exact), or reach the parameter through its "
            "module (e.g. self.lin.weight, not a list built in __init__)")
        self.params = names


class GradHookError(UnsupportedModule):
    """A selected parameter has a gradient hook (``p.register_hook``, or a post-accumulate hook where gradsel
    writes ``p.grad`` itself). The factors of the ghost engine and ``torch.func`` never pass through it; the
    per-sample loop (``torch.autograd.grad``) applies tensor hooks to each sample's gradient, so
    ``backend="auto"`` moves straight to it."""

    only_loop = True

    def __init__(self, names: List[str], kind: str):
        super().__init__(
            f"parameter(s) {names[:4]} {'has' if len(names) == 1 else 'have'} {kind}, which {backend_text(kind)}; "
            "pass backend='loop' (applies tensor hooks to each sample's gradient), or remove the hook while "
            "scoring and apply its effect to the result yourself")
        self.params = names


def backend_text(kind: str) -> str:
    return ("the ghost and vmap backends and filtered_backward cannot apply to per-sample factors"
            if "register_hook" in kind else "filtered_backward's one-backward mode would skip (it writes p.grad "
            "itself); use mode='two_pass', whose ordinary backward runs it")


def grad_hooks(params, post_accumulate: bool = False) -> None:
    """Raise :class:`GradHookError` naming the selected parameters with tensor gradient hooks (and, with
    ``post_accumulate``, post-accumulate-grad hooks)."""
    names = [n for n, p in params.items() if getattr(p, "_backward_hooks", None)]
    if names:
        raise GradHookError(names, "a gradient hook (p.register_hook)")
    if post_accumulate:
        names = [n for n, p in params.items() if getattr(p, "_post_accumulate_grad_hooks", None)]
        if names:
            raise GradHookError(names, "a post-accumulate-grad hook (p.register_post_accumulate_grad_hook)")
