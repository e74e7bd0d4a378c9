"""Reference directions: the mean gradient of a loss over reference data, and per-sample alignment with it.

    ref = gs.reference_gradient(model, safety_batches, params="trainable")   # name -> tensor
    res = gs.GradNormEngine(model).score(batch, reference=ref)
    res.dots      # (B,)  ⟨∇θ L_i, r⟩
    res.cosines   # (B,)  ⟨∇θ L_i, r⟩ / (||∇θ L_i|| ||r||)

The dots are exact and need no per-sample gradient: for a Linear layer ⟨g_i, V⟩ = Σ_t δ_tᵀ V a_t, one
forward-sized product per layer (``gradsel_core.factors``). Several references at once give (B, R).
A sample that gets a positive dot pushes the model the way a step on the reference data would; a negative
one pushes against it (for a safety reference: against the aligned behaviour).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .batching import LossFn, is_encoder_decoder, per_sample_losses, prepare_for
from .errors import UsageError
from .params import ParamSpec, select_params
from .types import scoring_mode

FORMAT = "gradsel-reference-1"


class ReferenceGradient(MappingABC):
    """A mapping parameter name -> reference tensor (the parameter's shape), with what it was made from.

    ``fingerprint``: the model fingerprint (``gradsel_core.store.model_fingerprint``'s content hash) it was
    computed on, so a store or an engine can check it belongs to the model; ``count``: the samples averaged;
    ``meta``: free-form JSON (loss, data description)."""

    def __init__(self, grads: Mapping[str, torch.Tensor], fingerprint: Optional[str] = None, count: int = 0,
                 meta: Optional[Mapping[str, Any]] = None):
        self.grads = dict(grads)
        self.fingerprint = fingerprint
        self.count = int(count)
        self.meta = dict(meta or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.grads[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.grads)

    def __len__(self) -> int:
        return len(self.grads)

    def norm(self) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.grads.values()))

    def digest(self) -> str:
        """sha256 over names, shapes, dtypes and bytes: what a store records to name this reference."""
        import hashlib

        h = hashlib.sha256()
        for n in sorted(self.grads):
            t = self.grads[n].detach().contiguous().cpu()
            h.update(f"{n}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def save(self, path: str) -> None:
        """Write as safetensors, with the fingerprint, count and meta in the header."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "fingerprint": self.fingerprint or "", "count": str(self.count),
                "meta": json.dumps(self.meta, sort_keys=True)}
        save_file({n: t.detach().contiguous().cpu() for n, t in sorted(self.grads.items())}, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: Optional[Union[str, torch.device]] = None) -> "ReferenceGradient":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device=str(device or "cpu")) as f:
                meta = f.metadata() or {}
                grads = {n: f.get_tensor(n) for n in f.keys()}
        except FileNotFoundError:
            raise UsageError(f"reference file {path!r} does not exist") from None
        except Exception as e:  # noqa: BLE001 - a malformed file: say which
            raise UsageError(f"{path!r} is not a gradsel reference (safetensors): {e}") from None
        if meta.get("format") != FORMAT:
            raise UsageError(f"{path!r} is not a gradsel reference file (format {meta.get('format')!r}); make one with "
                             "`gradsel reference` or gs.reference_gradient(...).save(path)")
        return cls(grads, meta.get("fingerprint") or None, int(meta.get("count", "0") or 0),
                   json.loads(meta.get("meta") or "{}"))

    def __repr__(self) -> str:
        return f"ReferenceGradient({len(self.grads)} tensors, count={self.count}, norm={self.norm():.4g})"


def reference_gradient(model: nn.Module, batches: Iterable[Mapping[str, Any]], params: ParamSpec = "trainable",
                       loss_fn: Optional[LossFn] = None, loss_reduction: str = "mean",
                       fingerprint: bool = True, meta: Optional[Mapping[str, Any]] = None) -> ReferenceGradient:
    """The mean over every sample of the reference data of ∇θ L(x) (each sample's own loss, as scored):
    r = (1/N) Σ_i ∇θ L_i, over the selected ``params``. Eval mode, as scoring; ``param.grad`` untouched."""
    chosen = select_params(model, params)
    names = list(chosen)
    acc = torch.float64 if any(p.dtype == torch.float64 for p in chosen.values()) else torch.float32
    total = {n: torch.zeros(p.shape, dtype=acc, device=p.device) for n, p in chosen.items()}
    count = 0
    with scoring_mode(model, chosen):
        for i, batch in enumerate(batches):
            prepared = prepare_for(model, batch, loss_fn)  # (seq2seq for an encoder-decoder model)
            if prepared.batch_size == 0:
                continue
            out = model(**prepared.model_inputs)
            losses, _ = per_sample_losses(out, prepared, loss_fn, loss_reduction)
            if not bool(torch.isfinite(losses).all()):
                raise UsageError(f"reference batch {i}: a non-finite loss; the mean gradient would be NaN")
            grads = torch.autograd.grad(losses.sum(), [chosen[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    total[n] += g.to(acc)
            count += prepared.batch_size
    if count == 0:
        raise UsageError("reference_gradient got no sample: pass at least one non-empty batch")
    mean = {n: (t / count).to(chosen[n].dtype) for n, t in total.items()}
    fp = None
    if fingerprint:
        from .store import model_fingerprint

        fp = model_fingerprint(model, chosen)["content_sha256"]
    return ReferenceGradient(mean, fp, count, {"loss": ("seq2seq_lm" if is_encoder_decoder(model) else "causal_lm")
                                                          if loss_fn is None else "custom",
                                                "loss_reduction": loss_reduction, **(meta or {})})


def stack_references(refs: Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]],
                     params: Mapping[str, torch.Tensor], acc: torch.dtype) -> Dict[str, torch.Tensor]:
    """One reference (a mapping) or several (a list) -> name -> (R, *shape) in ``acc`` on each parameter's
    device. Every selected parameter must be in every reference, with its shape; nothing else may be."""
    many: List[Mapping[str, torch.Tensor]] = [refs] if isinstance(refs, MappingABC) else list(refs)
    if not many:
        raise UsageError("reference= got an empty list")
    for k, r in enumerate(many):
        if not isinstance(r, MappingABC):
            raise UsageError(f"reference {k} is a {type(r).__name__}; pass a mapping name -> tensor "
                             "(gs.reference_gradient(...)) or a list of them")
        missing = [n for n in params if n not in r]
        extra = [n for n in r if n not in params]
        if missing or extra:
            raise UsageError(f"reference {k} does not match the scored parameters: missing {missing[:3]}, "
                             f"not scored {extra[:3]}; compute it with the same params= as the engine")
        for n, p in params.items():
            if tuple(r[n].shape) != tuple(p.shape):
                raise UsageError(f"reference {k}: {n} has shape {tuple(r[n].shape)}, the parameter {tuple(p.shape)}")
    return {n: torch.stack([r[n].detach().to(device=p.device, dtype=acc) for r in many]) for n, p in params.items()}


def reference_norms(stacked: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(R,) ||r|| of each stacked reference."""
    total = None
    for V in stacked.values():
        sq = V.flatten(1).pow(2).sum(1)
        total = sq if total is None else total + sq
    return total.sqrt()


def alignment(dots: Mapping[str, torch.Tensor], norms: torch.Tensor, refs: Mapping[str, torch.Tensor],
              single: bool):
    """Per-parameter dots (name -> (B, R)) summed, and cosines with the stacked ``refs``; a zero gradient or
    a zero reference gives cosine 0, never NaN. ``single``: return (B,) instead of (B, R)."""
    total = None
    for d in dots.values():
        total = d if total is None else total + d  # (B, R)
    rn = reference_norms(refs).to(total.dtype)  # (R,)
    denom = norms.to(total.dtype)[:, None] * rn[None, :]  # (B, R)
    cos = torch.where(denom > 0, total / denom.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))
    total, cos = total.float().detach(), cos.float().detach()
    return (total[:, 0], cos[:, 0]) if single else (total, cos)
