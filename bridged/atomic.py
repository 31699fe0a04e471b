"""File replacement that a crash cannot tear: the one way bridged writes state files.

A reader (or the next boot after a power cut) sees the old file or the new
one, never a mix: the data goes to a temporary file in the same directory
(``.<name>.<random><suffix>``, mode 0600 from mkstemp unless asked), is
flushed and fsynced, renamed over the target (atomic within one file
system), and the directory is fsynced so the rename itself is durable.

``write_atomic`` does it for data in memory (the store, the PKI, OTA's
version records, the fleet manifest).  ``Replacement`` is the same in steps,
for content that arrives in pieces and is checked before it may replace the
target (an OTA image: downloaded, fsynced, verified, then renamed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["write_atomic", "fsync_dir", "Replacement"]


class Replacement:
    """The new content of ``target``, written in pieces; it replaces the target only at ``rename()``.

    Used as a context manager, an exception inside it (a failed write, a
    cancellation) discards the temporary file; leaving it normally keeps the
    file for a later ``rename()`` or ``discard()``.

    Raises:
        OSError: the temporary file cannot be made (from the constructor).
    """

    def __init__(self, target: Path, suffix: str = ".tmp", mode: int = 0o600) -> None:
        self.target = target
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
        self.path = Path(name)  # the temporary file
        self.renamed = False
        try:
            if mode != 0o600:
                os.fchmod(fd, mode)
            self._file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise

    def __enter__(self) -> "Replacement":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            self.discard()

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def finish(self, durable: bool = True) -> None:
        """Flush, fsync (unless not ``durable``) and close the temporary file.

        Blocking: on an SD card the fsync may take a while (run it in a thread from a loop)."""
        if self._file.closed:
            return
        try:
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def rename(self) -> None:
        """Put the finished file in the target's place; ``fsync_dir`` of its folder makes that durable."""
        os.replace(self.path, self.target)
        self.renamed = True

    def commit(self, durable: bool = True) -> None:
        """``finish``, ``rename`` and fsync the directory: the target is the new content, durably."""
        self.finish(durable)
        self.rename()
        if durable:
            fsync_dir(self.target.parent)

    def discard(self) -> None:
        """Close and remove the temporary file (nothing once it was renamed)."""
        if not self._file.closed:
            self._file.close()
        if not self.renamed:
            self.path.unlink(missing_ok=True)


def write_atomic(target: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``target`` with ``data``; a failure leaves the old file and no temporary one.

    ``durable=False`` skips the fsyncs: still never a torn file for a reader, but
    a power cut may leave the old content (a status file such as fleet.json)."""
    with Replacement(target, mode=mode) as new:
        new.write(data)
        new.commit(durable)


def fsync_dir(directory: Path) -> None:
    """Make the renames and unlinks done in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
