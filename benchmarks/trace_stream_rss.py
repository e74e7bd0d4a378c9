"""RSS of a streaming scoring process window by window (issue #24: where the growth with N is).

    python benchmarks/trace_stream_rss.py DATA.jsonl OUT_DIR

Scores ``DATA.jsonl`` as ``bench_scale.py --stream`` does (its TinyGPT, the byte tokenizer, max_length 64,
the default window) and prints the process's ``VmRSS`` / ``VmHWM`` (MB) after windows 1, 2, 5, 10, 20 and
every 25th, then before and after the end-of-run merge. One run; RSS is not noisy, no times are reported.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gradsel_core as gs  # noqa: E402
from benchmarks.bench_scale import micro_model  # noqa: E402
from gradsel_core import scoring  # noqa: E402
from gradsel_core.data import ByteTokenizer  # noqa: E402
from gradsel_core.windows import JsonlFile  # noqa: E402


def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    log = []
    real_shard, real_merge = scoring._score_shard, scoring._merge
    count = [0]

    def shard(*a, **k):
        res = real_shard(*a, **k)
        count[0] += 1
        if count[0] in (1, 2, 5, 10, 20) or count[0] % 25 == 0:
            log.append((f"after window {count[0]}", status()))
        return res

    def merge(*a, **k):
        log.append(("before merge", status()))
        res = real_merge(*a, **k)
        log.append(("after merge", status()))
        return res

    scoring._score_shard, scoring._merge = shard, merge
    gs.score_dataset(micro_model(), JsonlFile(data), out, tokenizer=ByteTokenizer(), max_length=64, progress=False)
    log.append(("end", status()))
    for what, st in log:
        print(f"{what:>20}: VmRSS {st['VmRSS']} MB, VmHWM {st['VmHWM']} MB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
