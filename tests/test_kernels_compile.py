"""CI lane without a GPU: every kernel configuration gradsel launches compiles for the H200 (sm_90a).

``python -m gradsel_kernels._compile`` runs each launcher on meta tensors (shapes and dtypes of the
case, the launch configuration its public function picks for 132 SMs), records the launch, and compiles
it with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, ptxas included. This test runs it in a
subprocess (TRITON_INTERPRET unset: this process's kernels are interpreted) and asserts:

- every configuration compiles;
- shared memory fits the H200's 227 KiB per block;
- aligned configurations spill no registers;
- every 2-D tile address is formed in int64 (no int32 stride × index overflow);
- the cases cover every kernel, dtypes, aligned and odd shapes, LoRA ranks, lengths and padding on/off,
  split and unsplit launches, and the LM head's two passes (bias on/off, logit scale) at LLM vocabularies.

Skipped cleanly when triton, its NVIDIA backend, or ptxas is absent. The committed report
(benchmarks/results/kernel-compile-sm90.{json,md}) comes from the same module.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_triton

REPO = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 227 * 1024


def _ptxas_path():
    """The ptxas triton uses for sm_90, or None when its NVIDIA backend or ptxas is absent."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception:  # noqa: BLE001 - no NVIDIA backend
        return None
    if "nvidia" not in backends:
        return None
    try:
        try:
            tool = get_ptxas(90)
        except TypeError:  # older triton: get_ptxas() without an arch
            tool = get_ptxas()
        path = tool.path
    except Exception:  # noqa: BLE001 - ptxas not found
        return None
    return path if path and os.path.exists(path) else None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gradsel[triton]')")
    if _ptxas_path() is None:
        pytest.skip("triton's NVIDIA backend or its bundled ptxas is not available: cannot compile for sm_90")
    out = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")] + [env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns without it; 1 = the GPU default
    r = subprocess.run([sys.executable, "-m", "gradsel_kernels._compile", "--json", str(out), "--jobs",
                        str(min(2, os.cpu_count() or 1))],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.exists(), f"no report written (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    data = json.loads(out.read_text())
    data["stdout"] = r.stdout
    return data


def test_every_configuration_compiles_for_sm90(report):
    rows = report["kernels"]
    failed = [(r["case"], r["error"]) for r in rows if not r["ok"]]
    assert not failed, f"{len(failed)} configurations failed to compile for sm_90a: {failed}"
    assert all(r["n_regs"] and r["n_regs"] <= 255 for r in rows), [(r["case"], r["n_regs"]) for r in rows]


def test_shared_memory_fits_h200(report):
    over = [(r["case"], r["shared"]) for r in report["kernels"] if r["ok"] and r["shared"] > SMEM_LIMIT]
    assert not over, f"shared memory over the H200's {SMEM_LIMIT} B per block: {over}"
    assert all(r["shared"] is not None for r in report["kernels"] if r["ok"])


def test_aligned_configurations_do_not_spill(report):
    rows = [r for r in report["kernels"] if r["ok"] and r["aligned"]]
    assert len(rows) >= 20
    spills = [(r["case"], r["spill_stores"], r["spill_loads"]) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, f"aligned configurations spill registers (bytes stored/loaded): {spills}"


def test_tile_offsets_are_int64(report):
    narrow = [r["case"] for r in report["kernels"] if r["ok"] and not r["int64_tile_offsets"]]
    assert not narrow, f"2-D tile addresses formed with int32 offsets (overflow at stride × index >= 2^31): {narrow}"


def test_cases_cover_what_gradsel_launches(report):
    rows = report["kernels"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_ghost_sq_kernel", "_direct_sq_kernel", "_embedding_sq_kernel", "_row_sq_kernel",
                       "_head_lse_kernel", "_head_grad_kernel"}, kernels
    for k in kernels - {"_head_lse_kernel", "_head_grad_kernel"}:  # the head kernels have no split
        mine = [r for r in rows if r["kernel"] == k]
        assert {r["aligned"] for r in mine} == {True, False}, f"{k}: aligned and odd shapes"
        assert {r["config"]["n_split"] > 1 for r in mine} == {True, False}, f"{k}: split and unsplit launches"
    ghost = [r for r in rows if r["kernel"] == "_ghost_sq_kernel"]
    assert {r["constexprs"]["HAS_LEN"] for r in ghost} == {True, False}
    assert {r["config"]["block_t"] for r in ghost} == {16, 32, 64}
    emb = [r for r in rows if r["kernel"] == "_embedding_sq_kernel"]
    assert {r["constexprs"]["HAS_PAD"] for r in emb} == {True, False}
    row = [r for r in rows if r["kernel"] == "_row_sq_kernel"]
    assert {r["constexprs"]["WEIGHTED"] for r in row} == {True, False}
    lora = {r["case"] for r in rows if r["case"].startswith("lora-")}
    assert {"lora-A-r4-bf16", "lora-B-r64-bf16", "lora-A-r16-fp32"} <= lora
    # the LM head's passes: aligned and odd shapes, bias on and off, the logit scale, fp32 and bf16
    for k in ("_head_lse_kernel", "_head_grad_kernel"):
        mine = [r for r in rows if r["kernel"] == k]
        assert {r["aligned"] for r in mine} == {True, False}, k
        assert {r["constexprs"]["HAS_BIAS"] for r in mine} == {True, False}, k
        assert {r["constexprs"]["POST_SCALE"] for r in mine} == {True, False}, k
        assert {r["constexprs"]["ROUND"] for r in mine} == {True, False}, k  # bf16 rounds its logits, fp32 not
    # 64-row Gram blocks run with 8 warps (4 spill on unaligned shapes)
    for r in ghost + emb:
        if r["config"]["block_t"] == 64:
            assert r["config"]["num_warps"] == 8, r["case"]
