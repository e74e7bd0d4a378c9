"""The registry of per-layer norm rules, kept in one place.

A rule sees one call of one module: its positional inputs and the gradient of Σ_b L_b with respect to
the module's output (which, restricted to sample b, is sample b's own output gradient, since samples
are independent). It returns a factor (``gradsel_core.factors``) for each of the module's selected
parameters it was asked about. Rules return results; nothing is stored on modules or parameters.

    @register_norm_rule(MyLayer)
    def my_rule(call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]: ...

Modules can be named by class, by dotted class path (``"transformers.pytorch_utils.Conv1D"``, so the
library need not be imported), or matched by a predicate (look-alikes such as ``*RMSNorm``).
Parameters with no rule are computed exactly by the torch.func fallback in ``gradsel_core.ghost.fallback``.
The built-in rules live beside this file, one file per layer family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..factors import Factor
from ..errors import LayoutError, UnsupportedModule, UsageError
if TYPE_CHECKING:  # annotations only: importing ghost here would make `import gradsel_core.rules` circular
    from ..ghost.rows import Rows


@dataclass
class ModuleCall:
    """One call of a module during the scored forward."""

    module: Any  # the nn.Module called (typed Any: rules read attributes of their own class)
    name: str
    args: Tuple[Any, ...]  # positional inputs (tensors detached)
    kwargs: Dict[str, Any]
    grad_output: Optional[torch.Tensor] = None  # (B, ..., p) gradient of Σ_b L_b w.r.t. the output
    batch_size: int = 0
    output: Optional[torch.Tensor] = None  # the module's (first) output, detached: kept for rules that check
    # their recomputation against it (``keeps_output``)
    rows: Optional[Rows] = None  # input 0's row -> sample map when it is a proven flatten or routed rows
    # (``gradsel_core.ghost.rows``); a ``rowwise`` rule's output rows are the same

    def input(self, i: int = 0) -> torch.Tensor:
        x = self.args[i] if i < len(self.args) else None
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModule(f"module {self.name} ({type(self.module).__name__}) was called without a tensor input")
        return x


RuleFn = Callable[[ModuleCall, Sequence[str]], Dict[str, Factor]]
# the module's output recomputed by the rule's own formula from the call's inputs and the module's parameters:
# one tensor, or several acceptable ones (RMSNorm: w ⊙ x̂ or (1 + w) ⊙ x̂, the same gradient)
CheckFn = Callable[[ModuleCall], Union[torch.Tensor, Sequence[torch.Tensor]]]


@dataclass(frozen=True)
class NormRule:
    """A registered norm rule: the function and what the engine may assume about its module.

    ``fn(call, names) -> {local_param_name: Factor}`` scores the parameters ``names`` (local to the module) of
    one call. ``rowwise``: row i of the module's input makes row i of its output (Linear, norms), so a known
    row -> sample map of the input carries over to the output. ``keeps_output``: the rule checks its own
    recomputation against the module's output (``ModuleCall.output`` is filled in). ``claims``: local names
    of parameters of submodules that this rule scores (the module uses them functionally). ``check``: the
    module's output by the rule's own formula (``CheckFn``); the engine compares it with the output the tap saw
    the first time the rule scores a module (and again when the module's class, hooks or parameter shapes
    change), and moves the module to an exact fallback on a mismatch. A rule with neither ``check`` nor
    ``keeps_output`` is trusted as registered (for its own class only: a predicate never applies it)."""

    fn: RuleFn
    rowwise: bool = False
    keeps_output: bool = False
    claims: Tuple[str, ...] = ()
    check: Optional[CheckFn] = None

    @property
    def checks_itself(self) -> bool:
        return self.check is not None or self.keeps_output

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def __call__(self, call: ModuleCall, names: Sequence[str]) -> Dict[str, Factor]:
        return self.fn(call, names)


_BY_TYPE: Dict[Union[type, str], NormRule] = {}
_PREDICATES: List[Tuple[Callable[[nn.Module], bool], NormRule]] = []


def register_norm_rule(*targets: Union[type, str], predicate: Optional[Callable[[nn.Module], bool]] = None,
                       rowwise: bool = False, keeps_output: bool = False, claims: Sequence[str] = (),
                       check: Optional[CheckFn] = None):
    """Register ``fn(call, names) -> {local_param_name: Factor}`` for module types, dotted class
    names, or modules matching ``predicate``; the keywords are :class:`NormRule`'s. A later registration for
    the same target replaces the earlier. The decorated function is returned unchanged.

    A ``predicate`` (name-based look-alikes) needs ``check`` or ``keeps_output``: a look-alike is scored by the
    rule only once its output has been recomputed by the rule's formula and found equal."""
    if predicate is not None and check is None and not keeps_output:
        raise UsageError("register_norm_rule(predicate=...) needs check= (the output by the rule's formula) or "
                         "keeps_output=True: a look-alike is never scored by a rule that has not checked it")

    def deco(fn: RuleFn) -> RuleFn:
        rule = NormRule(fn, rowwise=rowwise, keeps_output=keeps_output, claims=tuple(claims), check=check)
        for t in targets:
            _BY_TYPE[t] = rule
        if predicate is not None:
            _PREDICATES.append((predicate, rule))
        return fn

    return deco


def rule_status(module: nn.Module) -> Tuple[Optional[NormRule], str]:
    """The rule for ``module`` and why: ``(rule, "rule")``, ``(None, "overridden")`` when a registered base
    class's rule does not apply because ``type(module)`` overrides its ``forward``, or ``(None, "none")``.

    A rule describes one class's forward. It applies to that class, and to a subclass that does not
    override ``forward`` (or registers a rule of its own). Predicates (look-alikes) are checked last."""
    for cls in type(module).__mro__:
        rule = _BY_TYPE.get(cls) or _BY_TYPE.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            if type(module).forward is not getattr(cls, "forward", None):
                return None, "overridden"
            return rule, "rule"
    for pred, rule in _PREDICATES:
        if pred(module):
            return rule, "rule"
    return None, "none"


def find_rule(module: nn.Module) -> Optional[NormRule]:
    """The rule that applies to ``module`` (see :func:`rule_status`), or None."""
    return rule_status(module)[0]


# -- helpers --------------------------------------------------------------------------------------------


def as_btd(x: torch.Tensor, B: int, name: str, rows: Optional[Rows] = None, last: Optional[int] = None) -> torch.Tensor:
    """(B, ..., d) -> (B, T', d) with T' the product of the middle dims; (B, d) -> (B, 1, d).

    With ``rows`` (a proven row -> sample map of x's dim 0, ``gradsel_core.ghost.rows``): flattened or routed rows
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


def output_tolerance(dtype: torch.dtype) -> float:
    """How far (relative to the output's largest entry) a rule's recomputation may be from the module's output:
    a few rounding errors of the dtype, far below any change a hook or a different formula makes."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 2e-2


def output_matches(expected: Union[torch.Tensor, Sequence[torch.Tensor]], actual: torch.Tensor,
                   chunk: int = 1 << 20) -> bool:
    """Whether ``actual`` (the module's output) equals ``expected`` (or one of several candidates), in shape
    and within :func:`output_tolerance` of its dtype, relative to ``actual``'s largest finite entry; a non-finite
    entry must be equal. Compared in slices of about ``chunk`` entries (no output-sized temporaries)."""
    cands = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    act = actual.detach().reshape(-1)
    acc = torch.float64 if act.dtype == torch.float64 else torch.float32
    scale = 0.0
    for i in range(0, act.numel(), chunk):
        a = act[i:i + chunk].to(acc)
        a = torch.where(torch.isfinite(a), a, torch.zeros((), dtype=acc, device=a.device))
        scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
    tol = output_tolerance(actual.dtype) * (scale + 1e-30)
    for e in cands:
        if not isinstance(e, torch.Tensor) or tuple(e.shape) != tuple(actual.shape):
            continue
        e = e.detach().reshape(-1)
        ok = True
        for i in range(0, act.numel(), chunk):
            a, b = act[i:i + chunk].to(acc), e[i:i + chunk].to(acc)
            fa, fb = torch.isfinite(a), torch.isfinite(b)
            if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
                ok = False
                break
            d = torch.where(fa, a - b, torch.zeros((), dtype=acc, device=a.device))
            if d.numel() and float(d.abs().max()) > tol:
                ok = False
                break
        if ok:
            return True
    return False


def only(names: Sequence[str], allowed: Sequence[str], call: ModuleCall) -> None:
    extra = [n for n in names if n not in allowed]
    if extra:
        raise UnsupportedModule(f"no rule for parameters {extra} of {call.name} ({type(call.module).__name__})")
