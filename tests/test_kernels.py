"""The fused Triton kernels (gradsel_kernels) against the torch references in gradsel_core.dispatch.

Default: CPU tensors under the Triton interpreter. tests/conftest.py exports TRITON_INTERPRET=1 before
anything imports triton (triton fixes interpreted vs compiled at its first import, and
torch.utils.flop_counter imports it). With GRADSEL_KERNEL_DEVICE=cuda (and TRITON_INTERPRET=0) the same
tests run compiled on the GPU: benchmarks/gpu_check.sh does that.

Tests that launch kernels carry the ``needs_triton`` marker and skip cleanly without triton; the import
and fallback tests at the top run everywhere.
"""
import contextlib
import importlib.util
import logging
import os
import sys
import subprocess
from pathlib import Path

import pytest
import torch

_DEVICE = os.environ.get("GRADSEL_KERNEL_DEVICE", "cpu")
_INTERPRET = _DEVICE == "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None

from gradsel_core import dispatch as D  # noqa: E402
import gradsel_kernels as K  # noqa: E402  (never needs triton: entry points import it on first call)

if HAS_TRITON:
    import triton.language as _tl  # noqa: E402

    from gradsel_kernels import _direct, _embedding, _ghost, _row, _utils  # noqa: E402
    from gradsel_kernels._direct import direct_config, direct_sq_launch  # noqa: E402
    from gradsel_kernels._embedding import embedding_config, embedding_sq_launch  # noqa: E402
    from gradsel_kernels._ghost import ghost_config, ghost_sq_launch  # noqa: E402
    from gradsel_kernels._row import row_config, row_sq_launch  # noqa: E402

if _DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("GRADSEL_KERNEL_DEVICE=cuda but CUDA is not available", allow_module_level=True)


def needs_triton(fn):
    """Marker ``needs_triton`` plus a clean skip when triton is not installed."""
    fn = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'gradsel[triton]')")(fn)
    return pytest.mark.needs_triton(fn)


REPO = Path(__file__).resolve().parents[1]
DEV = torch.device(_DEVICE)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def _kernels_interpreted() -> bool:
    return _interpreted(_ghost._ghost_sq_kernel) and _interpreted(_tl.zeros)


def rnd(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEV)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Kernel vs fp32 reference on the same (upcast) values: products are exact in fp32 for fp16/bf16
    inputs, so only summation order differs; tolerances scale with the largest |ref| (sums cancel)."""
    assert out.dtype == torch.float32, f"{what}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    rtol = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}[dtype]
    if not _INTERPRET:
        rtol *= 10  # different accumulation trees on the GPU
    ref = ref.float()
    atol = rtol * float(ref.abs().max()) + 1e-12
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what} {dtype}: {m}")


def all_ops(A, G, X, ids, pad):
    """(name, kernel output, reference on the fp32 upcast) for every op."""
    Af, Gf, Xf = A.float(), G.float(), X.float()
    return [
        ("ghost_sq", K.ghost_sq(A, G), D.ghost_sq(Af, Gf)),
        ("direct_sq", K.direct_sq(A, G), D.direct_sq(Af, Gf)),
        ("embedding_sq", K.embedding_sq(ids, G, pad), D.embedding_sq(ids, Gf, pad)),
        ("rowsum_sq", K.rowsum_sq(G), D.rowsum_sq(Gf)),
        ("weighted_rowsum_sq", K.weighted_rowsum_sq(X, G), D.weighted_rowsum_sq(Xf, Gf)),
    ]


# -- environment -----------------------------------------------------------------------------------


def test_core_import_does_not_import_triton():
    """Neither importing gradsel_core nor asking triton_usable about a CPU device (no interpreter)
    imports triton or gradsel_kernels."""
    code = ("import os, sys; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import torch, gradsel_core, gradsel_core.dispatch as D\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert not D.triton_usable(torch.device('cpu'))\n"
            "assert 'gradsel_kernels' not in sys.modules and 'triton' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr


@needs_triton
@pytest.mark.skipif(not _INTERPRET, reason="interpreter-mode check")
def test_kernels_run_interpreted():
    assert _kernels_interpreted(), "gradsel_kernels was decorated without TRITON_INTERPRET=1"
    assert D.triton_usable(torch.device("cpu"))  # the fixture sets TRITON_INTERPRET=1 for this module


def test_kernels_import_without_triton():
    """Importing gradsel_kernels never needs triton; a launch without it says what to install."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, gradsel_kernels as K\n"
        "assert sys.modules.get('triton') is None, 'triton imported'\n"
        "assert callable(K.ghost_sq) and K.__all__\n"
        "try:\n"
        "    K.ghost_sq(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))\n"
        "except ImportError as e:\n"
        "    assert 'pip install' in str(e) and 'ghost' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('launch without triton did not raise')\n"
        "from gradsel_core import dispatch as D\n"
        "assert not D.triton_usable(torch.device('cuda'))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert r.stderr.count("fused Triton kernels unavailable") == 1, r.stderr


@needs_triton
def test_triton_usable_falls_back_with_one_warning(monkeypatch, caplog):
    """A source checkout where triton imports but gradsel_kernels does not: backend "auto" must fall back
    to the torch path with one warning, not crash at the first kernel call."""
    monkeypatch.setitem(sys.modules, "gradsel_kernels", None)  # import gradsel_kernels -> ImportError
    D._kernels_problem.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="gradsel_core.dispatch"):
            dev = torch.device("cuda") if not _INTERPRET else torch.device("cpu")
            assert [D.triton_usable(dev) for _ in range(3)] == [False] * 3
        warnings = [r for r in caplog.records if "fused Triton kernels unavailable" in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        assert "gradsel_kernels" in warnings[0].getMessage() and "pip install -e ." in warnings[0].getMessage()
        with pytest.raises(ImportError, match="backend='ghost'"):
            D.ghost_sq(rnd(1, 2, 3), rnd(1, 2, 3), use_triton=True)
    finally:
        monkeypatch.undo()
        D._kernels_problem.cache_clear()
    assert D.triton_usable(torch.device("cuda") if not _INTERPRET else torch.device("cpu"))


# -- launches run under the tensors' device -------------------------------------------------------------


@needs_triton
def test_device_guard_enters_the_tensor_device(monkeypatch):
    entered = []

    class FakeCudaDevice:  # stands in for torch.cuda.device: records which device becomes current
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with _utils.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with _utils.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)], "a CPU launch must not touch the CUDA device"


@needs_triton
def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    """Each launcher enters device_guard(tensor.device) and launches its kernel inside it (so on that
    device and its current stream), checked through mocks of the guard and of the kernels."""
    state = {"inside": None, "launches": [], "guarded": []}

    @contextlib.contextmanager
    def fake_guard(device):
        state["guarded"].append(torch.device(device))
        state["inside"] = torch.device(device)
        try:
            yield
        finally:
            state["inside"] = None

    class KernelProxy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert state["inside"] is not None, f"{self.name} launched outside device_guard"
                devs = {a.device for a in args if isinstance(a, torch.Tensor)}
                assert devs == {state["inside"]}, (self.name, devs, state["inside"])
                state["launches"].append(self.name)
                return self.kernel[grid](*args, **kwargs)
            return launch

    for mod, kname in ((_ghost, "_ghost_sq_kernel"), (_direct, "_direct_sq_kernel"),
                       (_embedding, "_embedding_sq_kernel"), (_row, "_row_sq_kernel")):
        monkeypatch.setattr(mod, "device_guard", fake_guard)
        monkeypatch.setattr(mod, kname, KernelProxy(kname, getattr(mod, kname)))
    A, G, X = rnd(2, 5, 6), rnd(2, 5, 7), rnd(2, 5, 7)
    ids = torch.randint(0, 3, (2, 5)).to(DEV)
    for name, out, ref in all_ops(A, G, X, ids, pad=1):
        assert_close(out, ref, torch.float32, name)
    assert sorted(state["launches"]) == sorted(["_ghost_sq_kernel", "_direct_sq_kernel", "_embedding_sq_kernel",
                                                "_row_sq_kernel", "_row_sq_kernel"])
    assert set(state["guarded"]) == {DEV}


# -- split launches (few programs: short sequences, small batches) ---------------------------------------


@needs_triton
def test_configs_split_only_when_few_programs():
    bf = torch.bfloat16
    # the case: T=128, B=16 -> 48 ghost programs on 132 SMs: split; B=64 -> 192 programs: split
    # (< 264); long sequences fill the GPU: unsplit
    assert ghost_config(16, 128, 4096, 4096, bf, 132)["n_split"] > 1
    assert ghost_config(16, 2048, 4096, 4096, bf, 132)["n_split"] == 1
    c = ghost_config(16, 128, 4096, 4096, bf, 132)
    assert 16 * 3 * c["n_split"] >= 2 * 132 and c["num_warps"] == 8 and c["block_t"] == 64
    # each split keeps >= 2 column steps: narrow layers are not split below that
    assert ghost_config(1, 16, 40, 40, torch.float32, 132)["n_split"] == 1
    assert embedding_config(16, 128, 2048, bf, 132)["n_split"] > 1
    assert embedding_config(16, 2048, 2048, bf, 132)["n_split"] == 1
    assert direct_config(2, 256, 4096, 16, bf, 132)["n_split"] > 1  # LoRA A, small batch
    assert direct_config(16, 256, 4096, 4096, bf, 132)["n_split"] == 1
    assert row_config(1, 2048, 2048, 132)["n_split"] > 1
    assert row_config(64, 2048, 2048, 132)["n_split"] == 1
    # the SM count is read at launch time; under the interpreter a fixed small value
    assert _utils.sm_count(torch.device("cpu")) == _utils.INTERPRET_SM_COUNT


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_paths_match_reference(dtype):
    """Every launcher with its loop split over 2 and 3 programs (partials reduced in a fixed order)
    equals the unsplit launch and the torch reference: odd shapes, lengths, padding ids, small blocks."""
    gen = torch.Generator().manual_seed(7)
    B, T, d, p = 2, 40, 37, 50  # 3 row blocks of 16 (last partial), 3 and 4 column steps of 16
    A, G, X = rnd(B, T, d, dtype=dtype, gen=gen), rnd(B, T, p, dtype=dtype, gen=gen), rnd(B, T, p, dtype=dtype, gen=gen)
    Af, Gf, Xf = A.float(), G.float(), X.float()
    lengths = torch.tensor([20, 0]).to(DEV)
    Gz = Gf.clone()
    for b, n in enumerate(lengths.tolist()):
        Gz[b, n:] = 0
    ref, ref_len = D.ghost_sq(Af, Gf), D.ghost_sq(Af, Gz)
    ids = torch.randint(0, 4, (B, T), generator=gen).to(DEV)
    ids[0, :30] = 2  # a long run of one id crossing block borders
    for n_split in ((2, 3) if dtype == torch.float32 else (3,)):
        what = f"n_split={n_split}"
        assert_close(ghost_sq_launch(A, G, None, 16, 16, n_split), ref, dtype, f"ghost {what}")
        out = ghost_sq_launch(A, G, lengths.int(), 16, 16, n_split)
        assert_close(out, ref_len, dtype, f"ghost lengths {what}")
        assert float(out[1]) == 0.0
        assert_close(direct_sq_launch(A, G, None, 16, 16, 16, n_split), ref, dtype, f"direct {what}")
        out = direct_sq_launch(A, G, lengths.int(), 16, 32, 16, n_split)
        assert_close(out, ref_len, dtype, f"direct lengths {what}")
        assert float(out[1]) == 0.0
        assert_close(row_sq_launch(None, G, 16, 32, n_split), D.rowsum_sq(Gf), dtype, f"rowsum {what}")
        assert_close(row_sq_launch(X, G, 16, 32, n_split), D.weighted_rowsum_sq(Xf, Gf), dtype, f"wrowsum {what}")
        for pad in (None, 2):
            assert_close(embedding_sq_launch(ids, G, pad, 16, 16, n_split), D.embedding_sq(ids, Gf, pad), dtype,
                         f"embedding pad={pad} {what}")
    # more splits than column steps: the extra programs hold no columns and add zero
    assert_close(ghost_sq_launch(A, G, None, 16, 32, 4), ref, dtype, "ghost empty splits")
    assert_close(direct_sq_launch(A, G, None, 16, 16, 32, 3), ref, dtype, "direct empty splits")


@needs_triton
def test_split_launches_are_deterministic():
    """The split partials are combined in a fixed order (no atomics): repeated launches are bitwise equal."""
    A, G = rnd(2, 24, 37, dtype=torch.bfloat16), rnd(2, 24, 50, dtype=torch.bfloat16)
    ids = torch.randint(0, 3, (2, 24)).to(DEV)
    launches = [
        lambda: ghost_sq_launch(A, G, None, 16, 16, 3),
        lambda: direct_sq_launch(A, G, None, 16, 16, 16, 3),
        lambda: embedding_sq_launch(ids, G, None, 16, 16, 3),
        lambda: row_sq_launch(A, A, 16, 16, 3),
    ]
    for i, fn in enumerate(launches):
        first = fn()
        assert torch.equal(first, fn()), f"launch {i} not bitwise reproducible"


@needs_triton
def test_public_entry_points_take_the_split_path(monkeypatch):
    """Through the public functions: with the SM count of an H200 a (B=1) short input is split, and the
    result equals the reference (the config is computed from the SM count at launch)."""
    monkeypatch.setattr(_utils, "INTERPRET_SM_COUNT", 132)
    B, T, d, p = 1, 130, 70, 130  # fp32: 5 row steps of 32, 5 column steps of 32 -> 2 splits each
    A, G, X = rnd(B, T, d), rnd(B, T, p), rnd(B, T, p)
    ids = torch.randint(0, 3, (B, T)).to(DEV)
    seen = {}
    for mod, fn_name in ((_ghost, "ghost_sq_launch"), (_direct, "direct_sq_launch"),
                         (_embedding, "embedding_sq_launch"), (_row, "row_sq_launch")):
        real = getattr(mod, fn_name)

        def spy(*a, _real=real, _name=fn_name, **kw):
            seen.setdefault(_name, []).append(kw["n_split"])
            return _real(*a, **kw)

        monkeypatch.setattr(mod, fn_name, spy)
    for name, out, ref in all_ops(A, G, X, ids, pad=0):
        assert_close(out, ref, torch.float32, name)
    assert len(seen) == 4 and all(max(v) > 1 for v in seen.values()), seen


# -- int64 offsets ---------------------------------------------------------------------------------------


@needs_triton
def test_int64_offsets_for_large_strides():
    """stride × index reaching 2³¹ (a transposed view of a (V, B·T) buffer): the kernels form offsets in
    int64. A (1, 2, 3) view with a column stride of 2³⁰ reads element 2³¹ of a 4 GiB fp16 buffer (only the
    touched pages are committed); int32 offsets wrap there and read out of bounds."""
    try:
        buf = torch.empty(2**31 + 2**20, dtype=torch.float16, device=DEV)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer here: {e}")
    big = (0, 1, 2**30)  # strides over (B, T, d): the last column starts at element 2³¹
    A = buf.as_strided((1, 2, 3), big)
    vals = torch.randn(1, 2, 3).half().to(DEV)
    A.copy_(vals)
    G = torch.randn(1, 2, 4).half().to(DEV)
    ids = torch.tensor([[1, 1]], device=DEV)
    ref = D.ghost_sq(vals.float(), G.float())
    assert_close(K.ghost_sq(A, G), ref, torch.float16, "ghost big stride_ad")
    assert_close(K.direct_sq(A, G), ref, torch.float16, "direct big stride_ad")
    assert_close(K.direct_sq(G, A), ref, torch.float16, "direct big stride_gp")
    assert_close(K.ghost_sq(G, A), ref, torch.float16, "ghost big stride_gp")
    assert_close(K.rowsum_sq(A), D.rowsum_sq(vals.float()), torch.float16, "rowsum big stride")
    assert_close(K.weighted_rowsum_sq(A, A), D.weighted_rowsum_sq(vals.float(), vals.float()), torch.float16,
                 "wrowsum big stride")
    assert_close(K.embedding_sq(ids, A), D.embedding_sq(ids, vals.float()), torch.float16, "embedding big stride")
    del A, buf


# -- all ops, odd shapes, all dtypes --------------------------------------------------------------

SHAPES = [
    (3, 7, 37, 5),  # nothing a multiple of a block
    (1, 1, 1, 1),
    (1, 1, 3, 2),
    (2, 70, 20, 130),  # T spans two Gram blocks; p spans two row/direct tiles
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ops_match_reference(shape, dtype):
    B, T, d, p = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    A, G, X = rnd(B, T, d, dtype=dtype, gen=gen), rnd(B, T, p, dtype=dtype, gen=gen), rnd(B, T, p, dtype=dtype, gen=gen)
    ids = torch.randint(0, 4, (B, T), generator=gen).to(DEV)  # few ids: many repeats
    for name, out, ref in all_ops(A, G, X, ids, pad=1):
        assert_close(out, ref, dtype, name)


@needs_triton
def test_bf16_interpreter_dot_workaround():
    """The Triton interpreter's tl.dot multiplies bf16 as raw uint16 bit patterns; the kernels upcast
    bf16 tiles to fp32 before tl.dot when interpreting (exact). Without that this would be off by ~1e20."""
    A = rnd(2, 9, 24, dtype=torch.bfloat16)
    G = rnd(2, 9, 18, dtype=torch.bfloat16)
    ref = D.ghost_sq(A.float(), G.float())
    assert_close(K.ghost_sq(A, G), ref, torch.bfloat16, "ghost bf16")
    assert_close(K.direct_sq(A, G), ref, torch.bfloat16, "direct bf16")


# -- several blocks per dim (forced small blocks) -------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_blocks(dtype):
    B, T, d, p = 2, 50, 37, 21  # 4 row blocks of 16 (last partial), 3 column steps
    A, G, X = rnd(B, T, d, dtype=dtype), rnd(B, T, p, dtype=dtype), rnd(B, T, p, dtype=dtype)
    Af, Gf = A.float(), G.float()
    ref = D.ghost_sq(Af, Gf)
    assert_close(ghost_sq_launch(A, G, None, block_t=16, block_k=16), ref, dtype, "ghost")
    assert_close(direct_sq_launch(A, G, None, block_d=16, block_p=16, block_t=16), ref, dtype, "direct")
    assert_close(row_sq_launch(None, G, block_t=16, block_p=16), D.rowsum_sq(Gf), dtype, "rowsum")
    assert_close(row_sq_launch(X, G, block_t=16, block_p=16), D.weighted_rowsum_sq(X.float(), Gf), dtype, "wrowsum")
    # ids with long runs: after sorting, runs cross block borders (the pair-skip test must not drop them)
    ids = torch.randint(0, 3, (B, T)).to(DEV)
    ids[1, :40] = 7
    for pad in (None, 0, 7):
        assert_close(embedding_sq_launch(ids, G, pad, block_t=16, block_k=16),
                     D.embedding_sq(ids, Gf, pad), dtype, f"embedding pad={pad}")


@needs_triton
def test_lora_config_keeps_small_side_whole():
    for r in (4, 8, 16, 32, 64):
        cfg = direct_config(16, 128, 4096, r, torch.bfloat16, 132)
        assert cfg["block_p"] >= r and cfg["block_p"] <= 64, cfg
        cfg = direct_config(16, 128, r, 4096, torch.bfloat16, 132)
        assert cfg["block_d"] >= r and cfg["block_d"] <= 64, cfg
    A, G = rnd(2, 11, 200), rnd(2, 11, 4)  # LoRA-A-like: wide d, r = 4
    assert_close(K.direct_sq(A, G), D.direct_sq(A, G), torch.float32, "lora A")
    assert_close(K.direct_sq(G, A), D.direct_sq(G, A), torch.float32, "lora B")


# -- padding -----------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_padding_zero_rows_and_lengths(dtype):
    B, T, d, p = 3, 40, 19, 23
    A, G = rnd(B, T, d, dtype=dtype), rnd(B, T, p, dtype=dtype)
    lengths = torch.tensor([40, 17, 0])
    # zero G rows at padding (what the loss mask produces), A rows left non-zero
    Gz = G.clone()
    for b, n in enumerate(lengths.tolist()):
        Gz[b, n:] = 0
    ref = D.ghost_sq(A.float(), Gz.float())
    assert float(ref[2]) == 0.0
    assert_close(K.ghost_sq(A, Gz), ref, dtype, "ghost zero rows")
    assert_close(K.direct_sq(A, Gz), ref, dtype, "direct zero rows")
    # lengths: rows past each length are skipped even when G is not zero there
    for name, fn in (("ghost", K.ghost_sq), ("direct", K.direct_sq)):
        out = fn(A, G, lengths.to(DEV))
        assert_close(out, ref, dtype, f"{name} lengths")
        assert float(out[2]) == 0.0
    # forced small blocks: lengths land inside and at the border of blocks
    out = ghost_sq_launch(A, G, lengths.to(DEV).int(), block_t=16, block_k=16)
    assert_close(out, ref, dtype, "ghost lengths small blocks")
    out = direct_sq_launch(A, G, lengths.to(DEV).int(), block_d=16, block_p=16, block_t=16)
    assert_close(out, ref, dtype, "direct lengths small blocks")


@needs_triton
def test_lengths_validation():
    A, G = rnd(2, 5, 3), rnd(2, 5, 4)
    with pytest.raises(ValueError, match="lengths"):
        K.ghost_sq(A, G, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        K.direct_sq(A, G, torch.tensor([1.0, 2.0]))
    # lengths > T are clamped to T
    assert_close(K.ghost_sq(A, G, torch.tensor([9, 5])), D.ghost_sq(A, G), torch.float32, "clamped")


# -- strided inputs ----------------------------------------------------------------------------------


@needs_triton
def test_non_contiguous_inputs():
    B, T, d, p = 3, 13, 10, 6
    A = rnd(B, d, T).transpose(1, 2)  # (B, T, d), stride over d = T
    G = rnd(B, T, 2 * p)[:, :, ::2]  # (B, T, p), stride over p = 2
    X = rnd(T, B, p).transpose(0, 1)  # (B, T, p), batch stride = p
    Gb = rnd(2 * B, T, p)[::2]  # batch-strided
    ids = torch.randint(0, 5, (B, 2 * T))[:, ::2].to(DEV)  # (B, T), stride 2
    assert not (A.is_contiguous() or G.is_contiguous() or X.is_contiguous() or ids.is_contiguous())
    for name, out, ref in all_ops(A, G, X, ids, pad=2):
        assert_close(out, ref, torch.float32, f"{name} strided")
    assert_close(K.ghost_sq(A, Gb), D.ghost_sq(A, Gb), torch.float32, "ghost batch-strided")
    assert_close(K.weighted_rowsum_sq(X, Gb), D.weighted_rowsum_sq(X, Gb), torch.float32, "wrowsum batch-strided")


# -- embedding specifics -----------------------------------------------------------------------------


@needs_triton
def test_embedding_cases():
    B, T, d = 3, 21, 9
    G = rnd(B, T, d)
    ids = torch.randint(0, 6, (B, T)).to(DEV)
    ids[0] = 3  # one id everywhere: Σ_t g_t squared
    ids[1, ::2] = 0  # padding id interleaved
    for pad in (None, 0, 3, 99):  # 99: a padding id that never occurs
        assert_close(K.embedding_sq(ids, G, pad), D.embedding_sq(ids, G, pad), torch.float32, f"pad={pad}")
    # all distinct ids: Σ_t ||g_t||²
    uniq = torch.stack([torch.randperm(T) for _ in range(B)]).to(DEV)
    assert_close(K.embedding_sq(uniq, G), G.pow(2).sum(dim=(1, 2)), torch.float32, "distinct")
    # all ids equal: ||Σ_t g_t||²; all padding: 0
    same = torch.full((B, T), 5, device=DEV)
    assert_close(K.embedding_sq(same, G), D.rowsum_sq(G), torch.float32, "same")
    assert torch.all(K.embedding_sq(same, G, padding_idx=5) == 0)
    # int32 ids, and (1, T) position ids broadcast over the batch (HF passes them so)
    pos = torch.arange(T, device=DEV)[None]
    assert_close(K.embedding_sq(pos, G), G.pow(2).sum(dim=(1, 2)), torch.float32, "positions")
    assert_close(K.embedding_sq(ids.int(), G, 0), D.embedding_sq(ids, G, 0), torch.float32, "int32 ids")


# -- errors, empties, dispatch ------------------------------------------------------------------------


@needs_triton
def test_errors_and_empty():
    A, G = rnd(2, 4, 3), rnd(2, 4, 5)
    with pytest.raises(TypeError, match="float64"):
        K.ghost_sq(A.double(), G)
    with pytest.raises(TypeError, match="float64"):
        K.rowsum_sq(G.double())
    with pytest.raises(TypeError, match="float64"):
        K.embedding_sq(torch.zeros(2, 4, dtype=torch.long, device=DEV), G.double())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        K.direct_sq(A, rnd(2, 3, 5))
    with pytest.raises(TypeError, match="integer"):
        K.embedding_sq(torch.zeros(2, 4, device=DEV), G)
    for fn in (K.ghost_sq, K.direct_sq):
        assert fn(rnd(0, 4, 3), rnd(0, 4, 5)).shape == (0,)
        assert torch.equal(fn(rnd(2, 0, 3), rnd(2, 0, 5)), torch.zeros(2, device=DEV))
    assert torch.equal(K.rowsum_sq(rnd(2, 0, 5)), torch.zeros(2, device=DEV))
    assert torch.equal(K.embedding_sq(torch.zeros(2, 0, dtype=torch.long, device=DEV), rnd(2, 0, 5)),
                       torch.zeros(2, device=DEV))


@needs_triton
@pytest.mark.skipif(not _INTERPRET, reason="CPU-only check")
def test_cpu_tensors_refused_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        K.rowsum_sq(rnd(2, 3, 4))


@needs_triton
def test_dispatch_routes_to_kernels():
    A, G, X = rnd(2, 6, 5), rnd(2, 6, 7), rnd(2, 6, 7)
    ids = torch.randint(0, 3, (2, 6)).to(DEV)
    pairs = [
        (D.ghost_sq(A, G, use_triton=True), D.ghost_sq(A, G)),
        (D.direct_sq(A, G, use_triton=True), D.direct_sq(A, G)),
        (D.embedding_sq(ids, G, 1, use_triton=True), D.embedding_sq(ids, G, 1)),
        (D.rowsum_sq(G, use_triton=True), D.rowsum_sq(G)),
        (D.weighted_rowsum_sq(X, G, use_triton=True), D.weighted_rowsum_sq(X, G)),
    ]
    for out, ref in pairs:
        assert_close(out, ref, torch.float32, "dispatch")


@needs_triton
def test_mixed_dtypes():
    A, G = rnd(2, 9, 17, dtype=torch.bfloat16), rnd(2, 9, 6, dtype=torch.float32)
    X = rnd(2, 9, 6, dtype=torch.float16)
    ref = D.ghost_sq(A.float(), G)
    assert_close(K.ghost_sq(A, G), ref, torch.bfloat16, "ghost mixed")
    assert_close(K.direct_sq(A, G), ref, torch.bfloat16, "direct mixed")
    assert_close(K.weighted_rowsum_sq(X, G), D.weighted_rowsum_sq(X.float(), G), torch.float16, "wrowsum mixed")


@needs_triton
def test_engine_triton_backend_matches_loop():
    """The kernels plugged into the engine (backend="triton" -> dispatch -> gradsel_kernels), with padding,
    against the per-sample loop reference."""
    import gradsel_core as gs

    torch.manual_seed(0)
    cfg = gs.models.TinyGPTConfig(vocab_size=29, d_model=16, n_layer=1, n_head=2, max_seq_len=8, pad_token_id=0)
    model = gs.models.TinyGPT(cfg).to(DEV)
    ids = torch.randint(1, 29, (3, 8))
    ids[1, 5:] = 0
    ids[2, :4] = 7  # repeated ids
    batch = {"input_ids": ids.to(DEV), "attention_mask": (ids != 0).long().to(DEV)}
    ref = gs.GradNormEngine(model, backend="loop", per_param=True).score(batch)
    out = gs.GradNormEngine(model, backend="triton", per_param=True).score(batch)
    assert_close(out.norms, ref.norms, torch.float32, "engine norms")
    for name, sq in ref.per_param.items():
        assert_close(out.per_param[name], sq, torch.float32, name)


# -- property test ------------------------------------------------------------------------------------


def _property_body(B, T, d, p, n_ids, seed, half):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if half else torch.float32
    A, G, X = rnd(B, T, d, dtype=dtype, gen=gen), rnd(B, T, p, dtype=dtype, gen=gen), rnd(B, T, p, dtype=dtype, gen=gen)
    ids = torch.randint(0, n_ids, (B, T), generator=gen).to(DEV)
    for name, out, ref in all_ops(A, G, X, ids, pad=0):
        assert_close(out, ref, dtype, name)
    # ghost and direct agree with each other as well (two forms of one norm)
    assert_close(K.ghost_sq(A, G), K.direct_sq(A, G), dtype, "ghost vs direct")


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # optional: everything else runs without hypothesis

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_random_shapes():
        pass  # skipped by its marker: the property test needs hypothesis

else:

    @needs_triton
    # compiled on the GPU every new shape is a cold compile: fewer examples there (gpu_check's time budget)
    @settings(max_examples=6 if _INTERPRET else 3, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        B=st.integers(1, 3), T=st.integers(1, 20), d=st.integers(1, 40), p=st.integers(1, 40),
        n_ids=st.integers(1, 6), seed=st.integers(0, 2**16), half=st.booleans(),
    )
    def test_property_random_shapes(B, T, d, p, n_ids, seed, half):
        _property_body(B, T, d, p, n_ids, seed, half)


# -- benchmark scripts without a GPU --------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_bench_kernels_exits_cleanly_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py")],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "CUDA" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_bench_kernels_case_tables():
    """The case tables build without a GPU (shapes, nominal flops and bytes are filled in)."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import bench_kernels as bk
    finally:
        sys.path.remove(str(REPO))
    for quick in (True, False):
        kc = bk.kernel_cases(quick)
        # every Gram/row kernel is benchmarked; the LM head's two passes (head_lse, head_grad) are not in
        # bench_kernels.py yet (its torch reference is the chunk loop of gradsel_core.ghost.head, not dispatch)
        assert {c["op"] for c in kc} == set(K.__all__) - {"load", "head_lse", "head_grad"}
        assert all(c["bytes"] > 0 for c in kc)
        ec = bk.e2e_cases(quick)
        assert any(c["kind"] == "llama" and c["lora"] for c in ec) and any(c["kind"] == "tiny" for c in ec)
    if HAS_TRITON:  # each benchmark row records the launch configuration the kernel picks
        A, G = rnd(2, 8, 5), rnd(2, 8, 6)
        ids = torch.zeros(2, 8, dtype=torch.long, device=DEV)
        for op, args in (("ghost_sq", (A, G)), ("direct_sq", (A, G)), ("embedding_sq", (ids, G, 0)),
                         ("rowsum_sq", (G,)), ("weighted_rowsum_sq", (G, G))):
            cfg = bk.launch_config(op, args)
            assert cfg["n_split"] >= 1 and cfg["num_warps"] in (4, 8), (op, cfg)


def test_gpu_check_script_syntax():
    r = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
