"""FSDP2 (``torch.distributed.fsdp.fully_shard``): score and filter models larger than one device.

    import torch.distributed as dist
    from gradsel_core.integrations.fsdp import shard_decoder_layers
    dist.init_process_group("nccl"); torch.cuda.set_device(local_rank)
    model = shard_decoder_layers(model)          # fully_shard on every decoder layer, then on the root
    model, tok = load_sharded("/models/llama-70b", dtype="bfloat16")   # or: read on rank 0, shard, broadcast
    store = gs.score_dataset(model, records, "scores/")                  # every rank, same arguments
    res = gs.filtered_backward(model, batch, mode="two_pass")            # in-step selection, then opt.step()
    dist.destroy_process_group()                                         # before exit, on every rank

Why the norms stay exact: the ghost engine reads each layer's input activations and output gradients,
which FSDP does not shard (it shards parameters, gradients and optimizer state). The scored forward and
the activation backward run FSDP's own all-gathers; no weight gradient is computed, so no
reduce-scatter runs while scoring.

Scoring under FSDP: every rank runs the forward of every batch collectively with the others (the
all-gathers pair up layer by layer), so ranks score disjoint shards but the same *number* of batches;
:func:`gradsel_core.score_dataset` pads a rank that has fewer batches with forwards whose results are
discarded (:func:`pad_collective_forwards`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence

import torch
from torch import nn

from ..errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["decoder_layers", "shard_decoder_layers", "load_sharded", "is_sharded", "unsharded_class_name", "FullParams", "pad_collective_forwards"]


def is_sharded(model_or_params: Any) -> bool:
    """True when a parameter of ``model_or_params`` (a module or a ``{name: param}`` mapping) is a DTensor."""
    from ..filtered import sharded_param_names

    params = (dict(model_or_params.named_parameters()) if isinstance(model_or_params, nn.Module)
              else dict(model_or_params))
    return bool(sharded_param_names(params))


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks of ``model`` to shard one by one.

    HF models name them in ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``...); otherwise the
    items of the largest ``nn.ModuleList`` (e.g. ``TinyGPT.blocks``). Raises ``UsageError`` when neither
    exists."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        return list(max(lists, key=len))
    raise UsageError(
        f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules, no nn.ModuleList); "
        "call torch.distributed.fsdp.fully_shard on its blocks yourself, then on the model"
    )


def shard_decoder_layers(model: nn.Module, mesh: Any = None, reshard_after_forward: bool = True,
                         mp_policy: Any = None) -> nn.Module:
    """``fully_shard`` every decoder layer of ``model``, then the model itself (in place; returned).

    Needs ``torch.distributed`` initialised (``torchrun``). ``mesh``: a 1-D ``DeviceMesh`` (default: all
    ranks, on CUDA when available); ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy``. The model's
    parameters must be on the device of the mesh (``model.to(f"cuda:{local_rank}")``, or on ``meta`` and
    materialised after sharding)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("FSDP sharding needs torch.distributed: start with torchrun (or init_process_group) first")
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        raise UsageError(f"{type(model).__name__} is sharded already (its parameters are DTensors)")
    kw: Dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kw["mesh"] = mesh
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    log.info("fully_shard: %d decoder layers (%s) and the root over %d ranks", len(layers),
             type(layers[0]).__name__, dist.get_world_size())
    return model


def unsharded_class_name(model: nn.Module) -> str:
    """The model's own class name: ``fully_shard`` swaps the class for a subclass ``FSDP<Name>``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return type(model).__name__
    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls.__name__
    return type(model).__name__  # pragma: no cover - FSDPModule itself is never the whole model


class FullParams(Mapping):
    """``{name: whole tensor}`` over ``params`` that gathers a DTensor shard only when it is read (one
    at a time, never the whole model). Shapes, dtypes and ``numel`` of a DTensor are already global.
    Every rank must read the same names in the same order (each read is a collective)."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.params = params

    def __getitem__(self, name: str) -> torch.Tensor:
        p = self.params[name]
        full = getattr(p, "full_tensor", None)
        return full() if callable(full) else p

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def pad_collective_forwards(engine: Any, batches_per_rank: Sequence[int], rank: int,
                            make_batch: Callable[[], Mapping[str, torch.Tensor]]) -> int:
    """Make this rank run as many scored forwards as the busiest rank: FSDP's all-gathers pair up across
    ranks, so a rank that stopped early would leave the others waiting forever. ``batches_per_rank``: the
    number of batches each rank scores (known to all ranks from the batch plan). Scores ``make_batch()``
    (results discarded) as often as needed; returns that number."""
    extra = max(batches_per_rank) - batches_per_rank[rank]
    if extra > 0:
        batch = make_batch()
        for _ in range(extra):
            engine.score(batch)
        log.debug("rank %d: %d padding forward(s) to match the other ranks' FSDP collectives", rank, extra)
    return extra


def load_sharded(spec: str, dtype: Any = None) -> Any:
    """``(model, tokenizer)`` of the local HF causal-LM directory ``spec``, sharded with
    :func:`shard_decoder_layers`, reading the checkpoint on rank 0 only: the other ranks build the model on
    the ``meta`` device (no memory), then rank 0's weights are broadcast shard by shard
    (``set_model_state_dict(..., broadcast_from_rank0=True)``) and its buffers (rotary tables) copied.
    Host memory: one copy of the model, on rank 0. A PEFT adapter directory is loaded on every rank
    (:func:`gradsel_core.data.load_model_and_tokenizer`) before sharding. ``dtype`` as in that function."""
    import os

    import torch.distributed as dist

    from ..data import load_model_and_tokenizer

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("FSDP sharding needs torch.distributed: start with torchrun (or init_process_group) first")
    if spec == "tiny" or os.path.exists(os.path.join(spec, "adapter_config.json")) or not os.path.isdir(spec):
        model, tok = load_model_and_tokenizer(spec, dtype=dtype, device="cpu")
        return shard_decoder_layers(model), tok
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    rank = dist.get_rank()
    if rank == 0:
        model, tok = load_model_and_tokenizer(spec, dtype=dtype, device="cpu")
        full = model.state_dict()  # the CPU weights, kept while fully_shard moves each rank's shard
        want = next(model.parameters()).dtype
    else:
        tok = AutoTokenizer.from_pretrained(spec)
        full = {}
        want = None
    want = _broadcast_object(want)
    if rank != 0:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec), dtype=want)
    shard_decoder_layers(model)
    device = next(iter(model.parameters())).to_local().device if rank == 0 else None
    device = _broadcast_object(str(device) if device is not None else None)
    if rank != 0:
        target = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        model.to_empty(device=target)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for buf in model.buffers():  # non-persistent buffers (rotary tables) are not in the state dict
        dist.broadcast(buf, src=0)
    model.eval()
    return model, tok


def _broadcast_object(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
