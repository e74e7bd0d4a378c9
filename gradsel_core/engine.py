"""The public scoring API: ``GradNormEngine`` and ``per_sample_grad_norms``.

G_i = ||∇θ L(x_i)||_2 over the selected parameters θ, with L(x_i) sample i's own loss.
Scoring is deterministic and side-effect free: it runs in eval mode (dropout off) and restores every
module's mode, leaves ``param.grad`` and ``requires_grad`` as found, and works inside ``torch.no_grad()``
and ``torch.inference_mode()`` (it steps out of both for the scored forward).

Backends (``gradsel_core.backends``): ``loop`` (the reference), ``vmap`` (torch.func), ``ghost`` (one
activation backward) and ``triton`` (ghost with fused kernels). ``auto`` picks the fastest exact one and
moves down the chain ghost → vmap → loop, with one warning naming the reason, when a path fails; with
``verify`` (on by default under ``auto``) the first batch's fast norms of two samples are checked against a
per-sample backward.
"""
from __future__ import annotations

import logging
from typing import Any, List, Mapping, Optional

import torch
from torch import nn

from .ghost import GhostBackend, score_ghost
from .backends.loop import score_loop
from .backends.vmap import score_vmap
from .batching import LossFn, PreparedBatch, prepare_batch
from .params import ParamSpec, select_params
from .errors import VerificationError
from .types import (Coverage, CoverageEntry, RawScores, ScoreResult, ScoringSpec, acc_dtype, finish_norms,
                    grad_enabled_for, scoring_mode, tolerance)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "loop", "vmap", "ghost", "triton")
# samples the first-batch check compares against a per-sample backward
VERIFY_SAMPLES = 2

__all__ = ["GradNormEngine", "ScoreResult", "RawScores", "per_sample_grad_norms", "grad_enabled_for",
           "scoring_mode", "acc_dtype", "BACKENDS"]


class GradNormEngine:
    """Exact per-sample gradient norms.

    Args:
        model: any ``nn.Module`` taking the batch's tensors as keyword arguments.
        params: ``"trainable"``, ``"all"``, ``"lora"``, a list of names or ``callable(name, param)``.
        loss_fn: ``(outputs, batch) -> (B,)`` per-sample loss; default: causal LM on ``labels``.
        backend: ``"loop"`` (reference), ``"vmap"`` (torch.func), ``"ghost"`` (hooks, one backward),
            ``"triton"`` (ghost with fused kernels on CUDA) or ``"auto"``.
        per_param: also return each parameter's squared norms.
        chunk_size: samples per vmap chunk (memory bound); ``None`` = whole batch.
        loss_reduction: ``"mean"`` or ``"sum"`` over each sample's target tokens.
        verify: on the first batch, compare the fast norms of two samples with a per-sample backward
            (default: on for ``auto``, and for ``ghost``/``triton`` when any parameter is scored by something
            other than a registered rule, or when the model flattens or routes tokens: a module fallback
            assumes dim 0 is the batch, which a model can break when T == B; off for ``vmap`` and ``loop``). A mismatch moves ``auto`` to an exact backend with a
            warning and raises :class:`VerificationError` for an explicit fast backend.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = "trainable",
        loss_fn: Optional[LossFn] = None,
        backend: str = "auto",
        per_param: bool = False,
        chunk_size: Optional[int] = None,
        loss_reduction: str = "mean",
        verify: Optional[bool] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.model = model
        self.params = select_params(model, params)
        self.loss_fn = loss_fn
        self.backend = backend
        self.per_param = per_param
        self.chunk_size = chunk_size
        self.loss_reduction = loss_reduction
        self.verify = verify
        self.spec = ScoringSpec(model, self.params, loss_fn, loss_reduction, chunk_size)
        self.ghost = GhostBackend(self.spec)
        self._settled: Optional[str] = None  # the backend auto moved to after a failure or a mismatch
        self._verified = False
        self.last_backend: Optional[str] = None

    # -- public -----------------------------------------------------------------------------------
    def score(self, batch: Mapping[str, Any], reference: Any = None) -> ScoreResult:
        """Score one batch. Returns a :class:`ScoreResult`; B = 0 gives empty tensors.

        ``reference``: a mapping name -> tensor (``gs.reference_gradient``) or a list of them: the result
        then also holds ``dots`` ⟨∇θ L_i, r⟩ and ``cosines``, (B,) for one reference, (B, R) for a list."""
        prepared = prepare_batch(batch, lm_loss=self.loss_fn is None)
        refs = None
        if reference is not None:
            from .reference import stack_references

            refs = stack_references(reference, self.params, acc_dtype(self.params))
        backend = self.resolve_backend(prepared)
        device = prepared.full["input_ids"].device
        if prepared.batch_size == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=device)
            per = {n: empty.clone() for n in self.params} if self.per_param else None
            res = ScoreResult(empty, empty.clone(), torch.zeros(0, dtype=torch.int64, device=device), per, backend,
                              loss_reduction=self.loss_reduction if self.loss_fn is None else None)
            if refs is not None:
                R = next(iter(refs.values())).shape[0]
                shape = (0,) if isinstance(reference, Mapping) else (0, R)
                res.dots, res.cosines = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
            return res
        with scoring_mode(self.model, self.params):
            raw, backend = self._score_raw(prepared, backend, refs)
            if not self._verified and backend != "loop":
                if self._should_verify(backend):
                    raw, backend = self._check(prepared, raw, backend, refs)
                elif prepared.batch_size >= VERIFY_SAMPLES:
                    self._verified = True  # decided once, on the first batch that could be checked
        self.last_backend = backend
        res = self._finish(raw, backend)
        if refs is not None:
            from .reference import alignment

            res.dots, res.cosines = alignment(raw.dots, res.norms, refs, single=isinstance(reference, Mapping))
        return res

    def resolve_backend(self, prepared: Optional[PreparedBatch] = None) -> str:
        """The backend ``score`` will use: ``"auto"`` is ghost (triton on CUDA when the kernels import) when
        every selected parameter is covered by a rule, op uses or a module-level fallback, else vmap; after
        a failure or a failed check, the exact backend auto moved to."""
        if self.backend != "auto":
            return self.backend
        if self._settled is not None:
            return self._settled
        if not self.ghost.plan.complete:
            return "vmap"
        from .dispatch import triton_usable

        device = prepared.full["input_ids"].device if prepared is not None else None
        return "triton" if device is not None and device.type == "cuda" and triton_usable(device) else "ghost"

    def coverage(self) -> Coverage:
        """How each selected parameter is scored: by a rule, op uses, a module fallback, whole-model vmap or
        the loop. Reflects what the engine learned on the batches scored so far."""
        backend = self.last_backend or self.resolve_backend()
        if backend in ("ghost", "triton"):
            return Coverage(backend, self.ghost.coverage())
        how = "whole-model vmap" if backend == "vmap" else "loop"
        return Coverage(backend, [CoverageEntry(n, how) for n in self.params])

    # -- internals --------------------------------------------------------------------------------
    def _run_backend(self, backend: str, prepared: PreparedBatch, refs=None) -> RawScores:
        if backend == "loop":
            return score_loop(self.spec, prepared, refs)
        if backend == "vmap":
            return score_vmap(self.spec, prepared, refs)
        # strict: a parameter that only a fallback over the whole model could score is refused here; under
        # auto that moves the chain on to vmap, the same computation under its own name
        return score_ghost(self.ghost, prepared, use_triton=backend == "triton", strict=True, refs=refs)

    def _score_raw(self, prepared: PreparedBatch, backend: str, refs=None):
        if self.backend != "auto":
            return self._run_backend(backend, prepared, refs), backend
        chain = _chain_from(backend)
        for i, name in enumerate(chain):
            try:
                return self._run_backend(name, prepared, refs), name
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - auto: any failure of a fast path moves down the chain
                if i == len(chain) - 1:
                    raise
                nxt = chain[i + 1]
                log.warning("backend %s cannot score this model (%s: %s); using backend=%r (exact)",
                            name, type(e).__name__, _first_line(e), nxt)
                self._settled = nxt
        raise AssertionError("unreachable")

    def _should_verify(self, backend: str) -> bool:
        from .ghost.standins import can_stand_in

        if not can_stand_in(self.params):  # sharded (FSDP2): the per-sample loop needs whole weights
            if self.verify:
                log.warning("verify=True is skipped: the selected parameters are sharded (FSDP2), and the "
                            "per-sample reference needs whole weights")
            return False
        if self.verify is not None:
            return bool(self.verify)
        if self.backend == "auto":
            return True
        # (rows followed through ops: the model flattens or routes tokens, where dim 0 == B can be a coincidence)
        return backend in ("ghost", "triton") and (self.ghost.follow_rows
                                                   or any(e.how != "rule" for e in self.ghost.coverage()))

    def _check(self, prepared: PreparedBatch, raw: RawScores, backend: str, refs=None):
        """First-batch safety net: the fast squared norms of up to two samples against the loop."""
        B = prepared.batch_size
        idx = torch.arange(min(VERIFY_SAMPLES, B), device=prepared.full["input_ids"].device)
        ref = score_loop(self.spec, prepared.select(idx))
        tol = tolerance(next(iter(self.params.values())).dtype)
        bad = []
        total = torch.stack([ref.per_param_sq[m].double() for m in self.params]).sum(0)  # (k,)
        for n in self.params:
            fast, exact = raw.per_param_sq[n][idx].double(), ref.per_param_sq[n].double()
            ok = ~torch.isfinite(exact) | ~torch.isfinite(total) | \
                ((fast - exact).abs() <= tol * total.abs() + 1e-30)
            if not bool(ok.all()):
                err = ((fast - exact).abs() / total.abs().clamp(min=1e-30)).max().item()
                bad.append((n, err))
        self._verified = True
        if not bad:
            return raw, backend
        worst = ", ".join(f"{n} (rel. error {e:.2g})" for n, e in sorted(bad, key=lambda x: -x[1])[:4])
        msg = (f"backend {backend} disagrees with a per-sample backward on {len(bad)} parameter(s): {worst}; "
               "a rule does not describe a module of this model")
        if self.backend != "auto":
            raise VerificationError(msg + "; pass backend='auto' or 'vmap' (exact)")
        nxt = "vmap" if backend in ("ghost", "triton") else "loop"
        log.warning("%s; using backend=%r (exact)", msg, nxt)
        self._settled = nxt
        return self._score_raw(prepared, nxt, refs)

    def _finish(self, raw: RawScores, backend: str) -> ScoreResult:
        total = None
        for sq in raw.per_param_sq.values():
            total = sq if total is None else total + sq
        norms = finish_norms(total, raw.losses)
        per = {n: raw.per_param_sq[n].float() for n in self.params} if self.per_param else None
        return ScoreResult(
            norms=norms.float().detach(),
            losses=raw.losses.float().detach(),
            tokens=raw.tokens.long(),
            per_param=per,
            backend=backend,
            loss_reduction=self.loss_reduction if self.loss_fn is None else None,
        )


def _chain_from(backend: str) -> List[str]:
    chain = ["triton", "ghost", "vmap", "loop"] if backend == "triton" else ["ghost", "vmap", "loop"]
    return chain[chain.index(backend):]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def per_sample_grad_norms(model: nn.Module, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
    """Shorthand for ``GradNormEngine(model, **kwargs).score(batch).norms`` (float32, shape (B,))."""
    return GradNormEngine(model, **kwargs).score(batch).norms
