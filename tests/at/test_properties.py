"""Property tests for the AT core: the parser, the parameter grammar and bind.

Random input either gives events or an AtError, never anything else; how the
bytes are split into feeds never changes the events; format-then-parse
round-trips.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridged.at import format as fmt
from bridged.at.errors import AtError
from bridged.at.params import OMITTED, REQUIRED, Bare, Int, Quoted, Str, bind, parse_int, tokenize
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

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAX = 24
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

# Pieces that make streams interesting: line ends whole and in halves, commands,
# an AT+CIPSEND that (with the owner below) switches to data mode.
PIECES = [
    b"\r\n",
    b"\r",
    b"\n",
    b"AT",
    b"AT\r\n",
    b"at\r\n",
    b"ATE0\r\n",
    b"AT+GMR\r\n",
    b"AT+X=?\r\n",
    b"AT+X?\r\n",
    b'AT+X=1,"a\\"b",,\r\n',
    b'AT+X="',
    b"AT+CIPSEND=3\r\n",
    b"AT+CIPSEND=0,7\r\n",
    b"\x00",
    b"\xff",
    b'"',
    b",",
    b"\\",
]

streams = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=MAX + 8)), max_size=20).map(b"".join)


def _send_length(event) -> int | None:
    """The payload length of an ``AT+CIPSEND=[<id>,]<n>`` line with n > 0, else None."""
    if not (isinstance(event, CommandLine) and event.name == "+CIPSEND" and event.kind is Kind.SET):
        return None
    last = event.tokens[-1]
    try:
        length = parse_int(last.text) if isinstance(last, Bare) else 0
    except ValueError:
        return None
    return length if length > 0 else None


def feed_all(parser: Parser, chunks: list[bytes], limit: int | None = None) -> list:
    """Feed chunks, pulling events until NEED_DATA; enter data mode after AT+CIPSEND=..,<n>."""
    events: list = []
    for chunk in chunks:
        parser.receive_bytes(chunk)
        held = parser.buffered + (parser.data.buffered if parser.data is not None else 0)
        for _ in range(2 * held + 4):  # each event consumes at least one byte, or ends a phase
            event = parser.next_event(limit)
            if event is NEED_DATA:
                break
            events.append(event)
            if (length := _send_length(event)) is not None:
                parser.expect_data(length)
        else:
            raise AssertionError("next_event() never returned NEED_DATA")
        if not parser.in_data_mode:
            assert parser.buffered <= parser.max_line  # the command-mode buffer is capped
    return events


def normalize(events: list) -> list:
    """Merge adjacent DataChunks, drop LineTooLong lengths, make BadLine comparable."""
    out: list = []
    for event in events:
        if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
            event = DataChunk(out.pop().data + event.data)
        elif isinstance(event, LineTooLong):
            event = LineTooLong
        elif isinstance(event, BadLine):
            event = ("BadLine", event.raw, type(event.error), event.error.code)
        out.append(event)
    return out


@st.composite
def splits(draw, data: bytes) -> list[bytes]:
    """``data`` cut at random points."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# -- parser ----------------------------------------------------------------------------------


@SETTINGS
@given(data=streams, max_line=st.integers(8, 64), limit=st.sampled_from([None, 1, 2, 5]))
def test_random_bytes_give_only_events(data, max_line, limit):
    """Any byte stream gives well-formed events until NEED_DATA, never an exception."""
    parser = Parser(max_line)
    for event in feed_all(parser, [data], limit):
        if isinstance(event, CommandLine):
            assert event.raw.startswith(b"AT") and event.raw.endswith(b"\r\n")
            assert len(event.raw) <= max_line
            assert set(event.name) <= NAME_CHARS | {"+"}
            assert isinstance(event.kind, Kind)
            assert all(isinstance(t, (Quoted, Bare)) or t is OMITTED for t in event.tokens)
        elif isinstance(event, BadLine):
            assert isinstance(event.error, AtError)
            assert event.raw.endswith(b"\r\n") and len(event.raw) <= max_line
        elif isinstance(event, LineTooLong):
            assert event.length > max_line
        elif isinstance(event, DataChunk):
            assert 0 < len(event.data) <= (limit or len(event.data))
        else:
            assert isinstance(event, DataComplete)


@SETTINGS
@given(st.data(), streams, st.sampled_from([None, 1, 3]))
def test_any_split_gives_same_events(data, stream, limit):
    """Splitting the same input into any chunks gives the same event sequence."""
    whole = normalize(feed_all(Parser(MAX), [stream], limit))
    chunks = data.draw(splits(stream))
    assert normalize(feed_all(Parser(MAX), chunks, limit)) == whole
    byte_by_byte = normalize(feed_all(Parser(MAX), [stream[i : i + 1] for i in range(len(stream))], limit))
    assert byte_by_byte == whole


line_bodies = st.binary(max_size=MAX - 2).filter(lambda b: b"\r\n" not in b)
command_bodies = st.builds(
    lambda name, tail: b"AT" + name + tail,
    st.sampled_from([b"", b"E0", b"+GMR", b"+CWMODE", b"+X_Y"]),
    st.sampled_from([b"", b"?", b"=?", b"=1", b'="a"', b"=,", b"junk"]),
)


@SETTINGS
@given(st.data(), st.lists(st.one_of(line_bodies, command_bodies), max_size=12))
def test_each_complete_line_is_one_event(data, bodies):
    """Every \\r\\n-terminated line no longer than max_line yields one CommandLine or BadLine."""
    lines = [body + b"\r\n" for body in bodies]
    chunks = data.draw(splits(b"".join(lines)))
    events = feed_all(Parser(MAX), chunks)
    assert len(events) == len(lines)
    for line, event in zip(lines, events):
        assert isinstance(event, (CommandLine, BadLine))
        assert event.raw == line
        expected = parse_command_line(line)
        if isinstance(event, CommandLine):
            assert event == expected
        else:
            assert type(event.error) is type(expected.error)


@SETTINGS
@given(st.data(), st.binary(min_size=MAX + 1, max_size=200).filter(lambda b: b"\r\n" not in b), line_bodies)
def test_long_line_then_resync(data, junk, body):
    """An over-long line gives one LineTooLong; the line after it parses as usual."""
    stream = junk + b"\r\n" + body + b"\r\n"
    events = feed_all(Parser(MAX), data.draw(splits(stream)))
    assert len(events) == 2
    assert isinstance(events[0], LineTooLong)
    assert events[1].raw == body + b"\r\n"


# -- tokenize --------------------------------------------------------------------------------


param_bytes = st.lists(st.sampled_from([b'"', b"\\", b",", b"1", b"a", b" "])).map(b"".join)


@SETTINGS
@given(st.binary(max_size=80) | param_bytes)
def test_tokenize_random_bytes(text):
    """tokenize returns tokens or raises an AtError, nothing else."""
    try:
        tokens = tokenize(text)
    except AtError as error:
        assert 1 <= error.ext <= text.count(b",") + 1
        return
    assert tokens
    assert all(isinstance(t, (Quoted, Bare)) or t is OMITTED for t in tokens)
    if b'"' not in text:
        assert len(tokens) == text.count(b",") + 1
        assert [t.text if isinstance(t, Bare) else "" for t in tokens] == text.decode("latin-1").split(",")


def escape(text: str) -> bytes:
    """A string as an AT command parameter: quoted, with \\\\, \\" and \\, escaped."""
    raw = text.encode("latin-1")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b",", b"\\,") + b'"'


latin1 = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=20)
ints = st.integers(-(2**31), 2**32)


@SETTINGS
@given(st.lists(latin1, min_size=1, max_size=6))
def test_quoted_round_trip(texts):
    """Escaped, quoted strings tokenize back to the same text, alone or in a command."""
    params = b",".join(escape(t) for t in texts)
    assert tokenize(params) == tuple(Quoted(t) for t in texts)
    line = parse_command_line(b"AT+X=" + params + b"\r\n")
    assert line.tokens == tuple(Quoted(t) for t in texts)
    assert bind(line.tokens, [Str(20)] * len(texts)) == texts


@SETTINGS
@given(st.lists(st.one_of(ints, latin1.filter(lambda t: not set(t) & set('"\\,'))), min_size=1, max_size=6))
def test_fields_round_trip(values):
    """What format.fields prints (numbers, q() strings) tokenizes and binds back."""
    text = fmt.fields(*(fmt.q(v) if isinstance(v, str) else v for v in values))
    specs = [Str(20) if isinstance(v, str) else Int(-(2**31), 2**32) for v in values]
    assert bind(tokenize(text), specs) == values


@SETTINGS
@given(ints)
def test_int_forms_round_trip(value):
    """Decimal and 0x/0X hex forms of an integer parse back to it."""
    sign = "-" if value < 0 else ""
    for text in (str(value), f"{sign}0x{abs(value):x}", f"{sign}0X{abs(value):X}"):
        assert parse_int(text) == value
        assert bind(tokenize(text.encode()), [Int(-(2**31), 2**32)]) == [value]


# -- bind ------------------------------------------------------------------------------------

tokens = st.one_of(
    st.just(OMITTED),
    st.builds(Quoted, st.text(max_size=8)),
    st.builds(Bare, st.one_of(st.text(max_size=8), ints.map(str), ints.map(lambda i: hex(i)), st.just(""))),
)
defaults = st.one_of(st.just(REQUIRED), st.none(), st.integers(), st.text(max_size=4))
int_specs = st.builds(
    Int,
    lo=st.integers(-100, 100),
    hi=st.integers(-100, 100),
    default=defaults,
    choices=st.one_of(st.none(), st.lists(st.integers(-100, 100), max_size=4).map(tuple)),
)
str_specs = st.builds(Str, max_len=st.integers(0, 10), default=defaults, min_len=st.integers(0, 5))


@SETTINGS
@given(
    st.lists(tokens, max_size=6).map(tuple),
    st.lists(st.one_of(int_specs, str_specs), max_size=6),
    st.one_of(st.none(), st.integers(0, 7)),
)
def test_bind_random(tokens_, specs, min_count):
    """bind returns checked values or raises an AtError, nothing else."""
    try:
        values = bind(tokens_, specs, min_count=min_count)
    except AtError:
        return
    assert len(values) == len(specs)
    for token, spec, value in zip(tokens_ + (OMITTED,) * len(specs), specs, values):
        if token is OMITTED:
            assert spec.default is not REQUIRED and value == spec.default
        elif isinstance(spec, Int):
            assert spec.lo <= value <= spec.hi
            assert spec.choices is None or value in spec.choices
        else:
            assert isinstance(value, str) and spec.min_len <= len(value) <= spec.max_len
