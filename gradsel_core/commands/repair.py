"""``gradsel repair DIR``: rebuild a score store's ``manifest.json`` from its shards.

Each shard carries the run's identity (model fingerprint, config, data), its dataset positions and the
checksums of its payload and of ``ids.json``/``fields.json``, so a lost or corrupted manifest can be rebuilt
without rescoring. Corrupted shards are removed; when any shard is missing the rebuilt manifest is marked
incomplete and rerunning the same ``gradsel score`` command scores only what is missing. ``gradsel score``
does the same on resume, automatically.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="the score store directory")


def run(args: argparse.Namespace) -> int:
    from ..store import repair_store

    report = repair_store(args.dir)
    print(report.message)
    for name in report.removed:
        print(f"  removed corrupted shard {name}")
    return 0
