"""Integrations with training frameworks (optional extras; each imports its framework lazily).

``gradsel_core.integrations.hf``  (``pip install gradsel[hf]``): ``GradSelTrainer``, a drop-in
``transformers.Trainer`` that filters every batch in its training step, ``SelectionConfig`` and
``select_dataset`` for offline selection of a whole dataset.
"""
