"""Bytes from the UART -> events.  Sans I/O: no serial port, no clock.

Theory of operation (after h11's ``Connection``): the owner feeds bytes with
``receive_bytes()`` and pulls events with ``next_event()`` until it returns
``NEED_DATA``.  What the next bytes mean depends on the mode, which the owner
sets:

* command mode (the default): ``\\r\\n``-terminated lines.  A lone ``\\r`` or
  ``\\n`` does not end a line (ESP-AT's at_recv_task searches for ``\\r\\n``).
  A complete line becomes ``CommandLine`` (or ``BadLine`` when it is not an AT
  command at all).  When more than ``max_line`` bytes pile up without a
  terminator, one ``LineTooLong`` event is produced and bytes are dropped up to
  and including the next ``\\r\\n``: bad input is answered once and the parser
  resynchronises at the next line end.
* data mode (``expect_data(n)``, after AT+CIPSEND's ``>`` prompt): the next n
  bytes, whatever they are, come out as ``DataChunk`` events (as large as the
  buffer allows), then ``DataComplete``; then command mode again.
* ``discard_pending()`` drops whatever is buffered (used for ``busy p...``:
  ESP-AT discards input that arrives while a command runs).

The buffer is capped: in command mode by ``max_line`` (plus the bytes of lines
not yet pulled), in data mode the owner pulls chunks as it can store them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bridged.at.errors import AtError, NoAt, ParamParseFail
from bridged.at.params import Token, tokenize

__all__ = [
    "Kind",
    "CommandLine",
    "BadLine",
    "LineTooLong",
    "DataChunk",
    "DataComplete",
    "NEED_DATA",
    "Parser",
    "parse_command_line",
]


class Kind(enum.Enum):
    TEST = "=?"
    QUERY = "?"
    SET = "="
    EXECUTE = ""


@dataclass(frozen=True, slots=True)
class CommandLine:
    """A well-formed ``AT...`` line.

    ``raw`` is the line exactly as received, terminator included (for echo).
    ``name`` is ``""`` for bare ``AT``, ``"E0"`` for ATE0, ``"+CIPSTART"`` ...
    ``tokens`` holds the set command's parameters, unchecked; it is empty for
    the other kinds.
    """

    raw: bytes
    name: str
    kind: Kind
    tokens: tuple[Token, ...] = ()


@dataclass(frozen=True, slots=True)
class BadLine:
    """A complete line that is not an AT command; answered with ERROR."""

    raw: bytes
    error: AtError


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """More than max_line bytes without a terminator; answered with ERROR."""

    length: int


@dataclass(frozen=True, slots=True)
class DataChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class DataComplete:
    length: int


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = CommandLine | BadLine | LineTooLong | DataChunk | DataComplete


class _Mode(enum.Enum):
    COMMAND = enum.auto()
    DISCARD_LINE = enum.auto()  # dropping an over-long line up to its \r\n
    DATA = enum.auto()


_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def parse_command_line(raw: bytes) -> CommandLine | BadLine:
    """Parse one complete line (terminator included) into a CommandLine."""
    body = raw[:-2]
    if not body.startswith(b"AT"):
        return BadLine(raw, NoAt("line does not start with AT"))
    rest = body[2:]
    end = 0
    if rest[:1] == b"+":
        end = 1
    while end < len(rest) and rest[end] in _NAME_CHARS:
        end += 1
    name = rest[:end].decode("ascii")
    tail = rest[end:]
    if name == "+":
        return BadLine(raw, ParamParseFail("empty command name"))
    if tail == b"":
        return CommandLine(raw, name, Kind.EXECUTE)
    if tail == b"?":
        return CommandLine(raw, name, Kind.QUERY)
    if tail == b"=?":
        return CommandLine(raw, name, Kind.TEST)
    if tail[:1] == b"=":
        try:
            return CommandLine(raw, name, Kind.SET, tokenize(tail[1:]))
        except AtError as exc:
            return BadLine(raw, exc)
    return BadLine(raw, ParamParseFail(f"unexpected bytes after {name or 'AT'}"))


class Parser:
    """Frames UART input into events; see the module docstring."""

    def __init__(self, max_line: int = 256) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._mode = _Mode.COMMAND
        self._scan_from = 0  # where to resume searching for \r\n
        self._data_left = 0
        self._data_total = 0

    # -- input ---------------------------------------------------------------

    def receive_bytes(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_data_mode(self) -> bool:
        return self._mode is _Mode.DATA

    @property
    def data_left(self) -> int:
        return self._data_left

    def discard_pending(self) -> bytes:
        """Drop and return everything buffered (input refused as busy)."""
        dropped = bytes(self._buf)
        self._buf.clear()
        self._scan_from = 0
        if self._mode is _Mode.DISCARD_LINE:
            self._mode = _Mode.COMMAND
        return dropped

    # -- mode changes (by the owner) ------------------------------------------

    def expect_data(self, length: int) -> None:
        """COMMAND -> DATA: the next ``length`` bytes are payload."""
        if length <= 0:
            raise ValueError("data length must be positive")
        self._mode = _Mode.DATA
        self._data_left = self._data_total = length
        self._scan_from = 0

    # -- output ----------------------------------------------------------------

    def next_event(self, limit: int | None = None) -> Event | _NeedData:
        """Return the next event, or NEED_DATA.

        Args:
            limit: in data mode, the most payload bytes to return in one chunk
                (the room the owner has for them).  0 returns NEED_DATA.
        """
        if self._mode is _Mode.DATA:
            return self._next_data(limit)
        if self._mode is _Mode.DISCARD_LINE:
            if not self._drop_to_line_end():
                return NEED_DATA
        return self._next_line()

    def _next_line(self) -> Event | _NeedData:
        end = self._buf.find(b"\r\n", self._scan_from)
        if end < 0:
            # Keep the last byte in view: it may be the \r of a split \r\n.
            self._scan_from = max(0, len(self._buf) - 1)
            if len(self._buf) > self.max_line:
                length = len(self._buf)
                self._mode = _Mode.DISCARD_LINE
                self._keep_tail_cr()
                return LineTooLong(length)
            return NEED_DATA
        self._scan_from = 0
        if end + 2 > self.max_line:
            del self._buf[: end + 2]
            return LineTooLong(end + 2)
        raw = bytes(self._buf[: end + 2])
        del self._buf[: end + 2]
        return parse_command_line(raw)

    def _keep_tail_cr(self) -> None:
        tail = self._buf[-1:] if self._buf[-1:] == b"\r" else b""
        self._buf[:] = tail
        self._scan_from = 0

    def _drop_to_line_end(self) -> bool:
        end = self._buf.find(b"\r\n")
        if end < 0:
            self._keep_tail_cr()
            return False
        del self._buf[: end + 2]
        self._mode = _Mode.COMMAND  # DISCARD_LINE -> COMMAND
        return True

    def _next_data(self, limit: int | None) -> Event | _NeedData:
        if self._data_left == 0:
            self._mode = _Mode.COMMAND  # DATA -> COMMAND
            return DataComplete(self._data_total)
        n = min(len(self._buf), self._data_left)
        if limit is not None:
            n = min(n, limit)
        if n <= 0:
            return NEED_DATA
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._data_left -= n
        return DataChunk(chunk)
