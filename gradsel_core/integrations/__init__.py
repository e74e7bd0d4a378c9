"""Integrations with training frameworks (optional extras; each imports its framework lazily).

``gradsel_core.integrations.hf``  (``pip install gradsel[hf]``): ``GradSelMixin`` (in-step filtering for any
``transformers.Trainer`` subclass), ``GradSelTrainer`` (the mixin over ``Trainer``), ``SelectionConfig`` and
``select_dataset`` for offline selection of a whole dataset.

``gradsel_core.integrations.trl``  (``pip install gradsel[trl]``): ``GradSelSFTTrainer``, TRL's ``SFTTrainer``
with the mixin.

``gradsel_core.integrations.fsdp``  (torch only): FSDP2 ``fully_shard`` helpers -- ``shard_decoder_layers``,
``load_sharded`` (read on rank 0, shard, broadcast) -- for scoring and two-pass filtering of models larger than
one device.
"""
