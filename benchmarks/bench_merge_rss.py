"""Where the end of a streaming scoring run spends its memory (issue #24, peak RSS flat in N).

    python benchmarks/bench_merge_rss.py STORE [STORE ...]      # complete streaming stores (gradsel score)

For each store (made by ``gradsel score`` / ``score_dataset``, e.g. by ``bench_scale.py --stream-child
score``), a fresh process removes the columns file and runs ``repair_store``, which
assembles the store from its window shards exactly as the end of a scoring run does (``scoring._merge``),
then ``ScoreStore.open`` (what ``score_dataset`` returns), then touches ``store.norms`` and ``store.ids``
(what a caller reading the scores costs). Each phase is wrapped: the process's RSS (``VmRSS``, sampled every
2 ms by a thread) before and at its peak, and the Python heap's peak (``tracemalloc``: numpy buffers are
traced). No model runs: there is no forward+backward baseline; RSS is not noisy, times are (shared CPU).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class Sampler:
    """Peak ``VmRSS`` between ``reset()`` calls, sampled by a daemon thread."""

    def __init__(self, every: float = 0.002):
        self.peak = _rss_mb()
        self.every = every
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every)

    def reset(self) -> float:
        now = _rss_mb()
        self.peak = now
        return now


def child(store: str) -> None:
    import numpy as np  # noqa: F401

    import gradsel_core as gs
    from gradsel_core import scoring, store as st, windows

    sampler = Sampler()
    phases = []

    def wrap(mod, name, label):
        real = getattr(mod, name)

        def fn(*a, **k):
            before = sampler.reset()
            tracemalloc.reset_peak()
            h0 = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                time.sleep(0.01)
                phases.append({"phase": label, "rss_before_mb": round(before, 1),
                               "rss_peak_growth_mb": round(max(sampler.peak, _rss_mb()) - before, 1),
                               "heap_peak_growth_mb": round((tracemalloc.get_traced_memory()[1] - h0) / 2 ** 20, 1),
                               "s": round(time.perf_counter() - t0, 2)})
        setattr(mod, name, fn)
        return real

    for mod, name, label in ((windows, "assemble_columns", "assemble_columns (ids/fields/digests in RAM)"),
                             (scoring, "write_side_files", "write_side_files (columns file)"),
                             (scoring, "build_manifest", "build_manifest (summary)"),
                             (scoring, "_merge", "_merge (whole end of run, incl. the open)")):
        if hasattr(mod, name):
            wrap(mod, name, label)
    real_open = gs.ScoreStore.open.__func__
    gs.ScoreStore.open = classmethod(lambda cls, *a, **k: _phase("ScoreStore.open", lambda: real_open(cls, *a, **k)))

    def _phase(label, fn):
        before = sampler.reset()
        tracemalloc.reset_peak()
        h0 = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        out = fn()
        time.sleep(0.01)
        phases.append({"phase": label, "rss_before_mb": round(before, 1),
                       "rss_peak_growth_mb": round(max(sampler.peak, _rss_mb()) - before, 1),
                       "heap_peak_growth_mb": round((tracemalloc.get_traced_memory()[1] - h0) / 2 ** 20, 1),
                       "s": round(time.perf_counter() - t0, 2)})
        return out

    os.unlink(os.path.join(store, "columns.safetensors"))  # the manifest (complete) gives the record count
    tracemalloc.start()
    start = sampler.reset()
    rep = gs.repair_store(store) if hasattr(gs, "repair_store") else st.repair_store(store)
    assert rep.complete, rep.message
    s = _phase("ScoreStore.open (the reader's)", lambda: real_open(gs.ScoreStore, store))
    _phase("touch store.norms", lambda: s.norms.sum())
    _phase("touch store.ids", lambda: len(s.ids))
    _phase("touch store.fields", lambda: len(s.fields))
    _phase("touch store.record_sha256", lambda: s.record_sha256[0])
    import resource

    print(json.dumps({"records": len(s), "rss_at_start_mb": round(start, 1), "phases": phases,
                      "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return child(argv[1])
    from benchmarks.harness import env_info, markdown_table, utc_stamp, write_results

    rows = []
    for src in argv:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(src))) as tmp:
            dst = os.path.join(tmp, "store")
            shutil.copytree(src, dst)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--child", dst], env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
        for p in res["phases"]:
            rows.append({"records": res["records"], **p})
        rows.append({"records": res["records"], "phase": "process peak (ru_maxrss)", "rss_before_mb": res["rss_at_start_mb"],
                     "rss_peak_growth_mb": round(res["ru_maxrss_mb"] - res["rss_at_start_mb"], 1), "heap_peak_growth_mb": "",
                     "s": ""})
    md = markdown_table(["records", "phase", "RSS before MB", "RSS peak growth MB", "heap peak growth MB (tracemalloc)", "s"],
                        [[f"{r['records']:,}", r["phase"], r["rss_before_mb"], r["rss_peak_growth_mb"],
                          r["heap_peak_growth_mb"], r["s"]] for r in rows])
    meta = env_info()
    md += (f"\n\n{meta['timestamp']}, code {str(meta['git_commit'])[:10]}: repair_store (the end-of-run merge) on a copy of "
           "each store in a fresh process, then the reader's ScoreStore.open and first accesses. Phases nest (_merge "
           "contains the others). Times are noisy (shared CPU), RSS is not.\n")
    stem = f"merge-rss-{utc_stamp()}"
    write_results(rows, REPO / "benchmarks" / "results", stem, meta, markdown=md)
    print(md)


if __name__ == "__main__":
    main()
