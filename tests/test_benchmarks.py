"""The benchmark scripts run end to end (--quick, tiny sizes) and write complete result rows.

Each script runs as a subprocess from the repo root, exactly as documented
(``python benchmarks/bench_*.py --quick --out-dir <tmp>``), so results never land in benchmarks/results/.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per script; a quick run takes well under a minute on an idle 2-core machine

REQUIRED = [
    "bench", "case", "method", "status", "reason", "note", "median_s", "all_s", "repeats", "ratio_to_plain",
    "peak_mem_bytes", "mem_kind", "peak_mem_ratio", "max_rel_err", "ref_samples", "spec_B", "spec_T",
    "spec_d_model", "spec_model", "spec_params", "device", "env",
]
ENV_KEYS = ["torch_version", "python", "platform", "device", "device_name", "torch_threads", "timestamp", "git_commit"]


def run_script(name: str, out_dir: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{name}", "--quick", "--out-dir", str(out_dir), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    jsons = list(out_dir.glob("*.json"))
    csvs = list(out_dir.glob("*.csv"))
    assert len(jsons) == 1 and len(csvs) == 1, sorted(p.name for p in out_dir.iterdir())
    data = json.loads(jsons[0].read_text())
    with csvs[0].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(data["rows"]) > 0
    assert "| method |" in proc.stdout  # the markdown summary was printed
    return {"rows": data["rows"], "meta": data["meta"], "csv": csv_rows, "stdout": proc.stdout}


def check_rows(rows, methods):
    for case in {r["case"] for r in rows}:
        got = {r["method"] for r in rows if r["case"] == case}
        assert got == set(methods), (case, got)
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, (r["method"], missing)
        assert all(k in r["env"] for k in ENV_KEYS), r["env"].keys()
        if r["status"] == "ok":
            assert r["ratio_to_plain"] is not None and math.isfinite(r["ratio_to_plain"]), r
            assert r["ratio_to_plain"] > 0 and r["median_s"] > 0 and len(r["all_s"]) == r["repeats"]
            if r["method"] != "plain":
                assert r["max_rel_err"] is not None and math.isfinite(r["max_rel_err"]), r
        else:
            assert r["status"] in ("unsupported", "error"), r["status"]
            assert r["reason"], f"{r['method']} failed without a reason"
        if r["method"] == "plain":
            assert r["status"] == "ok" and r["ratio_to_plain"] == 1.0
        if r["method"] == "loop" and r["status"] == "ok":
            assert r["max_rel_err"] == 0.0  # the loop is the reference


def test_bench_engine_quick(tmp_path):
    results = REPO / "benchmarks" / "results"
    before = set(results.glob("*")) if results.exists() else set()
    out = run_script("bench_engine.py", tmp_path)
    check_rows(out["rows"], ["plain", "loop", "vmap", "ghost", "auto"])
    assert {c["method"] for c in out["csv"]} == {"plain", "loop", "vmap", "ghost", "auto"}
    assert "env_torch_version" in out["csv"][0]
    after = set(results.glob("engine-*-quick.*")) if results.exists() else set()
    assert not (after - before)  # --out-dir is honoured: nothing written under benchmarks/results/


@pytest.mark.needs_peers
def test_bench_peers_quick(tmp_path):
    pytest.importorskip("opacus", reason="opacus is not installed (pip install 'gradsel[bench]')")
    pytest.importorskip("backpack", reason="BackPACK is not installed (pip install --no-deps backpack-for-pytorch einops unfoldNd)")
    out = run_script("bench_peers.py", tmp_path)
    methods = ["plain", "loop", "vmap", "ghost", "opacus_hooks", "opacus_ghost", "backpack"]
    rows = out["rows"]
    check_rows(rows, methods)
    assert {r["case"] for r in rows} == {"quick-tinygpt-full", "quick-tinygpt-lora"}
    by = {(r["case"], r["method"]): r for r in rows}
    # the peers are installed (skipped above otherwise) and support TinyGPT: each computes the same
    # quantity as the loop
    for case in ("quick-tinygpt-full", "quick-tinygpt-lora"):
        for m in ("opacus_hooks", "opacus_ghost", "backpack"):
            assert by[(case, m)]["status"] == "ok", (case, m, by[(case, m)]["reason"])
        for m in ("opacus_hooks", "opacus_ghost"):
            r = by[(case, m)]
            assert r["max_rel_err"] < 1e-4, (case, m, r["max_rel_err"], r["note"])
    bp = by[("quick-tinygpt-full", "backpack")]  # BackPACK skips LayerNorm: reported, exact on what it covers
    assert bp["params_missing"] > 0 and "LayerNorm" in bp["note"]
    assert bp["max_rel_err_covered"] < 1e-4
    assert by[("quick-tinygpt-lora", "backpack")]["max_rel_err"] < 1e-4


def test_isolated_worker_measures_memory(tmp_path):
    """The default isolation path: one method in a fresh subprocess, with its peak memory."""
    sys.path.insert(0, str(REPO))
    from benchmarks import harness as H

    spec = H.CaseSpec("tinygpt", 16, 1, 2, 32, 8, 2, "full")
    res = H.run_isolated(REPO / "benchmarks" / "bench_engine.py", spec, "plain", "cpu", repeats=1, warmup=0,
                         timeout=TIMEOUT, threads=1)
    assert res["status"] == "ok", res.get("reason")
    assert res["timing"]["median_s"] > 0
    assert res["mem_kind"] in ("cpu_vmhwm_delta", "cpu_maxrss_delta")
    assert res["peak_mem_bytes"] is not None and res["peak_mem_bytes"] >= 0
    bad = H.run_isolated(REPO / "benchmarks" / "bench_engine.py", spec, "no_such_method", "cpu", 1, 0, TIMEOUT, 1)
    assert bad["status"] == "error" and "no_such_method" in bad["reason"]


def test_harness_helpers(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks import harness as H

    calls = []
    t = H.time_fn(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t["all_s"]) == 3 and t["median_s"] >= 0
    md = H.markdown_table(["a", "b"], [[1, "x|y"]])
    assert md.splitlines()[0] == "| a | b |" and "x\\|y" in md
    rows = [{"case": "c", "method": "plain", "status": "ok", "ratio_to_plain": 1.0, "env": {"torch_version": "x"}}]
    paths = H.write_results(rows, tmp_path, "t", {"k": 1})
    assert json.loads(paths["json"].read_text())["rows"][0]["env"]["torch_version"] == "x"
    with paths["csv"].open() as f:
        assert next(csv.DictReader(f))["env_torch_version"] == "x"
    with pytest.raises(ValueError):
        H.CaseSpec(params="prefix")


def test_bench_reference_quick(tmp_path):
    out = run_script("bench_reference.py", tmp_path)
    assert {r["method"] for r in out["rows"]} == {"plain", "norms", "norms+ref", "norms+4ref"}
    for r in out["rows"]:
        assert r["median_s"] > 0 and math.isfinite(r["ratio_to_plain"])
        assert r["dots_rel_err_vs_loop"] <= 1e-5  # the timed path is exact
    assert "torch_version" in out["meta"]


def test_bench_verify_quick(tmp_path):
    out = run_script("bench_verify.py", tmp_path)
    assert [r["method"] for r in out["rows"]] == ["plain", "first score, verify=False", "first score, verify=True"]
    assert all(r["median_s"] > 0 for r in out["rows"])
    assert "one-off cost" in out["stdout"]


def test_bench_regression_quick(tmp_path):
    """Ghost of this checkout against the pre-trust engine (its own gradsel_core, imported first in its worker)."""
    from benchmarks.bench_regression import TRUST_COMMIT

    rev = subprocess.run(["git", "rev-parse", "--verify", f"{TRUST_COMMIT}^"], cwd=REPO, capture_output=True, text=True)
    if rev.returncode != 0:
        pytest.skip(f"commit {TRUST_COMMIT} is not in this checkout's history (shallow clone)")
    out = run_script("bench_regression.py", tmp_path, "--cases", "tinygpt-lora")
    check_rows(out["rows"], ["plain", "ghost", "ghost-unfused", "ghost@pre-trust"])
    by = {r["method"]: r for r in out["rows"]}
    assert "fused_head=False" in by["ghost-unfused"]["note"] and "fused_head" not in by["ghost"]["note"]
    assert by["ghost@pre-trust"]["version_commit"] == rev.stdout.strip()
    assert "/pre-trust/gradsel_core" in by["ghost@pre-trust"]["note"]  # the old tree was the one imported
    assert str(REPO / "gradsel_core") in by["ghost"]["note"]
    for r in out["rows"]:
        assert r["status"] == "ok", r["reason"]
        assert r["peak_mem_fixed_bytes"] > 0 and r["mem_threshold"] == 65536
        if r["method"] != "plain":
            assert r["max_rel_err"] < 1e-5 and r["mem_pass_max_rel_err"] < 1e-5
    assert out["meta"]["versions"]["pre-trust"]["commit"] == rev.stdout.strip()


def test_bench_scale_small(tmp_path, monkeypatch):
    """bench_scale.py's in-process measures on a small store: rows with wall and CPU seconds, written files."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO))
    mod = importlib.import_module("benchmarks.bench_scale")
    mod.main(["--records", "3000", "--clusters", "100", "--repeats", "1", "--only", "open,select",
              "--out-dir", str(tmp_path), "--work-dir", str(tmp_path)])
    (js,) = tmp_path.glob("scale-*.json")
    rows = json.loads(js.read_text())["rows"]
    assert {r["measure"] for r in rows} >= {"open", "select 2 groups", "select 100 groups",
                                             "select 2 groups, norm_per_token"}
    assert all(r["median_s"] > 0 and r["records"] == 3000 for r in rows)


def test_bench_batching_small(tmp_path, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(REPO))
    mod = importlib.import_module("benchmarks.bench_batching")
    mod.main(["--short", "24", "--long", "2", "--repeats", "1", "--out-dir", str(tmp_path)])
    (js,) = tmp_path.glob("batching-*.json")
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 2 * len(mod.CONFIGS) and all(r["samples_per_s"] > 0 and r["x_plain"] > 0 for r in rows)
    assert {r["speedup_vs_b16"] for r in rows if r["config"] == "batch_size=16"} == {1.0}
