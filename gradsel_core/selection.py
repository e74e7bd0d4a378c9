"""Gradient-norm sample selection (arXiv 2604.17215, "Continual Safety Alignment via Gradient-Based
Sample Selection") and the ablation policies around it.

    sel = gs.select(store_or_scores, policy="median_band", ratio=0.2, loss_filter_std=1.0)
    sel.kept_ids, sel.dropped_ids, sel.summary, sel.kept_mask

    mask = gs.keep_mask(res.norms, res.losses, ratio=0.2)     # one training batch -> torch.BoolTensor [B]

Both entry points run the same pipeline (``_select_core``) and the same policy functions (``POLICIES``);
``select`` works over a whole score store (optionally per group), ``keep_mask`` over one batch.

Semantics (applied identically by every policy, per group -- or per batch for ``keep_mask``):

* **n** is the number of samples in the group / batch (the paper's B), *including* samples that are
  later excluded. Every count is ``target = ⌊ratio·n⌋`` as a user means it: computed exactly from the
  decimal the ratio prints as (``Fraction(repr(ratio))``) and then with a relative tolerance of 1e-9
  for floating-point representation, so ``0.29·100`` gives 29, ``(1/3)·3`` gives 1 and ``(1/3)·300``
  gives 100 (plain float arithmetic gives 28, 0 and 99). When fewer candidates than ``target`` exist,
  all candidates are kept (the count is capped; ``summary["target"]`` records the uncapped value).
* **Per-batch filtering keeps at least one sample** (:func:`keep_mask`, hence ``filtered_backward``
  and online training): when ``ratio > 0`` and the batch is not empty, the count-based policies
  (``median_band``, ``keep_bottom``, ``keep_top``, ``random``) keep ``max(1, ⌊ratio·B⌋)``, so a small
  batch at a small ratio still yields a gradient. (``drop_top`` keeps ``B − ⌊ratio·B⌋ ≥ 1`` for any
  ratio below 1 anyway; at ratio 1 it drops everything, as asked.) :func:`select` over a whole
  dataset does not round up: ⌊ratio·n⌋ may be 0 there.
* **Validity.** A sample whose norm, loss or ranking key is NaN/±inf is never kept; the count is in
  ``summary["nonfinite"]``. Loss statistics are taken over valid samples only.
* **Loss filter** (step 1 of the paper). ``loss_filter_std="auto"`` (the default everywhere) means
  1.0 for ``median_band`` -- the paper's rule -- and no filter (``None``) for every other policy, so
  ``drop_top``, ``keep_top``, ``random``, ... do exactly what their names say. An explicit number
  applies the filter to *any* policy (an ablation that wants ``random`` to differ from
  ``median_band`` only in the norm criterion passes ``loss_filter_std=1.0`` to both); ``None``
  disables it. ``summary["loss_filter_std"]`` records the value used. Survivors are the valid samples with
  ``|loss − mean| <= loss_filter_std · std`` (population std, ddof=0, inclusive, with a 1e-9
  relative tolerance so identical losses -- std 0 -- all pass despite rounding in the mean).
* **Ranking key**: the norm, or with ``length_normalize`` the norm divided by the target-token count
  (``True``/``"tokens"``) or by its square root (``"sqrt"``); token counts below 1 are treated as 1
  (a zero-token sample has no loss terms and a zero gradient, so its key stays its norm). The loss
  filter never uses the key; ``band``/``threshold`` edges apply to the key.
* **Ties** are broken deterministically by a stable sort on (key, then input position): earlier
  samples win a tie for a kept slot.
* **Policies** (``POLICIES``, extend with ``register_policy``), each on the survivors:

  ``median_band``  keep the ``target`` survivors whose key is closest to the survivors' median
                   (``np.median``: mean of the two middle values for an even count). The paper's rule.
  ``keep_bottom``  keep the ``target`` lowest keys.
  ``keep_top``     keep the ``target`` highest keys (the high-gradient ablation).
  ``drop_top``     drop the ``target`` highest keys and keep the rest, i.e. ``n − ⌊ratio·n⌋`` samples
                   when nothing is invalid or loss-filtered (the dropped count rounds down).
  ``band``         (``low_q``, ``high_q``) keep keys within ``[quantile(low_q), quantile(high_q)]`` of
                   the survivors' keys (``np.quantile``, linear interpolation, inclusive; ties are kept
                   or dropped together). ``ratio`` is ignored.
  ``threshold``    (``max_norm``) keep keys ``<= max_norm``. ``ratio`` is ignored.
  ``drop_opposed`` (ranks by the cosine with a reference gradient, ``reference=`` picks one of several)
                   drop the ``target`` samples whose gradient most opposes the reference (lowest
                   cosines) and keep the rest.
  ``project_band`` (cosine) keep the ``target`` survivors whose cosine is closest to the median cosine.
  ``random``       keep ``target`` survivors uniformly at random (``numpy.random.default_rng(seed)``;
                   with ``group_by``, group ``g`` -- numbered by first appearance -- uses
                   ``default_rng([seed, g])``; a ``numpy.random.Generator`` passed as ``seed`` is used
                   as is). Same kept count as ``median_band`` at the same ratio.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
import dataclasses
import functools
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "Selection",
    "select",
    "keep_mask",
    "POLICIES",
    "register_policy",
    "policy_names",
    "target_count",
    "norm_per_token",
    "SCORES",
    "resolve_loss_filter_std",
    "LOSS_FILTER_AUTO",
]

# A policy takes the survivors' ranking keys (1-D float64, input order) and returns a bool mask over
# them plus a dict of its own figures. ``n`` is the group/batch size, ``ratio`` the validated ratio,
# ``rng`` a numpy Generator; extra keyword-only parameters are the policy's own (``policy_kwargs``).
PolicyFn = Callable[..., Tuple[np.ndarray, Dict[str, Any]]]
POLICIES: Dict[str, PolicyFn] = {}
_CORE_PARAMS = ("key", "n", "ratio", "rng", "per_batch")
# A policy that declares ``per_batch`` (keyword-only) is told whether it runs on one training batch
# (keep_mask), where a positive ratio keeps at least one sample; other policies are not passed it.

LOSS_FILTER_AUTO = "auto"  # loss_filter_std default: 1.0 for median_band, None for every other policy
LossFilterStd = Union[float, None, str]


def register_policy(name: str) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator adding a policy ``fn(key, *, n, ratio, rng, **own_params) -> (mask, stats)``."""

    def deco(fn: PolicyFn) -> PolicyFn:
        POLICIES[name] = fn
        return fn

    return deco


def policy_names() -> List[str]:
    return sorted(POLICIES)


_COUNT_RTOL = 1e-9  # products this close (relative) below an integer count as that integer


@functools.lru_cache(maxsize=256)
def _ratio_fraction(ratio: float) -> Fraction:
    """The decimal a ratio prints as, exactly (parsed once per ratio, not once per group)."""
    return Fraction(repr(ratio))


def target_count(ratio: float, n: int, per_batch: bool = False) -> int:
    """⌊ratio·n⌋ as a user means it: exact for the decimal the ratio prints as (0.29·100 -> 29), with a
    1e-9 relative tolerance for floating-point representation ((1/3)·3 -> 1, (1/3)·300 -> 100).

    ``per_batch=True`` (in-step filtering) keeps at least one: ``max(1, ⌊ratio·n⌋)`` when
    ``ratio > 0`` and ``n >= 1``.
    """
    n = int(n)
    exact = _ratio_fraction(float(ratio)) * n
    k = math.floor(exact)
    if exact - k > 0 and (k + 1 - exact) <= _COUNT_RTOL * max(1.0, float(exact)):
        k += 1
    if per_batch and k == 0 and ratio > 0 and n >= 1:
        k = 1
    return int(k)


def resolve_loss_filter_std(policy: str, loss_filter_std: LossFilterStd = LOSS_FILTER_AUTO) -> Optional[float]:
    """The loss pre-filter width actually used: ``"auto"`` -> 1.0 for ``median_band`` (the paper's
    step 1), ``None`` for every other policy; ``None`` -> no filter; a number -> that number (checked:
    finite and >= 0), for any policy."""
    if isinstance(loss_filter_std, str):
        if loss_filter_std.strip().lower() != LOSS_FILTER_AUTO:
            raise ValueError(f"loss_filter_std must be 'auto', None or a finite number >= 0, got {loss_filter_std!r}")
        return 1.0 if policy == "median_band" else None
    if loss_filter_std is None:
        return None
    try:
        k = float(loss_filter_std)
    except (TypeError, ValueError):
        raise ValueError(f"loss_filter_std must be 'auto', None or a finite number >= 0, got {loss_filter_std!r}") from None
    if not (k >= 0.0) or math.isinf(k):
        raise ValueError(f"loss_filter_std must be 'auto', None or a finite number >= 0, got {loss_filter_std!r}")
    return k


@dataclass
class Selection:
    """Outcome of :func:`select`: ids in ascending order, a summary dict, and the mask in input order."""

    kept_ids: np.ndarray
    dropped_ids: np.ndarray
    summary: Dict[str, Any]
    kept_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.kept_ids.shape[0])


# --------------------------------------------------------------------------------------------------
# policies (the only place policy logic lives; shared by select and keep_mask)


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` smallest ``values`` (finite), earlier positions first among equal values:
    the first ``k`` of a stable argsort, found in O(n) (a partition, then the ties at the edge by position)."""
    n = values.shape[0]
    mask = np.zeros(n, dtype=bool)
    k = min(max(int(k), 0), n)
    if k == 0:
        return mask
    if k == n:
        mask[:] = True
        return mask
    edge = np.partition(values, k - 1)[k - 1]  # the k-th smallest value
    below = values < edge
    mask |= below
    need = k - int(np.count_nonzero(below))
    ties = np.flatnonzero(values == edge)
    mask[ties[:need]] = True  # ascending positions: earlier samples win the tie
    return mask


def _edges(key: np.ndarray, mask: np.ndarray) -> Dict[str, float]:
    kept = key[mask]
    if kept.size == 0:
        return {"kept_key_min": math.nan, "kept_key_max": math.nan}
    return {"kept_key_min": float(kept.min()), "kept_key_max": float(kept.max())}


@register_policy("median_band")
def _median_band(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, per_batch: bool = False):
    target = target_count(ratio, n, per_batch)
    mask = np.zeros(key.shape[0], dtype=bool)
    if key.size == 0:
        return mask, {"target": target, "median": math.nan, "max_kept_distance": math.nan}
    median = float(np.median(key))
    dist = np.abs(key - median)
    mask = _smallest(dist, target)
    stats = {"target": target, "median": median}
    stats["max_kept_distance"] = float(dist[mask].max()) if mask.any() else math.nan
    stats.update(_edges(key, mask))  # the band actually kept: [kept_key_min, kept_key_max]
    return mask, stats


@register_policy("keep_bottom")
def _keep_bottom(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, per_batch: bool = False):
    target = target_count(ratio, n, per_batch)
    mask = _smallest(key, target)
    return mask, {"target": target, **_edges(key, mask)}


@register_policy("keep_top")
def _keep_top(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, per_batch: bool = False):
    target = target_count(ratio, n, per_batch)
    mask = _smallest(-key, target)  # highest first, earlier position on ties
    return mask, {"target": target, **_edges(key, mask)}


@register_policy("drop_top")
def _drop_top(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator):
    n_drop = target_count(ratio, n)
    mask = _smallest(key, key.size - n_drop)  # later positions dropped first on ties
    return mask, {"target_dropped": n_drop, **_edges(key, mask)}


@register_policy("drop_opposed")
def _drop_opposed(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, reference: int = 0):
    """Drop the ⌊ratio·n⌋ samples whose gradient most opposes the reference (lowest cosines)."""
    n_drop = target_count(ratio, n)
    mask = _smallest(-key, key.size - n_drop)  # highest cosines kept (earlier positions on ties)
    return mask, {"target_dropped": n_drop, **_edges(key, mask)}


@register_policy("project_band")
def _project_band(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, per_batch: bool = False,
                  reference: int = 0):
    """The median band on the cosine with the reference: keep the ⌊ratio·n⌋ closest to the median cosine."""
    return _median_band(key, n=n, ratio=ratio, rng=rng, per_batch=per_batch)


_drop_opposed.ranks_by = _project_band.ranks_by = "cosine"


@register_policy("band")
def _band(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, low_q: float, high_q: float):
    low_q, high_q = float(low_q), float(high_q)
    if not (0.0 <= low_q <= high_q <= 1.0):
        raise ValueError(f"band policy needs 0 <= low_q <= high_q <= 1, got low_q={low_q}, high_q={high_q}")
    if key.size == 0:
        return np.zeros(0, dtype=bool), {"low_q": low_q, "high_q": high_q, "band_low": math.nan, "band_high": math.nan}
    lo, hi = (float(v) for v in np.quantile(key, [low_q, high_q]))
    mask = (key >= lo) & (key <= hi)
    return mask, {"low_q": low_q, "high_q": high_q, "band_low": lo, "band_high": hi}


@register_policy("threshold")
def _threshold(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, max_norm: float):
    max_norm = float(max_norm)
    if math.isnan(max_norm):
        raise ValueError("threshold policy needs a max_norm that is not NaN")
    return key <= max_norm, {"max_norm": max_norm}


@register_policy("random")
def _random(key: np.ndarray, *, n: int, ratio: float, rng: np.random.Generator, per_batch: bool = False):
    target = target_count(ratio, n, per_batch)
    mask = np.zeros(key.shape[0], dtype=bool)
    k = min(target, key.size)
    if k:
        mask[rng.choice(key.size, size=k, replace=False)] = True
    return mask, {"target": target}


_SEGMENTED_NAMES = ("median_band", "keep_bottom", "keep_top", "drop_top", "drop_opposed", "project_band")


def _resolve_policy(policy: str, policy_kwargs: Mapping) -> Tuple[PolicyFn, Dict[str, Any], bool]:
    """(fn, its own kwargs, whether it takes ``per_batch``)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; known policies: {', '.join(policy_names())}")
    fn = POLICIES[policy]
    params = inspect.signature(fn).parameters
    own = [p for p in params if p not in _CORE_PARAMS and params[p].kind == inspect.Parameter.KEYWORD_ONLY]
    has_var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(policy_kwargs) - set(own))
    if unknown and not has_var_kw:
        raise ValueError(
            f"policy {policy!r} does not take parameter(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(own) if own else 'no extra parameters'}"
        )
    missing = [p for p in own if params[p].default is inspect.Parameter.empty and p not in policy_kwargs]
    if missing:
        raise ValueError(f"policy {policy!r} needs parameter(s) {', '.join(missing)} (pass them as keyword arguments)")
    return fn, dict(policy_kwargs), "per_batch" in params


# --------------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, any device / dtype (bf16 included)
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.double()
        return t.numpy()
    return np.asarray(x)


def _as_float_1d(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    try:
        return arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric: {e}") from None


def _check_ratio(ratio: float) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}") from None
    if not (0.0 <= r <= 1.0):  # also rejects NaN
        raise ValueError(f"ratio must be in [0, 1] (the fraction of each group/batch to keep), got {ratio!r}")
    return r


def _length_mode(length_normalize: Union[bool, str, None]) -> Optional[str]:
    if length_normalize is None or length_normalize is False:
        return None
    if length_normalize is True:
        return "tokens"
    if isinstance(length_normalize, str):
        m = length_normalize.strip().lower()
        if m in ("", "none", "false", "off"):
            return None
        if m in ("tokens", "true", "linear"):
            return "tokens"
        if m in ("sqrt", "sqrt_tokens", "sqrt-tokens"):
            return "sqrt"
    raise ValueError(f"length_normalize must be False, True/'tokens' (norm / tokens) or 'sqrt' (norm / sqrt(tokens)), got {length_normalize!r}")


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _fields_of(obj: Any) -> Optional[Mapping]:
    fields = getattr(obj, "fields", None)
    if callable(fields) and not isinstance(fields, Mapping):
        try:
            fields = fields()
        except TypeError:
            return None
    return fields if isinstance(fields, Mapping) else None


def _labels_array(x: Any) -> np.ndarray:
    """Group labels as a 1-D array. A Python list/tuple mixing kinds (``["1", 1]``) becomes an object
    array, so numpy does not turn ``1`` into ``"1"`` and merge the two groups."""
    if isinstance(x, (list, tuple)):
        kinds = {_label_kind(_label_value(v)) for v in x} - {"none"}
        if len(kinds) > 1:
            arr = np.empty(len(x), dtype=object)
            for i, v in enumerate(x):
                arr[i] = v
            return arr
    return _to_numpy(x)


def _resolve_groups(obj: Any, group_by: Any) -> Optional[np.ndarray]:
    if group_by is None:
        return None
    if isinstance(group_by, str):
        if isinstance(obj, Mapping):
            if group_by not in obj:
                raise ValueError(f"cannot group by {group_by!r}: no such key (keys: {', '.join(map(str, obj))})")
            return _labels_array(obj[group_by])
        fields = _fields_of(obj)
        if fields is not None and group_by in fields:
            return _labels_array(fields[group_by])
        value = getattr(obj, group_by, None)
        if value is not None and not callable(value):
            return _labels_array(value)
        avail = f"available fields: {', '.join(map(str, fields))}" if fields else "the input exposes no per-record fields"
        raise ValueError(f"cannot group by {group_by!r}: {type(obj).__name__} has no field or attribute of that name ({avail})")
    return _labels_array(group_by)


def _columns(obj: Any, group_by: Any) -> Dict[str, Optional[np.ndarray]]:
    norms, losses = _get(obj, "norms"), _get(obj, "losses")
    if norms is None or losses is None:
        raise ValueError(f"select needs per-sample 'norms' and 'losses'; {type(obj).__name__} lacks them")
    norms = _as_float_1d(norms, "norms")
    n = norms.shape[0]
    cols: Dict[str, Optional[np.ndarray]] = {"norms": norms, "losses": _as_float_1d(losses, "losses")}
    tokens = _get(obj, "tokens")
    cols["tokens"] = None if tokens is None else _as_float_1d(tokens, "tokens")
    cos = _get(obj, "cosines")
    cols["cosines"] = None if cos is None else _as_cosines(cos)
    ids = _get(obj, "ids")
    cols["ids"] = np.arange(n) if ids is None else _to_numpy(ids)
    groups = _resolve_groups(obj, group_by)
    if groups is not None and groups.ndim != 1:
        raise ValueError(f"group labels must be 1-D, got shape {tuple(groups.shape)}")
    cols["groups"] = groups
    cols["group_codes"] = _stored_codes(obj, group_by, n) if groups is not None else None
    return cols


def _stored_codes(obj: Any, group_by: Any, n: int) -> Optional[Tuple[List[Any], np.ndarray]]:
    """A store's dictionary codes of a string field, when they number its values by first appearance
    (checked, O(n)): the groups without hashing 10M strings again. ``None`` otherwise."""
    fn = getattr(obj, "field_codes", None)
    if not isinstance(group_by, str) or not callable(fn):
        return None
    got = fn(group_by)
    if got is None:
        return None
    codes, distinct = got
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape != (n,) or (n and codes[0] != 0):
        return None
    if n:
        run_max = np.maximum.accumulate(codes)
        if codes.min() < 0 or run_max[-1] + 1 != len(distinct) or np.any(codes[1:] > run_max[:-1] + 1):
            return None
    if not all(type(v) is str for v in distinct):
        return None
    return list(distinct), codes


def _as_cosines(x: Any) -> np.ndarray:
    """Cosines with one reference (n,) or several (n, R), as float64."""
    a = _to_numpy(x).astype(np.float64)
    if a.ndim not in (1, 2):
        raise ValueError(f"cosines must have shape (n,) or (n, R), got {tuple(a.shape)}")
    return a


def _reference_key(policy: str, cols: Mapping[str, Optional[np.ndarray]], reference: int) -> np.ndarray:
    """The ranking key of a reference policy: the cosine with reference ``reference``."""
    cos = cols.get("cosines")
    if cos is None:
        raise ValueError(
            f"policy {policy!r} ranks samples by the cosine of their gradient with a reference gradient, and "
            "none was given: score with a reference (GradNormEngine.score(batch, reference=ref), "
            "gs.score_dataset(..., reference=ref), `gradsel score --reference ref.safetensors`)")
    if cos.ndim == 1:
        if reference != 0:
            raise ValueError(f"reference={reference}: the scores hold the cosine with one reference only")
        return cos
    if not 0 <= reference < cos.shape[1]:
        raise ValueError(f"reference={reference}: the scores hold cosines with {cos.shape[1]} references")
    return cos[:, reference]


def _check_lengths(cols: Mapping[str, Optional[np.ndarray]]) -> int:
    n = cols["norms"].shape[0]
    bad = {k: v.shape[0] for k, v in cols.items() if isinstance(v, np.ndarray) and v.shape[0] != n}
    if bad:
        raise ValueError(f"per-sample arrays must all have length {n} (that of norms); got " + ", ".join(f"{k}: {m}" for k, m in bad.items()))
    return n


# below this many values the plain Python paths are as fast as pandas' hashing, and the CLI starts without
# importing pandas (about 0.5 s)
_PANDAS_FROM = 100_000


def _pandas(n: int) -> Any:
    """pandas for hashing ``n`` values when it pays and is installed, else None."""
    if n < _PANDAS_FROM:
        return None
    try:
        import pandas as pd
    except ImportError:
        return None
    return pd


def _check_ids(ids: np.ndarray) -> None:
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.dtype.kind in "iu" and bool(np.all(ids[1:] > ids[:-1])):
        return  # strictly increasing (the usual case: positions or dataset order): unique in O(n)
    if ids.dtype.kind == "O" and ids.shape[0]:
        if len({type(v) for v in ids.tolist()}) > 1:
            raise ValueError("ids must be mutually comparable (all integers or all strings)")
        pd = _pandas(ids.shape[0])
        if pd is not None:  # hashing: a sort of 10M Python strings takes seconds
            dup_mask = pd.Index(ids).duplicated(keep="first")
            if not dup_mask.any():
                return
            dup = sorted(set(ids[dup_mask].tolist()))
            raise ValueError(f"ids must be unique; duplicated: {dup[:5]}{' ...' if len(dup) > 5 else ''}")
    try:
        uniq, counts = np.unique(ids, return_counts=True)
    except TypeError:
        raise ValueError("ids must be mutually comparable (all integers or all strings)") from None
    if uniq.shape[0] != ids.shape[0]:
        dup = uniq[counts > 1][:5].tolist()
        raise ValueError(f"ids must be unique; duplicated: {dup}{' ...' if (counts > 1).sum() > 5 else ''}")


# --------------------------------------------------------------------------------------------------
# the shared pipeline


SCORES = ("norm", "norm_per_token")


def _check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)} (norm: ||grad L_i|| as scored; norm_per_token: "
                         f"||grad sum_t l_t|| / sqrt(n_tokens), the length-debiased norm), got {score!r}")
    return score


def norm_per_token(norms: Any, tokens: Any, loss_reduction: str) -> np.ndarray:
    """The length-debiased score ``||∇ Σ_t ℓ_t|| / √n`` (float64, (n,)) from the norms of the same backward.

    ``loss_reduction`` is how the per-sample loss the norms belong to was reduced over the sample's ``n``
    target tokens: ``"sum"`` (the norm is ``||∇ Σ_t ℓ_t||``: divided by √n) or ``"mean"`` (the loss is
    ``Σ_t ℓ_t / n``, so ``||∇ Σ_t ℓ_t|| = n·norm``: multiplied by √n). Exact in both cases; a sample with
    no target token (n = 0) has a zero gradient and scores its norm (0). Only for the built-in causal-LM
    loss, whose token count is the count of target tokens the loss sums over."""
    norms = _as_float_1d(norms, "norms")
    t = np.maximum(_as_float_1d(tokens, "tokens"), 1.0)  # (n,); NaN stays NaN (the sample becomes invalid)
    if loss_reduction == "sum":
        return norms / np.sqrt(t)
    if loss_reduction == "mean":
        return norms * np.sqrt(t)
    raise ValueError(f"loss_reduction must be 'mean' or 'sum' (how the scored losses were reduced over tokens), "
                     f"got {loss_reduction!r}")


def _loss_reduction_of(obj: Any) -> Optional[str]:
    """The per-token reduction the norms of ``obj`` were scored with: a ``ScoreStore``'s manifest config,
    a ``ScoreResult``'s ``loss_reduction``, a mapping's ``"loss_reduction"``; ``None`` when unknown."""
    red = _get(obj, "loss_reduction")
    if red is None:
        meta = getattr(obj, "meta", None)
        cfg = meta.get("config") if isinstance(meta, Mapping) else None
        if isinstance(cfg, Mapping):
            if isinstance(cfg.get("loss"), Mapping) and cfg["loss"].get("kind") not in (None, "causal_lm_cross_entropy"):
                raise ValueError(f"score='norm_per_token' needs the built-in causal-LM loss; the store at "
                                 f"{getattr(obj, 'path', '?')} was scored with loss {cfg['loss'].get('kind')!r}")
            red = cfg.get("loss_reduction")
    return red if isinstance(red, str) else None


def _ranking_key(norms: np.ndarray, tokens: Optional[np.ndarray], mode: Optional[str]) -> np.ndarray:
    if mode is None:
        return norms
    t = np.maximum(tokens, 1.0)  # tokens < 1 -> 1; NaN tokens stay NaN (sample becomes invalid)
    return norms / (t if mode == "tokens" else np.sqrt(t))


def _select_group(
    norms: np.ndarray,
    losses: np.ndarray,
    key: np.ndarray,
    fn: PolicyFn,
    kwargs: Mapping,
    ratio: float,
    loss_filter_std: Optional[float],
    rng: np.random.Generator,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    n = norms.shape[0]
    valid = np.isfinite(norms) & np.isfinite(losses) & np.isfinite(key)
    stats: Dict[str, Any] = {"n": n, "nonfinite": int(n - valid.sum())}
    if loss_filter_std is None:
        survivors = valid
        stats.update(loss_mean=math.nan, loss_std=math.nan, loss_low=-math.inf, loss_high=math.inf)
    else:
        lv = losses[valid]
        mu = float(lv.mean()) if lv.size else math.nan
        sd = float(lv.std()) if lv.size else math.nan
        half = loss_filter_std * sd
        tol = 1e-9 * (abs(mu) + sd) if lv.size else 0.0
        with np.errstate(invalid="ignore"):
            survivors = valid & (np.abs(losses - mu) <= half + tol)
        stats.update(loss_mean=mu, loss_std=sd, loss_low=mu - half, loss_high=mu + half)
    stats["loss_filtered"] = int(valid.sum() - survivors.sum())
    stats["survivors"] = int(survivors.sum())
    pos = np.flatnonzero(survivors)
    sub_mask, pstats = fn(key[pos], n=n, ratio=ratio, rng=rng, **kwargs)
    sub_mask = np.asarray(sub_mask, dtype=bool)
    if sub_mask.shape != pos.shape:
        raise RuntimeError(f"policy returned a mask of shape {sub_mask.shape} for {pos.shape[0]} survivors")
    mask = np.zeros(n, dtype=bool)
    mask[pos[sub_mask]] = True
    stats.update(pstats)
    stats["kept"] = int(mask.sum())
    stats["dropped"] = int(n - stats["kept"])
    return mask, stats


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    if den == 0.0 or not math.isfinite(den):
        return math.nan
    return float(np.clip((xc * yc).sum() / den, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    return avg[inv.reshape(-1)]


def _length_diagnostics(norms: np.ndarray, key: np.ndarray, tokens: Optional[np.ndarray], mask: np.ndarray, mode: Optional[str]) -> Dict[str, Any]:
    if tokens is None:
        return {}
    ok = np.isfinite(norms) & np.isfinite(tokens)
    out: Dict[str, Any] = {
        "norm_tokens_pearson": _pearson(norms[ok], tokens[ok]),
        "norm_tokens_spearman": _pearson(_average_ranks(norms[ok]), _average_ranks(tokens[ok])) if ok.any() else math.nan,
    }
    if mode is not None:
        okk = np.isfinite(key) & np.isfinite(tokens)
        out["key_tokens_spearman"] = _pearson(_average_ranks(key[okk]), _average_ranks(tokens[okk])) if okk.any() else math.nan
    tok_ok = np.isfinite(tokens)
    kept_t, drop_t = tokens[mask & tok_ok], tokens[~mask & tok_ok]
    out["mean_tokens_kept"] = float(kept_t.mean()) if kept_t.size else math.nan
    out["mean_tokens_dropped"] = float(drop_t.mean()) if drop_t.size else math.nan
    return out


def _label_value(lab: Any) -> Any:
    """A label as a plain Python value (numpy scalars unwrapped; NaN -> None: the missing-label group)."""
    if isinstance(lab, np.generic):
        lab = lab.item()
    if isinstance(lab, float) and math.isnan(lab):
        return None
    return lab


def _label_kind(lab: Any) -> str:
    if lab is None:
        return "none"
    if isinstance(lab, bool):
        return "bool"
    if isinstance(lab, (int, float)):
        return "number"  # 1 and 1.0 are one group, as in a numeric column
    if isinstance(lab, (str, bytes)):
        return "str"
    return type(lab).__name__


def _first_appearance(uniq_first: np.ndarray, inverse: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Renumber ``np.unique`` groups by first appearance: ``(order, codes)`` where ``order[g]`` is the
    ``np.unique`` index of group ``g`` and ``codes`` (n,) the group of each record."""
    order = np.argsort(uniq_first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return order, rank[inverse.reshape(-1)]


def _factorize_objects(labels: np.ndarray) -> Optional[Tuple[List[Any], np.ndarray]]:
    """Group codes of an object array whose labels are all strings (missing labels, None or NaN, form one
    group labelled None), hash-based (pandas when installed, else one dict pass); ``None`` for any other
    object array."""
    values = labels.tolist()
    kinds = set(map(type, values))
    if not kinds <= {str, type(None), float}:
        return None
    if float in kinds and any(v == v for v in values if type(v) is float):
        return None  # a real number among strings: the general path keeps "1" and 1.0 apart
    pd = _pandas(len(values))
    if pd is None:
        table: Dict[Any, int] = {}
        codes = np.fromiter((table.setdefault(None if v is None or v != v else v, len(table)) for v in values),
                            dtype=np.int64, count=len(values))
        return list(table), codes
    c, u = pd.factorize(labels)  # first-appearance order; None and NaN -> -1
    codes = np.asarray(c, dtype=np.int64)
    firsts: List[Any] = list(u)
    na = codes < 0
    if na.any():  # the missing group goes where it first appears among the groups
        first_na = int(np.argmax(na))
        rank = int(codes[:first_na].max()) + 1 if first_na else 0  # groups seen before it: codes 0..rank-1
        codes = np.where(codes >= rank, codes + 1, codes)
        codes[na] = rank
        firsts.insert(rank, None)
    return firsts, codes


def _group_codes(labels: np.ndarray) -> Tuple[List[Any], np.ndarray]:
    """``(labels of the groups in order of first appearance, group code (n,) of each record)``, vectorized
    (``np.unique`` for numeric and string arrays, hashing for string object arrays). Missing labels
    (None, NaN) form one group labelled None. Labels of different kinds are different groups even when
    they compare or print equal: ``"1"`` and ``1`` (and ``True`` and ``1``) are two groups."""
    n = labels.shape[0]
    if n == 0:
        return [], np.zeros(0, dtype=np.int64)
    if labels.dtype.kind in "biuUSf":
        real = ~np.isnan(labels) if labels.dtype.kind == "f" else np.ones(n, dtype=bool)
        pos = np.flatnonzero(real)
        uniq, first, inv_real = np.unique(labels[real], return_index=True, return_inverse=True)
        firsts = [_label_value(v) for v in uniq.tolist()]
        first = pos[first]
        inv = np.full(n, len(firsts), dtype=np.int64)
        inv[real] = inv_real.reshape(-1)
        if pos.shape[0] < n:  # NaN labels: the missing group
            firsts.append(None)
            first = np.append(first, int(np.flatnonzero(~real)[0]))
        order, codes = _first_appearance(first, inv)
        return [firsts[int(k)] for k in order], codes
    if labels.dtype.kind == "O":
        fact = _factorize_objects(labels)
        if fact is not None:
            return fact
    # mixed kinds: one pass keyed by (kind, value)
    table: Dict[Tuple[str, Any], int] = {}
    firsts = []
    codes = np.empty(n, dtype=np.int64)
    for i, lab in enumerate(labels.tolist()):
        lab = _label_value(lab)
        k = (_label_kind(lab), lab)
        c = table.get(k)
        if c is None:
            c = table[k] = len(firsts)
            firsts.append(lab)
        codes[i] = c
    return firsts, codes


def _group_index(labels: np.ndarray) -> List[Tuple[Any, np.ndarray]]:
    """Groups in order of first appearance: [(label, positions ascending)] (see :func:`_group_codes`)."""
    return _split_groups(*_group_codes(labels))


def _split_groups(firsts: List[Any], codes: np.ndarray) -> List[Tuple[Any, np.ndarray]]:
    if not firsts:
        return []
    if len(firsts) <= 8:  # a few groups: one scan each beats a sort
        return [(label, np.flatnonzero(codes == g)) for g, label in enumerate(firsts)]
    perm = _group_order(codes, len(firsts))  # positions grouped, ascending within each group
    bounds = np.cumsum(np.bincount(codes, minlength=len(firsts)))[:-1]
    return list(zip(firsts, np.split(perm.astype(np.int64, copy=False), bounds)))


def _group_keys(labels: Sequence[Any]) -> List[str]:
    """The ``summary["groups"]`` key of each group: ``str(label)``, unless two groups print the same
    (``"1"`` and ``1``): then each of those is keyed ``"<type>:<label>"`` (``"str:1"``, ``"int:1"``)."""
    plain = [str(lab) for lab in labels]
    counts: Dict[str, int] = {}
    for k in plain:
        counts[k] = counts.get(k, 0) + 1
    keys = [k if counts[k] == 1 else f"{type(lab).__name__}:{k}" for k, lab in zip(plain, labels)]
    if len(set(keys)) != len(keys):  # e.g. two distinct objects of one type printing alike
        keys = [f"{k}#{i}" for i, k in enumerate(keys)]
    return keys


# --------------------------------------------------------------------------------------------------
# many groups at once: the count-based policies as segmented numpy (same numbers as the per-group loop)

_VECTOR_MIN_GROUPS = 64  # from this many groups on, the built-in count policies run segmented


_PACK_LIMIT = 1 << 32  # positions and group codes packed into the low / high 32 bits of one uint64
_LOW32 = 0xFFFFFFFF


def _sorted_low32(high: np.ndarray) -> np.ndarray:
    """Positions ``0..n-1`` ordered by ``high`` (uint64 < 2**32 each), then by position: one ``np.sort`` of
    ``high << 32 | position`` (a vectorized value sort, several times faster than a stable argsort)."""
    packed = high.astype(np.uint64)
    packed <<= np.uint64(32)
    packed |= np.arange(high.shape[0], dtype=np.uint64)
    packed.sort()
    packed &= np.uint64(_LOW32)
    return packed.view(np.int64)  # the positions (< 2**32): the same bits


def _value_order(values: np.ndarray) -> np.ndarray:
    """A stable argsort of finite ``values`` (equal values by position). Values that are all exact float32
    (stored norms, cosines) sort as order-preserving 32-bit integers packed with their positions; others
    by ``np.argsort(kind="stable")``."""
    n = values.shape[0]
    v32 = values.astype(np.float32)
    if n >= _PACK_LIMIT or not np.array_equal(v32, values):
        return np.argsort(values, kind="stable")
    v32 += np.float32(0.0)  # -0.0 -> +0.0: the two compare equal, so they must tie
    bits = v32.view(np.uint32)
    key = np.where(bits >= np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))  # float order as uint order
    return _sorted_low32(key)


def _group_order(codes: np.ndarray, n_groups: int, values: Optional[np.ndarray] = None) -> np.ndarray:
    """Positions ordered by group, then by ``values`` (if given), then by position (a stable sort by value,
    then a stable sort by group: packed into uint64 and sorted, or by 16-bit radix passes beyond 2**32)."""
    order = None if values is None else _value_order(values)
    c = codes if order is None else codes[order]
    if c.shape[0] < _PACK_LIMIT and n_groups < _PACK_LIMIT:
        perm = _sorted_low32(c)
    elif n_groups <= 1 << 16:
        perm = np.argsort(c.astype(np.uint16), kind="stable")
    else:  # two stable 16-bit passes: low half, then high half (LSD radix); codes < 2**32
        perm = np.argsort((c & 0xFFFF).astype(np.uint16), kind="stable")
        perm = perm[np.argsort((c[perm] >> 16).astype(np.uint16), kind="stable")]
    return perm if order is None else order[perm]


def _segments(counts: np.ndarray) -> np.ndarray:
    """Start of each group's segment in a group-ordered array."""
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


def _reduceat(ufunc: np.ufunc, x: np.ndarray, counts: np.ndarray, empty: float) -> np.ndarray:
    """``ufunc.reduce`` of each group's (contiguous) segment of ``x``; ``empty`` for empty groups."""
    out = np.full(counts.shape[0], empty, dtype=np.float64)
    nz = counts > 0
    if nz.any():
        out[nz] = ufunc.reduceat(x, _segments(counts)[nz])
    return out


def _segment_sums(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``np.add.reduce`` of each group's segment (NaN for an empty one). One call per segment, because
    numpy's pairwise summation is what ``mean``/``std`` use on one group: ``ufunc.reduceat`` sums in
    another order and differs in the last bits, which can move a record across the loss filter's edge."""
    out = np.full(counts.shape[0], math.nan)
    reduce = np.add.reduce
    ends = np.cumsum(counts).tolist()
    for g, (e, c) in enumerate(zip(ends, counts.tolist())):
        if c:
            out[g] = reduce(x[e - c:e])
    return out


def _closest_to_median(sorted_key: np.ndarray, starts: np.ndarray, sizes: np.ndarray, median: np.ndarray,
                       k_g: np.ndarray, dist: np.ndarray, scodes: np.ndarray, G: int) -> Optional[np.ndarray]:
    """The median band of every group without sorting the distances: in a group's key order the distances to
    its median fall then rise, so its ``k`` nearest keys are a window ``[L, L + k)`` found by one binary search
    over all groups at once; the window's larger end distance is the group's k-th smallest distance ``d``.
    That edge is then proven per group (fewer than ``k`` survivors strictly nearer, at least ``k`` within
    ``d``; else ``None``: the caller ranks every distance), and the mask over survivors (position order) keeps
    those nearer than ``d`` plus, among those exactly at ``d``, the earliest positions -- what ``_smallest``
    keeps in each group."""
    lo = np.zeros(G, dtype=np.int64)
    hi = np.maximum(sizes - k_g, 0)
    act = np.flatnonzero((k_g > 0) & (lo < hi))
    while act.size:
        mid = (lo[act] + hi[act]) // 2
        m = median[act]
        left = m - sorted_key[starts[act] + mid]  # distance of the window's first key (>= 0 once L is right)
        right = sorted_key[starts[act] + mid + k_g[act]] - m  # of the key just past the window
        move = left > right
        lo[act] = np.where(move, mid + 1, lo[act])
        hi[act] = np.where(move, hi[act], mid)
        act = act[lo[act] < hi[act]]
    some = k_g > 0
    edge = np.full(G, -math.inf)
    first = starts[some] + lo[some]
    edge[some] = np.maximum(np.abs(sorted_key[first] - median[some]),
                            np.abs(sorted_key[first + k_g[some] - 1] - median[some]))
    e = edge[scodes]  # (survivors,)
    nearer = dist < e
    at_edge = dist == e
    n_nearer = np.bincount(scodes[nearer], minlength=G)
    n_at = np.bincount(scodes[at_edge], minlength=G)
    if not (np.all(n_nearer[some] < k_g[some]) and np.all(n_nearer[some] + n_at[some] >= k_g[some])):
        return None
    need = k_g - n_nearer  # (G,): how many of the ties at the edge each group keeps, earliest first
    tie_pos = np.flatnonzero(at_edge)  # ascending positions
    tie_codes = scodes[tie_pos]
    perm = _group_order(tie_codes, G)  # by group, positions ascending within it
    rank = np.arange(perm.shape[0]) - _segments(n_at)[tie_codes[perm]]
    keep = nearer
    keep[tie_pos[perm[rank < need[tie_codes[perm]]]]] = True
    return keep


# policy name -> its built-in function: the policies the segmented path reproduces (not a re-registered name)
_SEGMENTED = {name: POLICIES[name] for name in _SEGMENTED_NAMES}


def _select_groups_segmented(
    norms: np.ndarray, losses: np.ndarray, key: np.ndarray, codes: np.ndarray, n_groups: int, policy: str,
    ratio: float, loss_filter_std: Optional[float],
) -> Tuple[np.ndarray, List[Dict[str, Any]], Dict[str, int]]:
    """What ``_select_group`` gives for every group (mask over all records, one stats dict per group), for
    the count-based built-in policies, as a handful of sorts and segment reductions instead of a Python
    loop over the groups (100k groups of 100 records in seconds). Also returns the totals of the summed
    counts."""
    n = norms.shape[0]
    G = n_groups
    n_g = np.bincount(codes, minlength=G)
    valid = np.isfinite(norms) & np.isfinite(losses) & np.isfinite(key)
    valid_g = np.bincount(codes[valid], minlength=G)
    if loss_filter_std is None:
        survivors = valid
        mu = sd = np.full(G, math.nan)
        low, high = np.full(G, -math.inf), np.full(G, math.inf)
    else:
        pv = _group_order(codes, G)
        pv = pv[valid[pv]]  # valid positions, by group, ascending: each group's lv of _select_group
        lv = losses[pv]
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = _segment_sums(lv, valid_g) / valid_g  # np.mean: sum / count
            dev = lv - mu[codes[pv]]
            sd = np.sqrt(_segment_sums(dev * dev, valid_g) / valid_g)  # np.std (ddof 0): the same operations
            half = loss_filter_std * sd
            tol = np.where(valid_g > 0, 1e-9 * (np.abs(mu) + sd), 0.0)
            survivors = valid & (np.abs(losses - mu[codes]) <= (half + tol)[codes])
            low, high = mu - half, mu + half
    surv_g = np.bincount(codes[survivors], minlength=G)
    sizes, inv = np.unique(n_g, return_inverse=True)
    counted = np.array([target_count(ratio, int(m)) for m in sizes.tolist()], dtype=np.int64)[inv.reshape(-1)]
    spos = np.flatnonzero(survivors)
    scodes = codes[spos]
    skey = key[spos]
    starts = _segments(surv_g)

    def ranked(values: np.ndarray) -> np.ndarray:
        """The rank of each survivor within its group, by value, then position."""
        order = _group_order(scodes, G, values)
        rank = np.empty(order.shape[0], dtype=np.int64)
        rank[order] = np.arange(order.shape[0]) - starts[scodes[order]]
        return rank

    extra: Dict[str, np.ndarray] = {}
    if policy in ("median_band", "project_band"):
        sorted_key = skey[_group_order(scodes, G, skey)]  # by group, then key
        with np.errstate(invalid="ignore"):
            lo_i = starts + np.maximum(surv_g - 1, 0) // 2
            hi_i = starts + surv_g // 2
            last = max(sorted_key.shape[0] - 1, 0)
            a = sorted_key[np.minimum(lo_i, last)] if sorted_key.size else np.zeros(G)
            b = sorted_key[np.minimum(hi_i, last)] if sorted_key.size else np.zeros(G)
            median = np.where(surv_g > 0, np.where(surv_g % 2 == 1, b, (a + b) / 2), math.nan)
        dist = np.abs(skey - median[scodes])
        k_g = np.minimum(counted, surv_g)
        keep = _closest_to_median(sorted_key, starts, surv_g, median, k_g, dist, scodes, G)
        if keep is None:  # the k-th distance was not proven (never seen): rank every distance
            rank = ranked(dist)
            keep = rank < k_g[scodes]
        kept_dist = np.where(keep, dist, -math.inf)
        extra["median"] = median
        order_k = _group_order(scodes[keep], G)
        kept_g = np.bincount(scodes[keep], minlength=G)
        extra["max_kept_distance"] = _reduceat(np.maximum, kept_dist[keep][order_k], kept_g, math.nan)
    else:
        if policy == "keep_bottom":
            values, k_g = skey, np.minimum(counted, surv_g)
        elif policy == "keep_top":
            values, k_g = -skey, np.minimum(counted, surv_g)
        elif policy == "drop_top":
            values, k_g = skey, np.maximum(surv_g - counted, 0)
        else:  # drop_opposed
            values, k_g = -skey, np.maximum(surv_g - counted, 0)
        rank = ranked(values)
        keep = rank < k_g[scodes]
    kept_g = np.bincount(scodes[keep], minlength=G)
    order_k = _group_order(scodes[keep], G)
    kept_keys = skey[keep][order_k]
    kmin = _reduceat(np.minimum, kept_keys, kept_g, math.nan)
    kmax = _reduceat(np.maximum, kept_keys, kept_g, math.nan)
    mask = np.zeros(n, dtype=bool)
    mask[spos[keep]] = True

    cols = {
        "n": n_g.tolist(), "nonfinite": (n_g - valid_g).tolist(),
        "loss_mean": mu.tolist(), "loss_std": sd.tolist(), "loss_low": low.tolist(), "loss_high": high.tolist(),
        "loss_filtered": (valid_g - surv_g).tolist(), "survivors": surv_g.tolist(),
    }
    count_key = "target_dropped" if policy in ("drop_top", "drop_opposed") else "target"
    cols[count_key] = counted.tolist()
    for k, v in extra.items():
        cols[k] = v.tolist()
    cols["kept_key_min"], cols["kept_key_max"] = kmin.tolist(), kmax.tolist()
    cols["kept"] = kept_g.tolist()
    cols["dropped"] = (n_g - kept_g).tolist()
    sums = {k: int(sum(cols[k])) for k in _SUMMED if k in cols}
    names = list(cols)
    rows = [dict(zip(names, vals)) for vals in zip(*(cols[k] for k in names))]
    if policy in ("median_band", "project_band"):  # a group with no survivor: no band (as _median_band)
        for g in np.flatnonzero(surv_g == 0).tolist():
            for k in ("kept_key_min", "kept_key_max"):
                rows[g].pop(k, None)
    return mask, rows, sums


_SUMMED = ("n", "kept", "dropped", "nonfinite", "loss_filtered", "survivors", "target", "target_dropped")


def _select_core(
    cols: Mapping[str, Optional[np.ndarray]],
    policy: str,
    ratio: float,
    loss_filter_std: LossFilterStd,
    seed: Union[int, None, np.random.Generator],
    length_normalize: Union[bool, str, None],
    policy_kwargs: Mapping,
    per_batch: bool = False,
    diagnostics: bool = False,
    score: str = "norm",
    loss_reduction: Optional[str] = None,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    fn, kwargs, takes_per_batch = _resolve_policy(policy, policy_kwargs)
    score = _check_score(score)
    call_kwargs = dict(kwargs, per_batch=per_batch) if takes_per_batch else kwargs
    ratio = _check_ratio(ratio)
    loss_filter_std = resolve_loss_filter_std(policy, loss_filter_std)
    mode = _length_mode(length_normalize)
    n = _check_lengths(cols)
    norms, losses, tokens, groups = cols["norms"], cols["losses"], cols.get("tokens"), cols.get("groups")
    if mode is not None and tokens is None:
        raise ValueError("length_normalize needs per-sample token counts ('tokens'), but none were given")
    if getattr(fn, "ranks_by", "norm") == "cosine":  # drop_opposed, project_band
        if mode is not None:
            raise ValueError(f"length_normalize applies to norms; policy {policy!r} ranks by a cosine")
        if score != "norm":
            raise ValueError(f"score={score!r} applies to norms; policy {policy!r} ranks by a cosine")
        key = _reference_key(policy, cols, int(kwargs.get("reference", 0)))
    elif score == "norm_per_token":
        if mode is not None:
            raise ValueError("score='norm_per_token' is already length-debiased; do not combine it with length_normalize")
        if tokens is None:
            raise ValueError("score='norm_per_token' needs per-sample token counts ('tokens'), but none were given")
        if loss_reduction is None:
            raise ValueError("score='norm_per_token' needs to know how the losses were reduced over tokens: pass "
                             "loss_reduction='mean' or 'sum' (a ScoreStore and ScoreResult record it)")
        key = norm_per_token(norms, tokens, loss_reduction)
    else:
        key = _ranking_key(norms, tokens, mode)

    summary: Dict[str, Any] = {
        "policy": policy,
        "ratio": ratio,
        "loss_filter_std": loss_filter_std,
        "length_normalize": mode or False,
        "score": score,
        "seed": "<Generator>" if isinstance(seed, np.random.Generator) else seed,
        "policy_kwargs": dict(kwargs),
        "group_by": None,
        "per_batch": per_batch,
    }
    if groups is None:
        mask, stats = _select_group(norms, losses, key, fn, call_kwargs, ratio, loss_filter_std,
                                    np.random.default_rng(seed))
        summary.update(stats)
    else:
        mask = np.zeros(n, dtype=bool)
        per_group: Dict[str, Dict[str, Any]] = {}
        totals = {k: 0 for k in _SUMMED}
        present = set()
        firsts, codes = cols["group_codes"] if cols.get("group_codes") is not None else _group_codes(groups)
        keys = _group_keys(firsts)
        if len(firsts) >= _VECTOR_MIN_GROUPS and _SEGMENTED.get(policy) is fn and not per_batch:
            mask, rows, sums = _select_groups_segmented(norms, losses, key, codes, len(firsts), policy, ratio,
                                                        loss_filter_std)
            for label, gkey, gstats in zip(firsts, keys, rows):
                gstats["label"] = label
                per_group[gkey] = gstats
            totals.update(sums)
            present.update(sums)
            results: Any = ()
        else:
            results = ((label, idx, None) for label, idx in _split_groups(firsts, codes))
        for g, ((label, idx, gstats), gkey) in enumerate(zip(results, keys)):
            if gstats is None:
                if isinstance(seed, np.random.Generator):
                    rng = seed  # shared generator: groups draw from it in turn
                else:
                    rng = np.random.default_rng(None if seed is None else [seed, g])
                gmask, gstats = _select_group(norms[idx], losses[idx], key[idx], fn, call_kwargs, ratio,
                                              loss_filter_std, rng)
                mask[idx] = gmask
            gstats["label"] = label
            per_group[gkey] = gstats
            for k in _SUMMED:
                if k in gstats:
                    totals[k] += int(gstats[k])
                    present.add(k)
        summary.update({k: totals[k] for k in _SUMMED if k in present})
        summary["n"], summary["kept"], summary["dropped"] = n, int(mask.sum()), int(n - mask.sum())
        summary["n_groups"] = len(per_group)
        summary["groups"] = per_group
    if diagnostics:  # rank correlations sort every column: only on request
        summary.update(_length_diagnostics(norms, key, tokens, mask, mode))
    log.debug(
        "select %s ratio=%s: kept %d of %d (%d non-finite, %d loss-filtered)",
        policy, ratio, summary["kept"], n, summary.get("nonfinite", 0), summary.get("loss_filtered", 0),
    )
    return mask, summary


# --------------------------------------------------------------------------------------------------
# public entry points


def select(
    store_or_scores: Any,
    policy: str = "median_band",
    ratio: float = 0.2,
    loss_filter_std: LossFilterStd = LOSS_FILTER_AUTO,
    group_by: Any = None,
    seed: Union[int, None, np.random.Generator] = 0,
    length_normalize: Union[bool, str, None] = False,
    *,
    score: str = "norm",
    loss_reduction: Optional[str] = None,
    diagnostics: bool = False,
    **policy_kwargs: Any,
) -> Selection:
    """Select samples from scored data with a policy (see the module docstring for the exact rules).

    ``store_or_scores``: anything with ``norms`` and ``losses`` (optional ``ids``, ``tokens``) as
    attributes (``ScoreResult``, ``ScoreStore``) or mapping keys; torch tensors or array-likes. Ids
    default to positions ``0..n-1``. ``group_by``: ``None`` (one global group), an array-like of n
    group labels, or a name looked up as a mapping key, in ``obj.fields`` (a mapping column -> array,
    or a zero-argument method returning one) or as an attribute. Selection then runs within each
    group; ``summary["groups"]`` holds each group's figures and the top-level counts are totals.
    ``policy_kwargs`` are the policy's own parameters (``low_q``/``high_q`` for ``band``,
    ``max_norm`` for ``threshold``). ``loss_filter_std``: ``"auto"`` (1.0 for ``median_band``, no
    filter otherwise), ``None`` (no filter) or a number (applied to any policy); the value used is
    ``summary["loss_filter_std"]``.

    ``score``: what the norm policies rank by: ``"norm"`` (the stored norm) or ``"norm_per_token"``
    (``||∇ Σ_t ℓ_t|| / √n_tokens``, the length-debiased norm, :func:`norm_per_token`), computed from the
    same norms with the reduction the scores record (a ``ScoreStore``'s config, a ``ScoreResult``'s
    ``loss_reduction``; else pass ``loss_reduction``). ``diagnostics=True`` adds the length
    correlations (Spearman/Pearson of norm and tokens, mean tokens kept/dropped) to the summary; they
    sort every column, so they are off by default.

    Returns a :class:`Selection` whose ``kept_ids``/``dropped_ids`` are sorted ascending and whose
    ``kept_mask`` is in input order.
    """
    cols = _columns(store_or_scores, group_by)
    ids = cols["ids"]
    _check_ids(ids)
    if score == "norm_per_token" and loss_reduction is None:
        loss_reduction = _loss_reduction_of(store_or_scores)
    mask, summary = _select_core(cols, policy, ratio, loss_filter_std, seed, length_normalize, policy_kwargs,
                                 diagnostics=diagnostics, score=score, loss_reduction=loss_reduction)
    if isinstance(group_by, str):
        summary["group_by"] = group_by
    elif group_by is not None:
        summary["group_by"] = "<labels>"
    return Selection(kept_ids=np.sort(ids[mask], kind="stable"), dropped_ids=np.sort(ids[~mask], kind="stable"), summary=summary, kept_mask=mask)


def keep_mask(
    norms: Any,
    losses: Any,
    policy: str = "median_band",
    ratio: float = 0.2,
    loss_filter_std: LossFilterStd = LOSS_FILTER_AUTO,
    tokens: Any = None,
    seed: Union[int, None, np.random.Generator] = 0,
    length_normalize: Union[bool, str, None] = False,
    return_summary: bool = False,
    cosines: Any = None,
    *,
    score: str = "norm",
    loss_reduction: Optional[str] = None,
    diagnostics: bool = False,
    **policy_kwargs: Any,
):
    """Per-batch selection for in-step filtering: the same policy logic as :func:`select` on one batch
    (n = B, no groups), except that a positive ratio keeps at least one sample of a non-empty batch
    (``max(1, ⌊ratio·B⌋)`` for the count-based policies), so every step can apply a gradient. Accepts torch tensors on any device (or array-likes); returns a
    ``torch.BoolTensor`` of shape ``[B]`` on ``norms``' device (CPU for non-tensors), and with
    ``return_summary=True`` the pair ``(mask, summary)``. The batch is copied to the host to decide.

    ``seed`` only matters for ``policy="random"``: an int re-seeds on every call, so a training loop
    should pass a per-step seed (e.g. ``seed=step``) or one shared ``numpy.random.Generator``.
    ``score``, ``loss_reduction`` and ``diagnostics`` as in :func:`select` (``score="norm_per_token"``
    needs ``tokens`` and ``loss_reduction``).
    """
    import torch

    device = norms.device if isinstance(norms, torch.Tensor) else torch.device("cpu")
    cols = {
        "norms": _as_float_1d(norms, "norms"),
        "losses": _as_float_1d(losses, "losses"),
        "tokens": None if tokens is None else _as_float_1d(tokens, "tokens"),
        "cosines": None if cosines is None else _as_cosines(cosines),
    }
    mask, summary = _select_core(cols, policy, ratio, loss_filter_std, seed, length_normalize, policy_kwargs,
                                 per_batch=True, diagnostics=diagnostics, score=score, loss_reduction=loss_reduction)
    out = torch.from_numpy(mask).to(device)
    return (out, summary) if return_summary else out


@dataclass
class SelectionConfig:
    """Which samples to train on (see :func:`select` for the policies).

    ``policy``: a name in ``gradsel_core.selection.POLICIES`` (``median_band`` is the paper's rule);
    ``ratio``: fraction of each micro-batch kept (``⌊ratio·B⌋``, at least one per batch online);
    ``loss_filter_std``: the loss pre-filter, ``"auto"`` (default: 1.0 for ``median_band``, none for
    the other policies), ``None`` (off) or a number (for any policy; see :attr:`resolved_loss_filter_std`);
    ``params``: the parameters scored and updated (``"trainable"``,
    ``"lora"``, names or a callable); ``policy_kwargs``: the policy's own parameters (``low_q``,
    ``high_q`` for ``band``, ``max_norm`` for ``threshold``); ``group_by``, ``length_normalize`` and
    ``score`` as in :func:`select`. Used by ``ContinualTrainer``, ``GradSelTrainer`` and the CLI.
    """

    policy: str = "median_band"
    ratio: float = 0.2
    loss_filter_std: LossFilterStd = LOSS_FILTER_AUTO
    params: Any = "trainable"  # a ParamSpec: "trainable", "lora", names or callable(name, param)
    group_by: Any = None  # offline selection only: select within each group
    length_normalize: Union[bool, str, None] = False
    policy_kwargs: Dict[str, Any] = field(default_factory=dict)
    score: str = "norm"  # "norm_per_token": rank by ||grad sum_t l_t|| / sqrt(n_tokens) (see select)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown selection policy {self.policy!r}; known policies: {', '.join(policy_names())}")
        try:
            r = float(self.ratio)
        except (TypeError, ValueError):
            raise ValueError(f"ratio must be a number in [0, 1], got {self.ratio!r}") from None
        if not (0.0 <= r <= 1.0):
            raise ValueError(f"ratio must be in [0, 1] (the fraction of each batch to keep), got {self.ratio!r}")
        resolve_loss_filter_std(self.policy, self.loss_filter_std)  # validates
        _check_score(self.score)
        if isinstance(self.loss_filter_std, str):
            self.loss_filter_std = LOSS_FILTER_AUTO
        if self.policy_kwargs is None:
            self.policy_kwargs = {}
        if not isinstance(self.policy_kwargs, Mapping):
            raise TypeError(f"policy_kwargs must be a dict, got {type(self.policy_kwargs).__name__}")
        self.policy_kwargs = dict(self.policy_kwargs)

    @property
    def resolved_loss_filter_std(self) -> Optional[float]:
        """The loss-filter width this config applies (``"auto"`` resolved for its policy)."""
        return resolve_loss_filter_std(self.policy, self.loss_filter_std)

    @classmethod
    def coerce(cls, value: Union["SelectionConfig", Mapping[str, Any], str, None]) -> Optional["SelectionConfig"]:
        """``None`` -> ``None``; a ``SelectionConfig`` as is; a policy name or a dict of its fields -> a
        ``SelectionConfig``."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(policy=value)
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"selection has unknown key(s) {unknown}; allowed: {sorted(names)}")
            return cls(**value)
        raise TypeError(f"selection must be a SelectionConfig, a dict, a policy name or None, got {type(value).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if not isinstance(self.params, str):
            d["params"] = "custom"
        if callable(self.group_by):
            d["group_by"] = getattr(self.group_by, "__name__", "<callable>")
        return d
