"""Batch validation, per-sample slicing and the per-sample loss.

The per-sample loss is defined per sample (never HF's global token mean): token losses with
``reduction='none'``, labels equal to -100 masked, then a mean (or sum) over that sample's own
counted target tokens. Logits at position t predict labels at t+1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


@dataclass
class PreparedBatch:
    """A validated batch.

    ``model_inputs`` go to ``model(**model_inputs)`` unchanged (everything but ``labels``);
    ``labels`` are the LM targets (``None`` when a custom ``loss_fn`` is used and none were given);
    ``full`` is the user's mapping, handed to a custom ``loss_fn``.
    """

    model_inputs: Dict[str, Any]
    labels: Optional[torch.Tensor]
    full: Dict[str, Any]
    batch_size: int
    seq_len: int
    seq2seq: bool = False  # labels are decoder targets, aligned with the logits (no causal shift)

    def per_sample_keys(self) -> Dict[str, bool]:
        """Which entries of ``full`` carry the batch on dim 0 (sliced per sample)."""
        return {k: _is_per_sample(v, self.batch_size) for k, v in self.full.items()}

    def select(self, index: torch.Tensor | slice) -> "PreparedBatch":
        """The sub-batch at ``index`` (a slice or an index tensor) along dim 0."""
        full = {k: (v[index] if _is_per_sample(v, self.batch_size) else v) for k, v in self.full.items()}
        ids = full["input_ids"]
        labels = self.labels[index] if self.labels is not None else None
        return PreparedBatch(
            model_inputs={k: v for k, v in full.items() if k != "labels"},
            labels=labels,
            full=full,
            batch_size=ids.shape[0],
            seq_len=self.seq_len,
            seq2seq=self.seq2seq,
        )


def _is_per_sample(v: Any, batch_size: int) -> bool:
    """A tensor whose dim 0 is the batch (a [1, T] ``position_ids`` broadcast is not, unless B == 1)."""
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size


def prepare_batch(batch: Mapping[str, Any], lm_loss: bool, seq2seq: bool = False) -> PreparedBatch:
    """Validate ``batch`` and build the LM labels.

    ``seq2seq`` (an encoder-decoder model, ``config.is_encoder_decoder``): ``input_ids`` go to the encoder and
    ``labels`` (B, T_dec), required, are the decoder's targets, aligned with its logits (no causal shift; the
    decoder inputs are the labels shifted right, :func:`add_decoder_inputs`).
    Raises ``TypeError``/``ValueError`` with a message that says what to fix.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping with 'input_ids' (got {type(batch).__name__})")
    if "input_ids" not in batch:
        raise ValueError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"batch['input_ids'] must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] must have shape [B, T], got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"batch['input_ids'] must hold integer token ids, got dtype {ids.dtype}")
    B, T = ids.shape
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"batch['attention_mask'] must have the shape of input_ids {(B, T)}, got {shape}")
    labels = batch.get("labels")
    if lm_loss and seq2seq:
        from .errors import UsageError

        if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[0] != B:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise UsageError(
                f"an encoder-decoder model (config.is_encoder_decoder) is scored on its decoder's targets: the batch "
                f"needs 'labels' of shape [B, T_dec] = [{B}, T_dec] (-100 where ignored), got {got}; 'input_ids' go "
                "to the encoder (records: 'prompt' -> encoder, 'response' -> labels)")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"batch['labels'] must hold integer token ids or -100, got dtype {labels.dtype}")
    elif lm_loss:
        if labels is None:
            labels = default_labels(ids, mask)
        else:
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T):
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"batch['labels'] must have the shape of input_ids {(B, T)}, got {shape}")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise TypeError(f"batch['labels'] must hold integer token ids or -100, got dtype {labels.dtype}")
    full = {k: _usable(v) for k, v in batch.items()}
    if ids.dtype != torch.long:  # int32 / uint8 ids: embeddings and the loss need int64
        full["input_ids"] = full["input_ids"].long()
    if isinstance(labels, torch.Tensor) and labels.dtype != torch.long:
        labels = labels.long()
        if "labels" in full:
            full["labels"] = labels
    pos = full.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 1:
        if pos.shape[0] != T:
            raise ValueError(f"batch['position_ids'] of shape {tuple(pos.shape)}: a 1-D position_ids must have "
                             f"length T = {T} (one vector shared by the batch), or pass shape [B, T]")
        full["position_ids"] = pos.unsqueeze(0)  # (1, T): one meaning in every backend, shared by the batch
    labels = _usable(labels)
    return PreparedBatch(
        model_inputs={k: v for k, v in full.items() if k != "labels"},
        labels=labels,
        full=full,
        batch_size=B,
        seq_len=T,
        seq2seq=seq2seq and lm_loss,
    )


def is_encoder_decoder(model: Any) -> bool:
    """Whether the model's (HF) config says it is an encoder-decoder model (BART, T5, ...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def prepare_for(model: Any, batch: Mapping[str, Any], loss_fn: Optional[LossFn] = None) -> PreparedBatch:
    """:func:`prepare_batch` for ``model``: the seq2seq loss (and the decoder's inputs) when its config says
    ``is_encoder_decoder`` and no custom ``loss_fn`` is given, else the causal LM loss (or ``loss_fn``)."""
    seq2seq = loss_fn is None and is_encoder_decoder(model)
    return add_decoder_inputs(prepare_batch(batch, lm_loss=loss_fn is None, seq2seq=seq2seq), model)


def add_decoder_inputs(prepared: PreparedBatch, model: Any) -> PreparedBatch:
    """The decoder's inputs of a seq2seq batch: the labels shifted right by the model's own
    ``prepare_decoder_input_ids_from_labels`` (the decoder start token, -100 as padding), unless the batch
    gives ``decoder_input_ids``. Refused when the model has neither."""
    if not prepared.seq2seq or "decoder_input_ids" in prepared.full:
        return prepared
    make = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if make is None:
        from .errors import UsageError

        raise UsageError(
            f"{type(model).__name__} is an encoder-decoder model without prepare_decoder_input_ids_from_labels: pass "
            "'decoder_input_ids' (the labels shifted right, starting with the decoder start token) in the batch")
    dec = make(labels=prepared.labels)  # (B, T_dec)
    if not isinstance(dec, torch.Tensor) or tuple(dec.shape) != tuple(prepared.labels.shape):
        from .errors import UsageError

        raise UsageError(f"{type(model).__name__}.prepare_decoder_input_ids_from_labels gave "
                         f"{getattr(dec, 'shape', type(dec).__name__)} for labels {tuple(prepared.labels.shape)}: "
                         "pass 'decoder_input_ids' in the batch")
    prepared.full["decoder_input_ids"] = dec
    prepared.model_inputs["decoder_input_ids"] = dec
    return prepared


def _usable(v: Any) -> Any:
    """Tensors made under ``torch.inference_mode()`` cannot enter autograd: copy them out of it."""
    if isinstance(v, torch.Tensor) and v.is_inference():
        with torch.inference_mode(False):
            return v.clone()
    return v


def default_labels(ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Targets = the ids, with -100 where the token is padding or is predicted from padding.

    Logits at t predict the token at t+1, so a token counts only if it and its predecessor are
    attended. With right padding this just drops padding; with left padding it also drops the first
    real token, which (like the first token of any unpadded sample) has no context to be predicted from.
    """
    labels = ids.clone()
    if mask is None:
        return labels
    keep = mask != 0  # (B, T)
    keep[:, 1:] &= mask[:, :-1] != 0
    return labels.masked_fill(~keep, IGNORE_INDEX)


def extract_logits(outputs: Any) -> torch.Tensor:
    """Logits from a plain tensor, an HF ``ModelOutput``/dict with ``logits``, or a tuple's first item."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"the model returned {type(outputs).__name__} with no logits; pass loss_fn=(outputs, batch) -> "
            "per-sample loss tensor [B] to score it"
        )
    return logits


def causal_lm_losses(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample causal-LM loss and target-token count.

    logits: (B, T, V) any float dtype; labels: (B, T) with -100 ignored.
    Returns (losses (B,) fp32 (fp64 for fp64 logits), tokens (B,) int64). A sample with no target
    token gets loss 0 (and hence gradient 0), never NaN.
    """
    B, T = labels.shape
    if logits.dim() != 3 or logits.shape[:2] != (B, T):
        raise ValueError(f"logits must have shape [B, T, V] = [{B}, {T}, V], got {tuple(logits.shape)}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if T < 2:
        zeros = logits.sum(dim=(1, 2)).to(acc) * 0.0  # keeps the graph, value 0
        return zeros, torch.zeros(B, dtype=torch.int64, device=labels.device)
    shift_logits = logits[:, :-1].to(acc)  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(B, T - 1)  # (B, T-1), 0 where ignored
    tokens = (shift_labels != IGNORE_INDEX).sum(dim=1)  # (B,)
    sums = tok.sum(dim=1)  # (B,)
    if reduction == "sum":
        return sums, tokens
    return sums / tokens.clamp(min=1).to(acc), tokens


def seq2seq_lm_losses(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss of an encoder-decoder model: the decoder's logits at t predict ``labels`` at t (no
    shift). logits: (B, T_dec, V); labels: (B, T_dec) with -100 ignored. Returns (losses (B,), tokens (B,)), a
    sample without a target token has loss 0."""
    B, T = labels.shape
    if logits.dim() != 3 or logits.shape[:2] != (B, T):
        raise ValueError(f"decoder logits must have shape [B, T_dec, V] = [{B}, {T}, V], got {tuple(logits.shape)}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tok = F.cross_entropy(logits.to(acc).reshape(B * T, -1), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(B, T)  # (B, T_dec), 0 where ignored
    tokens = (labels != IGNORE_INDEX).sum(dim=1)  # (B,)
    sums = tok.sum(dim=1)  # (B,)
    if reduction == "sum":
        return sums, tokens
    return sums / tokens.clamp(min=1).to(acc), tokens


def per_sample_losses(
    outputs: Any, batch: PreparedBatch, loss_fn: Optional[LossFn], reduction: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses (B,) and target-token counts (B,) for the model ``outputs`` on ``batch``.

    With a custom ``loss_fn`` the token count is the number of attended positions
    (``attention_mask`` sum, or T without a mask).
    """
    B = batch.batch_size
    if loss_fn is None:
        if batch.seq2seq:
            return seq2seq_lm_losses(extract_logits(outputs), batch.labels, reduction)
        return causal_lm_losses(extract_logits(outputs), batch.labels, reduction)
    losses = loss_fn(outputs, batch.full)
    if not isinstance(losses, torch.Tensor) or losses.shape != (B,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return a per-sample loss tensor of shape [B] = [{B}], got {shape}")
    mask = batch.full.get("attention_mask")
    ids = batch.full["input_ids"]
    tokens = mask.sum(dim=1).long() if mask is not None else torch.full((B,), ids.shape[1], dtype=torch.int64)
    acc = torch.float64 if losses.dtype == torch.float64 else torch.float32
    return losses.to(acc), tokens.to(ids.device)
