"""The public scoring API: ``GradNormEngine`` and ``per_sample_grad_norms``.

G_i = ||∇θ L(x_i)||_2 over the selected parameters θ, with L(x_i) sample i's own loss.
Scoring is deterministic and side-effect free: it runs in eval mode (dropout off) and restores every
module's mode, leaves ``param.grad`` and ``requires_grad`` as found, and works inside ``torch.no_grad()``
and ``torch.inference_mode()`` (it steps out of both for the scored forward).

Backends (``gradsel_core.backends``): ``loop`` (the reference), ``vmap`` (torch.func), ``ghost`` (one
activation backward) and ``triton`` (ghost with fused kernels). ``auto`` picks the fastest one and moves
down the chain triton → ghost → vmap → loop, with one warning naming the reason, only on an error that means
"this backend cannot score this model" (:class:`UnsupportedModule`, or an error a plain forward of the same
batch does not raise) or a failed check; an error caused by the batch (a token id >= vocab, a wrong shape) is
raised as it is and the engine stays where it is. With ``verify`` (on by default under ``auto``) every fast
backend in use is checked against the per-sample loop, per parameter against that parameter's own norm, on 3
distinct samples of a batch (differing in length where the batch allows); a batch with fewer (B < 3) leaves
the check pending. Buffers are restored around the check and every extra run, and models with layers that mix
samples (BatchNorm in train mode) are refused before any forward.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from .ghost import GhostBackend, score_ghost
from .backends.loop import score_loop
from .backends.vmap import score_vmap
from .batching import IGNORE_INDEX, LossFn, PreparedBatch, per_sample_losses, prepare_for
from .params import ParamSpec, select_params
from .errors import UnsupportedModule, VerificationError
from .types import (BufferSnapshot, Coverage, CoverageEntry, RawScores, ScoreResult, ScoringSpec, acc_dtype,
                    finish_norms, grad_enabled_for, refuse_sample_mixing, scoring_mode, tolerance)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "loop", "vmap", "ghost", "triton")
# distinct samples (differing in length where the batch allows) the check compares against a per-sample backward
VERIFY_SAMPLES = 3

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
        verify: until a fast backend is verified, compare its squared norms per parameter on 3 distinct samples
            of a batch with a per-sample backward (default: on for ``auto``, for every backend it moves to, and for ``ghost``/``triton`` when any parameter is scored by something
            other than a registered rule, or when the model flattens or routes tokens: a module fallback
            assumes dim 0 is the batch, which a model can break when T == B; off for ``vmap`` and ``loop``). A mismatch moves ``auto`` to an exact backend with a
            warning and raises :class:`VerificationError` for an explicit fast backend. A batch with fewer than 3
            distinct samples leaves the check pending (``engine.verified`` says where it stands).
        fused_head: the fused LM head of the ghost/triton backends (``gradsel_core/ghost/head.py``: the head,
            the token cross-entropy and the head's norms chunk by chunk over the vocabulary, never B×T×V
            logits). ``None`` (default): on where it applies and pays (``ghost.head.pays``: a frozen head from
            V ≥ 2,048 and B·T·V ≥ 2^21 logits, a trainable one from V ≥ 4,096 and 2^24); ``True``: on wherever it
            applies (never over hooks it would skip); ``False``: off. ``coverage()`` says whether it was used and why not.
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
        fused_head: Optional[bool] = None,
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
        self.ghost.fused_head = fused_head
        self._settled: Optional[str] = None  # the backend auto moved to after a failure or a mismatch
        self._verified: Set[str] = set()  # backends that passed the check against the per-sample loop
        self._unchecked: Set[str] = set()  # backends decided (on a batch that could be checked) not to check
        self.last_backend: Optional[str] = None

    # -- public -----------------------------------------------------------------------------------
    def score(self, batch: Mapping[str, Any], reference: Any = None) -> ScoreResult:
        """Score one batch. Returns a :class:`ScoreResult`; B = 0 gives empty tensors.

        ``reference``: a mapping name -> tensor (``gs.reference_gradient``) or a list of them: the result
        then also holds ``dots`` ⟨∇θ L_i, r⟩ and ``cosines``, (B,) for one reference, (B, R) for a list."""
        prepared = self.prepare(batch)
        self.ghost.refresh_params()  # a Parameter replaced since __init__ (resize_token_embeddings) is re-resolved
        refuse_sample_mixing(self.model, "scoring")
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
            raw, backend = self.score_prepared(prepared, backend, refs, BufferSnapshot(self.model))
        self.last_backend = backend
        res = self._finish(raw, backend)
        if refs is not None:
            from .reference import alignment

            res.dots, res.cosines = alignment(raw.dots, res.norms, refs, single=isinstance(reference, Mapping))
        return res

    def prepare(self, batch: Mapping[str, Any]) -> PreparedBatch:
        """Validate ``batch`` for this engine's model and loss (see :func:`gradsel_core.batching.prepare_batch`)."""
        return prepare_for(self.model, batch, self.loss_fn)

    @property
    def verified(self) -> bool:
        """Whether the backend in use has passed the check against the per-sample loop (the loop itself, and a
        backend scored without the check, count as verified); ``False`` while the check is pending: no batch
        with 3 distinct samples has been scored yet."""
        backend = self.last_backend or self.resolve_backend()
        return backend == "loop" or backend in self._verified or backend in self._unchecked

    def resolve_backend(self, prepared: Optional[PreparedBatch] = None) -> str:
        """The backend ``score`` will use: ``"auto"`` is ghost (triton on CUDA when the kernels import) when
        every selected parameter is covered by a rule, op uses or a module-level fallback, else vmap; after
        a failure or a failed check, the backend auto moved to."""
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
            return Coverage(backend, self.ghost.coverage(), head=self.ghost.head_status)
        how = "whole-model vmap" if backend == "vmap" else "loop"
        return Coverage(backend, [CoverageEntry(n, how) for n in self.params])

    # -- the engine's own path: run, fall back, verify -------------------------------------------------
    def score_prepared(self, prepared: PreparedBatch, backend: str, refs: Any = None,
                       snapshot: Optional[BufferSnapshot] = None) -> Tuple[RawScores, str]:
        """Run ``backend`` on a non-empty batch (already under :func:`scoring_mode`), move down ``auto``'s chain
        on errors meaning "this backend cannot score this model", and check a fast backend against the loop
        until it is verified. ``snapshot``: the buffers before the call, restored before every extra run."""
        snapshot = snapshot or BufferSnapshot(self.model)
        proven = [self._settled]  # the last move proven to be the model's (UnsupportedModule, a failed check)
        try:
            return self._score_chain(prepared, backend, refs, snapshot, proven)
        except BaseException:
            # the batch's error, raised by the last backend tried: a move made on the way because a backend
            # raised where a plain forward does not is not proven to be the model's (a backward that fails on
            # this batch alone fails on every backend), so the engine goes back to where the proof ends
            self._settled = proven[0]
            raise

    def _score_chain(self, prepared: PreparedBatch, backend: str, refs: Any, snapshot: BufferSnapshot,
                     proven: List[Optional[str]]) -> Tuple[RawScores, str]:
        while True:
            try:
                raw = self._run_backend(backend, prepared, refs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted out by cannot_score: the batch's errors are raised
                if self.backend != "auto" or backend == "loop":
                    raise
                reason = self.cannot_score(e, prepared, snapshot)
                snapshot.restore()
                backend = self.move_down(backend, f"{type(reason).__name__}: {_first_line(reason)}",
                                         only_loop=getattr(reason, "only_loop", False))
                if reason is e:
                    proven[0] = backend
                continue
            if backend == "loop":
                snapshot.restore()  # B forwards of one sample: buffers are left as found
                return raw, backend
            bad = self.check(prepared, raw, backend)
            if bad is None:
                return raw, backend
            snapshot.restore()
            backend = self.move_down(backend, bad, verification=True)
            proven[0] = backend

    def cannot_score(self, error: BaseException, prepared: PreparedBatch, snapshot: BufferSnapshot) -> BaseException:
        """Sort a fast backend's error: an :class:`UnsupportedModule` (this backend cannot score this model) is
        returned; any other error is the batch's (token id >= vocab, a wrong shape, a loss_fn that fails) when
        a plain forward and loss on the batch raise too, and is then raised as it is; otherwise it is the
        backend's, returned as an :class:`UnsupportedModule` that says so."""
        if isinstance(error, UnsupportedModule):
            return error
        try:
            with torch.no_grad():
                out = self.model(**prepared.model_inputs)
                per_sample_losses(out, prepared, self.loss_fn, self.loss_reduction)
        except Exception:  # noqa: BLE001 - the plain forward fails too: the batch (or the model) is at fault
            snapshot.restore()
            raise error
        snapshot.restore()
        return UnsupportedModule(f"{type(error).__name__} where a plain forward of the batch succeeds: "
                                 f"{_first_line(error)}")

    def move_down(self, backend: str, why: str, verification: bool = False, only_loop: bool = False) -> str:
        """``auto``: settle on the next backend of the chain (unverified until a batch can check it); straight on
        the loop for an error only the loop handles (``only_loop``: a hidden use of a parameter, a gradient
        hook). Raises :class:`VerificationError` for an explicit backend that failed the check."""
        if verification and self.backend != "auto":
            raise VerificationError(why + "; pass backend='auto' or 'vmap' (exact)")
        chain = _chain_from(backend)
        # a failed check of triton is a rule's fault: ghost uses the same rules
        nxt = "loop" if only_loop else ("vmap" if verification and backend == "triton" else chain[1])
        checked = ("the per-sample reference" if nxt == "loop"
                   else "checked against the per-sample loop on the next batch that can be checked")
        log.warning("backend %s cannot score this model (%s); using backend=%r (%s)", backend, why, nxt, checked)
        self._settled = nxt
        return nxt

    def needs_check(self, backend: str) -> bool:
        """Whether the next batch scored by ``backend`` is checked against the per-sample loop."""
        return backend != "loop" and backend not in self._verified and backend not in self._unchecked

    def check(self, prepared: PreparedBatch, raw: RawScores, backend: str) -> Optional[str]:
        """The safety net: until ``backend`` is verified, compare its squared norms per parameter (and its losses)
        with the per-sample loop on 3 distinct samples of the batch, chosen to differ in length. ``None`` when
        they agree (or the check is off), else what disagrees. A batch with fewer distinct samples (B < 3) is
        checked on those it has, and leaves verification pending. Buffers are restored after the reference's
        forwards."""
        if not self.needs_check(backend):
            return None
        idx, complete = verify_indices(prepared, self.loss_fn is None)
        if not self._should_verify(backend):
            if complete:
                self._unchecked.add(backend)  # decided once, on the first batch that could be checked
            return None
        after = BufferSnapshot(self.model)
        try:
            ref = score_loop(self.spec, prepared.select(idx))
        finally:
            after.restore()
        bad = compare_to_reference(raw, ref, idx, self.params)
        if not bad:
            if complete:
                self._verified.add(backend)
            else:
                log.debug("backend %s agrees with the per-sample loop on the %d distinct sample(s) of this batch; the "
                          "check stays pending until a batch with %d", backend, len(idx), VERIFY_SAMPLES)
            return None
        worst = ", ".join(f"{n} (rel. error {e:.2g} of its own norm)" for n, e in sorted(bad, key=lambda x: -x[1])[:4])
        return (f"backend {backend} disagrees with a per-sample backward on {len(bad)} parameter(s) of samples "
                f"{idx.tolist()}: {worst}; " + ("a rule does not describe a module of this model"
                                                 if backend in ("ghost", "triton") else
                                                 "it does not compute this model's per-sample gradients"))

    # -- internals --------------------------------------------------------------------------------
    def _run_backend(self, backend: str, prepared: PreparedBatch, refs=None) -> RawScores:
        if backend == "loop":
            return score_loop(self.spec, prepared, refs)
        if backend == "vmap":
            return score_vmap(self.spec, prepared, refs)
        # strict: a parameter that only a fallback over the whole model could score is refused here; under
        # auto that moves the chain on to vmap, the same computation under its own name
        return score_ghost(self.ghost, prepared, use_triton=backend == "triton", strict=True, refs=refs)

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


def verify_indices(prepared: PreparedBatch, lm_loss: bool = True) -> Tuple[torch.Tensor, bool]:
    """Up to ``VERIFY_SAMPLES`` pairwise distinct samples of the batch for the check, and whether there are
    that many (a check on fewer still catches what it sees, but does not complete verification).

    Samples that differ in length (attended tokens) come first: the shortest, the longest, then lengths in
    between; samples with a target token before those without (a sample without one has gradient 0 on every
    path); then samples of a length already taken whose tokens differ."""
    B = prepared.batch_size
    ids = prepared.full["input_ids"]  # (B, T)
    if B == 0:
        return torch.zeros(0, dtype=torch.long, device=ids.device), False
    mask = prepared.full.get("attention_mask")
    att = mask.ne(0) if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else torch.ones_like(ids, dtype=torch.bool)
    lengths = att.sum(1).tolist()
    labels = prepared.labels if lm_loss and isinstance(prepared.labels, torch.Tensor) else None
    if labels is not None and labels.dim() == 2:
        # seq2seq: every label is a target; the length is the encoder's and the decoder's
        targets = (labels if prepared.seq2seq else labels[:, 1:]).ne(IGNORE_INDEX).sum(1).tolist()
        if prepared.seq2seq:
            lengths = [(a, t) for a, t in zip(lengths, targets)]
    else:
        targets = [1] * B
    rows = ids.masked_fill(~att, -1).tolist()
    if labels is not None and prepared.seq2seq:
        rows = [r + [-2] + l_ for r, l_ in zip(rows, labels.tolist())]
    order = sorted(range(B), key=lambda b: (targets[b] == 0, lengths[b], b))
    first_of: Dict[Any, int] = {}
    for b in order:
        first_of.setdefault(lengths[b], b)
    by_len = sorted(first_of.values(), key=lambda b: (targets[b] == 0, lengths[b]))
    with_target = [b for b in by_len if targets[b] > 0] or by_len
    spread = [with_target[0], with_target[-1]] + with_target[1:-1] + [b for b in by_len if b not in with_target]
    picked: List[int] = []
    for b in spread + order:
        if len(picked) == VERIFY_SAMPLES:
            break
        if b not in picked and not any(rows[b] == rows[c] for c in picked):
            picked.append(b)
    return torch.tensor(sorted(picked), dtype=torch.long, device=ids.device), len(picked) == VERIFY_SAMPLES


def compare_to_reference(raw: RawScores, ref: RawScores, idx: torch.Tensor,
                         params: Mapping[str, torch.Tensor]) -> List[Tuple[str, float]]:
    """(name, relative error) of each parameter whose fast squared norms at ``idx`` disagree with the loop's,
    each against its own norm: |fast - exact| <= tol(dtype) · exact + eps(acc)² · (the sample's total squared
    norm), a floor that only tells a parameter whose gradient is zero from rounding noise. The losses are compared too (as ``"<loss>"``).
    A value the loop finds non-finite is not compared; a non-finite fast value where the loop's is finite is
    wrong."""
    acc = acc_dtype(params)
    floor_rel = torch.finfo(acc).eps ** 2
    total = torch.stack([ref.per_param_sq[m].double() for m in params]).sum(0)  # (k,)
    floor = floor_rel * total.abs().nan_to_num(0.0, 0.0, 0.0)
    bad: List[Tuple[str, float]] = []

    def compare(name: str, fast: torch.Tensor, exact: torch.Tensor, tol: float, atol: torch.Tensor) -> None:
        fast, exact = fast.double(), exact.double()
        diff = (fast - exact).abs()
        ok = ~torch.isfinite(exact) | (torch.isfinite(fast) & (diff <= tol * exact.abs() + atol + 1e-300))
        if not bool(ok.all()):
            err = (diff / torch.maximum(exact.abs(), atol).clamp(min=1e-300)).nan_to_num(math.inf)
            bad.append((name, float(err[~ok].max())))

    for n, p in params.items():
        compare(n, raw.per_param_sq[n][idx], ref.per_param_sq[n], tolerance(p.dtype), floor)
    loss_tol = max(tolerance(p.dtype) for p in params.values())
    compare("<loss>", raw.losses[idx], ref.losses, loss_tol, torch.full_like(total, 1e-7 if acc == torch.float32 else 1e-14))
    return bad


def _chain_from(backend: str) -> List[str]:
    chain = ["triton", "ghost", "vmap", "loop"] if backend == "triton" else ["ghost", "vmap", "loop"]
    return chain[chain.index(backend):]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def per_sample_grad_norms(model: nn.Module, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
    """Shorthand for ``GradNormEngine(model, **kwargs).score(batch).norms`` (float32, shape (B,))."""
    return GradNormEngine(model, **kwargs).score(batch).norms
