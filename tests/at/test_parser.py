"""Tests for bridged.at.parser: UART bytes -> events (sans I/O).

Most cases are a table of (bytes, expected events), each fed whole, byte by
byte and followed by trailing bytes (h11's ``tests/test_io.py`` ``tr``).
"""

from __future__ import annotations

import pytest

from bridged.at.errors import AtError, NoAt, ParamParseFail
from bridged.at.params import OMITTED, Bare, Quoted, parse_int
from bridged.at.parser import (
    NEED_DATA,
    BadLine,
    CommandLine,
    DataChunk,
    DataComplete,
    Kind,
    LineTooLong,
    Parser,
    parse_command_line,
)

MAX = 32  # max_line for the tables: small enough to write long lines by hand


# -- harness ---------------------------------------------------------------------------------


def cmd(raw: bytes, name: str, kind: Kind = Kind.EXECUTE, *tokens) -> CommandLine:
    return CommandLine(raw, name, kind, tuple(tokens))


def bad(raw: bytes, error_type: type[AtError], ext: int = 0) -> tuple:
    """What a BadLine normalises to (exceptions do not compare by value)."""
    return ("BadLine", raw, error_type, ext)


class Owner:
    """Plays the front: pulls every event, enters data mode after AT+CIPSEND=<n>."""

    def __init__(self, max_line: int = MAX, limit: int | None = None) -> None:
        self.parser = Parser(max_line)
        self.limit = limit
        self.events: list = []

    def feed(self, data: bytes) -> None:
        self.parser.receive_bytes(data)
        for _ in range(len(data) + 3 * self.parser.buffered + 10):  # never loops for ever
            event = self.parser.next_event(self.limit)
            if event is NEED_DATA:
                return
            if isinstance(event, DataChunk):
                assert type(event.data) is bytes
                assert 0 < len(event.data) <= (self.limit or len(event.data))
            self.events.append(event)
            if isinstance(event, CommandLine) and event.name == "+CIPSEND" and event.kind is Kind.SET:
                self.parser.expect_data(parse_int(event.tokens[-1].text))  # tables send valid lengths
        raise AssertionError("next_event() never returned NEED_DATA")


def normalize(events: list, max_line: int, exact_length: bool = True) -> list:
    """Comparable events: BadLine as a tuple, adjacent DataChunks merged.

    With ``exact_length`` False, LineTooLong lengths (which depend on how much
    had piled up when the parser gave up) are dropped after checking the cap.
    """
    out: list = []
    for event in events:
        if isinstance(event, BadLine):
            assert isinstance(event.error, AtError)
            event = bad(event.raw, type(event.error), event.error.ext)
        elif isinstance(event, CommandLine):
            assert type(event.raw) is bytes
        elif isinstance(event, LineTooLong):
            assert event.length > max_line
            if not exact_length:
                event = LineTooLong
        elif isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
            event = DataChunk(out.pop().data + event.data)
        out.append(event)
    return out


def check(data: bytes, expected: list, *, max_line: int = MAX, limit=None, clean: bool = True) -> None:
    """Feed ``data`` whole, byte by byte and with trailing bytes; compare events.

    ``clean`` cases end at a line boundary in command mode, so that bytes fed
    after them are parsed as the start of a new line.
    """
    expected = normalize(expected, max_line)
    loose = normalize(expected, max_line, exact_length=False)

    # Whole.
    owner = Owner(max_line, limit)
    owner.feed(data)
    assert normalize(owner.events, max_line) == expected
    if clean:
        assert owner.parser.buffered == 0
        assert not owner.parser.in_data_mode

    # Byte by byte: no event early, same events; an over-long line is noticed
    # as soon as one byte more than max_line has piled up.
    owner = Owner(max_line, limit)
    for i in range(len(data)):
        owner.feed(data[i : i + 1])
    assert normalize(owner.events, max_line, exact_length=False) == loose
    for event in owner.events:
        if isinstance(event, LineTooLong):
            assert event.length == max_line + 1

    if not clean:
        return
    # Trailing bytes are left in the buffer, and parsed as the next line.
    owner = Owner(max_line, limit)
    owner.feed(data + b"tr")
    assert normalize(owner.events, max_line) == expected
    assert owner.parser.buffered == 2
    owner.feed(b"\r\n")
    assert normalize(owner.events, max_line) == expected + [bad(b"tr\r\n", NoAt)]

    owner = Owner(max_line, limit)
    owner.feed(data + b"AT+T?\r\n")
    assert normalize(owner.events, max_line) == expected + [cmd(b"AT+T?\r\n", "+T", Kind.QUERY)]


# -- command lines ---------------------------------------------------------------------------

COMMAND_CASES = [
    # The four forms, and the basic names.
    (b"AT\r\n", [cmd(b"AT\r\n", "")]),
    (b"ATE0\r\n", [cmd(b"ATE0\r\n", "E0")]),
    (b"ATE1\r\n", [cmd(b"ATE1\r\n", "E1")]),
    (b"ATE\r\n", [cmd(b"ATE\r\n", "E")]),  # unknown names are the registry's business
    (b"AT+GMR\r\n", [cmd(b"AT+GMR\r\n", "+GMR")]),
    (b"AT+CWMODE=?\r\n", [cmd(b"AT+CWMODE=?\r\n", "+CWMODE", Kind.TEST)]),
    (b"AT+CWMODE?\r\n", [cmd(b"AT+CWMODE?\r\n", "+CWMODE", Kind.QUERY)]),
    (b"AT+CWMODE=1\r\n", [cmd(b"AT+CWMODE=1\r\n", "+CWMODE", Kind.SET, Bare("1"))]),
    (b"AT+UART_CUR?\r\n", [cmd(b"AT+UART_CUR?\r\n", "+UART_CUR", Kind.QUERY)]),
    (b"AT+cwmode?\r\n", [cmd(b"AT+cwmode?\r\n", "+cwmode", Kind.QUERY)]),  # case kept as sent
    (b"AT+X=\r\n", [cmd(b"AT+X=\r\n", "+X", Kind.SET, OMITTED)]),
    (
        b'AT+CWJAP="a\\,b","p"\r\n',
        [cmd(b'AT+CWJAP="a\\,b","p"\r\n', "+CWJAP", Kind.SET, Quoted("a,b"), Quoted("p"))],
    ),
    (
        b'AT+X=1,,"s",\r\n',
        [cmd(b'AT+X=1,,"s",\r\n', "+X", Kind.SET, Bare("1"), OMITTED, Quoted("s"), OMITTED)],
    ),
    (b"AT+X=?1\r\n", [cmd(b"AT+X=?1\r\n", "+X", Kind.SET, Bare("?1"))]),
    # Not AT commands at all: upper-case AT only (ESP_AT_SUB_NO_AT).
    (b"at\r\n", [bad(b"at\r\n", NoAt)]),
    (b"At\r\n", [bad(b"At\r\n", NoAt)]),
    (b"aT+GMR\r\n", [bad(b"aT+GMR\r\n", NoAt)]),
    (b" AT\r\n", [bad(b" AT\r\n", NoAt)]),
    (b"\r\n", [bad(b"\r\n", NoAt)]),  # an empty line
    (b"A\r\n", [bad(b"A\r\n", NoAt)]),
    (b"\x00\xff\r\n", [bad(b"\x00\xff\r\n", NoAt)]),
    # AT, then something that is not a name and a form.
    (b"AT+\r\n", [bad(b"AT+\r\n", ParamParseFail)]),
    (b"AT+=1\r\n", [bad(b"AT+=1\r\n", ParamParseFail)]),
    (b"AT+X?junk\r\n", [bad(b"AT+X?junk\r\n", ParamParseFail)]),
    (b"AT+X??\r\n", [bad(b"AT+X??\r\n", ParamParseFail)]),
    (b"AT E0\r\n", [bad(b"AT E0\r\n", ParamParseFail)]),
    (b"AT\xff\r\n", [bad(b"AT\xff\r\n", ParamParseFail)]),
    (b"AT+\xff?\r\n", [bad(b"AT+\xff?\r\n", ParamParseFail)]),
    (b"AT+GMR \r\n", [bad(b"AT+GMR \r\n", ParamParseFail)]),
    # Parameter errors found while tokenizing carry the parameter's index.
    (b'AT+X="abc\r\n', [bad(b'AT+X="abc\r\n', ParamParseFail, 1)]),
    (b'AT+X=1,"a"b\r\n', [bad(b'AT+X=1,"a"b\r\n', ParamParseFail, 2)]),
    # A lone \r or \n does not end a line.
    (b"AT\n\r\n", [bad(b"AT\n\r\n", ParamParseFail)]),
    (b"AT\rAT\r\n", [bad(b"AT\rAT\r\n", ParamParseFail)]),
    (b"AT\r\r\n", [bad(b"AT\r\r\n", ParamParseFail)]),
    (b"\n\r\n", [bad(b"\n\r\n", NoAt)]),
    (b"\nAT\r\n", [bad(b"\nAT\r\n", NoAt)]),
    # Many commands in one feed, each its own event, in order.
    (
        b"AT\r\nATE0\r\nAT+GMR\r\nat\r\nAT+CIPMUX=1\r\n",
        [
            cmd(b"AT\r\n", ""),
            cmd(b"ATE0\r\n", "E0"),
            cmd(b"AT+GMR\r\n", "+GMR"),
            bad(b"at\r\n", NoAt),
            cmd(b"AT+CIPMUX=1\r\n", "+CIPMUX", Kind.SET, Bare("1")),
        ],
    ),
    (b"\r\n\r\n", [bad(b"\r\n", NoAt), bad(b"\r\n", NoAt)]),
]

# Incomplete input: nothing comes out, and whatever follows continues the line.
INCOMPLETE_CASES = [
    (b"", []),
    (b"AT", []),
    (b"AT\r", []),
    (b"AT\n", []),
    (b"AT\n\r", []),
    (b"\r", []),
    (b"\n", []),
    (b"AT\r\nAT+GMR", [cmd(b"AT\r\n", "")]),
]


@pytest.mark.parametrize(("data", "expected"), COMMAND_CASES)
def test_command_lines(data, expected):
    """Complete lines become one CommandLine or BadLine each, however they arrive."""
    check(data, expected)


@pytest.mark.parametrize(("data", "expected"), INCOMPLETE_CASES)
def test_incomplete_lines(data, expected):
    """A line without its \\r\\n produces no event, whole or byte by byte."""
    check(data, expected, clean=False)


def test_incomplete_line_continues_with_next_feed():
    """Bytes fed later complete the pending line; nothing is lost or duplicated."""
    owner = Owner()
    for piece in (b"A", b"T+CW", b"MODE", b"=", b"3\r", b"\nAT", b"\r", b"\n"):
        owner.feed(piece)
    assert normalize(owner.events, MAX) == [
        cmd(b"AT+CWMODE=3\r\n", "+CWMODE", Kind.SET, Bare("3")),
        cmd(b"AT\r\n", ""),
    ]
    assert owner.parser.buffered == 0


def test_lone_newline_then_line_end():
    """``AT\\n`` gets no answer until a \\r\\n arrives (spec 1.1); then it is one line."""
    parser = Parser()
    parser.receive_bytes(b"AT\n")
    assert parser.next_event() is NEED_DATA
    parser.receive_bytes(b"\r")
    assert parser.next_event() is NEED_DATA
    parser.receive_bytes(b"\n")
    event = parser.next_event()
    assert isinstance(event, BadLine)
    assert event.raw == b"AT\n\r\n"
    assert parser.next_event() is NEED_DATA


def test_crlf_split_across_feeds():
    """A \\r at the end of one feed and \\n at the start of the next end the line."""
    parser = Parser()
    parser.receive_bytes(b"AT+GMR\r")
    assert parser.next_event() is NEED_DATA
    assert parser.buffered == 7
    parser.receive_bytes(b"\nATE0\r\n")
    assert parser.next_event() == cmd(b"AT+GMR\r\n", "+GMR")
    assert parser.next_event() == cmd(b"ATE0\r\n", "E0")
    assert parser.next_event() is NEED_DATA


def test_need_data_repr():
    """NEED_DATA is a singleton sentinel that names itself."""
    assert repr(NEED_DATA) == "NEED_DATA"
    assert Parser().next_event() is NEED_DATA


def test_kind_values():
    """Each Kind's value is the text that follows the name."""
    assert {kind: kind.value for kind in Kind} == {
        Kind.TEST: "=?",
        Kind.QUERY: "?",
        Kind.SET: "=",
        Kind.EXECUTE: "",
    }


# -- parse_command_line directly ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name", "kind", "tokens"),
    [
        (b"AT\r\n", "", Kind.EXECUTE, ()),
        (b"ATE0\r\n", "E0", Kind.EXECUTE, ()),
        (b"AT+RST\r\n", "+RST", Kind.EXECUTE, ()),
        (b"AT+CIPSTART=?\r\n", "+CIPSTART", Kind.TEST, ()),
        (b"AT+CIPSTATE?\r\n", "+CIPSTATE", Kind.QUERY, ()),
        (
            b'AT+CIPSTART=0,"TCP","example.com",80\r\n',
            "+CIPSTART",
            Kind.SET,
            (Bare("0"), Quoted("TCP"), Quoted("example.com"), Bare("80")),
        ),
    ],
)
def test_parse_command_line(raw, name, kind, tokens):
    """parse_command_line splits a full line into name, form and parameter tokens."""
    line = parse_command_line(raw)
    assert line == CommandLine(raw, name, kind, tokens)


def test_parse_command_line_errors_are_at_errors():
    """A rejected line carries the AtError the front answers with (and its code)."""
    no_at = parse_command_line(b"hello\r\n")
    assert isinstance(no_at, BadLine) and isinstance(no_at.error, NoAt)
    assert no_at.error.code == 0x01030000
    unterminated = parse_command_line(b'AT+X=1,2,"abc\r\n')
    assert isinstance(unterminated, BadLine) and isinstance(unterminated.error, ParamParseFail)
    assert unterminated.error.code == 0x01080003


# -- over-long lines -------------------------------------------------------------------------


def line_of(length: int) -> bytes:
    """A valid command line of exactly ``length`` bytes, \\r\\n included."""
    assert length >= 8
    return b"AT+X=" + b"1" * (length - 7) + b"\r\n"


GARBAGE = b"\x00\xff" * 20 + bytes(range(256))  # NUL, 0xFF, a lone \r and \n; no \r\n
assert b"\r\n" not in GARBAGE

LONG_CASES = [
    # Exactly max_line bytes is accepted; one more is too long, reported once.
    (line_of(MAX), [cmd(line_of(MAX), "+X", Kind.SET, Bare("1" * (MAX - 7)))]),
    (line_of(MAX + 1), [LineTooLong(MAX + 1)]),
    (line_of(MAX + 2), [LineTooLong(MAX + 2)]),
    # ... then the parser resynchronises at the next \r\n.
    (line_of(MAX + 1) + b"AT\r\n", [LineTooLong(MAX + 1), cmd(b"AT\r\n", "")]),
    (b"A" * 40 + b"\r\nAT\r\n", [LineTooLong(42), cmd(b"AT\r\n", "")]),
    (GARBAGE + b"\r\nAT+GMR\r\n", [LineTooLong(len(GARBAGE) + 2), cmd(b"AT+GMR\r\n", "+GMR")]),
    (b"X" * 40 + b"\r\r\nAT\r\n", [LineTooLong(43), cmd(b"AT\r\n", "")]),
    (b"X" * 40 + b"\r\rX\r\nAT\r\n", [LineTooLong(45), cmd(b"AT\r\n", "")]),
    # Lone \r / \n inside the garbage do not end it: the AT is part of the long line.
    (b"X" * 40 + b"\n\rAT\r\n", [LineTooLong(46)]),
    # Each over-long line is answered once.
    (
        b"X" * 40 + b"\r\n" + b"Y" * 50 + b"\r\nAT\r\n",
        [LineTooLong(42), LineTooLong(52), cmd(b"AT\r\n", "")],
    ),
    (b"AT\r\n" + b"Z" * 40 + b"\r\nATE1\r\n", [cmd(b"AT\r\n", ""), LineTooLong(42), cmd(b"ATE1\r\n", "E1")]),
]


@pytest.mark.parametrize(("data", "expected"), LONG_CASES)
def test_long_lines(data, expected):
    """Over-long lines give one LineTooLong and the next line parses normally."""
    check(data, expected)


@pytest.mark.parametrize(
    ("data", "expected"), [(b"X" * 40, [LineTooLong(40)]), (GARBAGE, [LineTooLong(len(GARBAGE))])]
)
def test_long_line_without_terminator(data, expected):
    """Garbage without \\r\\n is reported once, as soon as it passes max_line."""
    check(data, expected, clean=False)


@pytest.mark.parametrize("max_line", [8, MAX, 256])
def test_max_line_boundary(max_line):
    """A line of exactly max_line bytes is a command; max_line + 1 is LineTooLong."""
    longest = line_of(max_line)
    check(longest, [cmd(longest, "+X", Kind.SET, Bare("1" * (max_line - 7)))], max_line=max_line)
    check(line_of(max_line + 1), [LineTooLong(max_line + 1)], max_line=max_line)


def test_default_max_line_is_256():
    """ESP-AT's limit: 256 bytes per command line, terminator included (spec 1.1)."""
    assert Parser().max_line == 256
    check(line_of(256), [cmd(line_of(256), "+X", Kind.SET, Bare("1" * 249))], max_line=256)
    check(line_of(257), [LineTooLong(257)], max_line=256)


@pytest.mark.parametrize("chunk", [1, 3, 10, 100])
def test_garbage_reported_once_and_buffer_capped(chunk):
    """Long garbage in many feeds gives one LineTooLong and never piles up."""
    parser = Parser(MAX)
    junk = (GARBAGE * 4)[:1000]
    events = []
    for i in range(0, len(junk), chunk):
        parser.receive_bytes(junk[i : i + chunk])
        while (event := parser.next_event()) is not NEED_DATA:
            events.append(event)
        assert parser.buffered <= max(MAX, 1)
    assert len(events) == 1 and isinstance(events[0], LineTooLong)
    assert events[0].length > MAX
    # The \r\n arrives byte by byte; only the next line counts.
    for piece in (b"\r", b"\n", b"AT\r\n"):
        parser.receive_bytes(piece)
        while (event := parser.next_event()) is not NEED_DATA:
            events.append(event)
    assert events[1:] == [cmd(b"AT\r\n", "")]


def test_garbage_with_trailing_cr_then_non_newline():
    """A \\r kept while discarding is dropped when the next byte is not \\n."""
    parser = Parser(8)
    parser.receive_bytes(b"X" * 20 + b"\r")
    assert isinstance(parser.next_event(), LineTooLong)
    assert parser.next_event() is NEED_DATA
    assert parser.buffered <= 1
    parser.receive_bytes(b"Y")
    assert parser.next_event() is NEED_DATA
    parser.receive_bytes(b"\nAT\r\n")  # \r Y \n is not a line end: still discarding
    assert parser.next_event() is NEED_DATA
    parser.receive_bytes(b"AT\r\n")
    assert parser.next_event() == cmd(b"AT\r\n", "")


# -- data mode -------------------------------------------------------------------------------

DATA_CASES = [
    (
        b"AT+CIPSEND=5\r\nhello",
        [cmd(b"AT+CIPSEND=5\r\n", "+CIPSEND", Kind.SET, Bare("5")), DataChunk(b"hello"), DataComplete(5)],
    ),
    # Payload is raw: line ends, AT commands, NUL and 0xFF are just bytes.
    (
        b"AT+CIPSEND=0,8\r\nAT\r\n\x00\xff\r\n",
        [
            cmd(b"AT+CIPSEND=0,8\r\n", "+CIPSEND", Kind.SET, Bare("0"), Bare("8")),
            DataChunk(b"AT\r\n\x00\xff\r\n"),
            DataComplete(8),
        ],
    ),
    # Payload is not limited by max_line.
    (
        b"AT+CIPSEND=100\r\n" + b"z" * 100,
        [
            cmd(b"AT+CIPSEND=100\r\n", "+CIPSEND", Kind.SET, Bare("100")),
            DataChunk(b"z" * 100),
            DataComplete(100),
        ],
    ),
    # Bytes after the payload are parsed as commands again.
    (
        b"AT+CIPSEND=2\r\nhiAT\r\nAT+CIPSEND=1\r\n!ATE0\r\n",
        [
            cmd(b"AT+CIPSEND=2\r\n", "+CIPSEND", Kind.SET, Bare("2")),
            DataChunk(b"hi"),
            DataComplete(2),
            cmd(b"AT\r\n", ""),
            cmd(b"AT+CIPSEND=1\r\n", "+CIPSEND", Kind.SET, Bare("1")),
            DataChunk(b"!"),
            DataComplete(1),
            cmd(b"ATE0\r\n", "E0"),
        ],
    ),
    # A payload that looks like the end of a line does not confuse what follows.
    (
        b"AT+CIPSEND=1\r\n\rAT\r\n",
        [
            cmd(b"AT+CIPSEND=1\r\n", "+CIPSEND", Kind.SET, Bare("1")),
            DataChunk(b"\r"),
            DataComplete(1),
            cmd(b"AT\r\n", ""),
        ],
    ),
]


@pytest.mark.parametrize("limit", [None, 1, 3, 64])
@pytest.mark.parametrize(("data", "expected"), DATA_CASES)
def test_data_mode(data, expected, limit):
    """After expect_data(n), n bytes come out as chunks within limit, then DataComplete."""
    check(data, expected, limit=limit)


def test_data_mode_incomplete_payload():
    """A short payload leaves the parser in data mode, counting what is left."""
    check(
        b"AT+CIPSEND=10\r\nabc",
        [cmd(b"AT+CIPSEND=10\r\n", "+CIPSEND", Kind.SET, Bare("10")), DataChunk(b"abc")],
        clean=False,
    )
    owner = Owner()
    owner.feed(b"AT+CIPSEND=10\r\nabc")
    assert owner.parser.in_data_mode
    assert owner.parser.data_left == 7
    owner.feed(b"defghij\r\n")
    # The \r\n after the payload is not payload: it is a new (empty) line.
    assert normalize(owner.events[-3:], MAX) == [DataChunk(b"defghij"), DataComplete(10), bad(b"\r\n", NoAt)]
    assert not owner.parser.in_data_mode
    assert owner.parser.buffered == 0


def test_data_chunks_as_large_as_buffer_allows():
    """Without a limit, one chunk carries every buffered payload byte."""
    parser = Parser()
    parser.expect_data(1000)
    parser.receive_bytes(bytes(range(256)) * 5)
    assert parser.next_event() == DataChunk((bytes(range(256)) * 4)[:1000])
    assert parser.data_left == 0
    assert parser.next_event() == DataComplete(1000)
    assert parser.buffered == 280


def test_data_limit_respected_and_zero_waits():
    """limit caps each chunk; limit=0 returns NEED_DATA and consumes nothing."""
    parser = Parser()
    parser.expect_data(10)
    parser.receive_bytes(b"0123456789")
    assert parser.next_event(limit=0) is NEED_DATA
    assert parser.data.buffered == 10 and parser.data_left == 0  # taken, not yet handed out
    assert parser.next_event(limit=4) == DataChunk(b"0123")
    assert parser.data.buffered == 6
    assert parser.next_event(limit=4) == DataChunk(b"4567")
    assert parser.next_event(limit=4) == DataChunk(b"89")
    assert parser.in_data_mode
    # No payload byte is needed any more, so even limit=0 completes.
    assert parser.next_event(limit=0) == DataComplete(10)
    assert not parser.in_data_mode
    assert parser.next_event(limit=0) is NEED_DATA


def test_data_mode_waits_for_bytes():
    """In data mode an empty buffer is NEED_DATA, not DataComplete."""
    parser = Parser()
    parser.expect_data(3)
    assert parser.in_data_mode and parser.data_left == 3
    assert parser.next_event() is NEED_DATA
    parser.receive_bytes(b"a")
    assert parser.next_event() == DataChunk(b"a")
    assert parser.next_event() is NEED_DATA
    parser.receive_bytes(b"bc")
    assert parser.next_event() == DataChunk(b"bc")
    assert parser.next_event() == DataComplete(3)


@pytest.mark.parametrize("length", [0, -1])
def test_expect_data_rejects_non_positive(length):
    """expect_data needs at least one byte; the parser stays in command mode."""
    parser = Parser()
    with pytest.raises(ValueError):
        parser.expect_data(length)
    assert not parser.in_data_mode
    parser.receive_bytes(b"AT\r\n")
    assert parser.next_event() == cmd(b"AT\r\n", "")


def test_expect_data_after_partial_scan():
    """Bytes already scanned for \\r\\n in command mode are payload once data mode starts."""
    parser = Parser()
    parser.receive_bytes(b"AT+CIPSEND=4\r\nab")
    assert parser.next_event() == cmd(b"AT+CIPSEND=4\r\n", "+CIPSEND", Kind.SET, Bare("4"))
    parser.expect_data(4)
    parser.receive_bytes(b"\r\n")
    assert parser.next_event() == DataChunk(b"ab\r\n")
    assert parser.next_event() == DataComplete(4)
    assert parser.next_event() is NEED_DATA


# -- discard_pending -------------------------------------------------------------------------


def test_discard_pending_returns_and_drops_buffer():
    """discard_pending returns every buffered byte; the next line parses cleanly."""
    parser = Parser()
    parser.receive_bytes(b"AT+GMR\r\nAT+CWJAP")
    assert parser.next_event() == cmd(b"AT+GMR\r\n", "+GMR")
    assert parser.next_event() is NEED_DATA
    parser.receive_bytes(b"=1\r\nAT\r\n")
    assert parser.discard_pending() == b"AT+CWJAP=1\r\nAT\r\n"
    assert parser.buffered == 0
    assert parser.next_event() is NEED_DATA
    assert parser.discard_pending() == b""


def test_discard_pending_resets_scan_position():
    """After a discard, a line shorter than what was dropped is still found."""
    parser = Parser()
    parser.receive_bytes(b"ABCDEFGHIJ")
    assert parser.next_event() is NEED_DATA
    assert parser.discard_pending() == b"ABCDEFGHIJ"
    parser.receive_bytes(b"AT\r\n")
    assert parser.next_event() == cmd(b"AT\r\n", "")


def test_discard_pending_ends_discarding_a_long_line():
    """Discarding while an over-long line is being dropped returns to command mode."""
    parser = Parser(8)
    parser.receive_bytes(b"X" * 20)
    assert isinstance(parser.next_event(), LineTooLong)
    parser.discard_pending()
    parser.receive_bytes(b"AT\r\n")
    assert parser.next_event() == cmd(b"AT\r\n", "")


def test_discard_pending_after_payload():
    """Bytes beyond a payload stay buffered after DataComplete and can be discarded (busy)."""
    parser = Parser()
    parser.expect_data(2)
    parser.receive_bytes(b"hiEXTRA")
    assert parser.next_event() == DataChunk(b"hi")
    assert parser.next_event() == DataComplete(2)
    assert parser.buffered == 5
    assert parser.discard_pending() == b"EXTRA"
    parser.receive_bytes(b"AT\r\n")
    assert parser.next_event() == cmd(b"AT\r\n", "")


def test_discard_pending_in_data_mode_keeps_the_payload():
    """Payload bytes are the data phase's: discarding command input never drops them."""
    parser = Parser()
    parser.expect_data(4)
    parser.receive_bytes(b"ab")
    assert parser.discard_pending() == b""
    assert parser.in_data_mode and parser.data_left == 2
    parser.receive_bytes(b"cdAT")
    assert parser.next_event() == DataChunk(b"abcd")
    assert parser.next_event() == DataComplete(4)
    assert parser.discard_pending() == b"AT"


def test_a_repeated_send_line_is_parsed_once_and_gives_the_same_event():
    """A data command's line seen before comes from the parser's cache, unchanged."""
    parser = Parser()
    parser.receive_bytes(b"AT+CIPSEND=0,2048\r\nAT+CIPSEND=0,2048\r\nAT+CIPSEND=0,20\r\n")
    first, again, other = parser.next_event(), parser.next_event(), parser.next_event()
    assert first == cmd(b"AT+CIPSEND=0,2048\r\n", "+CIPSEND", Kind.SET, Bare("0"), Bare("2048"))
    assert again is first
    assert other == cmd(b"AT+CIPSEND=0,20\r\n", "+CIPSEND", Kind.SET, Bare("0"), Bare("20"))


def test_lines_of_other_commands_are_not_kept():
    """Only the data commands' lines are remembered: a password line is parsed anew, never held."""
    parser = Parser()
    line = b'AT+CWJAP="ap","secret"\r\n'
    parser.receive_bytes(line + line)
    first, again = parser.next_event(), parser.next_event()
    assert first == again and first is not again
    assert not parser._lines
