"""The safety-drift study: the synthetic alignment testbed, its evaluation and the experiment runner.

The engine, rules, store and selection never import this subpackage (the trainer and `gradsel train` use its
evaluation functions); it is the showcase built on them (``gradsel demo``), kept apart so the core reads on its own.

- :mod:`gradsel_core.study.testbed`: the synthetic instruction language, pretraining and continual tasks;
- :mod:`gradsel_core.study.evaluation`: refusal rate / ASR, multiple-choice log-likelihood, exact match,
  BWT / forgetting;
- :mod:`gradsel_core.study.experiment`: the study's cells, runs, report and plots.
"""
