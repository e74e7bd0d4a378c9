"""The shared benchmark harness: environment, timing, peak memory, cases, isolation and results.

What is measured
----------------
* Time: ``time_fn`` runs ``warmup`` untimed calls, then ``repeats`` timed calls (``perf_counter``;
  ``torch.cuda.synchronize`` before and after each call on CUDA) and reports the median; also the median
  process CPU time of the calls (``process_time``: on a shared CPU with one torch thread it counts this
  process's work, not the time it waited for a core).
* Peak memory (``PeakMemory``):
    - CUDA: ``torch.cuda.max_memory_allocated()`` after the runs minus ``memory_allocated()`` at the
      baseline (peak stats are reset at the baseline). Kind ``cuda_max_allocated_delta``.
    - CPU: each (case, method) runs in a FRESH subprocess (``--isolate process``, the default). The
      baseline is taken after imports, model and batch construction and the method's setup (Opacus
      wrapping, BackPACK ``extend``). Where Linux allows it, the peak-RSS counter is reset at the
      baseline (``echo 5 > /proc/self/clear_refs``) and the peak is ``VmHWM`` after the runs minus
      ``VmRSS`` at the baseline (kind ``cpu_vmhwm_delta``). Otherwise it is the growth of
      ``getrusage(RUSAGE_SELF).ru_maxrss`` over the baseline (kind ``cpu_maxrss_delta``; an
      underestimate if construction peaked higher). Either way it is resident memory of the whole
      process (allocator caching included), not a tensor count. With ``--isolate none`` (all methods
      in one process) the CPU peak is not measured (``None``).
* The baseline workload ("plain", 1.0x) is ``plain_step``: a forward of the batch, each sample's own
  causal-LM loss (token mean over its target tokens, exactly gradsel's loss), the batch MEAN of those
  losses, ``backward()``; ``zero_grad(set_to_none=True)`` before each call. No per-sample quantity.

Isolation protocol: a script calls ``worker_entry(registry)`` first thing; when started as
``python <script> --_worker <payload.json>`` it runs one (case, method) with ``run_method`` and writes
the result as JSON to the path named in the payload.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the scripts run as `python benchmarks/x.py`: use this checkout's gradsel
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
REL_TOL = 1e-3  # a method "matches" the loop reference when max_rel_err <= REL_TOL (fp32)


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
_PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "opacus": "opacus",
    "backpack": "backpack-for-pytorch",
    "triton": "triton",
    "numpy": "numpy",
    "gradsel": "gradsel",
}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """A file-name-safe UTC timestamp, e.g. ``20250101T120000Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _pkg_version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_info(device: Optional[str] = None) -> Dict[str, Any]:
    """Versions (read from package metadata, nothing heavy is imported), machine, device, threads, time, git."""
    dev = torch.device(device or "cpu")
    info: Dict[str, Any] = {f"{k}_version": _pkg_version(v) for k, v in _PACKAGES.items()}
    info["torch_version"] = torch.__version__
    info.update(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        cuda_version=torch.version.cuda,
        timestamp=utc_now(),
        git_commit=_git("rev-parse", "HEAD"),
    )
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    return info


# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------
def sync(device: Optional[torch.device | str] = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: Optional[str] = None) -> Dict[str, Any]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls.

    CUDA is synchronized before and after every timed call; ``gc.collect()`` runs (untimed) before each.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    cpu: List[float] = []  # process CPU time per call: less sensitive to other jobs on a shared machine
    for _ in range(repeats):
        gc.collect()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "cpu_median_s": statistics.median(cpu),
        "cpu_all_s": cpu,
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "all_s": times,
        "repeats": repeats,
        "warmup": warmup,
    }


def time_alternating(steps: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     device: Optional[str] = None) -> Dict[str, List[float]]:
    """Wall times of each ``steps[k]()`` over ``repeats`` rounds, the steps alternating within a round so that
    drift in machine load hits all of them (``warmup`` untimed rounds first; CUDA synchronized around each
    call, ``gc.collect()`` untimed before each). Returns ``{name: [seconds per round]}``."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def _proc_status() -> Dict[str, int]:
    """VmRSS/VmHWM in bytes from /proc/self/status ({} where unavailable)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Peak memory growth over a baseline; see the module docstring for exactly what is measured."""

    def __init__(self, device: str, isolated: bool = True):
        self.device = torch.device(device)
        self.isolated = isolated
        self.kind: Optional[str] = None
        self._base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_allocated_delta"
            return
        if not self.isolated:
            self.kind = "not_measured_in_process"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            st = _proc_status()
            if "VmRSS" in st and "VmHWM" in st:
                self._base = st["VmRSS"]
                self.kind = "cpu_vmhwm_delta"
                return
        except OSError:
            pass
        self._base = _maxrss_bytes()
        self.kind = "cpu_maxrss_delta"

    def peak_bytes(self) -> Optional[int]:
        if self.kind == "cuda_max_allocated_delta":
            sync(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.kind == "cpu_vmhwm_delta":
            return int(_proc_status()["VmHWM"] - self._base)
        if self.kind == "cpu_maxrss_delta":
            return int(_maxrss_bytes() - self._base)
        return None


# ------------------------------------------------------------------------------------------------
# cases: model + batch
# ------------------------------------------------------------------------------------------------
LORA_TARGETS = {
    "tinygpt": ["qkv", "proj", "fc", "fc_out"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj matches attn.c_proj and mlp.c_proj
    # mixture of experts: transformers' MixtralForCausalLM, fused 3-D experts, with its default experts
    # implementation (grouped_mm) or the eager per-expert loop
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral-eager": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],  # fc1/fc2 fed (B·T, d) rows
}


@dataclass
class CaseSpec:
    """One benchmark case. ``params``: "full" (every parameter) or "lora" (PEFT LoRA on all projections)."""

    model: str = "tinygpt"  # "tinygpt" | "gpt2" (HF GPT2LMHeadModel, random init, tied embeddings) |
    # "mixtral" / "mixtral-eager" (8 experts, top-2, intermediate 2d) | "opt" (HF OPTForCausalLM)
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    vocab: int = 8192
    T: int = 128
    B: int = 16
    params: str = "full"
    lora_r: int = 8
    seed: int = 0
    dtype: str = "float32"
    name: str = ""

    def __post_init__(self):
        if self.model not in LORA_TARGETS:
            raise ValueError(f"model must be one of {sorted(LORA_TARGETS)}, got {self.model!r}")
        if self.params not in ("full", "lora"):
            raise ValueError(f"params must be 'full' or 'lora', got {self.params!r}")
        if not self.name:
            p = "full" if self.params == "full" else f"lora{self.lora_r}"
            self.name = f"{self.model}-d{self.d_model}-L{self.n_layer}-T{self.T}-B{self.B}-{p}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CaseSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Built:
    spec: CaseSpec
    model: torch.nn.Module
    batch: Dict[str, torch.Tensor]  # what every method gets: {"input_ids": (B, T)} (no padding)
    labels: torch.Tensor  # gradsel's default LM labels for the batch
    device: torch.device
    info: Dict[str, Any] = field(default_factory=dict)

    def named_trainable(self) -> Dict[str, torch.nn.Parameter]:
        """``{name: param}`` of the scored parameters, names as gradsel reports them (tied ones once)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def build_case(spec: CaseSpec, device: str = "cpu") -> Built:
    """Model (random init, dropout 0) and a random full-length batch, deterministic in ``spec.seed``."""
    dev = torch.device(device)
    dtype = getattr(torch, spec.dtype)
    torch.manual_seed(spec.seed)
    info: Dict[str, Any] = {}
    if spec.model == "tinygpt":
        from gradsel_core.models import TinyGPT, TinyGPTConfig

        cfg = TinyGPTConfig(
            vocab_size=spec.vocab, d_model=spec.d_model, n_layer=spec.n_layer, n_head=spec.n_head,
            max_seq_len=spec.T, dropout=0.0,
        )
        model = TinyGPT(cfg)
        info["attn_impl"] = "tinygpt-eager"
        info["tied"] = False
    elif spec.model.startswith("mixtral"):
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(
            vocab_size=spec.vocab, hidden_size=spec.d_model, intermediate_size=2 * spec.d_model,
            num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head, num_key_value_heads=spec.n_head,
            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=spec.T, use_cache=False,
            tie_word_embeddings=False, bos_token_id=spec.vocab - 1, eos_token_id=spec.vocab - 1,
            experts_implementation="eager" if spec.model == "mixtral-eager" else None,
        )
        model = MixtralForCausalLM(cfg)
        info["attn_impl"] = getattr(model.config, "_attn_implementation", None)
        info["experts_impl"] = getattr(model.config, "_experts_implementation", None)
        info["tied"] = False
    elif spec.model == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(
            vocab_size=spec.vocab, hidden_size=spec.d_model, ffn_dim=4 * spec.d_model, num_hidden_layers=spec.n_layer,
            num_attention_heads=spec.n_head, max_position_embeddings=spec.T, word_embed_proj_dim=spec.d_model,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, use_cache=False,
            pad_token_id=spec.vocab - 1, bos_token_id=spec.vocab - 1, eos_token_id=spec.vocab - 1,
        )
        model = OPTForCausalLM(cfg)
        info["attn_impl"] = getattr(model.config, "_attn_implementation", None)
        info["tied"] = model.lm_head.weight is model.model.decoder.embed_tokens.weight
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=spec.vocab, n_positions=spec.T, n_embd=spec.d_model, n_layer=spec.n_layer,
            n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
            bos_token_id=spec.vocab - 1, eos_token_id=spec.vocab - 1,
        )
        model = GPT2LMHeadModel(cfg)
        info["attn_impl"] = getattr(model.config, "_attn_implementation", None)
        info["tied"] = model.lm_head.weight is model.transformer.wte.weight
    info["n_params_total"] = sum(p.numel() for p in model.parameters())
    if spec.params == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS[spec.model],
            bias="none", fan_in_fan_out=spec.model == "gpt2",
        )
        model = get_peft_model(model, lcfg)
        # peft initialises lora_B to 0, which makes every lora_A per-sample gradient exactly 0; give B a
        # small random value (as after some training) so both factors have non-trivial gradients.
        g = torch.Generator().manual_seed(spec.seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        info["lora_targets"] = LORA_TARGETS[spec.model]
    model = model.to(device=dev, dtype=dtype)
    g = torch.Generator().manual_seed(spec.seed + 2)
    ids = torch.randint(0, spec.vocab, (spec.B, spec.T), generator=g).to(dev)
    batch = {"input_ids": ids}
    from gradsel_core.batching import prepare_batch

    labels = prepare_batch(batch, lm_loss=True).labels
    trainable = [p for p in model.parameters() if p.requires_grad]
    info["n_params_scored"] = sum(p.numel() for p in trainable)
    info["n_param_tensors_scored"] = len(trainable)
    return Built(spec=spec, model=model, batch=batch, labels=labels, device=dev, info=info)


# ------------------------------------------------------------------------------------------------
# the loss and the baseline
# ------------------------------------------------------------------------------------------------
def lm_losses(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample causal-LM losses (B,): gradsel's definition (token mean over each sample's targets)."""
    from gradsel_core.batching import causal_lm_losses, extract_logits

    return causal_lm_losses(extract_logits(outputs), labels)[0]


def plain_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The 1.0x baseline: forward, batch mean of the per-sample losses, backward (fills ``.grad``)."""
    model.zero_grad(set_to_none=True)
    loss = lm_losses(model(**batch), labels).mean()
    loss.backward()
    return loss.detach()


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
class Unsupported(Exception):
    """Raised by a method adapter for a model it cannot handle (recorded as status 'unsupported')."""


class Adapter:
    """A benchmarked method: ``step()`` is timed; ``result()`` returns what the last step computed.

    ``result()`` -> {"norms": (B,) or None, "per_param_sq": {name: (B,)} or None, "losses": (B,) or None}.
    """

    note: str = ""

    def step(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def result(self) -> Dict[str, Any]:
        return {"norms": None, "per_param_sq": None, "losses": None}


class PlainAdapter(Adapter):
    note = "forward + batch-mean loss + backward (weight grads), no per-sample quantity"

    def __init__(self, built: Built):
        self.b = built
        built.model.train()  # dropout is 0: same function as eval
        self.loss = None

    def step(self) -> None:
        self.loss = plain_step(self.b.model, self.b.batch, self.b.labels)


class GradselAdapter(Adapter):
    """``gs.GradNormEngine(model, params="trainable", backend=...).score(batch)``."""

    def __init__(self, built: Built, backend: str, **engine_kw: Any):
        import gradsel_core as gs

        self.b = built
        self.engine = gs.GradNormEngine(built.model, params="trainable", backend=backend, per_param=True, **engine_kw)
        self.res = None
        self.note = f"gradsel backend={backend}" + "".join(f", {k}={v}" for k, v in engine_kw.items())

    def step(self) -> None:
        self.res = self.engine.score(self.b.batch)

    def result(self) -> Dict[str, Any]:
        if self.res.backend and self.res.backend != self.engine.backend:
            self.note = f"gradsel backend={self.engine.backend} -> {self.res.backend}"
        return {"norms": self.res.norms, "per_param_sq": self.res.per_param, "losses": self.res.losses}


class ReferenceAdapter(GradselAdapter):
    """The loop reference on the first ``k`` samples (untimed use)."""

    def __init__(self, built: Built, k: int):
        super().__init__(built, "loop")
        self.batch = {n: v[:k] for n, v in built.batch.items()}

    def step(self) -> None:
        self.res = self.engine.score(self.batch)


GRADSEL_METHODS: Dict[str, Callable[[Built], Adapter]] = {
    "plain": PlainAdapter,
    "loop": lambda b: GradselAdapter(b, "loop"),
    "vmap": lambda b: GradselAdapter(b, "vmap"),
    "ghost": lambda b: GradselAdapter(b, "ghost"),
    "auto": lambda b: GradselAdapter(b, "auto"),
}


def _to_list(t: Optional[torch.Tensor]) -> Optional[List[float]]:
    return None if t is None else [float(x) for x in t.detach().double().cpu().reshape(-1)]


def _reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:500]


def run_method(
    spec: CaseSpec,
    method: str,
    registry: Mapping[str, Callable[[Built], Adapter]],
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    isolated: bool = True,
    ref_samples: Optional[int] = None,
) -> Dict[str, Any]:
    """Build the case, set the method up, time it, measure its peak memory and return its outputs.

    ``method == "reference"`` runs gradsel's loop on the first ``ref_samples`` samples, untimed.
    Never raises: failures become ``status`` "unsupported" (``Unsupported``/``NotImplementedError``)
    or "error" with a ``reason``.
    """
    out: Dict[str, Any] = {"method": method, "status": "ok", "reason": "", "note": ""}
    phase = "build"
    try:
        built = build_case(spec, device)
        out["info"] = built.info
        phase = "setup"
        if method == "reference":
            adapter: Adapter = ReferenceAdapter(built, ref_samples or spec.B)
            adapter.step()
        else:
            if method not in registry:
                raise KeyError(f"unknown method {method!r}; known: {sorted(registry)}")
            adapter = registry[method](built)
            mem = PeakMemory(device, isolated=isolated)
            mem.start()
            phase = "run"
            out["timing"] = time_fn(adapter.step, repeats=repeats, warmup=warmup, device=device)
            out["peak_mem_bytes"] = mem.peak_bytes()
            out["mem_kind"] = mem.kind
        phase = "result"
        res = adapter.result()
        out["note"] = adapter.note
        out["norms"] = _to_list(res.get("norms"))
        out["losses"] = _to_list(res.get("losses"))
        pp = res.get("per_param_sq")
        out["per_param_sq"] = None if pp is None else {n: _to_list(v) for n, v in pp.items()}
        # optional extra (untimed) variants: {label: norms} and {label: failure reason}
        out["alt_norms"] = {lab: _to_list(v) for lab, v in (res.get("alt_norms") or {}).items()}
        out["alt_errors"] = dict(res.get("alt_errors") or {})
    except (Unsupported, NotImplementedError) as e:
        out.update(status="unsupported", reason=f"[{phase}] {_reason(e)}")
    except Exception as e:  # noqa: BLE001 - a benchmark records every failure
        out.update(status="error", reason=f"[{phase}] {_reason(e)}", traceback=traceback.format_exc()[-4000:])
    return out


# ------------------------------------------------------------------------------------------------
# isolation: one fresh subprocess per (case, method)
# ------------------------------------------------------------------------------------------------
def worker_entry(registry: Mapping[str, Callable[[Built], Adapter]], argv: Optional[Sequence[str]] = None) -> None:
    """If started as ``<script> --_worker payload.json``: run one method, write its JSON, exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "--_worker":
        return
    payload = json.loads(Path(argv[1]).read_text())
    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    res = run_method(
        CaseSpec.from_dict(payload["spec"]), payload["method"], registry, device=payload["device"],
        repeats=payload["repeats"], warmup=payload["warmup"], isolated=True, ref_samples=payload.get("ref_samples"),
    )
    Path(payload["out"]).write_text(json.dumps(res))
    sys.exit(0)


def run_isolated(
    script: str | Path,
    spec: CaseSpec,
    method: str,
    device: str,
    repeats: int,
    warmup: int,
    timeout: float,
    threads: Optional[int] = None,
    ref_samples: Optional[int] = None,
) -> Dict[str, Any]:
    """Run ``run_method`` for one method in a fresh ``python <script> --_worker`` subprocess."""
    with tempfile.TemporaryDirectory(prefix="gradsel-bench-") as tmp:
        payload_path = Path(tmp) / "payload.json"
        out_path = Path(tmp) / "out.json"
        payload = dict(
            spec=asdict(spec), method=method, device=device, repeats=repeats, warmup=warmup,
            threads=threads, ref_samples=ref_samples, out=str(out_path),
        )
        payload_path.write_text(json.dumps(payload))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            proc = subprocess.run(
                [sys.executable, str(script), "--_worker", str(payload_path)],
                capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT,
            )
        except subprocess.TimeoutExpired:
            return {"method": method, "status": "error", "reason": f"timeout after {timeout:.0f}s", "note": ""}
        if not out_path.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            return {
                "method": method, "status": "error", "note": "",
                "reason": f"worker exited with code {proc.returncode} and no result: {' | '.join(tail)}"[:500],
            }
        return json.loads(out_path.read_text())


# ------------------------------------------------------------------------------------------------
# comparing against the reference, rows
# ------------------------------------------------------------------------------------------------
def compare_to_reference(res: Mapping[str, Any], ref: Mapping[str, Any], k: int) -> Dict[str, Any]:
    """Max relative error of ``res``'s norms vs ``ref``'s on the first ``k`` samples, and coverage.

    ``max_rel_err``: max_i |n_i - r_i| / r_i against the loop's norm over ALL scored parameters.
    ``max_rel_err_covered``: the same against the loop restricted to the parameters the method reported
    (only when it reported fewer); ``params_missing``: the parameters it did not report.
    """
    out: Dict[str, Any] = {"max_rel_err": None, "max_rel_err_covered": None, "params_missing": None,
                           "worst_param": None, "loss_max_abs_diff": None}
    if res.get("losses") and ref.get("losses"):
        out["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(res["losses"][:k], ref["losses"][:k]))
    if not res.get("norms") or not ref.get("norms"):
        return out
    n, r = res["norms"][:k], ref["norms"][:k]
    if len(n) < k:
        out["max_rel_err"] = float("nan")
        return out
    out["max_rel_err"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(n, r))
    pp, rp = res.get("per_param_sq"), ref.get("per_param_sq")
    if pp is not None and rp is not None:
        missing = [name for name in rp if name not in pp]
        out["params_missing"] = missing
        if missing:
            covered = [math.sqrt(max(sum(rp[name][i] for name in rp if name in pp), 0.0)) for i in range(k)]
            out["max_rel_err_covered"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(n, covered))
        worst, worst_err = None, 0.0
        for name in rp:
            if name not in pp or len(pp[name]) < k:
                continue
            tot = [max(x, 1e-30) for x in ref["norms"][:k]]
            err = max(abs(pp[name][i] - rp[name][i]) / (tot[i] ** 2) for i in range(k))  # share of ||g||^2
            if err > worst_err:
                worst, worst_err = name, err
        if worst is not None and worst_err > REL_TOL:
            out["worst_param"] = f"{worst} (squared-norm error = {worst_err:.2e} of the sample's ‖g‖²)"
    return out


def run_case(
    spec: CaseSpec,
    methods: Sequence[str],
    registry: Mapping[str, Callable[[Built], Adapter]],
    script: str | Path,
    *,
    bench: str,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    isolate: str = "process",
    timeout: float = 1800.0,
    threads: Optional[int] = None,
    ref_samples: Optional[int] = None,
    env: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Run every method on ``spec`` (each in its own process unless ``isolate == "none"``) and build rows.

    The reference is gradsel's loop: the "loop" method's own output when it ran on the whole batch,
    otherwise a separate untimed loop run on the first ``ref_samples`` samples.
    """
    k = min(ref_samples or spec.B, spec.B)
    methods = list(dict.fromkeys(methods))
    if "plain" not in methods:
        methods.insert(0, "plain")

    def one(method: str, **kw: Any) -> Dict[str, Any]:
        t0 = time.perf_counter()
        if isolate == "process":
            r = run_isolated(script, spec, method, device, repeats, warmup, timeout, threads, **kw)
        else:
            r = run_method(spec, method, registry, device, repeats, warmup, isolated=False, **kw)
        med = r.get("timing", {}).get("median_s")
        msg = f"{med:.4f}s" if med is not None else r.get("reason", "")
        log(f"  [{spec.name}] {method:<13} {r['status']:<11} {msg}  ({time.perf_counter() - t0:.1f}s wall)")
        return r

    results = {m: one(m) for m in methods}
    loop = results.get("loop")
    if loop is not None and loop["status"] == "ok" and k == spec.B:
        ref, ref_src = loop, "loop method (whole batch)"
    else:
        ref, ref_src = one("reference", ref_samples=k), f"separate loop run on the first {k} samples"
    plain = results["plain"]
    plain_t = plain.get("timing", {}).get("median_s") if plain["status"] == "ok" else None
    plain_m = plain.get("peak_mem_bytes") if plain["status"] == "ok" else None
    plain_cpu = plain.get("timing", {}).get("cpu_median_s") if plain["status"] == "ok" else None
    env = env or env_info(device)
    rows = []
    for m, r in results.items():
        timing = r.get("timing") or {}
        med = timing.get("median_s")
        mem = r.get("peak_mem_bytes")
        row: Dict[str, Any] = {
            "bench": bench, "case": spec.name, "method": m, "status": r["status"], "reason": r.get("reason", ""),
            "note": r.get("note", ""),
            "median_s": med, "mean_s": timing.get("mean_s"), "min_s": timing.get("min_s"),
            "stdev_s": timing.get("stdev_s"), "all_s": timing.get("all_s"),
            "cpu_median_s": timing.get("cpu_median_s"), "cpu_all_s": timing.get("cpu_all_s"),
            "cpu_ratio_to_plain": (timing["cpu_median_s"] / plain_cpu) if (timing.get("cpu_median_s") and plain_cpu)
            else None,
            "repeats": repeats, "warmup": warmup,
            "ratio_to_plain": (med / plain_t) if (med is not None and plain_t) else None,
            "peak_mem_bytes": mem, "mem_kind": r.get("mem_kind"),
            "peak_mem_ratio": (mem / plain_m) if (mem is not None and plain_m) else None,
            "ref_samples": k, "ref_source": ref_src if ref["status"] == "ok" else f"unavailable: {ref.get('reason')}",
        }
        if m != "plain" and r["status"] == "ok" and ref["status"] == "ok":
            cmp = compare_to_reference(r, ref, k)
            row.update(cmp)
            row["params_missing"] = len(cmp["params_missing"]) if cmp["params_missing"] is not None else None
            extra = []
            if cmp["params_missing"]:
                shown = ", ".join(cmp["params_missing"][:4])
                more = f" (+{len(cmp['params_missing']) - 4} more)" if len(cmp["params_missing"]) > 4 else ""
                extra.append(f"does not report {len(cmp['params_missing'])} parameter tensors: {shown}{more}; "
                             f"max rel err vs loop over the parameters it covers: {_fmt_err(cmp['max_rel_err_covered'])}")
            if cmp["worst_param"]:
                extra.append(f"worst parameter {cmp['worst_param']}")
            for lab, alt in (r.get("alt_norms") or {}).items():
                e = compare_to_reference({"norms": alt}, ref, k)["max_rel_err"]
                extra.append(f"with {lab}: max rel err {_fmt_err(e)}")
            for lab, why in (r.get("alt_errors") or {}).items():
                extra.append(f"with {lab}: fails ({why})")
            if extra:
                row["note"] = "; ".join([row["note"], *extra]) if row["note"] else "; ".join(extra)
            row["matches_ref"] = cmp["max_rel_err"] is not None and cmp["max_rel_err"] <= REL_TOL
        else:
            row.update(max_rel_err=None, max_rel_err_covered=None, params_missing=None, worst_param=None,
                       loss_max_abs_diff=None, matches_ref=None)
        row.update({f"spec_{k_}": v for k_, v in asdict(spec).items() if k_ != "name"})
        row.update({f"info_{k_}": v for k_, v in (r.get("info") or plain.get("info") or {}).items()})
        row["device"] = device
        row["env"] = env
        rows.append(row)
    return rows


def _fmt_err(e: Optional[float]) -> str:
    return "n/a" if e is None else f"{e:.1e}"


# ------------------------------------------------------------------------------------------------
# writing results, markdown
# ------------------------------------------------------------------------------------------------
def _flatten(row: Mapping[str, Any]) -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for k, v in row.items():
        if k == "env" and isinstance(v, Mapping):
            flat.update({f"env_{ek}": ev for ek, ev in v.items()})
        elif isinstance(v, (list, tuple, dict)):
            flat[k] = json.dumps(v)
        else:
            flat[k] = v
    return flat


def write_results(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, stem: str, meta: Optional[Mapping[str, Any]] = None,
    markdown: Optional[str] = None,
) -> Dict[str, Path]:
    """Write ``<out_dir>/<stem>.json`` ({"meta", "rows"}), ``<stem>.csv`` (rows, env flattened to env_*
    columns) and, when given, ``<stem>.md``. Every row carries the env info. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv"}
    paths["json"].write_text(json.dumps({"meta": dict(meta or {}), "rows": list(rows)}, indent=1, default=str))
    flat = [_flatten(r) for r in rows]
    cols: List[str] = []
    for r in flat:
        cols.extend(c for c in r if c not in cols)
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
    if markdown is not None:
        paths["md"] = out / f"{stem}.md"
        paths["md"].write_text(markdown)
    return paths


def add_run_args(ap: Any, methods: Sequence[str], unit: str, stem: str) -> None:
    """The arguments every comparison script shares (methods, repeats, reference, isolation, device)."""
    ap.add_argument("--methods", default=",".join(methods), help=f"comma-separated subset of {list(methods)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ref-samples", type=int, default=None,
                    help="samples the loop reference covers (default: whole batch = reuse the loop row)")
    ap.add_argument("--isolate", choices=["process", "none"], default=None,
                    help=f"process (default): each {unit} in a fresh subprocess, needed for CPU peak memory; "
                    "none (--quick's default): all in this process, CPU peak memory not measured")
    ap.add_argument("--timeout", type=float, default=3600.0, help=f"seconds per {unit} subprocess")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the runs (default: torch's default; --quick: 1)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help=f"where {stem}-<timestamp>.json/.csv/.md go")


def finish(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, stem: str, meta: Mapping[str, Any],
           md: str) -> List[Mapping[str, Any]]:
    """Write the results, print the markdown summary and where the files went; return the rows."""
    paths = write_results(rows, out_dir, stem, meta, markdown=md)
    print()
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return list(rows)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells str()-ed, '|' escaped)."""
    def cell(x: Any) -> str:
        return ("" if x is None else str(x)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_ratio(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}×"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def ratio_cell(row: Mapping[str, Any]) -> str:
    """The summary cell of one (method, case): ``1.31×``, ``unsupported`` or ``error``."""
    if row["status"] != "ok":
        return row["status"]
    cell = fmt_ratio(row.get("ratio_to_plain")) or "ok"
    if row.get("matches_ref") is False:
        cell += " (≠)"
    if row.get("params_missing"):
        cell += " (partial)"
    return cell


def summary_markdown(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], labels: Mapping[str, str]) -> str:
    """Method × case table of time ratios to plain, then one detail table per case."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["method"], r["case"]): r for r in rows}
    meth = [m for m in methods if any((m, c) in by for c in cases)]
    head = ["method"] + cases
    body = [[labels.get(m, m)] + [ratio_cell(by[(m, c)]) if (m, c) in by else "" for c in cases] for m in meth]
    parts = [
        "Time per batch relative to a plain forward+backward of the mean loss (median of repeats; "
        "(≠) = norms differ from gradsel's loop reference by more than "
        f"{REL_TOL:g} relative; (partial) = the method leaves some scored parameters out of its norm).",
        "",
        markdown_table(head, body),
    ]
    for c in cases:
        detail = []
        for m in meth:
            r = by.get((m, c))
            if r is None:
                continue
            detail.append([
                labels.get(m, m), r["status"], "" if r.get("median_s") is None else f"{r['median_s']:.4f}",
                fmt_ratio(r.get("ratio_to_plain")), fmt_bytes(r.get("peak_mem_bytes")), fmt_ratio(r.get("peak_mem_ratio")),
                _fmt_err(r.get("max_rel_err")) if r.get("max_rel_err") is not None else "",
                r.get("reason") or r.get("note") or "",
            ])
        parts += ["", f"**{c}**", "", markdown_table(
            ["method", "status", "median s", "time ratio", "peak mem", "mem ratio", "max rel err vs loop", "note / reason"],
            detail)]
    return "\n".join(parts) + "\n"
