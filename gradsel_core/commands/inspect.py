"""``gradsel inspect DIR``: summarise a score store and draw histograms of its norms.

    gradsel inspect scores/ [--bins 20] [--log] [--by FIELD] [--plot norms.png] [--no-verify]
                    [--policy median_band --ratio 0.2 ...]

* ``--by FIELD`` draws one histogram per value of a metadata field (``task``...), on shared bins;
* ``--policy`` (with the options of ``gradsel select``) marks what that policy would keep: ``#`` kept,
  ``.`` not kept in the text histogram, a coloured overlay in the plot;
* ``--log`` bins on a log scale; bin edges are printed as norms (each edge a constant factor above the
  last), and the plot's tick labels are plain numbers;
* ``--plot PNG`` writes the histogram(s) with matplotlib (``pip install 'gradsel[plot]'``): the title
  names the store and the model, the 10/50/90% quantiles are dashed lines named in a legend beside
  the plot (never over the bars).
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UsageError
from .select import add_policy_arguments, check_output_path, run_policy, store_field

log = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)
QUANTILE_COLORS = ("#2ca02c", "#c44e52", "#8172b2")
ALL_COLOR, KEPT_COLOR, PLAIN_COLOR = "#b8bec9", "#dd8452", "#4c72b0"

# (label, positions mask) of one histogram
Group = Tuple[Optional[str], np.ndarray]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="score store directory")
    p.add_argument("--bins", type=int, default=20, help="histogram bins")
    p.add_argument("--log", action="store_true", help="log-scale bins (edges printed as norms)")
    p.add_argument("--width", type=int, default=50, help="width of the longest text bar")
    p.add_argument("--by", default=None, metavar="FIELD", help="one histogram per value of this store field")
    p.add_argument("--max-groups", type=int, default=12,
                   help="with --by, show the largest this many groups")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the histogram image here (needs matplotlib)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (model, config, counts, norm statistics, fields, and the "
                        "histogram counts and edges) instead of the text")
    g = p.add_argument_group("mark what a selection policy keeps (the options of `gradsel select`)")
    add_policy_arguments(g, policy_default=None)


def _fmt(x: Optional[float]) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.4g}"


# -- bins ---------------------------------------------------------------------------------------------


def plottable(values: np.ndarray, log: bool = False) -> np.ndarray:
    """The finite values (and, with ``log``, the positive ones) as float64: what a histogram shows."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if log:
        ok &= v > 0
    return ok


def bin_edges(values: np.ndarray, bins: int, log: bool = False) -> Optional[np.ndarray]:
    """``bins + 1`` edges (norm units) over the plottable ``values``: equal widths, or with ``log`` equal
    ratios (``np.geomspace``). ``None`` when nothing is plottable."""
    v = np.asarray(values, dtype=np.float64)[plottable(values, log)]
    if v.size == 0:
        return None
    lo, hi = float(v.min()), float(v.max())
    if log:
        return np.geomspace(lo, hi, bins + 1) if hi > lo else np.geomspace(lo / 1.05, hi * 1.05, bins + 1)
    return np.histogram_bin_edges(v, bins=bins)


def text_histogram(values: np.ndarray, bins: int = 20, width: int = 50, log: bool = False,
                   kept: Optional[np.ndarray] = None, edges: Optional[np.ndarray] = None) -> List[str]:
    """Lines ``[lo, hi)  bar  count`` over the plottable ``values`` (edges in norm units, log-spaced with
    ``log``). With ``kept`` (a bool mask over ``values``) the bar is ``#`` for kept and ``.`` for the rest,
    and the line ends with the kept count."""
    ok = plottable(values, log)
    v = np.asarray(values, dtype=np.float64)[ok]
    if v.size == 0:
        return ["  (no finite values)" if not log else "  (no finite positive values)"]
    if edges is None:
        edges = bin_edges(values, bins, log)
    counts, _ = np.histogram(v, bins=edges)
    kcounts = np.histogram(v[np.asarray(kept)[ok]], bins=edges)[0] if kept is not None else None
    top = max(int(counts.max()), 1)
    lab = [f"{e:.4g}" for e in edges]
    w = max(len(s) for s in lab)
    cw = len(str(int(counts.max())))
    lines = []
    for i, c in enumerate(counts):
        n_all = int(round(width * c / top))
        if c and not n_all:
            n_all = 1
        if kcounts is None:
            bar = "#" * n_all
            tail = f"{int(c):>{cw}}"
        else:
            k = int(kcounts[i])
            n_k = min(n_all, max(1 if k else 0, int(round(width * k / top))))
            bar = "#" * n_k + "." * (n_all - n_k)
            tail = f"{int(c):>{cw}}  kept {k}"
        close = "]" if i == len(counts) - 1 else ")"
        lines.append(f"  [{lab[i]:>{w}}, {lab[i + 1]:>{w}}{close} {bar:<{width}} {tail}")
    return lines


# -- groups and labels --------------------------------------------------------------------------------


def split_groups(store: Any, field: Optional[str], max_groups: int) -> Tuple[List[Group], int]:
    """``([(label, mask)], n_groups)``: one group (label ``None``) without ``field``; else the records of
    each value of the field (missing values, None or NaN, as ``"(missing)"``), the largest ``max_groups``
    groups, sorted by label."""
    n = len(store.norms)
    if not field:
        return [(None, np.ones(n, dtype=bool))], 1
    if max_groups < 1:
        raise UsageError(f"--max-groups must be at least 1, got {max_groups}")
    from ..selection import _factorize_objects, _group_codes, _stored_codes

    col = store_field(store, field, "--by")
    # the distinct values first (the store's string codes, or vectorized grouping), then one key per value
    got = _stored_codes(store, field, n)
    if got is None and col.dtype.kind == "O":
        got = _factorize_objects(col)  # strings and missing values only; None for mixed kinds
    if got is None and col.dtype.kind in "biufUS":
        got = _group_codes(col)
    if got is not None:
        firsts, codes = got
        keys = ["(missing)" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in firsts]
        labels, key_inv = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
        inverse = key_inv.reshape(-1)[codes]
        counts = np.bincount(inverse, minlength=labels.size)
    else:  # mixed kinds ("1" and 1 print alike: one key), a value at a time
        keys = ["(missing)" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in col.tolist()]
        labels, inverse, counts = np.unique(np.asarray(keys, dtype=object), return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:max_groups]
    shown = sorted(order.tolist(), key=lambda g: str(labels[g]))
    return [(str(labels[g]), inverse.reshape(-1) == g) for g in shown], int(labels.size)


def model_label(store: Any) -> str:
    """The model as the manifest records it: name (when known), class, parameters scored."""
    model = store.meta.get("model", {}) or {}
    cfg = store.meta.get("config", {}) or {}
    name = model.get("name_or_path") or model.get("name")
    cls = model.get("class", "?")
    head = f"{name} ({cls})" if name else str(cls)
    return (f"{head}, params={cfg.get('params')}: {model.get('n_selected', 0):,} of {model.get('n_total', 0):,} "
            "values scored")


def policy_label(sel: Any) -> str:
    s = sel.summary
    extra = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.get("policy_kwargs", {}).items())
    lf = "no loss filter" if s.get("loss_filter_std") is None else f"loss filter ±{s['loss_filter_std']:g} std"
    by = f", per {s['group_by']}" if s.get("group_by") else ""
    return f"{s['policy']} ratio {s['ratio']:g}{', ' + extra if extra else ''} ({lf}{by})"


# -- text ---------------------------------------------------------------------------------------------


def describe_dict(store, bins: int = 20, log: bool = False, groups: Optional[Sequence[Group]] = None,
                  by: Optional[str] = None, sel: Any = None) -> dict:
    """What :func:`describe` prints, as JSON values (NaN as null)."""
    from .select import jsonable

    meta = store.meta
    out = {"store": store.path, "records": len(store), "shards": len(meta.get("shards", [])),
           "id_kind": meta.get("data", {}).get("id_kind"), "model": model_label(store),
           "model_sha256": meta.get("model", {}).get("content_sha256"), "run_key": meta.get("run_key"),
           "config": meta.get("config", {}), "created": meta.get("created"), "finished": meta.get("finished"),
           "versions": meta.get("versions", {}), "summary": store.summary()}
    fl = store.losses[np.isfinite(store.losses)]
    out["loss_mean"] = float(fl.mean()) if fl.size else None
    out["loss_median"] = float(np.median(fl)) if fl.size else None
    out["fields"] = {name: {str(v): int(c) for v, c in zip(*np.unique(np.asarray([str(x) for x in col]), return_counts=True))}
                     for name, col in store.fields.items()}
    edges = bin_edges(store.norms, bins, log)  # the text histogram's bins

    def counts(mask: np.ndarray) -> List[int]:
        v = np.asarray(store.norms, dtype=np.float64)
        return np.histogram(v[mask & plottable(v, log)], bins=edges)[0].tolist()

    if edges is not None:
        everything = np.ones(len(store), dtype=bool)
        hist: dict = {"edges": edges.tolist(), "log": log, "counts": counts(everything)}
        if groups and by:
            hist["by"] = by
            hist["groups"] = {str(label): counts(mask) for label, mask in groups}
        if sel is not None:
            hist["kept"] = counts(np.asarray(sel.kept_mask, dtype=bool))
        out["histogram"] = hist
    if sel is not None:
        out["selection"] = {k: val for k, val in sel.summary.items() if not isinstance(val, (list, dict))}
    return jsonable(out)


def field_counts(store: Any, name: str, col: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``np.unique`` of ``str(value)`` over a metadata column, with counts: from the store's string codes or
    the integer/bool/float groups (one ``str`` per distinct value), else a value at a time (object columns,
    floats holding NaN or -0.0, which group with other values but print apart)."""
    from ..selection import _group_codes, _stored_codes

    got = _stored_codes(store, name, len(col))
    if got is None and (col.dtype.kind in "biu" or (col.dtype.kind == "f" and not np.isnan(col).any()
                                                     and not (np.signbit(col) & (col == 0)).any())):
        got = _group_codes(col)
    if got is None:  # object columns of mixed kinds, floats with NaN ("nan", as str gives)
        return np.unique(np.asarray([str(x) for x in col]), return_counts=True)
    firsts, codes = got
    per_value = np.bincount(codes, minlength=len(firsts))  # (distinct,)
    vals, inv = np.unique(np.asarray([str(v) for v in firsts]), return_inverse=True)
    return vals, np.bincount(inv.reshape(-1), weights=per_value, minlength=vals.size).astype(np.int64)


def describe(store, bins: int = 20, width: int = 50, log: bool = False, groups: Optional[Sequence[Group]] = None,
             by: Optional[str] = None, n_groups: int = 1, sel: Any = None) -> str:
    meta = store.meta
    s = store.summary()
    cfg = meta.get("config", {})
    run = meta.get("run", {})
    model = meta.get("model", {})
    out = [
        f"store:    {store.path}",
        f"records:  {len(store)}   shards: {len(meta.get('shards', []))}   ids: {meta.get('data', {}).get('id_kind')}",
        f"model:    {model_label(store)}  (sha256 {str(model.get('content_sha256'))[:12]})",
        f"config:   backend={cfg.get('backend_resolved')} (requested {cfg.get('backend')})  batch_size={cfg.get('batch_size')}"
        f"  max_tokens={cfg.get('max_tokens')}  shard_size={cfg.get('shard_size')}  per_param={cfg.get('per_param')}"
        f"  loss={cfg.get('loss_reduction')}",
        f"run:      created {meta.get('created')}  finished {meta.get('finished')}  world_size {run.get('world_size')}"
        f"  device {run.get('device')}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        f"non-finite: {s['nonfinite']} records (NaN norms {s['nan_norms']}, inf norms {s['inf_norms']}, "
        f"NaN losses {s['nan_losses']}, inf losses {s['inf_losses']})",
        f"tokens:   {s['tokens']:,} target tokens, {s['tokens'] / max(len(store), 1):.1f} per record",
        f"norm:     mean {_fmt(s['norm_mean'])}  median {_fmt(s['norm_median'])}  p10 {_fmt(s['norm_p10'])}  "
        f"p90 {_fmt(s['norm_p90'])}  min {_fmt(s['norm_min'])}  max {_fmt(s['norm_max'])}",
    ]
    fl = store.losses[np.isfinite(store.losses)]
    if fl.size:
        out.append(f"loss:     mean {_fmt(float(fl.mean()))}  median {_fmt(float(np.median(fl)))}")
    for name, col in store.fields.items():
        vals, counts = field_counts(store, name, col)
        shown = ", ".join(f"{v}={c}" for v, c in list(zip(vals, counts))[:8])
        out.append(f"field:    {name} ({len(vals)} values: {shown}{', ...' if len(vals) > 8 else ''})")
    if store.per_param:
        total = sum(float(np.nansum(v)) for v in store.per_param.values()) or 1.0
        shares = sorted(((float(np.nansum(v)) / total, n) for n, v in store.per_param.items()), reverse=True)
        out.append("per-parameter share of the squared norm (top 10):")
        out += [f"  {sh:7.2%}  {n}" for sh, n in shares[:10]]
    out += histogram_section(store.norms, bins, width, log, groups, by, n_groups, sel)
    return "\n".join(out)


def histogram_section(norms: np.ndarray, bins: int, width: int, log: bool, groups: Optional[Sequence[Group]],
                      by: Optional[str], n_groups: int, sel: Any) -> List[str]:
    groups = groups or [(None, np.ones(len(norms), dtype=bool))]
    edges = bin_edges(norms, bins, log)  # shared by every group, so the histograms line up
    head = f"histogram of norms ({bins} bins, finite values"
    if log and edges is not None:
        head += f"; log scale: each edge x{edges[1] / edges[0]:.4g} the last"
    out = [head + "):"]
    n_hidden = int((np.isfinite(norms) & ~plottable(norms, log)).sum())
    if n_hidden:
        out.append(f"  ({n_hidden} records with norm <= 0 are not shown on the log scale)")
    if sel is not None:
        out.append(f"  # kept by {policy_label(sel)}: {sel.summary['kept']} of {sel.summary['n']};  . not kept")
    if by and n_groups > len(groups):
        out.append(f"  (the {len(groups)} largest of {n_groups} groups of {by}; see --max-groups)")
    for label, m in groups:
        if label is not None:
            kept_txt = f", {int(sel.kept_mask[m].sum())} kept" if sel is not None else ""
            out.append(f"{by} = {label} ({int(m.sum())} records{kept_txt}):")
        kept = sel.kept_mask[m] if sel is not None else None
        out += text_histogram(norms[m], bins, width, log, kept=kept, edges=edges)
    return out


# -- plot ---------------------------------------------------------------------------------------------


def log_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    """About ``n`` log-spaced tick values in ``[lo, hi]``: powers of ten over three decades or more, else
    values rounded to two significant digits (so a range inside one decade still gets labels)."""
    if not (lo > 0 and hi >= lo):
        return []
    decades = np.arange(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)
    if decades.size >= 3:  # a wide range: powers of ten, every other one (or sparser) when many
        return [10.0 ** int(k) for k in decades[:: math.ceil(decades.size / n)]]
    raw = np.geomspace(lo, hi, n) if hi > lo else np.asarray([lo])
    ticks = sorted({float(f"{t:.2g}") for t in raw})
    return [t for t in ticks if lo * 0.98 <= t <= hi * 1.02] or [float(f"{lo:.3g}")]


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend; a ``UsageError`` saying how to install it if absent."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'gradsel[plot]' (or leave out --plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_figure(store, bins: int = 20, log: bool = False, groups: Optional[Sequence[Group]] = None,
                by: Optional[str] = None, n_groups: int = 1, sel: Any = None):
    """A matplotlib figure: one histogram per group (shared bins and x axis), the policy's kept records
    overlaid, the 10/50/90% quantiles of each group as dashed lines named in a legend outside the axes,
    and a title naming the model and the store."""
    plt = require_matplotlib()
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator

    groups = list(groups or [(None, np.ones(len(store.norms), dtype=bool))])
    norms = np.asarray(store.norms, dtype=np.float64)
    edges = bin_edges(norms, bins, log)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 1.3 + 2.3 * len(groups)), sharex=True, squeeze=False,
                             layout="constrained")
    n_bad = int((~np.isfinite(norms)).sum())
    n_hidden = int((np.isfinite(norms) & ~plottable(norms, log)).sum())
    hidden = f", {n_hidden} with norm <= 0 not on the log scale" if n_hidden else ""
    title = [f"model: {model_label(store)}", f"store: {store.path}  ({len(store)} records, {n_bad} non-finite{hidden})"]
    if sel is not None:
        title.append(f"kept by {policy_label(sel)}: {sel.summary['kept']} of {sel.summary['n']}")
    if by and n_groups > len(groups):
        title.append(f"the {len(groups)} largest of {n_groups} groups of {by}")
    fig.suptitle("\n".join(title), fontsize=9)
    for ax, (label, m) in zip(axes[:, 0], groups):
        ok = m & plottable(norms, log)
        v = norms[ok]
        if edges is not None and v.size:
            ax.hist(v, bins=edges, color=ALL_COLOR if sel is not None else PLAIN_COLOR,
                    label=f"all records ({v.size})" if sel is not None else f"records ({v.size})")
            if sel is not None:
                vk = norms[ok & sel.kept_mask]
                ax.hist(vk, bins=edges, color=KEPT_COLOR, label=f"kept ({vk.size})")
            for q, val, color in zip(QUANTILES, np.quantile(v, QUANTILES), QUANTILE_COLORS):
                ax.axvline(val, color=color, linestyle="--", linewidth=1.2, label=f"p{int(q * 100)} = {val:.4g}")
        else:
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center")
        if label is not None:
            ax.set_title(f"{by} = {label}  ({int(m.sum())} records)", fontsize=9, loc="left")
        ax.set_ylabel("records")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0.0)
    bottom = axes[-1, 0]
    if log:
        bottom.set_xscale("log")
        if edges is not None:
            ticks = log_ticks(float(edges[0]), float(edges[-1]))
            bottom.xaxis.set_major_locator(FixedLocator(ticks))
            bottom.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:.3g}"))
            bottom.xaxis.set_minor_locator(NullLocator())
            bottom.xaxis.set_minor_formatter(NullFormatter())
        bottom.set_xlabel("per-sample gradient norm (log scale)")
    else:
        bottom.set_xlabel("per-sample gradient norm")
    return fig


def plot_histogram(store, path: str, bins: int = 20, log: bool = False, groups: Optional[Sequence[Group]] = None,
                   by: Optional[str] = None, n_groups: int = 1, sel: Any = None) -> None:
    """Write :func:`make_figure` to ``path`` (PNG)."""
    plt = require_matplotlib()
    fig = make_figure(store, bins, log, groups, by, n_groups, sel)
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UsageError(f"--plot {path}: cannot write there ({e.strerror or e}); choose a writable place") from None
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..store import ScoreStore

    if args.bins < 1:
        raise UsageError(f"--bins must be at least 1, got {args.bins}")
    if args.plot:
        require_matplotlib()  # before any work
        check_output_path(args.plot, "--plot", store_dir=args.dir, example="norms.png")
    store = ScoreStore.open(args.dir, verify=not args.no_verify)
    sel = run_policy(store, args) if args.policy else None
    groups, n_groups = split_groups(store, args.by, args.max_groups)
    if args.json:
        import json

        print(json.dumps(describe_dict(store, args.bins, args.log, groups, args.by, sel), allow_nan=False))
        if args.plot:
            plot_histogram(store, args.plot, bins=args.bins, log=args.log, groups=groups, by=args.by,
                           n_groups=n_groups, sel=sel)
        return 0
    print(describe(store, bins=args.bins, width=args.width, log=args.log, groups=groups, by=args.by,
                   n_groups=n_groups, sel=sel))
    if args.plot:
        plot_histogram(store, args.plot, bins=args.bins, log=args.log, groups=groups, by=args.by,
                       n_groups=n_groups, sel=sel)
        print(f"wrote {args.plot}")
    return 0
