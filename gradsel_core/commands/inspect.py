"""``gradsel inspect DIR``: summarise a score store and draw a text histogram of its norms.

    gradsel inspect scores/ [--bins 20] [--log] [--plot norms.png] [--no-verify]

``--plot`` writes a matplotlib histogram (Agg backend) with the 10/50/90% quantiles marked.
"""
from __future__ import annotations

import argparse
from typing import List

import numpy as np

QUANTILES = (0.1, 0.5, 0.9)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="score store directory")
    p.add_argument("--bins", type=int, default=20, help="histogram bins (default 20)")
    p.add_argument("--log", action="store_true", help="bin log10(norm) instead of the norm")
    p.add_argument("--width", type=int, default=50, help="width of the longest text bar")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a histogram image here")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")


def _fmt(x: float) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.4g}"


def text_histogram(values: np.ndarray, bins: int = 20, width: int = 50, log: bool = False) -> List[str]:
    """Lines ``[lo, hi)  ####  count`` for the finite ``values`` (log10 bins with ``log``)."""
    v = values[np.isfinite(values)].astype(np.float64)
    if log:
        v = v[v > 0]
        v = np.log10(v)
    if v.size == 0:
        return ["  (no finite values)"]
    counts, edges = np.histogram(v, bins=bins)
    top = max(int(counts.max()), 1)
    lab = [f"{(10 ** e if log else e):.4g}" for e in edges]
    w = max(len(s) for s in lab)
    lines = []
    for i, c in enumerate(counts):
        bar = "#" * int(round(width * c / top))
        if c and not bar:
            bar = "."
        close = "]" if i == len(counts) - 1 else ")"
        lines.append(f"  [{lab[i]:>{w}}, {lab[i + 1]:>{w}}{close} {bar:<{width}} {int(c)}")
    return lines


def describe(store, bins: int = 20, width: int = 50, log: bool = False) -> str:
    meta = store.meta
    s = store.summary()
    cfg = meta.get("config", {})
    model = meta.get("model", {})
    run = meta.get("run", {})
    out = [
        f"store:    {store.path}",
        f"records:  {len(store)}   shards: {len(meta.get('shards', []))}   ids: {meta.get('data', {}).get('id_kind')}",
        f"model:    {model.get('class')}  {len(model.get('params', []))} tensors, {model.get('n_selected', 0):,} of "
        f"{model.get('n_total', 0):,} values scored (params={cfg.get('params')})  sha256 {str(model.get('content_sha256'))[:12]}",
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
        vals, counts = np.unique(np.asarray([str(x) for x in col]), return_counts=True)
        shown = ", ".join(f"{v}={c}" for v, c in list(zip(vals, counts))[:8])
        out.append(f"field:    {name} ({len(vals)} values: {shown}{', ...' if len(vals) > 8 else ''})")
    if store.per_param:
        total = sum(float(np.nansum(v)) for v in store.per_param.values()) or 1.0
        shares = sorted(((float(np.nansum(v)) / total, n) for n, v in store.per_param.items()), reverse=True)
        out.append("per-parameter share of the squared norm (top 10):")
        out += [f"  {sh:7.2%}  {n}" for sh, n in shares[:10]]
    out.append(f"histogram of {'log10 ' if log else ''}norms ({bins} bins, finite values):")
    out += text_histogram(store.norms, bins=bins, width=width, log=log)
    return "\n".join(out)


def plot_histogram(store, path: str, bins: int = 20, log: bool = False) -> None:
    """A matplotlib histogram of the finite norms with the 10/50/90% quantiles marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = store.norms[np.isfinite(store.norms)].astype(np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    if log:
        v = v[v > 0]
        ax.set_xscale("log")
        edges = np.logspace(np.log10(v.min()), np.log10(v.max()), bins + 1) if v.size else bins
        ax.hist(v, bins=edges, color="#4c72b0")
    else:
        ax.hist(v, bins=bins, color="#4c72b0")
    if v.size:
        for q, val in zip(QUANTILES, np.quantile(v, QUANTILES)):
            ax.axvline(val, color="#c44e52", linestyle="--", linewidth=1)
            ax.text(val, ax.get_ylim()[1] * 0.95, f" {int(q * 100)}%: {val:.3g}", rotation=90, va="top", fontsize=8)
    ax.set_xlabel("per-sample gradient norm")
    ax.set_ylabel("records")
    ax.set_title(f"{len(store)} records, {int((~np.isfinite(store.norms)).sum())} non-finite")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..store import ScoreStore

    store = ScoreStore.open(args.dir, verify=not args.no_verify)  # errors: `gradsel inspect: error: ...` (cli)
    print(describe(store, bins=args.bins, width=args.width, log=args.log))
    if args.plot:
        plot_histogram(store, args.plot, bins=args.bins, log=args.log)
        print(f"wrote {args.plot}")
    return 0
