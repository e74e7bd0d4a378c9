"""``gradsel select``: select samples from a score store with a policy and write the kept ids.

    gradsel select --scores DIR --policy median_band --ratio 0.2 [--loss-filter-std 1.0]
                   [--group-by FIELD] [--seed 0] [--length-normalize none|tokens|sqrt]
                   [--param KEY=VALUE ...] --out kept.jsonl

Writes one JSON line per kept sample, in ascending id order: ``{"id", "norm", "loss"}`` (plus
``"tokens"`` when the store has token counts), then prints the selection summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import numpy as np

log = logging.getLogger(__name__)

POLICY_HELP = "median_band (the paper's rule), keep_bottom, keep_top, drop_top, band, threshold, random"


def _opt_float(text: str) -> Optional[float]:
    if text.strip().lower() in ("none", "off", ""):
        return None
    return float(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", required=True, metavar="DIR", help="score store directory")
    p.add_argument("--policy", default="median_band", help=f"selection policy: {POLICY_HELP}")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of each group to keep (drop, for drop_top)")
    p.add_argument("--loss-filter-std", type=_opt_float, default=1.0, metavar="K",
                   help="keep only losses within K std of the mean first; 'none' disables (default 1.0)")
    p.add_argument("--group-by", default=None, metavar="FIELD", help="select within each value of this store field")
    p.add_argument("--seed", type=int, default=0, help="seed for the random policy")
    p.add_argument("--length-normalize", default="none", choices=["none", "tokens", "sqrt"],
                   help="rank norm / tokens or norm / sqrt(tokens) instead of the norm")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, repeatable (band: low_q, high_q; threshold: max_norm)")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL of kept samples")


def _open_store(path: str):
    from gradsel_core.store import ScoreStore

    return ScoreStore.open(path)


def _parse_params(items: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            out[k.strip()] = v.strip()
    return out


def _store_field(store: Any, name: str, where: str) -> Any:
    fields = getattr(store, "fields", None)
    if callable(fields) and not isinstance(fields, Mapping):
        fields = fields()
    if not isinstance(fields, Mapping):
        raise ValueError(f"cannot --group-by {name!r}: the score store at {where} exposes no per-record fields (store.fields)")
    if name not in fields:
        raise ValueError(f"cannot --group-by {name!r}: the score store at {where} has fields {', '.join(map(str, fields)) or '(none)'}")
    return fields[name]


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)  # strict JSON: NaN -> null, ±inf -> "inf"/"-inf"
    return x


def write_kept(path: str, sel, ids, norms, losses, tokens=None) -> int:
    """Write one JSON line per kept sample (ascending id order); returns the number written."""
    ids = np.asarray(ids)
    norms, losses = np.asarray(norms, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    pos = np.flatnonzero(sel.kept_mask)
    pos = pos[np.argsort(ids[pos], kind="stable")]
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for i in pos:
            rec = {"id": ids[i].item() if isinstance(ids[i], np.generic) else ids[i], "norm": float(norms[i]), "loss": float(losses[i])}
            if tokens is not None and np.isfinite(tokens[i]):
                rec["tokens"] = int(tokens[i])
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return int(pos.shape[0])


def run(args: argparse.Namespace) -> int:
    from gradsel_core.selection import select

    store = _open_store(args.scores)  # errors are printed by the CLI: `gradsel select: error: ...`
    cols = {
        "ids": np.asarray(store.ids) if getattr(store, "ids", None) is not None else None,
        "norms": np.asarray(store.norms),
        "losses": np.asarray(store.losses),
        "tokens": np.asarray(store.tokens) if getattr(store, "tokens", None) is not None else None,
    }
    if cols["ids"] is None:
        cols["ids"] = np.arange(cols["norms"].shape[0])
    groups = _store_field(store, args.group_by, args.scores) if args.group_by else None
    sel = select(
        cols,
        policy=args.policy,
        ratio=args.ratio,
        loss_filter_std=args.loss_filter_std,
        group_by=groups,
        seed=args.seed,
        length_normalize=args.length_normalize,
        **_parse_params(args.param),
    )
    if args.group_by:
        sel.summary["group_by"] = args.group_by
    written = write_kept(args.out, sel, cols["ids"], cols["norms"], cols["losses"], cols["tokens"])
    s = sel.summary
    print(f"{args.policy}: kept {s['kept']} of {s['n']} samples -> {args.out} ({written} lines)")
    print(json.dumps(_jsonable(s), indent=2))
    return 0
