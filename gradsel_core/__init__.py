"""gradsel: exact per-sample gradient norms at the cost of one backward, and the gradient-based sample
selection built on them (arXiv 2604.17215, "Continual Safety Alignment via Gradient-Based Sample Selection").

    import gradsel_core as gs
    res = gs.GradNormEngine(model).score(batch)   # res.norms, res.losses, res.tokens
"""
import importlib
import importlib.util
from typing import Any

from .errors import (GradselError, LayoutError, StoreConflictError, StoreError, UnsupportedModule, UsageError,
                     VerificationError)

# everything else is imported on first use (PEP 562), so `gradsel --help`, `inspect` and `select` start
# without importing torch
_LAZY = {
    "GradNormEngine": "engine", "ScoreResult": "engine", "per_sample_grad_norms": "engine",
    "Dense": "factors", "EmbRows": "factors", "Factor": "factors", "Grouped": "factors", "Outer": "factors",
    "RowSum": "factors", "Sliced": "factors", "Stacked": "factors",
    "FilteredBackward": "filtered", "FilteredResult": "filtered", "TwoPassFilteredBackward": "filtered",
    "filtered_backward": "filtered",
    "ModuleCall": "rules", "NormRule": "rules", "register_norm_rule": "rules",
    "ReferenceGradient": "reference", "reference_gradient": "reference",
    "score_dataset": "scoring", "ScoreStore": "store",
    "Selection": "selection", "SelectionConfig": "selection", "keep_mask": "selection", "select": "selection",
    "ContinualResult": "trainer", "ContinualTrainer": "trainer", "LoRAConfig": "trainer", "Task": "trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # a submodule (gs.models, gs.filtered, gs.trainer, ...), as an eagerly importing package would have it
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"models"})


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
