"""Following a device's AT transcript file while it is written, for tests.

The file's format is ``bridged.uart.transcript``'s: one line per up to 32
bytes from (``RX``) or to (``TX``) the MCU, and one per mark (``--``: a
command recognised, a link connected, a boot, a fault...).  `TranscriptFollower`
reads what was appended since its last look (across rotations: the file
it reads stays open until read to its end, then the one that replaced it is
read from its start), rebuilds the two byte streams
and lists the marks; a search consumes what it matched, so successive
waits find successive events (as pexpect does), and each of the three
(marks, RX, TX) has its own cursor.

Memory is bounded whatever the test's length: each stream keeps its last
`KEEP_BYTES` bytes and the list its last `KEEP_MARKS` marks (consumed or
not); a wait finds what is among those.  A mark's ``rx`` and ``tx`` count
every byte since the transcript began, dropped ones included.

A mark's text is the line after ``-- ``: the kind, then ``key=value``
fields, e.g. ``command name=AT+CIPSEND kind=set``; patterns are regular
expressions searched in it.  A mark kind this version does not know (a newer
daemon's) is read all the same.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bridged.uart.transcript_format import Direction, parse_line

__all__ = ["KEEP_BYTES", "KEEP_MARKS", "TranscriptFollower", "TranscriptMark"]

_MARK = re.compile(r"\S+ (\d+\.\d+) -- (\w+)(.*)")
_FIELD = re.compile(r" (\w+)=(\"(?:[^\"\\]|\\.)*\"|\S+)")
_READ_MAX = 4 * 1024 * 1024  # per look: a bounded bite of a fast-growing file
_MAX_FILES = 100  # [log] transcript_files at most: path.1 ... path.99
KEEP_BYTES = 4 * 1024 * 1024  # of each stream, the newest (see the module's docstring)
KEEP_MARKS = 100_000  # about 10 MB of marks


@dataclass(frozen=True, slots=True)
class TranscriptMark:
    """One mark of the transcript: ``kind`` and ``fields`` as written."""

    kind: str
    fields: dict[str, Any]
    text: str  # "command name=AT+CIPSEND kind=set"
    mono: float  # the daemon's monotonic clock, seconds
    rx: int  # bytes the MCU had sent when the mark was made
    tx: int  # bytes sent to the MCU when the mark was made


def _unvalue(text: str) -> Any:
    if text.startswith('"'):
        try:
            return json.loads(text)
        except ValueError:
            return text
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.isdigit() else text


@dataclass
class TranscriptFollower:
    """Reads ``path`` as it grows; see the module docstring."""

    path: Path
    marks: list[TranscriptMark] = field(default_factory=list)
    rx: bytearray = field(default_factory=bytearray)
    tx: bytearray = field(default_factory=bytearray)
    _offset: int = 0
    _partial: bytes = b""
    _cursor: dict[str, int] = field(default_factory=lambda: {"marks": 0, "RX": 0, "TX": 0})
    _file: BinaryIO | None = field(default=None, repr=False)  # kept open: read to its end once rotated
    _ino: int = -1  # the inode of the file followed
    _dropped: dict[str, int] = field(default_factory=lambda: {"RX": 0, "TX": 0})  # bytes let go of, per stream

    def poll(self) -> bool:
        """Read what was appended since the last call (at most ``_READ_MAX`` bytes); True if anything was."""
        got, switches = 0, 0
        while got < _READ_MAX:
            if self._file is None and not self._open(self.path):
                break
            assert self._file is not None
            data = self._file.read(_READ_MAX - got)
            if data:
                self._feed(data)
                got += len(data)
                continue
            successor = self._successor()  # read to its end: was it rotated away?
            if successor is None or switches > _MAX_FILES or not self._open(successor):
                break
            switches += 1
        self._trim()
        return got > 0

    def _trim(self) -> None:
        """Keep the newest KEEP_BYTES of each stream and KEEP_MARKS marks; cursors follow."""
        for direction, stream in (("RX", self.rx), ("TX", self.tx)):
            drop = len(stream) - KEEP_BYTES
            if drop > 0:
                del stream[:drop]
                self._dropped[direction] += drop
                self._cursor[direction] = max(0, self._cursor[direction] - drop)
        drop = len(self.marks) - KEEP_MARKS
        if drop > 0:
            del self.marks[:drop]
            self._cursor["marks"] = max(0, self._cursor["marks"] - drop)

    def close(self) -> None:
        """Let go of the file (a later `poll` opens it again where it was)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, path: Path) -> bool:
        """Follow ``path``: from where it was if it is the file followed before, else from its start."""
        try:
            file = open(path, "rb")  # noqa: SIM115 (kept open: a rotated file is read to its end)
        except FileNotFoundError:
            return False
        ino = os.fstat(file.fileno()).st_ino
        if ino != self._ino:
            self._ino, self._offset, self._partial = ino, 0, b""  # a rotation ends on a whole line
        file.seek(self._offset)
        self.close()
        self._file = file
        return True

    def _successor(self) -> Path | None:
        """The file written after the one read to its end, or None while that one is still written.

        The daemon's RotatingFile renames ``path`` to ``path.1`` (``.1`` to
        ``.2``...): the one read to its end is now ``path.K``, and ``path.K-1``
        (``path`` for K = 1) came after it, even after several rotations.
        """
        try:
            if os.stat(self.path).st_ino == self._ino:
                return None
        except FileNotFoundError:
            return None  # between a rotation's rename and its new file
        newer = self.path
        for k in range(1, _MAX_FILES + 1):
            older = Path(f"{self.path}.{k}")
            try:
                if os.stat(older).st_ino == self._ino:
                    return newer
            except FileNotFoundError:
                break
            newer = older
        return self.path  # ours was dropped (transcript_files = 1): the one written now

    def _feed(self, data: bytes) -> None:
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            self._take(line.decode("ascii", "replace"))

    def _take(self, line: str) -> None:
        try:
            parsed = parse_line(line)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.direction is not None:
            (self.rx if parsed.direction is Direction.RX else self.tx).extend(parsed.data)
            return
        match = _MARK.fullmatch(line)
        if match is None:
            return  # not a transcript line: nothing a test could wait for
        mono, kind, rest = match.groups()
        fields = {k: _unvalue(v) for k, v in _FIELD.findall(rest)}
        self.marks.append(TranscriptMark(kind, fields, f"{kind}{rest}", float(mono),
                                         self._dropped["RX"] + len(self.rx), self._dropped["TX"] + len(self.tx)))

    def find_mark(self, pattern: str | re.Pattern[str]) -> TranscriptMark | None:
        """The first unconsumed mark whose text matches ``pattern`` (consumed), or None."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        for i in range(self._cursor["marks"], len(self.marks)):
            if regex.search(self.marks[i].text):
                self._cursor["marks"] = i + 1
                return self.marks[i]
        return None

    def find_bytes(self, direction: str, pattern: bytes | re.Pattern[bytes]) -> bytes | None:
        """The first unconsumed match of ``pattern`` in the RX or TX stream (consumed), or None."""
        stream = self.rx if direction == "RX" else self.tx
        start = self._cursor[direction]
        if isinstance(pattern, bytes):
            at = stream.find(pattern, start)
            if at < 0:
                return None
            self._cursor[direction] = at + len(pattern)
            return pattern
        match = pattern.search(stream, start)
        if match is None:
            return None
        self._cursor[direction] = match.end()
        return bytes(match.group(0))

    def tail(self, direction: str | None = None) -> str:
        """What was seen last, for a failure message: the last marks, or the end of a stream."""
        if direction is not None:
            stream = self.rx if direction == "RX" else self.tx
            return f"the end of {direction}: {bytes(stream[-200:])!r}"
        shown = "\n".join(f"  {m.text}" for m in self.marks[-10:])
        return f"the last marks:\n{shown or '  (no marks yet)'}"
