"""Tests for bridged.at.datamode: the data phase after ``>``, on an explicit clock.

The machine is sans I/O, so every test drives time itself: ``feed(data, now)``,
``next_chunk(now, limit)`` and ``deadline()``.  Three layers:

* examples per kind (AT+CIPSEND, AT+CIPSENDEX, AT+CIPSENDL, passthrough), on the
  machine and through ``Parser``;
* the ``+++`` guard rules: an h2-style table from (state, input) to (next state,
  payload out, command input back), and every timing of a ``+++`` burst checked
  against ``spec_outcome``, a byte-by-byte reading of the spec's rule;
* hypothesis: random streams, feeds and clocks give what ``spec_outcome`` says,
  however often the owner looks (only when bytes arrive, or at every deadline).
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridged.at.datamode import GUARD, DataKind, DataMachine, Escape
from bridged.at.parser import NEED_DATA, CommandLine, DataChunk, DataComplete, DataEscaped, Kind, Parser

SEND, SENDEX, SENDL, PASSTHROUGH = DataKind.SEND, DataKind.SENDEX, DataKind.SENDL, DataKind.PASSTHROUGH
FINITE = [SEND, SENDEX, SENDL]
STREAMING = [SENDL, PASSTHROUGH]

G = GUARD
EPS = 1e-6
T0 = 5000.0  # the prompt's time: a large clock value, as loop.time() is after a while
LATER = 10.0  # long enough for every timer to have run out


# -- harness ---------------------------------------------------------------------------------


def make(kind: DataKind, length: int = 10, *, chunk: int = 2920, interval: float = G,
         now: float = T0) -> DataMachine:
    return DataMachine(kind, length, now, chunk, interval)


def drain(machine: DataMachine, now: float, limit: int | None = None) -> list:
    """Every next_chunk() result at ``now`` until it returns None."""
    out = []
    for _ in range(100_000):
        item = machine.next_chunk(now, limit)
        if item is None:
            return out
        if not isinstance(item, Escape):
            assert type(item) is bytes and 0 < len(item) <= (limit or len(item))
        out.append(item)
    raise AssertionError("next_chunk() never returned None")


def payload_of(items: list) -> bytes:
    return b"".join(item for item in items if not isinstance(item, Escape))


def escapes_in(items: list) -> int:
    return sum(isinstance(item, Escape) for item in items)


def state_of(machine: DataMachine) -> str:
    """The machine's state, as the tables below name it (the test's one look inside)."""
    held, backslash, finished, escaped = machine._plus, machine._backslash, machine._done, machine._escaped
    assert 0 <= held <= 3
    assert not (finished and escaped)
    if escaped or finished:
        assert not held, "a finished phase holds no '+' back"
        assert escaped or not backslash  # (a \\ pending when +++ cancels is moot)
        return "ESCAPED" if escaped else "DONE"
    if held:
        return f"PLUS{held}"
    if backslash:
        return "BACKSLASH"
    if 0 <= machine.left < 3:
        return "SHORT"
    return "OPEN"


def check_invariants(machine: DataMachine, length: int, fed: int) -> None:
    """What holds after any step, in any state."""
    state = state_of(machine)
    assert machine.buffered >= 0 and machine.received <= fed
    assert machine.done == (state in ("DONE", "ESCAPED"))
    assert not machine.complete or (state == "DONE" and machine.buffered == 0)
    if machine.kind is PASSTHROUGH:
        assert machine.left == -1 and state not in ("DONE", "SHORT")
    elif state != "ESCAPED":
        assert 0 <= machine.left <= length
        if machine.kind is not SENDEX:  # raw bytes: every byte taken counts
            assert machine.taken + machine.left == length
            assert machine.received == machine.taken
    deadline = machine.deadline()
    assert deadline is None or math.isfinite(deadline)


class Run:
    """Plays the owner of a machine: feeds, pulls after every feed, records everything."""

    def __init__(self, machine: DataMachine, limit: int | None = None) -> None:
        self.machine = machine
        self.limit = limit
        self.payload = bytearray()
        self.rest = bytearray()
        self.escapes = 0

    def feed(self, data: bytes, now: float) -> None:
        self.rest += self.machine.feed(data, now)
        self.pull(now)

    def pull(self, now: float) -> list:
        items = drain(self.machine, now, self.limit)
        self.payload += payload_of(items)
        self.escapes += escapes_in(items)
        return items


# -- the spec, read byte by byte ---------------------------------------------------------------


def process(kind: DataKind, length: int, raw: bytes) -> tuple[bytes, int, bool]:
    """Payload, raw bytes used, and whether the phase ended, for ``raw`` without any +++."""
    if kind is PASSTHROUGH:
        return bytes(raw), len(raw), False
    if kind is not SENDEX:
        n = min(len(raw), length)
        return bytes(raw[:n]), n, n == length
    out, i, backslash = bytearray(), 0, False  # AT+CIPSENDEX: \0 ends, \x is x
    while i < len(raw) and len(out) < length:
        byte = raw[i]
        i += 1
        if backslash:
            backslash = False
            if byte == ord("0"):
                return bytes(out), i, True
            out.append(byte)
        elif byte == ord("\\"):
            backslash = True
        else:
            out.append(byte)
    return bytes(out), i, len(out) == length


def spec_outcome(kind: DataKind, length: int, feeds: list[tuple[float, bytes]], start: float = T0):
    """(payload, command input, escaped) for timed feeds, from the spec's +++ rule.

    The rule, per byte: three '+' with at least GUARD of silence before the first
    and after the third, less than GUARD between them; bytes of one feed arrive
    together.  A +++ counts only while the phase is open with 3 or more bytes left.
    """
    times: list[float] = []
    stream = bytearray()
    for at, data in feeds:
        times += [at] * len(data)
        stream += data
    for k in range(len(stream) - 2):
        before = times[k - 1] if k else start
        after = times[k + 3] if k + 3 < len(stream) else math.inf
        if (
            stream[k : k + 3] == b"+++"
            and times[k] >= before + G
            and times[k + 1] < times[k] + G
            and times[k + 2] < times[k + 1] + G
            and after >= times[k + 2] + G
        ):
            payload, _, ended = process(kind, length, bytes(stream[:k]))
            if ended or (kind is not PASSTHROUGH and length - len(payload) < 3):
                break  # the phase was over (or too short for a +++) before this burst
            return payload, bytes(stream[k + 3 :]), True
    payload, used, _ = process(kind, length, bytes(stream))
    return payload, bytes(stream[used:]), False


def timeline(gaps_and_data, start: float = T0) -> list[tuple[float, bytes]]:
    feeds, at = [], start
    for gap, data in gaps_and_data:
        at += gap
        feeds.append((at, data))
    return feeds


# -- AT+CIPSEND -----------------------------------------------------------------------------------


def test_send_takes_exactly_length_and_returns_the_rest():
    """SEND takes <length> bytes; what follows in the same read is command input."""
    machine = make(SEND, 5)
    assert machine.feed(b"hel", T0 + 0.001) == b""
    assert machine.feed(b"loAT\r\n", T0 + 0.002) == b"AT\r\n"
    assert machine.done and machine.left == 0 and machine.received == 5
    assert drain(machine, T0 + 0.002) == [b"hello"]
    assert machine.complete
    assert machine.feed(b"more", T0 + 1) == b"more"  # a finished phase takes nothing


def test_send_hands_chunks_out_as_soon_as_fed():
    """SEND and SENDEX hand out every byte at once: no packing, no timer."""
    for kind in (SEND, SENDEX):
        machine = make(kind, 100, chunk=4, interval=1.0)
        machine.feed(b"abcdefghij", T0 + 0.001)
        assert machine.next_chunk(T0 + 0.001) == b"abcdefghij"
        assert machine.deadline() is None
        machine.feed(b"k", T0 + 0.002)
        assert machine.next_chunk(T0 + 0.002) == b"k"
        assert machine.next_chunk(T0 + 0.002) is None and not machine.done


def test_send_respects_limit():
    """limit caps each chunk; limit=0 hands out nothing; the phase completes after the last byte."""
    machine = make(SEND, 7)
    machine.feed(b"abcdefg", T0 + 0.001)
    assert machine.next_chunk(T0 + 0.001, 0) is None and machine.buffered == 7
    assert [machine.next_chunk(T0 + 0.001, 3) for _ in range(3)] == [b"abc", b"def", b"g"]
    assert machine.next_chunk(T0 + 0.001, 3) is None and machine.complete


def test_send_plus_bytes_inside_payload_are_data():
    """'+' bytes that arrive with other bytes, or without silence before them, are payload at once."""
    machine = make(SEND, 9)
    machine.feed(b"a+++", T0 + 0.001)
    assert machine.next_chunk(T0 + 0.001) == b"a+++"
    machine.feed(b"+++", T0 + 0.001 + G - EPS)  # silence just short of the guard time
    assert machine.next_chunk(T0 + 0.001 + G - EPS) == b"+++"
    assert machine.deadline() is None


def test_send_through_parser_with_trailing_command():
    """Through the parser: chunks, DataComplete(<length>), then the surplus as a command line."""
    parser = Parser()
    parser.expect_data(4, T0)
    parser.receive_bytes(b"ab", T0 + 0.001)
    assert parser.next_event(None, T0 + 0.001) == DataChunk(b"ab")
    assert parser.next_event(None, T0 + 0.001) is NEED_DATA
    parser.receive_bytes(b"cdAT\r\n", T0 + 0.002)
    assert parser.next_event(1, T0 + 0.002) == DataChunk(b"c")
    assert parser.next_event(1, T0 + 0.002) == DataChunk(b"d")
    assert parser.next_event(1, T0 + 0.002) == DataComplete(4)
    assert parser.next_event(None, T0 + 0.002) == CommandLine(b"AT\r\n", "", Kind.EXECUTE)
    assert not parser.in_data_mode and parser.deadline() is None


# -- AT+CIPSENDEX ---------------------------------------------------------------------------------

# (length, bytes, payload, done, command input)
SENDEX_CASES = [
    (10, b"ab\\0cd", b"ab", True, b"cd"),  # \0 ends early; the two bytes are not sent
    (2, b"\\0", b"", True, b""),  # an empty send
    (4, b"a\\\\0b", b"a\\0b", True, b""),  # \\0 sends the two bytes \0
    (3, b"\\a\\+\\c", b"a+c", True, b""),  # \x is x
    (3, b"a\\\\b", b"a\\b", True, b""),  # \\ is one backslash
    (3, b"\\\\\\\\\\\\XY", b"\\\\\\", True, b"XY"),  # <length> counts unescaped bytes
    (2, b"ab\\0", b"ab", True, b"\\0"),  # the length is reached first: \0 is command input
    (5, b"abcdeAT\r\n", b"abcde", True, b"AT\r\n"),
    (5, b"ab\\", b"ab", False, b""),  # a trailing backslash waits
    (5, b"\\0\\0", b"", True, b"\\0"),  # only the first \0 belongs to the data
]


def feed_pieces(machine: DataMachine, pieces: list[bytes], start: float) -> tuple[bytes, bytes]:
    """Feed pieces GUARD/4 apart (never a +++ candidate); return (payload, command input)."""
    run = Run(machine)
    for i, piece in enumerate(pieces):
        run.feed(piece, start + (i + 1) * G / 4)
    run.pull(start + LATER)
    return bytes(run.payload), bytes(run.rest)


@pytest.mark.parametrize(("length", "data", "payload", "done", "rest"), SENDEX_CASES)
def test_sendex_escapes_any_split(length, data, payload, done, rest):
    """SENDEX unescapes the same way whether the bytes come whole, byte by byte or split anywhere."""
    splits = [[data], [data[i : i + 1] for i in range(len(data))]]
    splits += [[data[:i], data[i:]] for i in range(1, len(data))]
    for pieces in splits:
        machine = make(SENDEX, length)
        assert feed_pieces(machine, pieces, T0) == (payload, rest), pieces
        assert machine.complete == done and machine.taken == len(payload)


def test_sendex_backslash_at_end_of_read_then_zero_terminates():
    """A backslash ending one read and a '0' starting the next, even much later, end the data."""
    machine = make(SENDEX, 100)
    assert machine.feed(b"ab\\", T0 + 0.001) == b""
    assert machine.next_chunk(T0 + 0.001) == b"ab" and not machine.done
    assert machine.deadline() is None  # the backslash waits for input, not for time
    assert machine.feed(b"0AT\r\n", T0 + 5.0) == b"AT\r\n"
    assert machine.complete and machine.taken == 2 and machine.received == 4


def test_sendex_through_parser_counts_unescaped_bytes():
    """Through the parser: DataComplete carries the bytes sent after unescaping; the rest is a command."""
    parser = Parser()
    parser.start_data(SENDEX, 100, T0)
    parser.receive_bytes(b"a\\\\b\\", T0 + 0.001)
    assert parser.next_event(None, T0 + 0.001) == DataChunk(b"a\\b")
    parser.receive_bytes(b"0AT+GMR\r\n", T0 + 0.002)
    assert parser.next_event(None, T0 + 0.002) == DataComplete(3)
    assert parser.next_event(None, T0 + 0.002) == CommandLine(b"AT+GMR\r\n", "+GMR", Kind.EXECUTE)


# -- AT+CIPSENDL and passthrough: packing -------------------------------------------------------


@pytest.mark.parametrize("kind", STREAMING)
def test_streaming_full_chunk_goes_at_once_rest_waits_interval(kind):
    """A full chunk goes out at once; the short rest waits until interval after its first byte."""
    machine = make(kind, 100, chunk=4, interval=0.05)
    machine.feed(b"abcdef", T0 + 0.1)
    assert machine.next_chunk(T0 + 0.1) == b"abcd"
    assert machine.next_chunk(T0 + 0.1) is None
    assert machine.deadline() == T0 + 0.1 + 0.05
    assert machine.next_chunk(T0 + 0.1 + 0.05 - EPS) is None
    assert machine.next_chunk(machine.deadline()) == b"ef"
    assert machine.deadline() is None


@pytest.mark.parametrize("kind", STREAMING)
def test_streaming_short_data_waits_from_first_byte(kind):
    """Bytes that keep arriving do not push the timer: it runs from the oldest buffered byte."""
    machine = make(kind, 100, chunk=100, interval=0.05)
    machine.feed(b"ab", T0 + 0.1)
    machine.feed(b"cd", T0 + 0.13)
    assert machine.next_chunk(T0 + 0.13) is None
    assert machine.deadline() == T0 + 0.1 + 0.05
    assert machine.next_chunk(T0 + 0.1 + 0.05) == b"abcd"


@pytest.mark.parametrize("kind", STREAMING)
def test_streaming_limit_respected(kind):
    """limit caps each chunk, full chunks included; limit=0 hands out nothing."""
    machine = make(kind, 100, chunk=4, interval=0.05)
    machine.feed(b"abcdefghij", T0 + 0.1)
    assert machine.next_chunk(T0 + 0.1, 3) == b"abc"
    assert machine.next_chunk(T0 + 0.1, 0) is None
    assert machine.next_chunk(T0 + 0.1, 3) == b"def"
    assert machine.next_chunk(T0 + 0.1, 3) == b"ghi"  # 4 buffered: a full chunk, cut by the limit
    assert machine.next_chunk(T0 + 0.1, 3) is None  # 'j' alone waits for the interval
    assert machine.deadline() == T0 + 0.1 + 0.05
    assert machine.next_chunk(T0 + 0.1 + 0.05, 3) == b"j"


@pytest.mark.parametrize("kind", STREAMING)
def test_streaming_partial_pull_keeps_arrival_time(kind):
    """After a pull cut short by limit, the remaining old bytes go at once, not one interval later."""
    machine = make(kind, 100, chunk=100, interval=0.05)
    machine.feed(b"abcdef", T0 + 0.1)
    due = T0 + 0.1 + 0.05
    assert machine.next_chunk(due - EPS, 2) is None
    assert machine.next_chunk(due, 2) == b"ab"
    assert machine.next_chunk(due, 2) == b"cd"
    assert machine.next_chunk(due, 0) is None
    assert machine.deadline() == due  # still due: only the limit holds 'ef' back
    assert machine.next_chunk(due + 0.001, 5) == b"ef"


@pytest.mark.parametrize("kind", STREAMING)
def test_streaming_rest_after_chunk_waits_from_its_own_arrival(kind):
    """After a full chunk, the bytes left wait for interval after they arrived, even when pulled late."""
    machine = make(kind, 100, chunk=4, interval=0.05)
    machine.feed(b"abc", T0 + 0.1)
    machine.feed(b"defg", T0 + 0.11)
    assert machine.next_chunk(T0 + 0.13) == b"abcd"  # pulled late: the timer is the arrival's
    assert machine.next_chunk(T0 + 0.13) is None
    assert machine.deadline() == T0 + 0.11 + 0.05
    assert machine.next_chunk(T0 + 0.11 + 0.05) == b"efg"


@pytest.mark.parametrize("kind", STREAMING)
def test_streaming_interval_zero_sends_at_once(kind):
    """With AT+TRANSINTVL=0 whatever arrives goes out at once."""
    machine = make(kind, 100, chunk=100, interval=0.0)
    machine.feed(b"xy", T0 + 0.001)
    assert machine.next_chunk(T0 + 0.001) == b"xy"


def test_sendl_completes_after_length_raw_bytes():
    """SENDL takes <length> raw bytes (no unescaping); the last short block goes without waiting."""
    machine = make(SENDL, 6, chunk=4, interval=0.05)
    assert machine.feed(b"a\\0bcdXY", T0 + 0.001) == b"XY"
    assert machine.done and machine.received == 6
    assert payload_of(drain(machine, T0 + 0.001)) == b"a\\0bcd"
    assert machine.complete and machine.taken == 6


def test_sendl_through_parser_packs_and_completes():
    """Through the parser: SENDL chunks within limit, the deadline for the rest, DataComplete(<length>)."""
    parser = Parser()
    parser.start_data(SENDL, 10, T0, chunk=4, interval=0.05)
    parser.receive_bytes(b"abcdef", T0 + 0.001)
    assert parser.next_event(3, T0 + 0.001) == DataChunk(b"abc")
    assert parser.next_event(3, T0 + 0.001) is NEED_DATA  # 'def' is less than a chunk: it waits
    assert parser.deadline() == T0 + 0.001 + 0.05
    assert parser.next_event(None, T0 + 0.001 + 0.05) == DataChunk(b"def")
    parser.receive_bytes(b"ghijAT\r\n", T0 + 0.06)
    assert parser.next_event(None, T0 + 0.06) == DataChunk(b"ghij")
    assert parser.next_event(None, T0 + 0.06) == DataComplete(10)
    assert parser.next_event(None, T0 + 0.06) == CommandLine(b"AT\r\n", "", Kind.EXECUTE)


def test_passthrough_never_completes():
    """PASSTHROUGH takes everything and never ends on its own."""
    machine = make(PASSTHROUGH, 0, chunk=8, interval=0.0)
    run = Run(machine)
    for i in range(50):
        run.feed(bytes([i]) * 7 + b"\r\n", T0 + 0.001 * (i + 1))
    assert bytes(run.payload) == b"".join(bytes([i]) * 7 + b"\r\n" for i in range(50))
    assert run.rest == b"" and not machine.done and not machine.complete



def test_a_streams_chunk_carries_its_last_bytes_arrival():
    """A passthrough tail AT+TRANSINTVL held goes out with the time its last byte came, not
    the time it went (the uplink ring times the MCU's sends by it); whole chunks too."""
    parser = Parser()
    parser.start_data(PASSTHROUGH, 0, T0, chunk=4, interval=0.02)
    parser.receive_bytes(b"ab", T0 + 0.001)
    parser.receive_bytes(b"cdef", T0 + 0.005)
    chunk = parser.next_event(None, T0 + 0.005)
    assert (chunk.data, chunk.at) == (b"abcd", T0 + 0.005)
    assert parser.next_event(None, T0 + 0.006) is NEED_DATA  # 'ef' waits the interval
    chunk = parser.next_event(None, T0 + 0.03)
    assert (chunk.data, chunk.at) == (b"ef", T0 + 0.005)

# -- +++: the table ---------------------------------------------------------------------------------

# name -> (bytes, time since the previous step).  "silence" feeds nothing: it pulls.
INPUTS = {
    "plus_after_silence": (b"+", G),
    "plus_soon": (b"+", G / 2),
    "byte_soon": (b"x", G / 2),
    "byte_after_silence": (b"x", G),
    "backslash_soon": (b"\\", G / 2),
    "zero_soon": (b"0", G / 2),
    "silence": (b"", G),
}

# state -> the steps that reach it from a fresh machine (length 10), as (bytes, gap).
SETUPS = {
    "OPEN": [(b"ab", 0.1)],
    "PLUS1": [(b"ab", 0.1), (b"+", G)],
    "PLUS2": [(b"ab", 0.1), (b"+", G), (b"+", G / 2)],
    "PLUS3": [(b"ab", 0.1), (b"+", G), (b"+", G / 2), (b"+", G / 2)],
    "BACKSLASH": [(b"ab\\", 0.1)],
    "SHORT": [(b"abcdefgh", 0.1)],  # 2 bytes left: too few for a +++
    "DONE": [(b"abcdefghij", 0.1)],
    "ESCAPED": [(b"ab", 0.1), (b"+++", G), (b"", G)],
}


def _data_row(state_after: str, held: bytes) -> dict:
    """Inputs that turn whatever '+' were held into data, followed by the new byte."""
    return {
        "byte_soon": (state_after, held + b"x", b""),
        "byte_after_silence": (state_after, held + b"x", b""),
        "backslash_soon": (state_after, held + b"\\", b""),
        "zero_soon": (state_after, held + b"0", b""),
    }


def _ignored_row(state: str) -> dict:
    return {name: (state, b"", data) for name, (data, _) in INPUTS.items()}


# (state, input) -> (next state, payload handed out, command input returned); AT+CIPSEND.
SEND_TABLE = {
    "OPEN": {
        "plus_after_silence": ("PLUS1", b"", b""),  # held back: may start a +++
        "plus_soon": ("OPEN", b"+", b""),
        **_data_row("OPEN", b""),
        "silence": ("OPEN", b"", b""),
    },
    "PLUS1": {
        "plus_after_silence": ("PLUS1", b"+", b""),  # the lone '+' was data; the new one may start a +++
        "plus_soon": ("PLUS2", b"", b""),
        **_data_row("OPEN", b"+"),
        "silence": ("OPEN", b"+", b""),
    },
    "PLUS2": {
        "plus_after_silence": ("PLUS1", b"++", b""),
        "plus_soon": ("PLUS3", b"", b""),
        **_data_row("OPEN", b"++"),
        "silence": ("OPEN", b"++", b""),
    },
    "PLUS3": {
        "plus_after_silence": ("ESCAPED", b"", b"+"),  # the silence after +++ passed: escape
        "plus_soon": ("OPEN", b"++++", b""),  # four '+' are data
        **_data_row("OPEN", b"+++"),
        "byte_after_silence": ("ESCAPED", b"", b"x"),
        "silence": ("ESCAPED", b"", b""),
    },
    "SHORT": {
        "plus_after_silence": ("SHORT", b"+", b""),  # fewer than 3 left: never held back
        "plus_soon": ("SHORT", b"+", b""),
        **_data_row("SHORT", b""),
        "silence": ("SHORT", b"", b""),
    },
    "DONE": _ignored_row("DONE"),
    "ESCAPED": _ignored_row("ESCAPED"),
}

SENDEX_TABLE = {
    **SEND_TABLE,
    "OPEN": {**SEND_TABLE["OPEN"], "backslash_soon": ("BACKSLASH", b"", b"")},
    "PLUS1": {**SEND_TABLE["PLUS1"], "backslash_soon": ("BACKSLASH", b"+", b"")},
    "PLUS2": {**SEND_TABLE["PLUS2"], "backslash_soon": ("BACKSLASH", b"++", b"")},
    "PLUS3": {**SEND_TABLE["PLUS3"], "backslash_soon": ("BACKSLASH", b"+++", b"")},
    "SHORT": {**SEND_TABLE["SHORT"], "backslash_soon": ("BACKSLASH", b"", b"")},
    "BACKSLASH": {
        "plus_after_silence": ("PLUS1", b"", b""),  # a +++ after a backslash still escapes
        "plus_soon": ("OPEN", b"+", b""),
        "byte_soon": ("OPEN", b"x", b""),
        "byte_after_silence": ("OPEN", b"x", b""),
        "backslash_soon": ("OPEN", b"\\", b""),
        "zero_soon": ("DONE", b"", b""),  # \0: the end, not sent
        "silence": ("BACKSLASH", b"", b""),
    },
}

TABLES = {
    SEND: SEND_TABLE,
    SENDEX: SENDEX_TABLE,
    SENDL: SEND_TABLE,
    PASSTHROUGH: {state: row for state, row in SEND_TABLE.items() if state not in ("SHORT", "DONE")},
}

TRANSITIONS = [
    (kind, state, name) for kind, table in TABLES.items() for state in table for name in INPUTS
]


@pytest.mark.parametrize(("kind", "state", "name"), TRANSITIONS, ids=lambda v: getattr(v, "name", v))
def test_state_table(kind, state, name):
    """Every (state, input) ends in the state, payload and command input the table gives."""
    machine = make(kind, 10, chunk=1)  # chunk=1: streaming kinds hand out each byte at once
    run = Run(machine)
    now, fed = T0, 0
    for data, gap in SETUPS[state]:
        now += gap
        run.feed(data, now) if data else run.pull(now)
        fed += len(data)
    assert state_of(machine) == state
    before_payload, before_escapes, before_taken = bytes(run.payload), run.escapes, machine.taken

    data, gap = INPUTS[name]
    now += gap
    run.feed(data, now) if data else run.pull(now)
    fed += len(data)

    next_state, out, rest = TABLES[kind][state][name]
    assert state_of(machine) == next_state
    assert bytes(run.payload[len(before_payload) :]) == out
    assert bytes(run.rest) == rest
    assert run.escapes - before_escapes == (next_state == "ESCAPED" != state)
    check_invariants(machine, 10, fed)
    if next_state in ("PLUS1", "PLUS2", "PLUS3"):
        assert machine.deadline() == now + G  # the held '+' are decided after the guard time
    if next_state == "DONE":
        assert machine.complete
        if state == "DONE":
            assert machine.taken == before_taken
    if next_state == "ESCAPED":
        assert drain(machine, now + LATER) == []  # nothing is handed out after an escape
        assert machine.feed(b"late", now + LATER) == b"late"


# -- +++: every timing of a burst -------------------------------------------------------------------

SPLITS = [[b"+++"], [b"+", b"++"], [b"++", b"+"], [b"+", b"+", b"+"]]
PRE = [G - EPS, G, 3 * G]  # silence before the first '+'
INNER = [0.0, EPS, G / 2, G - EPS, G, 3 * G]  # between the reads of the burst
POST = [  # what follows: (gap, bytes); b"" = nothing more arrives
    (G - EPS, b"x"),
    (G - EPS, b"+"),
    (G, b"x"),
    (G, b"+++"),
    (3 * G, b"+"),
    (None, b""),
]


def _bursts():
    for kind in (SEND, SENDEX, SENDL, PASSTHROUGH):
        for split in SPLITS:
            for pre in PRE:
                for inner in itertools.product(INNER, repeat=len(split) - 1):
                    for post in POST:
                        yield kind, split, pre, inner, post


def test_guard_times_every_burst_timing():
    """For every split and timing of a burst, +++ escapes as the spec's rule says and nothing else is lost."""
    escaped_count = 0
    for kind, split, pre, inner, (post_gap, post) in _bursts():
        steps = [(0.1, b"ab")] + [(pre if i == 0 else inner[i - 1], piece) for i, piece in enumerate(split)]
        if post:
            steps.append((post_gap, post))
        feeds = timeline(steps)
        payload, rest, escaped = spec_outcome(kind, 10, feeds)
        machine = make(kind, 10, chunk=1)
        run = Run(machine)
        for at, data in feeds:
            run.feed(data, at)
        run.pull(feeds[-1][0] + LATER)
        case = (kind, split, pre, inner, post_gap, post)
        assert (bytes(run.payload), bytes(run.rest), run.escapes) == (payload, rest, int(escaped)), case
        escaped_count += escaped
    assert escaped_count > 100  # the rule does fire in this table


def test_plus_burst_waits_for_post_guard_and_deadline_says_when():
    """A +++ is held until the guard time after its last '+'; deadline() says exactly when."""
    for kind in DataKind:
        machine = make(kind, 10)
        machine.feed(b"+", T0 + 1.0)
        machine.feed(b"++", T0 + 1.0 + G / 2)
        assert machine.deadline() == T0 + 1.0 + G / 2 + G
        assert machine.next_chunk(T0 + 1.0 + G / 2 + G - EPS) is None
        assert not machine.done
        assert isinstance(machine.next_chunk(machine.deadline()), Escape)
        assert machine.done and machine.deadline() is None
        assert machine.next_chunk(T0 + LATER) is None


def test_deadline_is_exact_on_any_clock():
    """At exactly deadline() next_chunk() acts, whatever the clock's value (no float gap between the two)."""
    for i in range(2000):
        start = i * 0.377  # monotonic clocks start anywhere
        machine = make(PASSTHROUGH, 0, chunk=100, interval=0.05, now=start)
        machine.feed(b"+++", start + 0.5)
        assert machine.next_chunk(machine.deadline()) == Escape(), start
        machine = make(PASSTHROUGH, 0, chunk=100, interval=0.05, now=start)
        machine.feed(b"data", start + 0.001)
        assert machine.next_chunk(machine.deadline()) == b"data", start


def test_plus_counts_silence_from_the_prompt():
    """The silence before the first '+' counts from the prompt (the machine's start time)."""
    machine = make(SEND, 10)
    machine.feed(b"+++", T0 + G)
    assert machine.next_chunk(T0 + G + G) == Escape()
    early = make(SEND, 10)
    early.feed(b"+++", T0 + G - EPS)
    assert early.next_chunk(T0 + G - EPS) == b"+++"


def test_four_plus_are_data():
    """'++++' is data, in one read or as +++ then '+' within the guard time."""
    for pieces in ([b"++++"], [b"+++", b"+"], [b"+", b"+", b"+", b"+"]):
        machine = make(PASSTHROUGH, 0, interval=0.0)
        run = Run(machine)
        for i, piece in enumerate(pieces):
            run.feed(piece, T0 + 1.0 + i * G / 2)
        run.pull(T0 + LATER)
        assert bytes(run.payload) == b"++++" and run.escapes == 0


def test_plus_candidate_needs_three_bytes_left():
    """With fewer than 3 bytes left a '+' is never held back: it is payload (and may complete the phase)."""
    for kind in FINITE:
        machine = make(kind, 5)
        run = Run(machine)
        run.feed(b"abc", T0 + 0.1)
        run.feed(b"+++", T0 + 0.2)
        assert run.payload == b"abc++" and run.rest == b"+" and machine.complete
        machine = make(kind, 5)
        run = Run(machine)
        run.feed(b"ab", T0 + 0.1)
        run.feed(b"+++", T0 + 0.2)  # exactly 3 left: a candidate
        assert run.payload == b"ab" and not machine.done and machine.deadline() == T0 + 0.2 + G


def test_released_plus_adds_no_delay_beyond_the_hold():
    """A lone '+' held as a candidate goes out once the guard time passes, not a further interval later."""
    machine = make(PASSTHROUGH, 0, chunk=100, interval=G)
    machine.feed(b"+", T0 + 1.0)
    assert machine.next_chunk(T0 + 1.0) is None
    assert machine.next_chunk(T0 + 1.0 + G) == b"+"


def test_late_pull_gives_the_same_escape():
    """A +++ followed by silence escapes even when the owner looks only when the next bytes arrive."""
    machine = make(SEND, 10)
    machine.feed(b"ab", T0 + 0.1)
    assert machine.next_chunk(T0 + 0.1) == b"ab"
    machine.feed(b"+++", T0 + 0.2)
    assert machine.feed(b"AT\r\n", T0 + 0.3) == b"AT\r\n"
    assert machine.next_chunk(T0 + 0.3) == Escape()
    assert machine.next_chunk(T0 + 0.3) is None and machine.taken == 2


def test_escape_in_send_through_parser_cancels():
    """+++ in SEND gives DataEscaped with the bytes taken; nothing is handed out after it; then commands."""
    parser = Parser()
    parser.expect_data(10, T0)
    parser.receive_bytes(b"abcd", T0 + 0.1)
    assert parser.next_event(1, T0 + 0.1) == DataChunk(b"a")
    parser.receive_bytes(b"+++", T0 + 0.2)
    assert parser.next_event(0, T0 + 0.2) is NEED_DATA
    assert parser.deadline() == T0 + 0.2 + G
    assert parser.next_event(0, parser.deadline()) == DataEscaped(4)  # escape is not blocked by a full ring
    assert not parser.in_data_mode and parser.deadline() is None
    parser.receive_bytes(b"AT\r\n", T0 + 1.5)
    assert parser.next_event(None, T0 + 1.5) == CommandLine(b"AT\r\n", "", Kind.EXECUTE)


def test_escape_in_sendex_through_parser_cancels():
    """+++ in SENDEX (even after a pending backslash) cancels with DataEscaped."""
    parser = Parser()
    parser.start_data(SENDEX, 10, T0)
    parser.receive_bytes(b"x\\", T0 + 0.1)
    assert parser.next_event(None, T0 + 0.1) == DataChunk(b"x")
    parser.receive_bytes(b"++", T0 + 0.2)
    parser.receive_bytes(b"+", T0 + 0.21)
    assert parser.next_event(None, T0 + 0.21) is NEED_DATA
    assert parser.next_event(None, T0 + 0.21 + G) == DataEscaped(1)


def test_escape_leaves_passthrough_through_parser():
    """+++ ends passthrough; later bytes are command lines, not payload."""
    parser = Parser()
    parser.start_data(PASSTHROUGH, 0, T0, chunk=2920, interval=G)
    parser.receive_bytes(b"hello", T0 + 0.1)
    assert parser.next_event(None, T0 + 0.1) is NEED_DATA
    assert parser.next_event(None, parser.deadline()) == DataChunk(b"hello")
    parser.receive_bytes(b"+++", T0 + 0.5)
    assert parser.next_event(None, T0 + 0.5 + G) == DataEscaped(5)
    assert not parser.in_data_mode
    parser.receive_bytes(b"AT+CIPMODE=0\r\n", T0 + 2.0)
    event = parser.next_event(None, T0 + 2.0)
    assert isinstance(event, CommandLine) and event.name == "+CIPMODE"


@pytest.mark.parametrize("kind", STREAMING)
def test_escape_with_no_room_keeps_the_streams_leftover(kind):
    """+++ while the owner has no room (a full ring) still escapes; the stream's bytes taken before it
    and never handed out come with DataEscaped, in order; what follows +++ is command input."""
    parser = Parser()
    parser.start_data(kind, 1 << 20, T0, chunk=4, interval=G)
    parser.receive_bytes(b"abcdefgh", T0 + 0.1)
    assert parser.next_event(2, T0 + 0.1) == DataChunk(b"ab")
    assert parser.next_event(0, T0 + 0.1) is NEED_DATA  # the ring is full: cdefgh wait
    parser.receive_bytes(b"ijk", T0 + 0.5)
    parser.receive_bytes(b"+++", T0 + 1.0)
    assert parser.next_event(0, T0 + 1.0) is NEED_DATA
    assert parser.next_event(0, T0 + 1.0 + G) == DataEscaped(11, b"cdefghijk")
    parser.receive_bytes(b"AT\r\n", T0 + 2.0)
    assert parser.next_event(None, T0 + 2.0) == CommandLine(b"AT\r\n", "", Kind.EXECUTE)


def test_escape_in_send_with_no_room_leaves_nothing():
    """AT+CIPSEND's +++ cancels the whole send: no leftover, whatever was buffered."""
    machine = make(SEND, 10)
    machine.feed(b"abc", T0 + 0.1)
    machine.feed(b"+++", T0 + 0.5)
    assert drain(machine, T0 + 0.5 + G, limit=0) == [Escape()]
    assert machine.leftover() == b""


@pytest.mark.parametrize("kind", STREAMING)
def test_deadline_without_room_is_the_plus_guard_only(kind):
    """With no room the interval of bytes that cannot go is no deadline (a past one would wake the owner
    again and again); a +++ candidate's guard still is."""
    machine = make(kind, 1 << 20)
    machine.feed(b"data", T0 + 0.1)
    assert machine.deadline() == T0 + 0.1 + G
    assert machine.deadline(room=False) is None
    machine.feed(b"+++", T0 + 0.5)
    assert machine.deadline(room=False) == T0 + 0.5 + G


@pytest.mark.parametrize("kind", STREAMING)
@pytest.mark.parametrize("pieces", [
    [(0.5, b"+++x")],  # a byte within the guard after: no escape
    [(0.5, b"x+++")],  # a byte within the guard before
    [(0.5, b"++++")],  # four
    [(0.5, b"+"), (0.5 + G / 2, b"++x")],  # split, then a byte in the guard after
    [(0.5, b"+"), (0.5 + 2 * G, b"++")],  # split by a silence: three candidates that are data
])
def test_broken_escapes_with_no_room_stay_data_in_order(kind, pieces):
    """While the ring is full (no room) a +++ whose guard a byte breaks, four +, or a split +++ is data:
    no escape, and once room comes every byte goes out in the order it came."""
    machine = make(kind, 1 << 20)
    machine.feed(b"head", T0 + 0.1)
    sent = b"head"
    out = drain(machine, T0 + 0.1, limit=0)
    for at, data in pieces:
        machine.feed(data, T0 + at)
        sent += data
        out += drain(machine, T0 + at, limit=0)
    out += drain(machine, T0 + 2.0, limit=0)  # long after: any guard time has passed
    out += drain(machine, T0 + 2.0)  # room comes
    assert not any(isinstance(item, Escape) for item in out)
    assert payload_of(out) == sent
    assert machine.leftover() == b""


# -- hypothesis -----------------------------------------------------------------------------------

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GAPS = st.one_of(st.sampled_from([0.0, EPS, G / 2, G - EPS, G, G + EPS, 3 * G]), st.floats(0.0, 0.1))
PIECES = st.one_of(
    st.binary(max_size=6),
    st.lists(st.sampled_from([b"+", b"+", b"++", b"+++", b"\\", b"0", b"a"]), max_size=4).map(b"".join),
)
FEEDS = st.lists(st.tuples(GAPS, PIECES), max_size=12)
SHAPES = st.tuples(
    st.sampled_from(list(DataKind)),
    st.integers(1, 14),  # length
    st.sampled_from([1, 3, 5, 2920]),  # chunk
    st.sampled_from([0.0, G / 2, G, 0.05]),  # interval
    st.sampled_from([None, 1, 4]),  # limit
)


def run_machine(kind, length, chunk, interval, limit, feeds, at_deadlines: bool):
    """Drive a machine; check invariants and the deadline contract at every step."""
    machine = make(kind, length, chunk=chunk, interval=interval)
    run = Run(machine, limit)
    fed, last = 0, T0

    def catch_up(until: float) -> None:
        for _ in range(1000):
            deadline = machine.deadline()
            if deadline is None or deadline >= until:
                return
            assert deadline >= last, "a deadline in the past with nothing ready"
            run.pull(deadline)
            check_invariants(machine, length, fed)
            after = machine.deadline()
            assert after is None or after > deadline, "pulling at deadline() made no progress"
        raise AssertionError("deadlines never ran out")

    for at, data in feeds:
        if at_deadlines:
            catch_up(at)
        run.feed(data, at)
        fed, last = fed + len(data), at
        check_invariants(machine, length, fed)
        if limit is None:
            deadline = machine.deadline()
            assert deadline is None or deadline > at, "deadline() in the past although nothing is ready"
    if at_deadlines:
        catch_up(last + LATER)
    run.pull(last + LATER)
    check_invariants(machine, length, fed)
    assert machine.deadline() is None
    if machine.done:
        assert machine.feed(b"+++x", last + 2 * LATER) == b"+++x"
    return run


def check_against_spec(kind, length, interval, feeds, payload, rest, escaped, taken, complete):
    """Compare what the owner saw with spec_outcome()."""
    want_payload, want_rest, want_escaped = spec_outcome(kind, length, feeds)
    assert escaped == want_escaped
    assert rest == want_rest
    assert taken == len(want_payload)
    if escaped:
        # An escape drops what was not handed out yet: the payload is a prefix of what was taken.
        assert want_payload.startswith(payload)
        if kind in (SEND, SENDEX) or interval <= G:
            assert payload == want_payload  # every taken byte was due before the +++ was decided
    else:
        assert payload == want_payload
        stream = b"".join(data for _, data in feeds)
        if kind is not SENDEX:  # raw kinds without an escape: the payload is a prefix of the input
            assert payload + rest == stream
        assert complete == process(kind, length, stream)[2]


@SETTINGS
@given(SHAPES, FEEDS, st.booleans())
def test_machine_random_streams_match_spec(shape, gaps_and_data, at_deadlines):
    """Random feeds on a random clock give the spec's outcome, however often the owner looks."""
    kind, length, chunk, interval, limit = shape
    feeds = timeline(gaps_and_data)
    run = run_machine(kind, length, chunk, interval, limit, feeds, at_deadlines)
    machine = run.machine
    assert run.escapes <= 1
    check_against_spec(
        kind, length, interval, feeds,
        bytes(run.payload), bytes(run.rest), bool(run.escapes), machine.taken, machine.complete,
    )


@SETTINGS
@given(SHAPES, FEEDS, st.booleans())
def test_parser_random_streams_match_spec(shape, gaps_and_data, at_deadlines):
    """Through the parser, random feeds give the spec's DataChunks, end event and command input."""
    kind, length, chunk, interval, limit = shape
    feeds = timeline(gaps_and_data)
    parser = Parser()
    parser.start_data(kind, length, T0, chunk, interval)
    payload, ends = bytearray(), []

    def pull(now: float) -> None:
        while not ends:
            event = parser.next_event(limit, now)
            if event is NEED_DATA:
                return
            if isinstance(event, DataChunk):
                assert 0 < len(event.data) <= (limit or len(event.data))
                payload.extend(event.data)
            else:
                assert isinstance(event, (DataComplete, DataEscaped))
                ends.append(event)

    last = T0
    for at, data in feeds:
        while at_deadlines and (deadline := parser.deadline()) is not None and deadline < at:
            pull(deadline)
            assert ends or parser.deadline() is None or parser.deadline() > deadline
        parser.receive_bytes(data, at)
        pull(at)
        last = at
    pull(last + LATER)
    assert len(ends) <= 1
    end = ends[0] if ends else None
    assert parser.in_data_mode == (end is None)
    rest = parser.discard_pending()
    escaped = isinstance(end, DataEscaped)
    taken = end.length if end is not None else parser.data.taken
    check_against_spec(
        kind, length, interval, feeds, bytes(payload), rest, escaped, taken, isinstance(end, DataComplete)
    )


@pytest.mark.parametrize("kind", STREAMING)
def test_an_escaped_streams_machine_hands_out_nothing_more(kind):
    """A stream whose full ring held a byte when +++ came: after Escape, next_chunk() and
    deadline() give nothing (they raised IndexError) and the byte is leftover()'s."""
    machine = DataMachine(kind, 100, 0.0)
    assert machine.feed(b"x", 0.0) == b""
    assert machine.next_chunk(0.001, limit=0) is None  # a full ring: the byte stays
    assert machine.feed(b"+++", GUARD) == b""
    assert isinstance(machine.next_chunk(2 * GUARD, limit=0), Escape)
    assert machine.next_chunk(2 * GUARD + 0.001) is None
    assert machine.next_chunk(3 * GUARD, limit=10) is None
    assert machine.deadline() is None
    assert machine.leftover() == b"x"


def test_fresh_until_the_first_byte():
    """DataMachine.fresh (uart.direct's condition) holds until a byte came, a '+' held back included."""
    machine = DataMachine(SEND, 10, 0.0)
    assert machine.fresh
    machine.feed(b"+", 1.0)  # a +++ candidate: held, not taken
    assert not machine.fresh
    other = DataMachine(SEND, 10, 0.0)
    other.feed(b"abc", 0.001)
    assert not other.fresh
