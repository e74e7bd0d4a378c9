"""TRL integration: ``GradSelSFTTrainer``, TRL's ``SFTTrainer`` with in-step gradient-norm selection.

    from gradsel_core.integrations.trl import GradSelSFTTrainer     # pip install 'gradsel[trl]'
    trainer = GradSelSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=lora,
                                selection={"policy": "median_band", "ratio": 0.2})
    trainer.train()

Everything :class:`~gradsel_core.integrations.hf.GradSelMixin` documents holds. With a prompt/completion
dataset TRL's collator labels the prompt tokens -100 (``completion_only_loss``, TRL's default), so each
sample's loss -- and its gradient norm -- is over its completion only. SFTTrainer's own loss and the
metrics it computes there (``entropy``, ``mean_token_accuracy``, ``num_tokens``) are not computed on the
filtered steps. Packed batches (``packing=True``, ``padding_free=True``) are refused: a packed row mixes
samples, so its norm is no sample's.
"""
from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gradsel_core.integrations.trl needs trl: pip install 'gradsel[trl]'") from e

from .hf import GradSelMixin

__all__ = ["GradSelSFTTrainer"]


class GradSelSFTTrainer(GradSelMixin, SFTTrainer):
    """``trl.SFTTrainer`` with in-step gradient-norm selection (see :class:`GradSelMixin`).

    Args:
        selection: a :class:`~gradsel_core.SelectionConfig`, a dict of its fields, or ``None`` (plain
            ``SFTTrainer``).
        *args, **kwargs: those of ``trl.SFTTrainer``.
    """
