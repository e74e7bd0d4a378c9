"""gradsel vs its peers: per-sample gradient norms on the same batches, in one run.

    python benchmarks/bench_peers.py                       # every case (slow on CPU: hours at d=768/T=512)
    python benchmarks/bench_peers.py --cases 'tinygpt-d256-T128-*' --repeats 5
    python benchmarks/bench_peers.py --quick               # tiny smoke run (used by tests)

Methods (rows), all on the same model and batch, each timed in its own fresh process:

* ``plain``        - forward, batch MEAN of the per-sample losses, backward: the 1.0x baseline.
* ``loop``         - gradsel ``backend="loop"``: one forward+backward per sample (the reference).
* ``vmap``         - gradsel ``backend="vmap"``: ``torch.func.vmap(grad(...))``.
* ``ghost``        - gradsel ``backend="ghost"``: hooks, one backward, Gram/ghost norms.
* ``opacus_hooks`` - Opacus ``GradSampleModule`` (loss_reduction="sum"): hooks materialise every
  per-sample gradient ``p.grad_sample`` (B x param), then we take the norms. The backward also
  computes the ordinary ``.grad``.
* ``opacus_ghost`` - Opacus ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``,
  norms only: one forward, ONE backward of the summed loss, ``get_norm_sample()`` (the per-sample
  norms Opacus clips with; it stacks each parameter's ``_norm_sample``). Real Opacus ghost-clipping
  training does a second, re-weighted backward on top, not timed here.
* ``backpack``     - BackPACK ``extend(model)`` + ``with backpack(BatchL2Grad()): loss.backward()``;
  the norm is sqrt of the sum of ``p.batch_l2`` over the parameters that got one.

The loss every method differentiates: sample b's own causal-LM loss L_b (token cross-entropy,
reduction none, -100 masked, mean over b's target tokens; logits at t predict t+1) - gradsel's
definition. Peers backpropagate ``sum_b L_b`` with their "sum" reduction, so their per-sample
gradients are exactly grad L_b (a batch mean would scale them by 1/B). BackPACK's first-order
extensions need no loss-module extension: they read each module's output gradient per sample, so the
custom loss is fine (its docstring: sum -> grad L_b, mean -> grad L_b / B).

Peer adapter details (recorded in each row's ``note``):

* Opacus and BackPACK get ``position_ids`` expanded to a contiguous [B, T]. With the models' default
  [1, T] position ids, broadcast over the batch, both treat the position embedding as a batch of ONE
  sample: its "per-sample" gradient is the batch-summed gradient, given to every sample (Opacus
  hooks/BackPACK: silently wrong norms; Opacus ghost: a shape error). Each row's note reports what
  the default gives, from one extra untimed step.
* Opacus's ghost embedding norm sampler calls ``input_ids.view(-1, 1)``: non-contiguous (expanded)
  ids fail, hence the contiguous copy.
* Opacus ghost clipping refuses tied parameters (GPT-2's wte/lm_head): ``unsupported``.
  Opacus hooks handle the tie (they sum the per-use per-sample gradients) - checked against the loop.
* BackPACK has no BatchL2Grad extension for LayerNorm or HF's Conv1D (GPT-2's attention and MLP):
  those parameters get no ``batch_l2`` and are left out of its norm (``params_missing``;
  ``max_rel_err_covered`` compares with the loop restricted to what it covers). For a tied weight it
  keeps one use's value, not the sum.

Correctness: every method's norms are compared with gradsel's loop (fp32) on the first
``--ref-samples`` samples (default: the whole batch, reusing the loop row's own output; with fewer,
a separate untimed loop run on that sub-batch is the reference - samples are independent, so a
sub-batch's norms are the same numbers). ``max_rel_err`` = max_i |n_i - r_i| / r_i.

Cases: TinyGPT (4 layers, vocab 8192, n_head = d/64) at d in {256, 768} x T in {128, 512}, B = 16,
full parameters and LoRA r=8 (alpha 16, on qkv/proj/fc/fc_out; lora_B drawn N(0, 0.02) instead of
peft's zeros so that lora_A has non-zero gradients), and HF GPT2LMHeadModel at d=256 (random init,
tied embeddings, HF's default attention implementation) full and LoRA (c_attn/c_proj/c_fc).
Batches: uniform random token ids, full length, no padding.

Results: ``<out-dir>/peers-<UTC timestamp>.json/.csv/.md`` (every row with versions, device, shapes,
median, ratios, errors); the markdown summary is printed at the end.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness as H  # noqa: E402

import torch  # noqa: E402

METHODS = ["plain", "loop", "vmap", "ghost", "opacus_hooks", "opacus_ghost", "backpack"]
LABELS = {
    "plain": "plain fwd+bwd (mean loss)",
    "loop": "gradsel loop (per-sample fwd+bwd)",
    "vmap": "gradsel vmap (torch.func)",
    "ghost": "gradsel ghost",
    "auto": "gradsel auto",
    "opacus_hooks": "Opacus GradSampleModule (hooks)",
    "opacus_ghost": "Opacus ghost clipping (norms only)",
    "backpack": "BackPACK BatchL2Grad",
}


# ------------------------------------------------------------------------------------------------
# peer adapters
# ------------------------------------------------------------------------------------------------
def total_norm(sq: Dict[str, torch.Tensor], B: int) -> torch.Tensor:
    """sqrt of the sum of per-parameter squared norms; like Opacus's own clipping code (a ``torch.stack``
    over parameters) it refuses a parameter whose per-sample result does not have B samples."""
    for name, v in sq.items():
        if v.shape != (B,):
            raise RuntimeError(f"per-sample result for {name} has shape {list(v.shape)}, not [{B}]: "
                               "its input was taken for a different batch")
    return torch.stack(list(sq.values())).sum(0).clamp(min=0).sqrt()


class PeerAdapter(H.Adapter):
    """Common part: the model in train mode (Opacus hooks only fire in training; dropout is 0), the
    inputs with position_ids expanded to a contiguous [B, T], names of the scored parameters."""

    label = ""

    def __init__(self, built: H.Built):
        self.b = built
        B, T = built.batch["input_ids"].shape
        pos = torch.arange(T, device=built.device)[None].expand(B, T).contiguous()
        self.inputs = {**built.batch, "position_ids": pos}
        self.names = {id(p): n for n, p in built.named_trainable().items()}
        self.last: Dict[str, Any] = {}
        self.notes: List[str] = ["position_ids expanded to [B,T]"]
        built.model.train()
        # the token ids do not require grad, so every full backward hook on the first module warns: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def forward_backward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def step(self) -> None:
        self.last = self.forward_backward(self.inputs)

    def result(self) -> Dict[str, Any]:
        res = dict(self.last)
        # untimed: what the same peer gives with the model's default [1, T] position ids
        if any(("wpe" in n) for n in self.names.values()):
            try:
                alt = self.forward_backward(dict(self.b.batch))
                res["alt_norms"] = {"default [1,T] position_ids": alt["norms"]}
            except Exception as e:  # noqa: BLE001
                res["alt_errors"] = {"default [1,T] position_ids": H._reason(e)[:160]}
        self.note = "; ".join(self.notes)
        return res


class OpacusHooks(PeerAdapter):
    def __init__(self, built: H.Built):
        super().__init__(built)
        from opacus import GradSampleModule

        try:
            self.gsm = GradSampleModule(built.model, batch_first=True, loss_reduction="sum", strict=True)
        except NotImplementedError as e:  # buffers in a trainable module: not a per-sample problem here
            self.gsm = GradSampleModule(built.model, batch_first=True, loss_reduction="sum", strict=False)
            self.notes.append(f"strict=False ({H._reason(e)[:120]})")
        self.params = [p for p in built.model.parameters() if p.requires_grad]

    def forward_backward(self, inputs):
        self.gsm.zero_grad(set_to_none=True)  # also sets every p.grad_sample to None
        losses = H.lm_losses(self.gsm(**inputs), self.b.labels)
        losses.sum().backward()
        B = losses.shape[0]
        sq = {}
        for p in self.params:
            gs = p.grad_sample
            if gs is None:
                continue
            if isinstance(gs, list):
                raise RuntimeError(f"{self.names[id(p)]}: grad_sample accumulated over {len(gs)} passes")
            sq[self.names[id(p)]] = gs.reshape(gs.shape[0], -1).pow(2).sum(1)
        return {"norms": total_norm(sq, B), "per_param_sq": sq, "losses": losses.detach()}


class OpacusGhost(PeerAdapter):
    def __init__(self, built: H.Built):
        super().__init__(built)
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        kw = dict(batch_first=True, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
        try:
            self.gsm = GradSampleModuleFastGradientClipping(built.model, strict=True, **kw)
        except NotImplementedError as e:
            self.gsm = GradSampleModuleFastGradientClipping(built.model, strict=False, **kw)
            self.notes.append(f"strict=False ({H._reason(e)[:120]})")
        self.params = [p for p in built.model.parameters() if p.requires_grad]
        self.notes.append("norms only: 1 forward + 1 backward (training adds a 2nd backward)")

    def forward_backward(self, inputs):
        self.gsm.zero_grad(set_to_none=True)
        for p in self.params:  # no stale norms from a previous step
            if hasattr(p, "_norm_sample"):
                del p._norm_sample
        losses = H.lm_losses(self.gsm(**inputs), self.b.labels)
        losses.sum().backward()
        norms = self.gsm.get_norm_sample()  # stacks every trainable p._norm_sample, 2-norm over params
        sq = {self.names[id(p)]: p._norm_sample.pow(2) for p in self.params if hasattr(p, "_norm_sample")}
        return {"norms": norms, "per_param_sq": sq, "losses": losses.detach()}


class BackpackL2(PeerAdapter):
    def __init__(self, built: H.Built):
        super().__init__(built)
        from backpack import extend

        extend(built.model)
        self.params = [p for p in built.model.parameters() if p.requires_grad]
        self.skipped: set = set()

    def forward_backward(self, inputs):
        from backpack import backpack
        from backpack.extensions import BatchL2Grad

        self.b.model.zero_grad(set_to_none=True)
        for p in self.params:
            if hasattr(p, "batch_l2"):
                del p.batch_l2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = H.lm_losses(self.b.model(**inputs), self.b.labels)
            with backpack(BatchL2Grad()):
                losses.sum().backward()
        for w in caught:
            msg = str(w.message)
            if "does not have an extension for Module" in msg:
                self.skipped.add(msg.split("<class '")[-1].split("'>")[0])  # qualified class name
        sq = {self.names[id(p)]: p.batch_l2.detach() for p in self.params if hasattr(p, "batch_l2")}
        if not sq:
            raise H.Unsupported("BackPACK computed batch_l2 for no scored parameter")
        return {"norms": total_norm(sq, losses.shape[0]), "per_param_sq": sq, "losses": losses.detach()}

    def result(self):
        res = super().result()
        # modules with their own parameters that BackPACK skipped (containers are reported too; drop them)
        own = {f"{type(m).__module__}.{type(m).__qualname__}" for m in self.b.model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False))}
        skipped = sorted(s.rsplit(".", 1)[-1] for s in self.skipped if s in own)
        if skipped:
            self.notes.append(f"no BatchL2Grad extension for {', '.join(skipped)} (skipped)")
            self.note = "; ".join(self.notes)
        return res


REGISTRY = {
    **H.GRADSEL_METHODS,
    "opacus_hooks": OpacusHooks,
    "opacus_ghost": OpacusGhost,
    "backpack": BackpackL2,
}


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def default_cases(B: int = 16, n_layer: int = 4, vocab: int = 8192) -> Dict[str, H.CaseSpec]:
    cases: Dict[str, H.CaseSpec] = {}
    for d in (256, 768):
        for T in (128, 512):
            for params in ("full", "lora"):
                key = f"tinygpt-d{d}-T{T}-{params}"
                cases[key] = H.CaseSpec("tinygpt", d, n_layer, d // 64, vocab, T, B, params, name=key)
    for params in ("full", "lora"):
        key = f"gpt2-d256-T128-{params}"
        cases[key] = H.CaseSpec("gpt2", 256, n_layer, 4, vocab, 128, B, params, name=key)
    return cases


def quick_cases() -> Dict[str, H.CaseSpec]:
    cases = {}
    for model in ("tinygpt", "gpt2"):
        for params in ("full", "lora"):
            key = f"quick-{model}-{params}"
            cases[key] = H.CaseSpec(model, 32, 1, 2, 64, 16, 4, params, name=key)
    return cases


def select(cases: Dict[str, H.CaseSpec], patterns: Optional[str]) -> List[H.CaseSpec]:
    if not patterns or patterns == "all":
        return list(cases.values())
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for k, c in cases.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)]
    if not chosen:
        raise SystemExit(f"--cases {patterns!r} matches none of: {', '.join(cases)}")
    return chosen


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (TinyGPT full+LoRA, d=32, T=16, B=4)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated case names or globs (default: all; see --list). e.g. 'tinygpt-d256-T128-*'")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--B", type=int, default=16, help="batch size of the default cases")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    H.add_run_args(ap, METHODS, "(case, method)", "peers")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    pool = quick_cases() if args.quick else default_cases(args.B, args.layers, args.vocab)
    if args.list:
        for k, c in pool.items():
            print(k, c)
        return []
    cases = select(pool, args.cases if args.cases else ("quick-tinygpt-*" if args.quick else None))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in REGISTRY]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {list(REGISTRY)}")
    repeats = args.repeats or (2 if args.quick else 5)
    isolate = args.isolate or ("none" if args.quick else "process")
    threads = args.threads or (1 if args.quick else None)  # tiny ops: 1 thread avoids pool contention
    if threads:
        torch.set_num_threads(threads)
    env = H.env_info(device)
    print(f"bench_peers: {len(cases)} case(s) x {len(methods)} methods on {env['device_name']} "
          f"({env['torch_threads']} threads), repeats={repeats}, warmup={args.warmup}, isolate={isolate}")
    rows: List[Dict[str, Any]] = []
    for spec in cases:
        case_rows = H.run_case(
            spec, methods, REGISTRY, __file__, bench="peers", device=device, repeats=repeats, warmup=args.warmup,
            isolate=isolate, timeout=args.timeout, threads=threads, ref_samples=args.ref_samples, env=env,
        )
        rows.extend(case_rows)
    md = H.summary_markdown(rows, ["plain", *[m for m in METHODS if m != "plain"], "auto"], LABELS)
    stem = f"peers-{H.utc_stamp()}{'-quick' if args.quick else ''}"
    meta = {"bench": "peers", "argv": sys.argv if argv is None else argv, "env": env, "methods": methods,
            "cases": [c.name for c in cases], "repeats": repeats, "warmup": args.warmup, "isolate": isolate}
    return H.finish(rows, args.out_dir, stem, meta, md)


if __name__ == "__main__":
    H.worker_entry(REGISTRY)
    main()
