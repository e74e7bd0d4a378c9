"""Reading ``--data`` (issue #24 item 4): records/s and peak RSS of :func:`gradsel_core.sources.iter_records`
plus :func:`gradsel_core.jsonl.record_digest` (what ``gradsel score`` and ``select --data`` do per raw record)
over the same N short records as JSONL, Parquet and a ``datasets`` folder. Each (format, N) runs in its own
process, so the peak RSS is that reader's; the baseline is the same process's RSS after its imports (the
peak is reset there through /proc/self/clear_refs: Linux only). No model
and no forward/backward: this measures the readers only.

    python benchmarks/bench_sources.py                 # N = 10k, 100k, 1M
    python benchmarks/bench_sources.py --n 10000 --out-dir /tmp/x

The machine is a shared 2-core CPU: wall times are noisy; the peak-RSS growth is the point (flat in N means
the file is never read whole).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS_DIR, _proc_status, env_info, markdown_table, utc_stamp, write_results  # noqa: E402

CHUNK = 100_000


def _rows(lo: int, m: int):
    return [{"id": f"r{i}", "text": "alpha beta gamma delta " * (1 + i % 5), "task": ("a", "b")[i % 2]}
            for i in range(lo, lo + m)]


def make_files(d: Path, n: int) -> dict:
    """The same n records as JSONL, Parquet (row groups of 100k) and a datasets folder, written in chunks."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl, pqf, hf = d / f"d{n}.jsonl", d / f"d{n}.parquet", d / f"d{n}_ds"
    writer = None
    with open(jl, "w", encoding="utf-8") as f:
        for lo in range(0, n, CHUNK):
            rows = _rows(lo, min(CHUNK, n - lo))
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            t = pa.Table.from_pylist(rows)
            writer = writer or pq.ParquetWriter(pqf, t.schema)
            writer.write_table(t)
    writer.close()
    datasets.disable_progress_bars()
    datasets.Dataset.from_parquet(str(pqf)).save_to_disk(str(hf))
    return {"jsonl": str(jl), "parquet": str(pqf), "hf": str(hf)}


def measure(path: str) -> dict:
    """In this process: read every record of ``path`` and hash it; the time and the RSS growth."""
    from gradsel_core.jsonl import record_digest
    from gradsel_core.sources import iter_records

    import datasets  # noqa: F401  imported before the baseline, as the CLI would have it
    import pyarrow.parquet  # noqa: F401

    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    n = 0
    for rec in iter_records(path, max_line_bytes=None):
        record_digest(rec)
        n += 1
    dt = time.perf_counter() - t0
    peak = _proc_status()["VmHWM"]
    return {"records": n, "seconds": round(dt, 3), "records_per_s": round(n / dt), "rss_base_mb": round(base / 2**20, 1),
            "rss_peak_mb": round(peak / 2**20, 1), "rss_growth_mb": round((peak - base) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            files = make_files(Path(tmp), n)
            for kind, path in files.items():
                env = dict(os.environ, OMP_NUM_THREADS="1")
                out = subprocess.run([sys.executable, __file__, "--measure", path], env=env, capture_output=True,
                                     text=True, check=True).stdout
                r = {"n": n, "format": kind, **json.loads(out.strip().splitlines()[-1])}
                print(r, flush=True)
                rows.append(r)
    meta = {"env": env_info(), "what": "iter_records + record_digest over N short records, one process each"}
    md = markdown_table(["N", "format", "records/s", "seconds", "RSS before (MB)", "peak RSS growth (MB)"],
                        [[r["n"], r["format"], r["records_per_s"], r["seconds"], r["rss_base_mb"], r["rss_growth_mb"]]
                         for r in rows])
    paths = write_results(rows, args.out_dir, f"sources-{utc_stamp()}", meta, markdown=md + "\n")
    print(md)
    print(paths)


if __name__ == "__main__":
    main()
