"""torch.func backend: ``vmap(grad(loss of one sample))`` over the batch, ``functional_call`` on the
selected parameters. ``chunk_size`` bounds memory (samples per vectorised chunk)."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, Iterator, Optional

import torch
from torch.func import functional_call, grad, vmap

from ..batching import PreparedBatch, per_sample_losses
from ..ghost.failures import grad_hooks
from ..ghost.standins import assert_no_hidden_uses
from ..types import RawScores, ScoringSpec, acc_dtype


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch HF models to eager attention while vmapping, and restore.

    HF's SDPA mask builder branches on the mask's values (data-dependent control flow, which vmap
    refuses), and SDPA on CPU has no vmap batching rule. Eager attention is the same math.
    """
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs[id(cfg)] = cfg
    saved = [(c, c._attn_implementation) for c in configs.values()]
    # HF's bidirectional (encoder) mask asks padding_mask.all() to skip building the mask: data-dependent
    # control flow under vmap. Always building it is the same math.
    masking: Any = sys.modules.get("transformers.masking_utils")
    skip = getattr(masking, "_ignore_bidirectional_mask_sdpa", None)
    try:
        for c, impl in saved:
            if impl != "eager":
                c._attn_implementation = "eager"
        if skip is not None:
            masking._ignore_bidirectional_mask_sdpa = _never_skip
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
        if skip is not None:
            masking._ignore_bidirectional_mask_sdpa = skip


def _never_skip(*args: Any, **kwargs: Any) -> bool:
    return False


def score_vmap(engine: ScoringSpec, batch: PreparedBatch,
               refs: Optional[Dict[str, torch.Tensor]] = None) -> RawScores:
    model = engine.model
    grad_hooks(engine.params)  # torch.func never runs a parameter's gradient hooks: refused, naming it
    # functional_call replaces module attributes only: a Parameter held in a list/dict/closure is refused
    assert_no_hidden_uses(model, engine.params, lambda: per_sample_losses(
        model(**batch.model_inputs), batch, engine.loss_fn, engine.loss_reduction)[0].sum())
    acc = acc_dtype(engine.params)
    names = list(engine.params)
    detached = {n: p.detach() for n, p in engine.params.items()}
    per_sample = batch.per_sample_keys()
    keys = list(batch.full)
    vm_args = {k: batch.full[k] for k in keys if per_sample[k]}
    fixed = {k: batch.full[k] for k in keys if not per_sample[k]}
    labels = batch.labels

    def one_sample(params: Dict[str, torch.Tensor], sample: Dict[str, torch.Tensor], sample_labels):
        full = {k: v.unsqueeze(0) for k, v in sample.items()}
        full.update(fixed)
        sub = PreparedBatch(
            model_inputs={k: v for k, v in full.items() if k != "labels"},
            labels=None if sample_labels is None else sample_labels.unsqueeze(0),
            full=full,
            batch_size=1,
            seq_len=batch.seq_len,
            seq2seq=batch.seq2seq,
        )
        out = functional_call(model, params, args=(), kwargs=sub.model_inputs)
        loss, tok = per_sample_losses(out, sub, engine.loss_fn, engine.loss_reduction)  # (1,), (1,)
        return loss.sum(), (loss.detach().squeeze(0), tok.squeeze(0))

    grad_fn = grad(one_sample, has_aux=True)
    in_dims = (None, {k: 0 for k in vm_args}, None if labels is None else 0)
    # torch.func.grad ignores the outer no_grad; it only stops a useless outer graph being recorded
    with torch.no_grad(), eager_attention(model):
        grads, (losses, tokens) = vmap(grad_fn, in_dims=in_dims, chunk_size=engine.chunk_size, randomness="error")(
            detached, vm_args, labels
        )
    per_param_sq = {n: grads[n].to(acc).pow(2).flatten(1).sum(1) for n in names}
    dots = {n: grads[n].to(acc).flatten(1) @ V.to(acc).flatten(1).t() for n, V in refs.items()} if refs else None
    return RawScores(per_param_sq=per_param_sq, losses=losses, tokens=tokens, dots=dots)
