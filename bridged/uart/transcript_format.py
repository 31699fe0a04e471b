"""The AT transcript's lines, sans I/O: entries -> text and back.

Entries are what the front records: a `Chunk` (the bytes of one read or one
write, with the monotonic and wall clock times of it) or a `Mark` (a session
event: a command recognised, a data phase, a link event, boot...).  A
`Formatter` turns each into lines of the transcript file (the format is in
``bridged.uart.transcript``'s docstring); `parse_line` reads one back, so
tools and tests can rebuild the RX and TX streams exactly.
"""

from __future__ import annotations

import datetime
import enum
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["Direction", "MarkKind", "Chunk", "Mark", "Formatter", "Line", "parse_line", "escape",
           "LINE_BYTES"]

LINE_BYTES = 32  # bytes per file line

class Direction(str, enum.Enum):
    RX = "RX"  # MCU -> bridged
    TX = "TX"  # bridged -> MCU


class MarkKind(str, enum.Enum):
    TRANSCRIPT_ON = "transcript_on"
    TRANSCRIPT_OFF = "transcript_off"
    BOOT = "boot"  # "ready" is about to go out
    RESTART = "restart"  # AT+RST, AT+RESTORE, a forced restart
    COMMAND = "command"  # a command line was recognised
    DATA_START = "data_start"  # the payload of a send follows
    DATA_END = "data_end"  # ... was complete, or cancelled by +++
    CONNECTED = "connected"
    CONNECT_FAILED = "connect_failed"
    CLOSED = "closed"
    IPD = "ipd"  # a +IPD frame (or a passive-mode notice) was queued
    LOST = "lost"  # the disk fell behind: rx/tx bytes and marks not written
    FAULT = "fault"  # an injected fault (bridged.faults): its name and what it did


# Named tuples, not dataclasses: one is made per read and per write.
class Chunk(NamedTuple):
    direction: Direction
    data: bytes | memoryview
    mono: float
    wall: float


class Mark(NamedTuple):
    kind: MarkKind
    fields: dict[str, Any]
    mono: float
    wall: float


# --------------------------------------------------------------------------
# Formatting (sans I/O).


def escape(data: bytes | memoryview) -> str:
    """The printable form: a bytes literal's body as written between single quotes."""
    text = repr(bytes(data))
    body = text[2:-1]
    # repr picks double quotes when the bytes hold ' and no ": ' is then bare.
    return body if text[1] == "'" else body.replace("'", "\\'")


_BARE = re.compile(r"[A-Za-z0-9_.:+/\[\]-]+")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)  # ASCII, quoted


class Formatter:
    """Entries -> transcript lines (with their ``\\n``); keeps a clock cache."""

    def __init__(self, width: int = LINE_BYTES) -> None:
        self.width = width
        self._second = -1
        self._prefix = ""

    def stamp(self, mono: float, wall: float) -> str:
        second = int(wall)
        if second != self._second:  # strftime once a second, not per line
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micros = min(int((wall - second) * 1_000_000), 999_999)
        return f"{self._prefix}.{micros:06d}Z {mono:.6f}"

    def lines(self, entry: Chunk | Mark) -> list[str]:
        stamp = self.stamp(entry.mono, entry.wall)
        if isinstance(entry, Mark):
            fields = "".join(f" {k}={_value(v)}" for k, v in entry.fields.items())
            return [f"{stamp} -- {entry.kind.value}{fields}\n"]
        data = entry.data if type(entry.data) is bytes else bytes(entry.data)
        head = f"{stamp} {entry.direction.value} "
        hexed = data.hex(" ")  # 3 characters a byte: sliced per line below
        width = self.width
        out = []
        # The hot loop of a transcript at throughput: escape() inlined.
        for offset in range(0, len(data), width):
            text = repr(data[offset:offset + width])
            if text[1] != "'":
                text = "b'" + text[2:-1].replace("'", "\\'") + "'"
            size = f"+{offset}" if offset else len(data)
            out.append(f"{head}{size} {text[1:]} {hexed[3 * offset:3 * (offset + width) - 1]}\n")
        return out


@dataclass(frozen=True, slots=True)
class Line:
    """One parsed transcript line: bytes (``direction`` set) or a mark (``mark`` set)."""

    wall: datetime.datetime
    mono: float
    direction: Direction | None = None
    data: bytes = b""
    offset: int = 0  # of these bytes within their read or write
    length: int | None = None  # of the whole read or write (its first line only)
    text: str = ""  # the printable form as written
    mark: MarkKind | None = None
    fields: dict[str, Any] = field(default_factory=dict)


_CHUNK_LINE = re.compile(r"(\S+) (\d+\.\d+) (RX|TX) (\+?)(\d+) '(.*)' ([0-9a-f ]*)")
_MARK_LINE = re.compile(r"(\S+) (\d+\.\d+) -- (\w+)((?: \w+=(?:\"(?:[^\"\\]|\\.)*\"|\S+))*)")
_FIELD = re.compile(r" (\w+)=(\"(?:[^\"\\]|\\.)*\"|\S+)")


def _unvalue(text: str) -> Any:
    if text.startswith('"'):
        return json.loads(text)
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.isdigit() else text


def parse_line(text: str) -> Line:
    """Read back one line of a transcript file.

    Raises:
        ValueError: not a transcript line.
    """
    text = text.rstrip("\n")
    if m := _CHUNK_LINE.fullmatch(text):
        wall, mono, tag, plus, number, printable, hexed = m.groups()
        offset, length = (int(number), None) if plus else (0, int(number))
        return Line(datetime.datetime.fromisoformat(wall), float(mono), Direction(tag),
                    bytes.fromhex(hexed), offset, length, printable)
    if m := _MARK_LINE.fullmatch(text):
        wall, mono, kind, rest = m.groups()
        fields = {k: _unvalue(v) for k, v in _FIELD.findall(rest)}
        return Line(datetime.datetime.fromisoformat(wall), float(mono), mark=MarkKind(kind),
                    fields=fields)
    raise ValueError(f"not a transcript line: {text[:80]!r}")
