"""The fused LM head (gradsel_core/ghost/head.py) at LLM vocabularies: peak memory and time against a plain
HF forward+backward and against today's ghost path (fused_head=False), side by side in one run.

    python benchmarks/bench_head.py                  # vocab 32,000 / 128,256 / 151,936, T = 512 / 2048, full + LoRA
    python benchmarks/bench_head.py --quick --out-dir /tmp/x

Model: HF ``LlamaForCausalLM`` (random init), hidden 256, 2 layers, intermediate 512, 4 heads, untied head, fp32;
B·T = 2048 tokens per batch (B = 4 at T = 512, B = 1 at T = 2048). LoRA: r = 8 on q/k/v/o/gate/up/down (the head
frozen). Methods, each in a FRESH subprocess (peak = VmHWM growth over the baseline taken after the model, the
batch and the engine are built; ``benchmarks/harness.py``):

* ``plain``: forward (logits), gradsel's per-sample loss, batch mean, ``backward()`` (the 1.0× baseline);
* ``ghost``: ``GradNormEngine(backend="ghost", fused_head=False).score`` (today's path: full logits);
* ``fused``: ``GradNormEngine(backend="ghost", fused_head=True).score``;
* ``filt_ghost`` / ``filt_fused`` (vocab 128,256 only): one in-step filtering step ``FilteredBackward.step``
  (median_band, ρ = 0.2), against ``plain``, which is the plain training step's forward+backward;
  ``filt2_ghost`` / ``filt2_fused`` (full parameters): the same step in two-pass mode
  (``TwoPassFilteredBackward``: the activation backward, then an ordinary backward of the kept samples' loss).

The largest B·T that fits a memory budget (8 GiB) is extrapolated from a linear fit of the measured peak
against B·T at two batch sizes (vocab 128,256, T = 512, full parameters): an estimate, not a measurement.
Times are medians of ``--repeats`` calls after ``--warmup`` untimed ones (default ONE call, no warm-up: a
full run is ~49 processes of 20-60 s each on this machine; ``--warmup 1`` leaves out the first call's one-time
costs: the rules' self-checks and, at B ≥ 2, the layout probe) on a shared 2-core CPU with other jobs running:
noisy, compare the ratios within a case only. Workers run with glibc's mmap threshold fixed (``--mmap-threshold``,
default 64 KiB: every allocation of 64 KiB or more is its own mapping, returned on free), so that resident
memory follows the live tensors; with the dynamic default, freed buffers of tens of MiB stay in the heap
or not depending on the order of allocations, and a second call's peak measures that. Both wall time and the process's CPU time are reported (CPU time
counts this process's work, not the time it waited for a core: the steadier of the two on a busy machine). The norms of ``fused`` are checked against ``ghost`` (same batch, same model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import (RESULTS_DIR, PeakMemory, env_info, fmt_bytes, markdown_table, time_fn,  # noqa: E402
                                utc_stamp, write_results)

BUDGET = 8 * 1024 ** 3
METHODS = ("plain", "ghost", "fused")


def build(vocab: int, T: int, B: int, lora: bool, d: int = 256, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(T, 64),
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    return model, {"input_ids": ids, "attention_mask": mask}


def worker(payload: dict) -> dict:
    import gradsel_core as gs
    from gradsel_core.batching import causal_lm_losses, default_labels

    torch.set_num_threads(payload["threads"])
    model, batch = build(payload["vocab"], payload["T"], payload["B"], payload["lora"])
    method = payload["method"]
    labels = default_labels(batch["input_ids"], batch["attention_mask"])
    out: dict = {}
    if method == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            logits = model(**batch).logits
            loss = causal_lm_losses(logits, labels)[0].mean()
            loss.backward()
    elif method in ("ghost", "fused"):
        eng = gs.GradNormEngine(model, backend="ghost", fused_head=method == "fused", verify=False)

        def step():
            out["norms"] = eng.score(batch).norms.tolist()
            out["coverage"] = eng.coverage().head
    else:  # filt_ghost / filt_fused (one backward), filt2_ghost / filt2_fused (two-pass)
        cls = gs.filtered.TwoPassFilteredBackward if method.startswith("filt2") else gs.FilteredBackward
        fb = cls(model, policy="median_band", ratio=0.2, fused_head=method.endswith("fused"))

        def step():
            model.zero_grad(set_to_none=True)
            out["norms"] = fb.step(batch).norms.tolist()
            out["coverage"] = fb.engine.ghost.head_status
    mem = PeakMemory("cpu", isolated=True)
    mem.start()
    t = time_fn(step, repeats=payload["repeats"], warmup=payload["warmup"])
    out.update(median_s=t["median_s"], times_s=t.get("all_s"), cpu_median_s=t["cpu_median_s"],
               cpu_s=t.get("cpu_all_s"), peak_bytes=mem.peak_bytes(), mem_kind=mem.kind)
    return out


def run(payload: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gradsel-head-") as tmp:
        p, o = Path(tmp) / "in.json", Path(tmp) / "out.json"
        p.write_text(json.dumps({**payload, "out": str(o)}))
        env = dict(os.environ, OMP_NUM_THREADS=str(payload["threads"]), MKL_NUM_THREADS=str(payload["threads"]))
        if payload.get("mmap_threshold"):
            env["MALLOC_MMAP_THRESHOLD_"] = str(payload["mmap_threshold"])
        try:
            proc = subprocess.run([sys.executable, __file__, "--_worker", str(p)], capture_output=True, text=True,
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"timeout after {timeout:.0f}s"}
        if not o.exists():
            tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-4:])
            return {"status": "error", "reason": f"exit {proc.returncode}: {tail}"[:400]}
        return {"status": "ok", **json.loads(o.read_text())}


def rel_diff(a, b):
    if not a or not b:
        return None
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small vocabularies and T (smoke test)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--mmap-threshold", type=int, default=65536,
                    help="MALLOC_MMAP_THRESHOLD_ of the workers (bytes; 0: glibc's dynamic default)")
    ap.add_argument("--cases", default=None,
                    help="only these VOCAB:T cases of the default list, or explicit VOCAB:T:B cases, comma-separated "
                         "(e.g. 151936:2048 or 4096:128:16; no filtering steps, no fit)")
    ap.add_argument("--params", choices=["full", "lora", "both"], default="both")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.quick:
        vocabs, shapes, filt_vocab, fit = (4096,), ((64, 2),), 4096, ((64, 1), (64, 2))
    else:
        vocabs, shapes, filt_vocab, fit = (32000, 128256, 151936), ((512, 4), (2048, 1)), 128256, ((512, 2), (512, 4))
    rows = []
    common = dict(repeats=args.repeats, warmup=args.warmup, threads=args.threads, mmap_threshold=args.mmap_threshold)

    def one(vocab, T, B, lora, method):
        r = run(dict(common, vocab=vocab, T=T, B=B, lora=lora, method=method), args.timeout)
        r.update(vocab=vocab, T=T, B=B, params="lora" if lora else "full", method=method)
        print(f"  V={vocab:>6} T={T:>4} B={B} {r['params']:<4} {method:<10} {r['status']:<5} "
              f"{r.get('median_s') or 0:.3f}s peak {fmt_bytes(r.get('peak_bytes'))} {r.get('reason', '')}",
              flush=True)
        rows.append(r)
        return r

    cases = [(v, T, B) for v in vocabs for T, B in shapes]
    if not args.quick:
        cases.insert(0, (8192, 512, 4))  # a small vocabulary (the auto rule's sweep: --cases VOCAB:T:B)
    only = None if args.cases is None else [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
    if only is not None:
        explicit = [c for c in only if len(c) == 3]  # VOCAB:T:B: run as given (the auto rule's sweep)
        pairs = {c for c in only if len(c) == 2}
        cases = [(v, T, B) for v, T, B in cases if (v, T) in pairs] + explicit
    for vocab, T, B in cases:
        if True:
            for lora in {"full": (False,), "lora": (True,), "both": (False, True)}[args.params]:
                res = {m: one(vocab, T, B, lora, m) for m in METHODS}
                if only is None and vocab == filt_vocab and T == shapes[0][0]:
                    for m in ("filt_ghost", "filt_fused") + (() if lora else ("filt2_ghost", "filt2_fused")):
                        res[m] = one(vocab, T, B, lora, m)
                plain = res["plain"]
                for m, r in res.items():
                    if r["status"] == "ok" and plain["status"] == "ok":
                        r["time_ratio"] = r["median_s"] / plain["median_s"]
                        r["cpu_ratio"] = r["cpu_median_s"] / plain["cpu_median_s"]
                        r["mem_ratio"] = r["peak_bytes"] / plain["peak_bytes"] if plain["peak_bytes"] else None
                res["fused"]["norms_rel_diff_vs_ghost"] = rel_diff(res["fused"].get("norms"), res["ghost"].get("norms"))
    # the largest B·T within the budget: linear fit of the peak against B·T (two batch sizes)
    fits = {}
    (T1, B1), (T2, B2) = fit
    for m in (METHODS if only is None else ()):
        pts = []
        for T, B in fit:
            r = next((x for x in rows if x["method"] == m and x["vocab"] == filt_vocab and x["T"] == T and x["B"] == B
                      and x["params"] == "full"), None) or one(filt_vocab, T, B, False, m)
            pts.append((T * B, r.get("peak_bytes")))
        (n1, p1), (n2, p2) = pts
        if p1 is not None and p2 is not None and n2 != n1 and p2 > p1:
            slope = (p2 - p1) / (n2 - n1)
            fits[m] = {"bytes_per_token": slope, "intercept": p1 - slope * n1,
                       "max_tokens_in_budget": int((BUDGET - (p1 - slope * n1)) / slope)}
    env = env_info("cpu")
    for r in rows:
        r["env"] = env
        r.pop("norms", None)
    table = markdown_table(
        ["vocab", "T", "B", "params", "method", "median s", "time / plain", "CPU s", "CPU / plain", "peak",
         "peak / plain", "head"],
        [[r["vocab"], r["T"], r["B"], r["params"], r["method"],
          "" if r.get("median_s") is None else f"{r['median_s']:.2f}",
          "" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}×",
          "" if r.get("cpu_median_s") is None else f"{r['cpu_median_s']:.2f}",
          "" if r.get("cpu_ratio") is None else f"{r['cpu_ratio']:.2f}×", fmt_bytes(r.get("peak_bytes")),
          "" if r.get("mem_ratio") is None else f"{r['mem_ratio']:.2f}×",
          (r.get("coverage") or r.get("reason") or "")[:40]] for r in rows])
    fit_table = markdown_table(
        ["method", "peak bytes per token (fit)", "fixed (fit)", f"largest B·T in {BUDGET / 1024 ** 3:.0f} GiB (estimate)"],
        [[m, fmt_bytes(f["bytes_per_token"]), fmt_bytes(f["intercept"]), f["max_tokens_in_budget"]]
         for m, f in fits.items()])
    md = table + "\n\n" + fit_table + "\n"
    paths = write_results(rows, args.out_dir, f"head-{utc_stamp()}",
                          meta={"script": "bench_head.py", "fits": fits, "budget_bytes": BUDGET, "env": env,
                                "args": vars(args)},
                          markdown=md)
    print(md)
    print(f"results: {paths['json']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        payload = json.loads(Path(sys.argv[2]).read_text())
        Path(payload["out"]).write_text(json.dumps(worker(payload)))
        sys.exit(0)
    sys.exit(main())
