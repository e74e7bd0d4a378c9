"""Ghost scoring of this checkout against earlier versions of the engine and a plain forward+backward, in one run.

    python benchmarks/bench_regression.py                            # the three cases below, pre-trust vs now
    python benchmarks/bench_regression.py --rev before-fix=bc28537   # also an older commit of today's engine
    python benchmarks/bench_regression.py --quick --out-dir /tmp/x   # tiny smoke run (used by tests)

Cases (d 256, 4 layers, 4 heads, vocab 8192, T 128, B 16, float32): the private GPT (``TinyGPT``) with PEFT
LoRA r 8 on every Linear, the same GPT with full parameters, and HF GPT-2 with full parameters.

Time: the median wall time of the calls and, beside it, their median process CPU time (one torch thread:
the work of the process, not the time it waited for a core on a loaded machine).

Rows (methods), each in a FRESH subprocess (``benchmarks/harness.py``: median of the timed repeats after a
warm-up; CPU peak memory = peak RSS over the baseline taken after the model, batch and engine are built):

* ``plain``: forward, batch mean of the per-sample losses, backward (1.0x);
* ``ghost``: ``GradNormEngine(backend="ghost").score(batch)`` of this checkout (its defaults: the fused LM head
  where ``auto`` turns it on, ``gradsel_core/ghost/head.py``);
* ``ghost-unfused``: the same with ``fused_head=False``: the full-logits path, i.e. what the trust round's
  stand-ins, op-use tracking and taps cost on their own (the pre-trust engine has no fused head);
* ``ghost@NAME``: the same call on the engine of commit ``REV`` (``--rev NAME=REV``; by default
  ``pre-trust``: the parent of the first trust-round commit). Its ``gradsel_core`` is extracted with
  ``git archive`` into a temporary folder that the subprocess imports first; the case (model, batch, loss)
  is built by that version's own code, the same code path as the plain row.

Every ghost row is checked against this checkout's per-sample loop on the first samples (max rel err).
Timings on a shared CPU are noisy (other jobs run beside them): ``--rounds N`` runs every method N times,
each in a fresh process, interleaved, and reports the median over all repeats of all rounds (memory: the
median over rounds).

Memory is measured twice. The timed processes run under glibc's default allocator: their peak RSS (the
``peak mem`` column, as in ``bench_engine.py``) varies by ±15-30 MiB from run to run for the SAME method,
because glibc's dynamic mmap threshold keeps freed activations of tens of MiB in the heap or not depending
on the order of earlier frees. A second pass runs every method again in fresh processes with
``MALLOC_MMAP_THRESHOLD_`` fixed (``--mem-threshold``, default 64 KiB: every allocation of 64 KiB or more is
its own mapping, returned to the system when freed), so peak RSS follows the live tensors; those peaks
(``peak mem, fixed mmap``) repeat to within about 1 MiB and are the ones to compare. That pass is not timed
(``--mem-repeats`` calls after the warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness as H  # noqa: E402

_TREES_ENV = "GRADSEL_BENCH_TREES"  # {version name: folder holding that version's gradsel_core}
# the first trust-round commit (stand-ins, op-use tracking, taps): its parent is the engine before the round
TRUST_COMMIT = "9e81ca9"
DEFAULT_REVS = [f"pre-trust={TRUST_COMMIT}^"]


class VersionAdapter(H.GradselAdapter):
    """The ghost backend of whichever ``gradsel_core`` this process imported, named in the note."""

    def __init__(self, built: H.Built, version: str, **engine_kw: Any):
        import gradsel_core

        super().__init__(built, "ghost", **engine_kw)
        self.note = f"{self.note}, {version}: {Path(gradsel_core.__file__).parent}"


def _registry(versions: List[str]) -> Dict[str, Any]:
    reg: Dict[str, Any] = {"plain": H.PlainAdapter, "ghost": lambda b: VersionAdapter(b, "this checkout"),
                           "ghost-unfused": lambda b: VersionAdapter(b, "this checkout", fused_head=False)}
    for v in versions:
        reg[f"ghost@{v}"] = (lambda name: (lambda b: VersionAdapter(b, name)))(v)
    return reg


def _worker(argv: List[str]) -> None:
    """``--_worker payload``: put the version's tree first on sys.path (before anything imports gradsel_core)."""
    if len(argv) != 2 or argv[0] != "--_worker":
        return
    method = json.loads(Path(argv[1]).read_text())["method"]
    trees = json.loads(os.environ.get(_TREES_ENV, "{}"))
    version = method.partition("@")[2]
    if version:
        if "gradsel_core" in sys.modules:
            raise SystemExit("gradsel_core was imported before the version's tree was put on sys.path")
        sys.path.insert(0, trees[version])
    H.worker_entry(_registry(list(trees)), argv)


def extract(rev: str, into: Path) -> str:
    """``git archive`` of ``rev``'s gradsel_core into ``into``; returns the full commit hash."""
    root = H.REPO_ROOT
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "gradsel_core"], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit


def _pool(rounds: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per (case, method) from several rounds: time median over every repeat, memory median."""
    if len(rounds) == 1:
        return rounds[0]
    out = []
    for i, row in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        ok = [r for r in same if r["status"] == "ok" and r.get("all_s")]
        row = dict(row, rounds=len(rounds))
        if len(ok) == len(same):
            row["all_s"] = [t for r in ok for t in r["all_s"]]
            row["median_s"] = statistics.median(row["all_s"])
            mems = [r["peak_mem_bytes"] for r in ok if r.get("peak_mem_bytes") is not None]
            row["peak_mem_bytes"] = statistics.median(mems) if mems else None
            row["peak_mem_by_round"] = mems
            row["max_rel_err"] = max((r["max_rel_err"] for r in ok if r.get("max_rel_err") is not None), default=None)
        out.append(row)
    plain = {r["case"]: r for r in out if r["method"] == "plain"}
    for r in out:
        p = plain.get(r["case"])
        if p is not None and r.get("median_s") and p.get("median_s"):
            r["ratio_to_plain"] = r["median_s"] / p["median_s"]
        if p is not None and r.get("peak_mem_bytes") is not None and p.get("peak_mem_bytes"):
            r["peak_mem_ratio"] = r["peak_mem_bytes"] / p["peak_mem_bytes"]
    return out


def _memory_pass(rows: List[Dict[str, Any]], spec: H.CaseSpec, methods: List[str], versions: Dict[str, str],
                 args: Any, threads: int, env: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every method again, each in a fresh process under a fixed mmap threshold: adds ``peak_mem_fixed_*``."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mem_threshold)
    try:
        mem = H.run_case(spec, methods, _registry(list(versions)), __file__, bench="regression-memory",
                         device="cpu", repeats=args.mem_repeats, warmup=args.warmup, isolate="process",
                         timeout=args.timeout, threads=threads, ref_samples=args.ref_samples or min(4, spec.B), env=env)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    for r in mem:
        r["peak_mem_fixed_bytes"] = r["peak_mem_bytes"] if r["status"] == "ok" else None
        r["peak_mem_fixed_ratio"] = r["peak_mem_ratio"] if r["status"] == "ok" else None
        r["mem_pass_max_rel_err"] = r.get("max_rel_err")
        r["mem_threshold"] = args.mem_threshold
    if not rows:
        return mem
    by = {r["method"]: r for r in mem}
    for r in rows:
        m = by.get(r["method"]) if r["case"] == spec.name else None
        if m is None:
            continue
        r["peak_mem_fixed_bytes"] = m.get("peak_mem_bytes") if m["status"] == "ok" else None
        r["peak_mem_fixed_ratio"] = m.get("peak_mem_ratio") if m["status"] == "ok" else None
        r["mem_pass_max_rel_err"] = m.get("max_rel_err")
        r["mem_threshold"] = args.mem_threshold
    return rows


def table(rows: List[Dict[str, Any]], methods: List[str]) -> str:
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["case"], r["method"]): r for r in rows}

    def over(r: Dict[str, Any], p: Dict[str, Any], key: str) -> str:
        a, b = r.get(key), p.get(key)
        return "" if a is None or b is None or r is p else f"{(a - b) / 2**20:+.1f} MiB"

    body = []
    for c in cases:
        p = by[(c, "plain")]
        for m in methods:
            r = by.get((c, m))
            if r is None:
                continue
            body.append([c, m, r["status"], "" if r.get("median_s") is None else f"{r['median_s']:.3f}",
                         H.fmt_ratio(r.get("ratio_to_plain")), H.fmt_ratio(r.get("cpu_ratio_to_plain")),
                         H.fmt_bytes(r.get("peak_mem_bytes")),
                         over(r, p, "peak_mem_bytes"), H.fmt_bytes(r.get("peak_mem_fixed_bytes")),
                         over(r, p, "peak_mem_fixed_bytes"), H.fmt_ratio(r.get("peak_mem_fixed_ratio")),
                         "" if r.get("max_rel_err") is None else f"{r['max_rel_err']:.1e}",
                         "" if r["status"] == "ok" else r.get("reason", "")])
    return H.markdown_table(["case", "method", "status", "median s", "time / plain", "CPU time / plain",
                             "peak mem", "over plain",
                             "peak mem, fixed mmap", "over plain", "mem / plain (fixed mmap)",
                             "max rel err vs loop", "reason"], body)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: d=32, 1 layer, vocab 64, T=16, B=4")
    ap.add_argument("--rev", action="append", default=None, metavar="NAME=REV",
                    help=f"an earlier engine to compare (repeatable; default {DEFAULT_REVS})")
    ap.add_argument("--cases", default="tinygpt-lora,tinygpt-full,gpt2-full",
                    help="comma-separated subset of tinygpt-lora, tinygpt-full, gpt2-full")
    ap.add_argument("--rounds", type=int, default=1, help="fresh-process runs of every method (pooled)")
    ap.add_argument("--mem-threshold", type=int, default=65536,
                    help="MALLOC_MMAP_THRESHOLD_ (bytes) of the memory pass; 0: no memory pass")
    ap.add_argument("--mem-repeats", type=int, default=2, help="calls after the warm-up in the memory pass")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the memory pass (its rows' times are those of that pass: not comparable timings)")
    H.add_run_args(ap, ["plain", "ghost"], "method", "regression")
    args = ap.parse_args(argv)

    import torch

    q = args.quick
    revs = args.rev or DEFAULT_REVS
    versions = dict(r.split("=", 1) for r in revs)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    repeats = args.repeats or (2 if q else 5)
    threads = args.threads or 1  # pinned: one thread per process
    torch.set_num_threads(threads)
    dims = dict(d_model=32, n_layer=1, n_head=2, vocab=64, T=16, B=4) if q else \
        dict(d_model=256, n_layer=4, n_head=4, vocab=8192, T=128, B=16)
    all_cases = {"tinygpt-lora": H.CaseSpec(model="tinygpt", params="lora", lora_r=8, **dims),
                 "tinygpt-full": H.CaseSpec(model="tinygpt", params="full", **dims),
                 "gpt2-full": H.CaseSpec(model="gpt2", params="full", **dims)}
    cases = [all_cases[c.strip()] for c in args.cases.split(",") if c.strip()]
    methods = ["plain", "ghost", "ghost-unfused"] + [f"ghost@{v}" for v in versions]
    env = H.env_info(device)
    with tempfile.TemporaryDirectory(prefix="gradsel-versions-") as tmp:
        commits = {v: extract(rev, Path(tmp) / v) for v, rev in versions.items()}
        os.environ[_TREES_ENV] = json.dumps({v: str(Path(tmp) / v) for v in versions})
        print(f"bench_regression: {[c.name for c in cases]} x {methods} on {env['device_name']} ({threads} thread(s)), "
              f"repeats={repeats}, rounds={args.rounds}; versions {commits}")
        rows = []
        for spec in cases:
            if args.memory_only:  # the memory pass alone (its times are that pass's few calls: not for comparison)
                rows += _memory_pass([], spec, methods, versions, args, threads, env)
                continue
            rounds = [H.run_case(spec, methods, _registry(list(versions)), __file__, bench="regression", device=device,
                                 repeats=repeats, warmup=args.warmup, isolate=args.isolate or "process",
                                 timeout=args.timeout, threads=threads, ref_samples=args.ref_samples or min(4, spec.B),
                                 env=env) for _ in range(args.rounds)]
            rows += _pool(rounds)
            if args.mem_threshold and device == "cpu":  # (after --rounds; not with --memory-only, above)
                rows = _memory_pass(rows, spec, methods, versions, args, threads, env)
    for r in rows:
        v = r["method"].partition("@")[2]
        r["version_commit"] = commits.get(v, env.get("git_commit"))
        r["version_rev"] = versions.get(v, "this checkout")
    md = ("MEMORY PASS ONLY (--memory-only): the times below are those of its few calls, not a timing. "
          if args.memory_only else "")
    md += (f"Ghost scoring per version / plain forward+backward, {threads} thread(s), median of {repeats} repeats x "
          f"{args.rounds} round(s), each method in a fresh process; peak mem = peak RSS over the baseline under the "
          + (f"default allocator (noisy), fixed mmap = the same with MALLOC_MMAP_THRESHOLD_={args.mem_threshold} "
             f"({args.mem_repeats} calls after the warm-up). " if args.mem_threshold else
             "default allocator (noisy); no memory pass (--mem-threshold 0). ")
          + f"CPU time = process time (one torch thread). Versions: this checkout = "
          f"{env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}; "
          + "; ".join(f"{v} = {rev} = {c}" for (v, rev), c in zip(versions.items(), commits.values()))
          + f". {env['device_name']}, torch {env['torch_version']}, {env['timestamp']}.\n\n"
          + table(rows, methods) + "\n")
    stem = f"regression-{'memory-' if args.memory_only else ''}{H.utc_stamp()}{'-quick' if q else ''}"
    meta = {"bench": "regression", "argv": sys.argv if argv is None else argv, "env": env, "methods": methods,
            "versions": {v: {"rev": versions[v], "commit": commits[v]} for v in versions},
            "cases": [c.name for c in cases], "repeats": repeats, "rounds": args.rounds, "threads": threads,
            "mem_threshold": args.mem_threshold, "mem_repeats": args.mem_repeats,
            "memory_only": args.memory_only}
    return H.finish(rows, args.out_dir, stem, meta, md)


if __name__ == "__main__":
    _worker(sys.argv[1:])
    main()
