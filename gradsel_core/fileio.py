"""Atomic writes, the one way gradsel writes a file or folder that must never be seen half-written.

Everything goes to a temp path beside the target (same directory, so ``os.replace`` is atomic), is
fsynced, moved over the target, and the directory is fsynced. A failure removes the temp path and leaves
any earlier target as it was. Temp names start with :data:`TMP_PREFIX`, which the score store recognises
as its own leftovers after a kill.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Callable, Iterator, Optional, TextIO

__all__ = ["TMP_PREFIX", "atomic_path", "atomic_write", "atomic_text", "fsync_dir", "normal_permissions"]

TMP_PREFIX = ".gradsel-tmp-"

# turns an OSError of the write into the error the caller's user should see (None: raise it as is)
ErrorFn = Optional[Callable[[OSError], BaseException]]


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries), quietly where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def normal_permissions(path: str) -> None:
    """Give ``path`` the mode a plain ``open()`` would (``0666 & ~umask``): safetensors and mkstemp write 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_path(path: str, error: ErrorFn = None, permissions: bool = True) -> Iterator[str]:
    """Yield a temp path beside ``path``; the block writes a file or a folder there. When the block ends
    without error the temp path is fsynced (a file's data; a folder's files) and moved over ``path`` (an
    earlier folder there is replaced whole); otherwise it is removed. ``permissions``: files get the mode a
    plain ``open()`` gives. ``error``: maps an OSError to the exception to raise instead."""
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f"{TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if os.path.isdir(tmp):
            for f in os.listdir(tmp):
                fp = os.path.join(tmp, f)
                if os.path.isfile(fp):
                    if permissions:
                        normal_permissions(fp)
                    _fsync_file(fp)
            if os.path.isdir(path) and not os.path.islink(path):  # os.replace cannot replace a non-empty folder
                old = os.path.join(d, f"{TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            if permissions:
                normal_permissions(tmp)
            _fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and error is not None:
            raise error(e) from e
        raise
    fsync_dir(d)


def atomic_write(path: str, data: bytes, error: ErrorFn = None) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path, error) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def atomic_text(path: str, error: ErrorFn = None) -> Iterator[TextIO]:
    """Stream text to ``path`` atomically: the file appears whole when the block ends, or not at all."""
    with atomic_path(path, error) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
