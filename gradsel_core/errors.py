"""Every error gradsel raises on purpose, under one root.

::

    GradselError                      what a user can fix; the message names the cause and the way out
    ├── UsageError (ValueError)       a bad argument, file or record
    ├── StoreError (RuntimeError)     a score store is unreadable or busy
    ├── StoreConflictError            ``out_dir`` holds another run's scores, or files that are not a store's
    └── UnsupportedModule             the engine cannot score this model exactly with this backend
        ├── LayoutError               a tensor's dim 0 is not the batch and no row -> sample map is known
        └── VerificationError         the fast norms disagree with a per-sample backward

The CLI prints a ``GradselError`` as one line, ``gradsel <cmd>: error: <cause>``, and exits 2 (``--debug``
shows the traceback). The message names the record, file, argument or module at fault and says what to do.
"""
from __future__ import annotations

__all__ = ["GradselError", "UsageError", "StoreError", "StoreConflictError", "UnsupportedModule", "LayoutError",
           "VerificationError"]


class GradselError(Exception):
    """An error the user can fix; its message names the cause and the way out."""


class UsageError(GradselError, ValueError):
    """A bad argument, file or record (also a ``ValueError``, for callers that catch that)."""


class StoreError(GradselError, RuntimeError):
    """A score store is unreadable or busy: a missing, truncated or corrupted file (named in the message)."""


class StoreConflictError(GradselError, RuntimeError):
    """``out_dir`` holds scores of another model, config or dataset, or files that are not a store's."""


class UnsupportedModule(GradselError, RuntimeError):
    """The engine cannot score this module exactly with the chosen backend; the message says what to do."""


class LayoutError(UnsupportedModule):
    """A tensor's dim 0 is not the batch and no row -> sample map is known for it."""


class VerificationError(UnsupportedModule):
    """The fast norms disagree with a per-sample backward beyond the dtype's tolerance."""
