"""The reference: one forward and one backward per sample. Slow and obviously correct."""
from __future__ import annotations

import torch

from typing import Dict, List, Optional, Sequence

from ..batching import PreparedBatch, per_sample_losses
from ..types import RawScores, ScoringSpec, acc_dtype


def score_loop(engine: ScoringSpec, batch: PreparedBatch,
               refs: Optional[Dict[str, torch.Tensor]] = None) -> RawScores:
    """``refs``: name -> (R, *shape) references; the dots ⟨g_b, r⟩ are taken from the explicit gradients."""
    names = list(engine.params)
    tensors = [engine.params[n] for n in names]
    acc = acc_dtype(engine.params)
    sq: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    dots: Dict[str, List[torch.Tensor]] = {n: [] for n in (refs or {})}
    losses, tokens = [], []
    for b in range(batch.batch_size):
        sub = batch.select(slice(b, b + 1))
        out = engine.model(**sub.model_inputs)
        loss, tok = per_sample_losses(out, sub, engine.loss_fn, engine.loss_reduction)  # (1,), (1,)
        grads: Sequence[Optional[torch.Tensor]] = [None] * len(tensors)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
        for n, p, g in zip(names, tensors, grads):
            val = torch.zeros((), dtype=acc, device=p.device) if g is None else g.to(acc).pow(2).sum()
            sq[n].append(val)
            if n in dots:
                V = refs[n]  # (R, *shape)
                dots[n].append(torch.zeros(V.shape[0], dtype=acc, device=p.device) if g is None
                               else V.to(acc).flatten(1) @ g.to(acc).flatten())  # (R,)
        losses.append(loss.detach())
        tokens.append(tok)
    return RawScores(
        per_param_sq={n: torch.stack(v) for n, v in sq.items()},
        losses=torch.cat(losses),
        tokens=torch.cat(tokens),
        dots={n: torch.stack(v) for n, v in dots.items()} if refs else None,
    )
