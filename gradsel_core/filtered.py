"""In-step (online) filtering in one forward and one backward (Book-Keeping style).

One forward under the ghost capture, one activation backward of Σ_b L_b: every rule layer hands over
its inputs A and output gradients G. From them come, in order:

1. the per-sample norms (exactly as ``GradNormEngine(backend="ghost")``),
2. the keep-mask m of the per-batch policy (``gradsel_core.selection.keep_mask``),
3. the update  ∇W = loss_scale · Σ_b m_b G_bᵀ A_b / Σ_b m_b  — one matmul per layer over the kept
   samples only, which is the weight-gradient matmul a normal backward does, on ρ·B samples.

There is no second backward. Parameters without a rule use the torch.func fallback's per-sample
gradients. The result is accumulated into ``p.grad`` as ``loss.backward()`` would; the optimizer is not
stepped, so it composes with any optimizer, scheduler or accumulation scheme.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .batching import LossFn, prepare_batch
from .dispatch import triton_usable
from .engine import GradNormEngine, grad_enabled_for
from .ghost import capture_forward
from .params import ParamSpec

log = logging.getLogger(__name__)


@dataclass
class FilteredResult:
    kept: torch.Tensor  # (B,) bool
    norms: torch.Tensor  # (B,) float32
    losses: torch.Tensor  # (B,) float32
    tokens: torch.Tensor  # (B,) int64
    loss: float  # mean loss over the kept samples (0.0 when none is kept)
    n_kept: int
    summary: Dict[str, Any] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return self.n_kept / max(1, self.kept.shape[0])


class FilteredBackward:
    """Reusable in-step filter for one model: ``step(batch)`` fills ``.grad`` of the selected parameters.

    ``loss_filter_std``: ``"auto"`` (1.0 for ``median_band``, no loss filter for other policies),
    ``None`` or a number (any policy); ``ratio > 0`` keeps at least one sample per batch.
    The model's mode is left as the caller set it (train mode: dropout on; the norms are then those of
    the training loss actually optimised).
    """

    def __init__(self, model: nn.Module, policy: str = "median_band", ratio: float = 0.2,
                 params: ParamSpec = "trainable", loss_filter_std: Union[float, None, str] = "auto",
                 loss_fn: Optional[LossFn] = None, loss_reduction: str = "mean", backend: str = "auto",
                 **policy_kwargs: Any):
        if backend not in ("auto", "ghost", "triton"):
            raise ValueError(f"filtered_backward needs the one-backward engine: backend 'auto', 'ghost' or "
                             f"'triton', got {backend!r}")
        self.engine = GradNormEngine(model, params=params, loss_fn=loss_fn, backend="ghost",
                                     loss_reduction=loss_reduction)
        self.backend = backend
        from .selection import resolve_loss_filter_std

        # "auto": 1.0 for median_band (the paper's loss pre-filter), none for other policies
        self.policy, self.ratio = policy, ratio
        self.loss_filter_std = resolve_loss_filter_std(policy, loss_filter_std)
        self.policy_kwargs = policy_kwargs

    def step(self, batch: Mapping[str, Any], loss_scale: float = 1.0, seed: Any = 0) -> FilteredResult:
        from .selection import keep_mask

        engine = self.engine
        prepared = prepare_batch(batch, lm_loss=engine.loss_fn is None)
        B = prepared.batch_size
        device = prepared.full["input_ids"].device
        if B == 0:
            empty = torch.zeros(0, device=device)
            return FilteredResult(empty.bool(), empty, empty.clone(), empty.long(), 0.0, 0, {"n": 0})
        use_triton = self.backend == "triton" or (self.backend == "auto" and device.type == "cuda"
                                                  and triton_usable(device))
        with grad_enabled_for(engine.params):
            cap, losses, tokens = capture_forward(engine, prepared, use_triton, keep_factors=True)
            cap.backward(losses.sum(), engine.params)
        sq = cap.per_param_sq(engine.params, device)
        norms = torch.stack(list(sq.values())).sum(0).clamp(min=0).sqrt().float()  # (B,)
        losses = losses.detach().float()
        kept, summary = keep_mask(norms, losses, policy=self.policy, ratio=self.ratio,
                                  loss_filter_std=self.loss_filter_std, tokens=tokens, seed=seed,
                                  return_summary=True, **self.policy_kwargs)
        index = kept.nonzero().squeeze(1)  # (K,)
        K = int(index.numel())
        if K == 0:
            log.debug("filtered_backward: no sample kept in this batch; no gradient added")
            return FilteredResult(kept, norms, losses, tokens, 0.0, 0, summary)
        w = torch.full((K,), loss_scale / K, device=device)  # mean over the kept samples
        for name, factors in cap.factors.items():
            p = engine.params[name]
            g = None
            for f in factors:
                part = f.weighted_sum(w, index)
                g = part if g is None else g + part
            g = g.reshape(p.shape).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return FilteredResult(kept, norms, losses, tokens, float(losses[index].mean()), K, summary)


def filtered_backward(model: nn.Module, batch: Mapping[str, Any], policy: str = "median_band",
                      ratio: float = 0.2, params: ParamSpec = "trainable",
                      loss_filter_std: Union[float, None, str] = "auto",
                      loss_scale: float = 1.0, loss_fn: Optional[LossFn] = None, seed: Any = 0,
                      **policy_kwargs: Any) -> FilteredResult:
    """Score ``batch``, keep samples by the per-batch ``policy``, and accumulate
    ``loss_scale · ∇(mean loss over the kept samples)`` into ``p.grad`` of the selected parameters,
    with one forward and one backward. See :class:`FilteredBackward` to reuse the setup across steps."""
    fb = FilteredBackward(model, policy=policy, ratio=ratio, params=params, loss_filter_std=loss_filter_std,
                          loss_fn=loss_fn, **policy_kwargs)
    return fb.step(batch, loss_scale=loss_scale, seed=seed)
