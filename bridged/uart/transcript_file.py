"""The AT transcript's file: opened safely, rotated, written off the loop.

`RotatingFile` appends lines to a file that is never followed through a
symbolic link nor handed to another reader, and rotates it by size.
`FileWriter` writes it from a thread of its own: the front's loop must never
wait on a disk (an NFS server gone away, a disk slower than the UART), so it
hands lines over and looks at `FileWriter.backlog` to know when to stop.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import deque
from typing import Iterable

__all__ = ["RotatingFile", "FileWriter"]

# The path may lie in a folder other users can write to (/tmp): never follow a
# symbolic link planted there, never wait for a FIFO's reader (open() would
# block until one comes), never make the file some terminal's controlling tty.
_OPEN_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
               | os.O_NOCTTY | os.O_NONBLOCK)
_REFUSED = {  # what open() says, in words that tell what to change
    errno.ELOOP: "a symbolic link (refused: give the file's own path)",
    errno.ENXIO: "a FIFO (refused: the transcript must be a regular file or a device)",
    errno.EEXIST: "made by someone else while the transcript rotated (refused)",
}


def _check_opened(path: str, info: os.stat_result) -> None:
    """Refuse a file that would carry payloads to someone else.

    Raises:
        OSError: a FIFO or socket (its reader gets every byte), another
            user's file (they could read it whatever its mode), or a file
            with other hard links (writing it would change another file).
    """
    if stat.S_ISCHR(info.st_mode):
        return  # /dev/null and the like: only root makes device nodes
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "neither a regular file nor a device (refused)", path)
    if info.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"owned by uid {info.st_uid}, not by bridged's user (refused)", path)
    if info.st_nlink > 1:
        raise OSError(errno.EPERM, "has other hard links (refused: writing it would change another file)",
                      path)


class RotatingFile:
    """Appends text to a file of at most ``max_bytes``, keeping ``files`` files.

    At the cap the file becomes ``<path>.1`` (``.1`` becomes ``.2`` ... and
    ``.<files-1>`` is dropped) and a new one starts; with ``files`` = 1 the
    file starts over.  A line is never split across two files.  Only a
    regular file of this user's is rotated or has its mode set; a character
    device (/dev/null) is written as it is; a symbolic link, a FIFO, another
    user's file and the like are refused (`_check_opened`).

    Raises:
        OSError: the file cannot be opened (at construction) or written.
    """

    def __init__(self, path: str, max_bytes: int, files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.files = files
        self.regular = True
        self._fd = self._open()
        self.size = os.fstat(self._fd).st_size

    def _open(self, new: bool = False) -> int:
        flags = _OPEN_FLAGS | (os.O_EXCL if new else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            raise OSError(exc.errno, _REFUSED[exc.errno], self.path) from None
        try:
            info = os.fstat(fd)
            self.regular = stat.S_ISREG(info.st_mode)
            _check_opened(self.path, info)
            if self.regular:
                os.fchmod(fd, 0o600)  # an older file of ours keeps no wider mode
            os.set_blocking(fd, True)  # only the open had to be non-blocking
        except OSError:
            os.close(fd)
            raise
        return fd

    def write_lines(self, lines: list[str] | Iterable[str]) -> None:
        """Append whole lines (ASCII, each ending in ``\\n``), rotating at the cap."""
        if not isinstance(lines, list):
            lines = list(lines)
        total = sum(map(len, lines))
        if self.size + total <= self.max_bytes or not self.regular:
            self._write("".join(lines))  # the usual case: no line-by-line look
            return
        batch: list[str] = []
        size = self.size
        for line in lines:
            if size + len(line) > self.max_bytes and size > 0 and self.regular:
                self._write("".join(batch))
                batch = []
                self._rotate()
                size = 0
            batch.append(line)
            size += len(line)
        self._write("".join(batch))

    def _write(self, text: str) -> None:
        view = memoryview(text.encode("ascii"))
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self.size += n

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        names = [self.path, *(f"{self.path}.{i}" for i in range(1, self.files))]
        for older, newer in reversed(list(zip(names, names[1:]))):  # the oldest first
            try:
                os.replace(older, newer)  # a link at newer is replaced, never followed
            except FileNotFoundError:
                pass  # not there yet, or removed meanwhile: nothing to keep
        if self.files == 1:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        # Exclusive: whatever stands at the path now, someone else put there.
        self._fd = self._open(new=True)
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileWriter:
    """Writes lines to a `RotatingFile` from a thread of its own.

    `put` never waits; `backlog` counts the characters handed over and not
    yet written, for the caller to stop handing over (nothing here drops).
    A failed write ends the thread and stays in `error` for the caller to
    see; the file is closed by the thread, which only ever touches it.
    """

    def __init__(self, file: RotatingFile) -> None:
        self.backlog = 0  # written by the thread under _cond, read by the loop without
        self.error: OSError | None = None
        self._file = file
        self._batches: deque[list[str]] = deque()
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="transcript", daemon=True)
        self._thread.start()

    def put(self, lines: list[str]) -> None:
        size = sum(map(len, lines))
        with self._cond:
            self._batches.append(lines)
            self.backlog += size
            self._cond.notify()

    def close(self, timeout: float) -> bool:
        """Write what was handed over and close; False if that took over ``timeout`` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()  # a daemon thread: a stuck write cannot keep the process

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._batches or self._closing):
                        self._cond.wait()
                    if not self._batches:
                        return  # closing, and everything is written
                    lines = [line for batch in self._batches for line in batch]
                    self._batches.clear()
                size = sum(map(len, lines))
                self._file.write_lines(lines)
                with self._cond:
                    self.backlog -= size
        except OSError as exc:
            self.error = exc
        finally:
            try:
                self._file.close()
            except OSError:
                pass  # nothing more can be lost; a write error, if any, is in self.error
