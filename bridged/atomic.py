"""Durable file replacement: the one way bridged writes state files.

A reader (or the next boot after a power cut) sees the old file or the new
one, never a mix: the data goes to a temporary file in the same directory
(mode 0600, from mkstemp), is flushed and fsynced, renamed over the target
(atomic within one file system), and the directory is fsynced so the rename
itself is durable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic", "fsync_dir"]


def write_atomic(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data`` durably; a failure leaves the old file and no temporary one."""
    directory = target.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make the renames and unlinks done in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
