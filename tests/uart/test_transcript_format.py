"""The AT transcript's lines: bytes and marks rendered, and parsed back to the same."""

from __future__ import annotations

import ast
import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridged.uart.transcript_format import Chunk, Direction, Formatter, Mark, MarkKind, escape, parse_line


WALL = 1_780_000_000.25  # 2026-05-28T20:26:40.25 UTC
STAMP = "2026-05-28T20:26:40.250000Z 12.500000"


def _unescape(text: str) -> bytes:
    return ast.literal_eval("b'" + text + "'")


ESCAPES = [
    (b"AT\r\n", r"AT\r\n"),
    (b"\tx\\", r"\tx\\"),
    (b"\x00\x1b\x7f\x80\xff", r"\x00\x1b\x7f\x80\xff"),
    (b"it's", r"it\'s"),
    (b"'\"", r"\'" + '"'),
    (b'say "hi"', 'say "hi"'),
    (b"", ""),
]


@pytest.mark.parametrize(("data", "text"), ESCAPES)
def test_printable_form(data, text):
    """\\r, \\n, tabs, backslashes, quotes and non-printables are escaped; the rest shows as is."""
    assert escape(data) == text
    assert _unescape(text) == data


def test_chunk_line_has_stamp_direction_length_printable_and_hex():
    """One short write is one line: wall clock, monotonic clock, TX, length, printable, hex."""
    lines = Formatter().lines(Chunk(Direction.TX, b"\r\nOK\r\n", 12.5, WALL))
    assert lines == [f"{STAMP} TX 6 '\\r\\nOK\\r\\n' 0d 0a 4f 4b 0d 0a\n"]


def test_long_chunk_spans_lines_with_offsets():
    """A 70-byte read takes three lines: its length first, then +32 and +64."""
    data = bytes(range(70))
    lines = Formatter().lines(Chunk(Direction.RX, memoryview(data), 12.5, WALL))
    assert [line.split(" ")[3] for line in lines] == ["70", "+32", "+64"]
    assert all(line.startswith(f"{STAMP} RX ") for line in lines)
    assert b"".join(parse_line(line).data for line in lines) == data


def test_mark_line_and_quoted_values():
    """A mark is '--', its kind and its fields; a value with spaces or quotes is quoted."""
    mark = Mark(MarkKind.CLOSED, {"link": 2, "reason": 'peer said "bye"', "server": True}, 12.5, WALL)
    line = Formatter().lines(mark)[0]
    assert line == f'{STAMP} -- closed link=2 reason="peer said \\"bye\\"" server=true\n'
    parsed = parse_line(line)
    assert parsed.mark is MarkKind.CLOSED
    assert parsed.fields == {"link": 2, "reason": 'peer said "bye"', "server": True}
    assert parsed.wall == datetime.datetime(2026, 5, 28, 20, 26, 40, 250000, tzinfo=datetime.timezone.utc)
    assert parsed.mono == 12.5


def test_parse_rejects_other_text():
    """A line that is not a transcript line is a ValueError, not a wrong result."""
    with pytest.raises(ValueError):
        parse_line("hello world\n")


@given(st.binary(max_size=200), st.sampled_from(list(Direction)))
def test_lines_give_back_the_bytes(data, direction):
    """Any bytes, formatted and parsed back, give the same bytes through hex and through the printable form."""
    lines = Formatter().lines(Chunk(direction, data, 1.0, WALL))
    parsed = [parse_line(line) for line in lines]
    assert all(p.direction is direction for p in parsed)
    assert b"".join(p.data for p in parsed) == data
    assert b"".join(_unescape(p.text) for p in parsed) == data
    assert all(line.isascii() and line.count("\n") == 1 for line in lines)
