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
* data mode (``start_data()`` after a ``>`` prompt; ``expect_data(n)`` is
  AT+CIPSEND's case): bytes go to a ``datamode.DataMachine`` which decides
  what is payload (``DataChunk``), when the phase is over (``DataComplete``)
  and whether ``+++`` ended it (``DataEscaped``); then command mode again,
  with the bytes that followed the payload.  Time matters here (the ``+++``
  guard times, AT+TRANSINTVL): ``receive_bytes`` and ``next_event`` take
  ``now``, and ``deadline()`` says when to look again without new input.
* ``discard_pending()`` drops whatever is buffered (used for ``busy p...``:
  ESP-AT discards input that arrives while a command runs).

The buffer is capped: in command mode by ``max_line`` (plus the bytes of lines
not yet pulled), in data mode the owner pulls chunks as it can store them.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from bridged.at.datamode import DataKind, DataMachine, Escape
from bridged.at.errors import AtError, NoAt, ParamParseFail
from bridged.at.params import Token, tokenize

__all__ = [
    "Kind",
    "CommandLine",
    "BadLine",
    "LineTooLong",
    "DataChunk",
    "DataComplete",
    "DataEscaped",
    "NEED_DATA",
    "Parser",
    "parse_command_line",
]


class Kind(enum.Enum):
    TEST = "=?"
    QUERY = "?"
    SET = "="
    EXECUTE = ""

    # Members are singletons: hashing by identity is the C slot, not Enum's
    # Python-level hash of the name (this is a key of every command lookup).
    __hash__ = object.__hash__


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
    """A complete line that is not an AT command; answered with ERROR.

    ``name`` is the command's name when the line got that far (for the log).
    """

    raw: bytes
    error: AtError
    name: str = ""


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """More than max_line bytes without a terminator; answered with ERROR."""

    length: int


@dataclass(frozen=True, slots=True)
class DataChunk:
    data: bytes
    at: float = field(default=0.0, compare=False)  # a stream's: when its last byte came (AT+TRANSINTVL held it)


@dataclass(frozen=True, slots=True)
class DataComplete:
    length: int  # payload bytes (after AT+CIPSENDEX's unescaping)


@dataclass(frozen=True, slots=True)
class DataEscaped:
    """+++ ended the data phase; ``length`` payload bytes had been taken.

    ``leftover``: a stream's payload (AT+CIPSENDL, passthrough) taken before the
    +++ but not handed out in a DataChunk (the owner had no room for it)."""

    length: int
    leftover: bytes = b""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = CommandLine | BadLine | LineTooLong | DataChunk | DataComplete | DataEscaped


class _Mode(enum.Enum):
    COMMAND = enum.auto()
    DISCARD_LINE = enum.auto()  # dropping an over-long line up to its \r\n
    DATA = enum.auto()


_LINE_CACHE = 64  # command lines remembered, parsed (CommandLine is immutable)
# ... of the commands that carry data, which a host repeats with the same text
# hundreds of times a second (no other line is kept: some hold a password).
_REPEATED = frozenset({"+CIPSEND", "+CIPSENDEX", "+CIPSENDL", "+CIPRECVDATA"})
_NAME = re.compile(rb"\+?[A-Za-z0-9_]*")  # after "AT": the command's name (empty for bare AT)


def parse_command_line(raw: bytes) -> CommandLine | BadLine:
    """Parse one complete line (terminator included) into a CommandLine."""
    body = raw[:-2]
    if not body.startswith(b"AT"):
        return BadLine(raw, NoAt("line does not start with AT"))
    rest = body[2:]
    end = _NAME.match(rest).end()
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
            return BadLine(raw, exc, name)
    return BadLine(raw, ParamParseFail(f"unexpected bytes after {name or 'AT'}"), name)


class Parser:
    """Frames UART input into events; see the module docstring."""

    def __init__(self, max_line: int = 256) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._mode = _Mode.COMMAND
        self.in_data_mode = False  # _mode is DATA (a plain attribute: read for every event)
        self._scan_from = 0  # where to resume searching for \r\n
        self._data: DataMachine | None = None
        self._lines: dict[bytes, CommandLine] = {}  # data commands parsed before, by their bytes

    # -- input ---------------------------------------------------------------

    def receive_bytes(self, data: bytes, now: float = 0.0) -> None:
        if self._data is not None and not self._data.done:
            data = self._data.feed(data, now)
        self._buf += data

    @property
    def idle(self) -> bool:
        """Reading command lines, none of one held (nor an over-long line being dropped)."""
        return self._mode is _Mode.COMMAND and not self._buf

    @property
    def buffered(self) -> int:
        """Command-mode bytes waiting (in data mode: bytes after the payload)."""
        return len(self._buf)

    @property
    def data(self) -> DataMachine | None:
        return self._data

    @property
    def data_left(self) -> int:
        """Payload bytes the data phase still expects from the UART."""
        return max(self._data.left, 0) if self._data is not None else 0

    def discard_pending(self) -> bytes:
        """Drop and return the command-mode bytes buffered (input refused as busy)."""
        dropped = bytes(self._buf)
        self._buf.clear()
        self._scan_from = 0
        if self._mode is _Mode.DISCARD_LINE:
            self._mode = _Mode.COMMAND
        return dropped

    # -- mode changes (by the owner) ------------------------------------------

    def start_data(self, kind: DataKind, length: int, now: float = 0.0,
                   chunk: int = 2920, interval: float = 0.020) -> None:
        """COMMAND -> DATA: what follows is payload, as ``kind`` says."""
        if length <= 0 and kind is not DataKind.PASSTHROUGH:
            raise ValueError("data length must be positive")
        self._mode = _Mode.DATA
        self.in_data_mode = True
        self._scan_from = 0
        self._data = DataMachine(kind, length, now, chunk, interval)
        if self._buf:  # bytes that came behind the command line are payload
            pending, self._buf = bytes(self._buf), bytearray()
            self.receive_bytes(pending, now)

    def end_data(self) -> None:
        """DATA -> COMMAND: the owner read the payload past the parser (``uart.direct``)."""
        self._mode = _Mode.COMMAND  # _end_data, inline: after every direct payload
        self.in_data_mode = False
        self._data = None

    def expect_data(self, length: int, now: float = 0.0) -> None:
        """AT+CIPSEND's data phase: the next ``length`` bytes are payload."""
        self.start_data(DataKind.SEND, length, now)

    def deadline(self, room: bool = True) -> float | None:
        """When next_event() may produce something without new input (``room``: False while
        the owner can take no payload)."""
        return self._data.deadline(room) if self._data is not None else None

    # -- output ----------------------------------------------------------------

    def next_event(self, limit: int | None = None, now: float = 0.0) -> Event | _NeedData:
        """Return the next event, or NEED_DATA.

        Args:
            limit: in data mode, the most payload bytes to return in one chunk
                (the room the owner has for them).
            now: the current time (data mode only).
        """
        if self._mode is _Mode.DATA:
            return self._next_data(limit, now)
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
        line = self._lines.get(raw)
        if line is None:
            line = parse_command_line(raw)
            if type(line) is CommandLine and line.name in _REPEATED:
                if len(self._lines) >= _LINE_CACHE:
                    self._lines.clear()
                self._lines[raw] = line
        return line

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

    def _next_data(self, limit: int | None, now: float) -> Event | _NeedData:
        machine = self._data
        out = machine.next_chunk(now, limit)
        if isinstance(out, Escape):
            self._end_data()
            return DataEscaped(machine.taken, machine.leftover())
        if out:
            return DataChunk(out, machine.last_arrival)
        if machine.complete:
            self._end_data()
            return DataComplete(machine.taken)
        return NEED_DATA

    def _end_data(self) -> None:
        self._mode = _Mode.COMMAND  # DATA -> COMMAND
        self.in_data_mode = False
        self._data = None
