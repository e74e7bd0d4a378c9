"""User-facing errors.

``GradselError`` is what a user can fix: bad input, a refused store, a wrong argument. The CLI prints it as
one line, ``gradsel <cmd>: error: <cause>``, and exits 2 (``--debug`` shows the traceback). The message
names the record, file or argument at fault and says what to do next.
"""
from __future__ import annotations


class GradselError(Exception):
    """An error the user can fix; its message names the cause and the way out."""


class UsageError(GradselError, ValueError):
    """A bad argument, file or record (also a ``ValueError``, for callers that catch that)."""
