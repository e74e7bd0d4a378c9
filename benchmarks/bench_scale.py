"""Selection and store reading at 10M records (issue #24 item 3), and streaming scoring at 10k-1M (item 1,
``--stream``): ``ScoreStore.open``, ``gs.select`` (one
group, 2 groups, 100k groups, ``score="norm_per_token"``), and the CLI (``gradsel select``, ``gradsel select
--data``, ``gradsel inspect --by --policy``) as whole processes, with their peak RSS.

    python benchmarks/bench_scale.py                       # 10M records (store built with from_arrays)
    python benchmarks/bench_scale.py --quick --out-dir /tmp/x
    python benchmarks/bench_scale.py --stream              # peak RSS at 10k/100k/1M, 1M rerun and resume

The store is made with ``ScoreStore.from_arrays`` (no scoring): random norms, losses and token counts, a
``task`` field with 2 values and a ``cluster`` field with 100k values (strings). ``--data`` needs the
scored JSONL: a file of ``--data-records`` records (ids and a short text) and a store of the same ids with
each record's content digest (as ``gradsel score`` keeps it), so the join checks every record's content.

Timings are wall-clock medians on whatever machine runs this; on a shared CPU they are noisy, so the CPU
seconds of the process (``time.process_time``; for the CLI the child's user+sys time) are reported too. Each run
also times one ``np.sort`` of N float64 values (``sort_s``) and reports every figure as a multiple of it
as well, so runs under different load can be compared. A plain forward+backward is not the baseline
here: nothing in these paths runs a model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gradsel_core as gs  # noqa: E402
from benchmarks.harness import RESULTS_DIR, env_info, markdown_table, time_fn, utc_stamp, write_results  # noqa: E402

# issue #24's targets at 10M records, seconds
TARGETS = {"open": 2.0, "select 2 groups": 3.0, "select 100k groups": 5.0, "cli select": 8.0,
           "cli select --data": 30.0, "cli inspect --by --policy": 8.0}


def make_arrays(n: int, n_clusters: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 512, n)  # (n,)
    norms = (rng.gamma(2.0, 1.0, n) / np.sqrt(tokens)).astype(np.float32)
    losses = rng.normal(2.0, 0.5, n).astype(np.float32)
    task = np.array(["instruct", "knowledge"], dtype=object)[rng.integers(0, 2, n)]
    names = np.array([f"c{k}" for k in range(n_clusters)], dtype=object)
    cluster = names[np.concatenate([np.arange(min(n, n_clusters)), rng.integers(0, n_clusters, max(n - n_clusters, 0))])]
    return dict(norms=norms, losses=losses, tokens=tokens), {"task": task, "cluster": cluster}


def timed(fn, repeats):
    """([wall s], [CPU s of this process]) of ``repeats`` calls (``gc.collect()`` untimed before each)."""
    import gc

    wall, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


# runs the CLI and, at exit, writes the process's own peak RSS (VmHWM: this process image only; the
# rusage of a child also counts the parent's memory it was spawned from, the benchmark's 10M-record arrays)
_CLI = ("import atexit, runpy, sys\n"
        "hwm = sys.argv.pop(1)\n"
        "def _hwm():\n"
        "    kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "    open(hwm, 'w').write(kb)\n"
        "atexit.register(_hwm)\n"
        "runpy.run_module('gradsel_core.cli', run_name='__main__', alter_sys=True)\n")


def run_cli(argv, env):
    """(wall seconds, CPU seconds, peak RSS in MB) of ``python -m gradsel_core.cli ARGV`` in a fresh process;
    the peak RSS is the process's VmHWM (its own image, not the benchmark's memory it was spawned from)."""
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", _CLI, hwm.name, *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err = p.stderr.read().decode() if p.stderr else ""
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"gradsel {' '.join(argv)} failed ({p.returncode}): {err[-2000:]}")
        peak_kb = float(open(hwm.name).read() or "nan")
    return wall, usage.ru_utime + usage.ru_stime, peak_kb / 1024.0


# -- streaming scoring (issue #24 item 1) -----------------------------------------------------------

STREAM_TARGETS = {"peak RSS growth 10k -> 1M": 50.0, "rerun, nothing to do": 5.0, "resume, first new batch": 10.0}


def micro_model():
    """The streaming measures' model: a TinyGPT small enough that 1M records score in minutes on 2 shared
    cores (byte vocab 259, d_model 8, 1 layer, 1 head); what is measured is the data path, not the engine."""
    from gradsel_core.models import TinyGPT, TinyGPTConfig

    torch.manual_seed(0)
    return TinyGPT(TinyGPTConfig(vocab_size=259, d_model=8, n_layer=1, n_head=1, max_seq_len=64))


def write_stream_data(path: Path, n: int) -> None:
    """``n`` short JSONL records: an int id, a text of 8-40 bytes, a ``task`` field with 2 values."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for lo in range(0, n, 100_000):
            hi = min(n, lo + 100_000)
            lens = rng.integers(8, 41, hi - lo)
            f.write("".join(f'{{"id": {i}, "text": "{(f"record {i} " * 8)[:int(L)]}", "task": "{"ab"[i % 2]}"}}\n'
                            for i, L in zip(range(lo, hi), lens)))


def stream_child(mode: str, data: str, out: str) -> None:
    """One measured process (``score``, ``rerun`` or ``resume``): ``score_dataset`` on the JSONL file with the
    byte tokenizer; prints JSON with the call's wall seconds and the seconds from the call to its first
    scored batch."""
    import json as _json

    from gradsel_core import GradNormEngine
    from gradsel_core.data import ByteTokenizer
    from gradsel_core.windows import JsonlFile

    torch.set_num_threads(1)
    model = micro_model()
    first = {}
    real = GradNormEngine.score

    def score(self, *a, **k):
        first.setdefault("t", time.perf_counter())
        return real(self, *a, **k)

    GradNormEngine.score = score
    t0 = time.perf_counter()
    store = gs.score_dataset(model, JsonlFile(data), out, tokenizer=ByteTokenizer(), max_length=64, progress=False)
    wall = time.perf_counter() - t0
    print(_json.dumps({"mode": mode, "wall_s": wall, "first_batch_s": (first["t"] - t0) if "t" in first else None,
                       "records": len(store), "records_scored": store.run.get("records_scored")}))


def run_child(args, env):
    """(child's JSON, process wall s, CPU s, peak RSS MB) of one ``stream_child`` in a fresh process."""
    import json as _json

    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--stream-child", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"stream child {args} failed: {err.decode()[-2000:]}")
    return _json.loads(out.decode().strip().splitlines()[-1]), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def stream_main(args, env) -> None:
    """Peak RSS of a full scoring run at each N, then at the largest N a rerun with nothing to do and a resume
    whose last window is missing (every finished window is checked first: the worst case for the first batch)."""
    sizes = [int(x) for x in args.stream_records.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-stream-", dir=args.work_dir))
    stem = f"scale-stream-{utc_stamp()}"
    rows = []
    meta = {**env_info(), "snapshot_of": os.environ.get("BENCH_SNAPSHOT_COMMIT"), "sizes": sizes,
            "model": "TinyGPT(vocab 259, d_model 8, 1 layer, 1 head) via score_dataset(JsonlFile, ByteTokenizer, "
                     "max_length=64), default token budget and shard size; one fresh process per measure",
            "note": "shared 2-core CPU: wall-clock figures are noisy (one run each). The finished 1M store of the "
                    "rerun/resume measures is the one the full 1M scoring run in this script wrote. No plain "
                    "forward+backward baseline: these measures time the data path (reading, hashing, checking), "
                    "and the RSS of whole processes."}

    def report():
        md = markdown_table(["measure", "records", "wall s (call)", "process s", "CPU s", "peak RSS MB", "target", "meets"],
                            [[r["measure"], f"{r['records']:,}", f"{r['call_s']:.2f}", f"{r['process_s']:.2f}",
                              f"{r['cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}", r.get("target", ""),
                              "" if r.get("meets") is None else ("yes" if r["meets"] else "NO")] for r in rows])
        md += (f"\n\n{meta['timestamp']}, {meta['cpu']} ({meta['cpu_count']} cores, shared: timings are noisy), "
               f"torch {meta['torch_version']}, code {str(meta['git_commit'] or meta['snapshot_of'])[:10]}. {meta['model']}.\n")
        write_results(rows, args.out_dir, stem, meta, markdown=md)
        return md

    try:
        for n in sizes:
            data, out = work / f"d{n}.jsonl", work / f"s{n}"
            write_stream_data(data, n)
            res, wall, cpu, rss = run_child(["score", str(data), str(out)], env)
            rows.append({"measure": "score from scratch", "records": n, "call_s": res["wall_s"], "process_s": wall,
                         "cpu_s": cpu, "peak_rss_mb": rss, "data_mb": round(data.stat().st_size / 2 ** 20, 1)})
            print(rows[-1], flush=True)
            report()
        base = next(r for r in rows if r["records"] == min(sizes))
        top = next(r for r in rows if r["records"] == max(sizes))
        growth = top["peak_rss_mb"] - base["peak_rss_mb"]
        rows.append({"measure": f"peak RSS growth {min(sizes):,} -> {max(sizes):,}", "records": max(sizes), "call_s": 0.0,
                     "process_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": growth, "target": "<= +50 MB",
                     "meets": growth <= STREAM_TARGETS["peak RSS growth 10k -> 1M"] if min(sizes) <= 10_000 else None})
        n = max(sizes)
        data, out = work / f"d{n}.jsonl", work / f"s{n}"
        res, wall, cpu, rss = run_child(["rerun", str(data), str(out)], env)
        rows.append({"measure": "rerun, nothing to do", "records": n, "call_s": res["wall_s"], "process_s": wall,
                     "cpu_s": cpu, "peak_rss_mb": rss, "target": "<= 5 s (call)",
                     "meets": res["wall_s"] <= STREAM_TARGETS["rerun, nothing to do"], "records_scored": res["records_scored"]})
        print(rows[-1], flush=True)
        report()
        shards = sorted(p for p in out.iterdir() if p.name.startswith("shard-"))
        shards[-1].unlink()
        (out / "manifest.json").unlink()
        res, wall, cpu, rss = run_child(["resume", str(data), str(out)], env)
        rows.append({"measure": "resume, first new batch", "records": n, "call_s": res["first_batch_s"],
                     "process_s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "target": "<= 10 s (call to 1st batch)",
                     "meets": res["first_batch_s"] <= STREAM_TARGETS["resume, first new batch"],
                     "records_scored": res["records_scored"], "whole_call_s": res["wall_s"]})
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = report()
    print(md)
    print(f"wrote {args.out_dir}/{stem}.json, .csv, .md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--clusters", type=int, default=100_000)
    ap.add_argument("--data-records", type=int, default=10_000_000, help="records of the --data run (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-repeats", type=int, default=3, help="runs of the --data join (the slowest measure)")
    ap.add_argument("--quick", action="store_true", help="100k records, 1k clusters, 1 repeat")
    ap.add_argument("--work-dir", default=None, help="where the stores are built (default: a temp dir)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--only", default=None, help="comma-separated measure names (prefixes) to run, e.g. 'cli inspect'")
    ap.add_argument("--stream", action="store_true", help="the streaming scoring measures instead (issue #24 item 1)")
    ap.add_argument("--stream-records", default="10000,100000,1000000", help="record counts of --stream")
    ap.add_argument("--stream-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stream_child:
        return stream_child(*args.stream_child)
    if args.stream:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]))
        return stream_main(args, env)
    only = [w.strip() for w in args.only.split(",")] if args.only else None

    def want(measure: str) -> bool:
        return only is None or any(measure.startswith(w) for w in only)
    if args.quick:
        args.records, args.clusters, args.data_records, args.repeats, args.data_repeats = 100_000, 1_000, 100_000, 1, 1
    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]))
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work_dir))
    N, R = args.records, args.repeats
    rows = []
    stem = f"scale-{utc_stamp()}"
    meta = {**env_info(), "snapshot_of": os.environ.get("BENCH_SNAPSHOT_COMMIT"), "records": N,
            "clusters": args.clusters, "repeats": R,
            "note": "shared CPU: wall-clock medians are noisy; x_sort divides by one np.sort of N float64 in the "
                    "same run; cpu_s is the process's CPU time"}

    def report():
        md = markdown_table(
            ["measure", "records", "median wall s", "CPU s", "x np.sort(N)", "target s", "meets (wall)",
             "meets (CPU s)", "peak RSS MB"],
            [[r["measure"], f"{r['records']:,}", f"{r['median_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['x_sort']:.1f}",
              "" if r["target_s"] is None else f"{r['target_s']:g}",
              "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO"),
              "" if r["meets_target"] is None else ("yes" if r["cpu_s"] <= r["target_s"] else "NO"),
              r.get("peak_rss_mb", "")]
             for r in rows])
        md += (f"\n\n{meta['timestamp']}, {meta['cpu']} ({meta['cpu_count']} cores, shared: timings are noisy), "
               f"torch {meta['torch_version']}, numpy {meta['numpy_version']}, code {str(meta['git_commit'] or meta['snapshot_of'])[:10]}. "
               f"One np.sort of N float64 took {meta.get('sort_s', float('nan')):.2f} s in this run.\n")
        write_results(rows, args.out_dir, stem, meta, markdown=md)  # after every measure: a partial run keeps its rows
        return md

    def row(measure, timing, records=N, target_key=None, **extra):
        times, cpu = timing
        med = statistics.median(times)
        extra = {"cpu_s": round(statistics.median(cpu), 3), **extra}
        target = TARGETS.get(target_key or measure) if records >= 10_000_000 else None
        r = {"measure": measure, "records": records, "median_s": med, "all_s": times, "x_sort": med / sort_s,
             "target_s": target, "meets_target": None if target is None else med <= target, **extra}
        rows.append(r)
        report()
        print(f"{measure:34s} {med:8.2f} s  ({med / sort_s:5.1f}x sort)" + (f"  target {target:g} s" if target else "")
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)

    try:
        cols, fields = make_arrays(N, args.clusters)
        x = np.random.default_rng(1).random(N)
        sort_s = time_fn(lambda: np.sort(x), repeats=R)["median_s"]
        x = None
        meta["sort_s"] = sort_s
        print(f"calibration: np.sort of {N:,} float64: {sort_s:.2f} s", flush=True)
        d = work / "store"
        t0 = time.perf_counter()
        gs.ScoreStore.from_arrays(d, **cols, fields=fields)
        build_s = time.perf_counter() - t0
        row("from_arrays (build, not a target)", ([build_s], [float("nan")]))
        cols = fields = None  # free them: the CLI runs below are measured in their own processes
        store = gs.ScoreStore.open(d)
        if want("open"):
            row("open", timed(lambda: gs.ScoreStore.open(d), R))
        if want("select (one group)"):
            row("select (one group)", timed(lambda: gs.select(store), R))
        if want("select 2 groups"):
            row("select 2 groups", timed(lambda: gs.select(store, group_by="task"), R))
        if want(f"select {'100k' if args.clusters == 100_000 else args.clusters} groups"):
            row("select 100k groups" if args.clusters == 100_000 else f"select {args.clusters} groups",
                timed(lambda: gs.select(store, group_by="cluster"), R),
                target_key="select 100k groups" if args.clusters == 100_000 else None, groups=args.clusters)
        if want("select 2 groups, norm_per_token"):
            row("select 2 groups, norm_per_token",
                timed(lambda: gs.select(store, group_by="task", score="norm_per_token"), R))
        if want("select 2 groups, diagnostics=True"):
            row("select 2 groups, diagnostics=True",
                timed(lambda: gs.select(store, group_by="task", diagnostics=True), R))
        store = None  # free it before the CLI runs
        for measure, cli in (
            ("cli select", ["select", "--scores", str(d), "--out", str(work / "sel.jsonl")]),
            ("cli select --group-by task", ["select", "--scores", str(d), "--out", str(work / "selg.jsonl"),
                                            "--group-by", "task"]),
            ("cli inspect --by --policy", ["inspect", str(d), "--by", "task", "--policy", "median_band"]),
        ):
            if not want(measure):
                continue
            runs = [run_cli(cli, env) for _ in range(R)]
            row(measure, ([w for w, _, _ in runs], [c for _, c, _ in runs]),
                target_key="cli select" if measure.startswith("cli select") else measure,
                peak_rss_mb=round(max(m for _, _, m in runs)))
        if args.data_records and want("cli select --data"):
            M = args.data_records
            dd, data = work / "store-data", work / "data.jsonl"
            from gradsel_core.jsonl import record_digest

            digests = []  # each record's content hash, as gradsel score keeps it: select --data checks every one
            with open(data, "w") as f:  # the scored file: ids in order and a short text
                for lo in range(0, M, 1_000_000):
                    recs = [{"id": i, "text": f"record number {i}"} for i in range(lo, min(M, lo + 1_000_000))]
                    f.write("".join(json.dumps(r) + "\n" for r in recs))
                    digests += map(record_digest, recs)
            c2, f2 = make_arrays(M, min(args.clusters, M), seed=2)
            gs.ScoreStore.from_arrays(dd, **c2, fields=f2, record_sha256=digests)
            del c2, f2, digests
            runs = [run_cli(["select", "--scores", str(dd), "--out", str(work / "kept.jsonl"), "--data", str(data)], env)
                    for _ in range(args.data_repeats)]
            row("cli select --data", ([w for w, _, _ in runs], [c for _, c, _ in runs]), records=M,
                peak_rss_mb=round(max(m for _, _, m in runs)), data_mb=round(data.stat().st_size / 2 ** 20))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    md = report()
    print(md)
    print(f"wrote {args.out_dir}/{stem}.json, .csv, .md")


if __name__ == "__main__":
    main()
