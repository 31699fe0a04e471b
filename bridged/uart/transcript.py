"""The AT transcript: every byte to and from the MCU, with the session's marks.

Theory of operation.  The front's byte path holds a ``tap`` attribute: None
while the transcript is off (one attribute check per read or write and
nothing else), the `Transcript` while it is on.  Switching is `enable()` /
`disable()`, which set or clear ``tap`` on every holder (the front, its
`Output`, its `LinkTable`), so it can be done at run time.  A tap call only
appends (direction, bytes, monotonic time, wall time) to a list; formatting
happens later in the same loop: on a short timer, as soon as the list holds
``_FLUSH_SIZE`` bytes, and when the transcript is switched off or the front
stops.  Writing happens on a thread of its own (`FileWriter`), so the loop
never waits on the disk, and memory stays bounded: while the disk is
``_BACKLOG_LIMIT`` characters behind (an NFS server gone, a disk slower than
the UART), records are dropped and counted, and one ``lost`` mark (bytes
each way, marks) stands for them when writing resumes.  A failed write (a
full disk) ends the transcript with one error event at the next flush;
the session goes on.

Where it goes: a file (``[log] transcript_path``), mode 0600 since payloads
may hold secrets, rotated like logging's RotatingFileHandler (at
``transcript_max_bytes`` the file becomes ``<path>.1``, ``.1`` becomes ``.2``
..., ``transcript_files`` files in all); or, without a path, the log: marks
as ``transcript_mark`` events at info, bytes as ``transcript_bytes`` events
at debug (payloads are never logged at info).

The file format (made and read back by the sans-I/O `transcript_format`),
one line per up to 32 bytes of one read or write and one per mark::

    2026-05-01T10:00:00.123456Z 1234.567890 RX 4 'AT\\r\\n' 41 54 0d 0a
    2026-05-01T10:00:00.123470Z 1234.567904 -- command name=AT+CIPSEND kind=set
    2026-05-01T10:00:00.125001Z 1234.569435 RX 40 '0123...' 30 31 32 33 ...
    2026-05-01T10:00:00.125001Z 1234.569435 RX +32 '89' 38 39

wall clock (UTC, microseconds), monotonic clock (seconds), then ``RX`` (from
the MCU), ``TX`` (to the MCU) or ``--`` (a mark).  A read or write longer
than 32 bytes spans several lines: the first gives its length, the next ones
``+offset``.  The printable form is Python's bytes literal without the b
(``\\r \\n \\t \\\\ \\'`` and ``\\xNN`` outside printable ASCII), always in
single quotes; the hex form is authoritative, so `parse_line` rebuilds
either stream exactly.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Iterable

import structlog

from bridged.config import LogConfig
from bridged.uart.transcript_file import FileWriter, RotatingFile
from bridged.uart.transcript_format import (
    Chunk,
    Direction,
    Formatter,
    Line,
    Mark,
    MarkKind,
    escape,
    parse_line,
)

__all__ = ["Direction", "MarkKind", "Chunk", "Mark", "Formatter", "Line", "parse_line",
           "escape", "RotatingFile", "Transcript"]

log = structlog.get_logger()

_LOG_BYTES = 256  # bytes per transcript_bytes log event
_FLUSH_INTERVAL = 0.2  # seconds a recorded byte may wait for the disk
_FLUSH_SIZE = 256 * 1024  # ... unless this many are waiting
# Characters handed to the writer thread and not yet on disk, past which new
# records are dropped (and counted in a `lost` mark): about 2.5 MB of UART
# traffic, seconds at 5 Mbaud both ways; only a slow or stuck disk gets there.
_BACKLOG_LIMIT = 16 * 1024 * 1024
_CLOSE_WAIT = 0.5  # seconds the stopping front waits for the disk (the supervisor gives it 1)
_monotonic, _time = time.monotonic, time.time  # looked up once: called per read and write


class _FileSink:
    """Formats on the loop (a busy CPU slows the loop rather than losing
    bytes), writes on the `FileWriter`'s thread, and while the disk is
    `_BACKLOG_LIMIT` behind, drops records and counts them in one `lost` mark."""

    def __init__(self, config: LogConfig) -> None:
        self.path = config.transcript_path
        self.formatter = Formatter()
        self.writer = FileWriter(RotatingFile(config.transcript_path, config.transcript_max_bytes,
                                              config.transcript_files))
        self._lost: Mark | None = None  # what was dropped since the disk fell behind

    def write(self, entries: list[Chunk | Mark]) -> None:
        """Hand entries to the writer, or count them as lost.

        Raises:
            OSError: an earlier write failed (the writer has stopped).
        """
        if self.writer.error is not None:
            raise self.writer.error
        if self.writer.backlog >= _BACKLOG_LIMIT:
            self._count_lost(entries)
            return
        lines = self.formatter.lines
        text = [line for entry in entries for line in lines(entry)]
        if self._lost is not None:
            text[:0] = lines(self._lost)
            self._lost = None
        self.writer.put(text)

    def _count_lost(self, entries: list[Chunk | Mark]) -> None:
        if self._lost is None:  # stamped as the first record it stands for
            self._lost = Mark(MarkKind.LOST, {"rx": 0, "tx": 0, "marks": 0}, entries[0].mono, entries[0].wall)
        counts = self._lost.fields
        for entry in entries:
            if isinstance(entry, Mark):
                counts["marks"] += 1
            else:
                counts[entry.direction.name.lower()] += len(entry.data)

    def close(self) -> OSError | None:
        """Write what is left (waiting at most _CLOSE_WAIT); the writer's error, if any."""
        if self._lost is not None and self.writer.error is None:
            self.writer.put(self.formatter.lines(self._lost))
        if not self.writer.close(_CLOSE_WAIT):
            log.warning("transcript_unfinished", path=self.path, backlog=self.writer.backlog)
        return self.writer.error


class _LogSink:
    def __init__(self, config: LogConfig) -> None:
        self.with_bytes = config.level == "debug"
        self.formatter = Formatter()

    def write(self, entries: list[Chunk | Mark]) -> None:
        for entry in entries:
            wall, mono = self.formatter.stamp(entry.mono, entry.wall).split(" ")
            if isinstance(entry, Mark):
                log.info("transcript_mark", mark=entry.kind.value, wall=wall, mono=float(mono),
                         **entry.fields)
            elif self.with_bytes:
                data = bytes(entry.data)
                for offset in range(0, len(data), _LOG_BYTES):
                    piece = data[offset:offset + _LOG_BYTES]
                    log.debug("transcript_bytes", dir=entry.direction.value, length=len(data),
                              offset=offset, wall=wall, mono=float(mono), text=escape(piece),
                              hex=piece.hex(" "))

    def close(self) -> OSError | None:
        return None


class Transcript:
    """The transcript of one front process; see the module docstring.

    Args:
        config: the ``[log]`` section (path, rotation, level; ``transcript``
            switches it on at once).
        holders: objects whose ``tap`` attribute is set to this transcript
            while it is on and to None while it is off.
    """

    def __init__(self, config: LogConfig, holders: Iterable[object] = ()) -> None:
        self.config = config
        self._holders = tuple(holders)
        self._sink: _FileSink | _LogSink | None = None
        self._pending: list[Chunk | Mark] = []
        self._size = 0
        self._flush_handle: asyncio.Handle | None = None
        self._flush_soon = False
        if config.transcript:
            self.enable()

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    def enable(self) -> bool:
        """Start recording; False (and an error logged) if the file cannot be opened."""
        if self._sink is not None:
            return True
        path = self.config.transcript_path
        try:
            self._sink = _FileSink(self.config) if path else _LogSink(self.config)
        except OSError as exc:
            log.error("transcript_unavailable", path=path, error=exc.strerror or str(exc))
            return False
        for holder in self._holders:
            holder.tap = self
        log.info("transcript_on", path=path or None, bytes_logged=bool(path) or self.config.level == "debug")
        self.mark(MarkKind.TRANSCRIPT_ON, pid=os.getpid())
        return True

    def disable(self) -> None:
        """Stop recording; what was recorded is written first."""
        if self._sink is None:
            return
        self.mark(MarkKind.TRANSCRIPT_OFF)
        self.flush()
        sink = self._detach()
        if sink is None:
            return  # flush() found the disk failing, and said so
        error = sink.close()
        if error is not None:
            self._failed(error)
        else:
            log.info("transcript_off")

    def _detach(self) -> _FileSink | _LogSink | None:
        for holder in self._holders:
            holder.tap = None
        sink, self._sink = self._sink, None
        return sink

    close = disable

    # -- the tap: called from the byte path, so only record ------------------------

    def received(self, data: bytes) -> None:
        self._record(Chunk(Direction.RX, data, _monotonic(), _time()), len(data))

    def sent(self, data: bytes | memoryview) -> None:
        self._record(Chunk(Direction.TX, data, _monotonic(), _time()), len(data))

    def _record(self, chunk: Chunk, size: int) -> None:
        self._pending.append(chunk)
        self._size += size
        if self._flush_handle is None or (self._size >= _FLUSH_SIZE and not self._flush_soon):
            self._schedule()

    def mark(self, kind: MarkKind, /, **fields: Any) -> None:
        self._pending.append(Mark(kind, fields, _monotonic(), _time()))
        if self._flush_handle is None:
            self._schedule()

    # -- writing -------------------------------------------------------------------

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside a loop (tests, shutdown): at once
            self.flush()
            return
        if self._size >= _FLUSH_SIZE:
            if not self._flush_soon:
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                self._flush_handle = loop.call_soon(self.flush)
                self._flush_soon = True
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(_FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Write what was recorded (the timer calls it; so does switching off)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush_soon = False
        entries, self._pending, self._size = self._pending, [], 0
        sink = self._sink
        if not entries or sink is None:
            return
        try:
            sink.write(entries)
        except OSError as exc:
            self._detach()
            sink.close()  # its writer has stopped: at once
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        # A debugging aid must not take the session down: say so and stop.
        log.error("transcript_write_failed", path=self.config.transcript_path,
                  error=exc.strerror or str(exc))
