"""gradsel: exact per-sample gradient norms at the cost of one backward, and the gradient-based sample
selection built on them (arXiv 2604.17215, "Continual Safety Alignment via Gradient-Based Sample Selection").

    import gradsel_core as gs
    res = gs.GradNormEngine(model).score(batch)   # res.norms, res.losses, res.tokens
"""
from . import models
from .engine import GradNormEngine, ScoreResult, per_sample_grad_norms
from .errors import (GradselError, LayoutError, StoreConflictError, StoreError, UnsupportedModule, UsageError,
                     VerificationError)
from .factors import Dense, EmbRows, Factor, Grouped, Outer, RowSum, Sliced, Stacked
from .filtered import FilteredBackward, FilteredResult, TwoPassFilteredBackward, filtered_backward
from .rules import ModuleCall, NormRule, register_norm_rule
from .reference import ReferenceGradient, reference_gradient
from .scoring import score_dataset
from .store import ScoreStore
from .selection import Selection, SelectionConfig, keep_mask, select
from .trainer import ContinualResult, ContinualTrainer, LoRAConfig, Task

__version__ = "0.1.0"

__all__ = [
    "GradNormEngine",
    "ScoreResult",
    "per_sample_grad_norms",
    "register_norm_rule",
    "ModuleCall",
    "NormRule",
    "Factor",
    "Outer",
    "RowSum",
    "EmbRows",
    "Dense",
    "Stacked",
    "Sliced",
    "Grouped",
    "GradselError",
    "UsageError",
    "UnsupportedModule",
    "LayoutError",
    "VerificationError",
    "score_dataset",
    "reference_gradient",
    "ReferenceGradient",
    "ScoreStore",
    "StoreError",
    "StoreConflictError",
    "select",
    "keep_mask",
    "Selection",
    "SelectionConfig",
    "ContinualTrainer",
    "ContinualResult",
    "LoRAConfig",
    "Task",
    "filtered_backward",
    "FilteredBackward",
    "FilteredResult",
    "TwoPassFilteredBackward",
    "models",
    "__version__",
]
