"""Atomic file writes, shared by checkpoints, converted datasets and cached weights.

A file written here is either absent, its old version, or complete: never truncated, whenever
the process is killed.
"""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

__all__ = ["write_atomically"]


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a local file so that ``path`` holds either its old content or all of the new.

    ``write(f)`` fills a temporary file in the same folder (named ``.<name>.<random>.tmp``,
    so neither Detectron2's ``*.pth`` listing nor ``last_checkpoint`` can pick it up), which
    is flushed, ``fsync``-ed and then renamed onto ``path`` with ``os.replace`` (atomic on
    POSIX and Windows within one file system); the folder is ``fsync``-ed too where the OS
    allows, so the rename survives a power cut. A process killed at any moment (SIGKILL)
    leaves ``path`` untouched or complete, and at worst a stray ``.tmp`` file.

    Args:
        path (str): destination on a local file system.
        write: called once with the open binary temporary file.

    Raises:
        Whatever ``write`` or the file system raises (``OSError``: e.g. disk full); the
        temporary file is removed then and ``path`` keeps its old content.
    """
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a plain open() would give 0644
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable (not possible on Windows)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
