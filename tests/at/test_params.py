"""Tests for bridged.at.params: the parameter grammar (tokenize) and typed specs (bind)."""

from __future__ import annotations

import pytest

from bridged.at.errors import (
    AtError,
    ParamCountMismatch,
    ParamInvalid,
    ParamLengthMismatch,
    ParamParseFail,
    ParamTypeMismatch,
)
from bridged.at.params import OMITTED, REQUIRED, Bare, Int, Omitted, Quoted, Str, bind, parse_int, tokenize

# -- tokenize --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        (b"1", (Bare("1"),)),
        (b"0x1F", (Bare("0x1F"),)),
        (b"-5", (Bare("-5"),)),
        (b'"a"', (Quoted("a"),)),
        (b'""', (Quoted(""),)),  # an empty string is present, not omitted
        (b'1,"TCP",0x1F', (Bare("1"), Quoted("TCP"), Bare("0x1F"))),
        (b'"a","b"', (Quoted("a"), Quoted("b"))),
        # Omitted fields.
        (b"", (OMITTED,)),
        (b",", (OMITTED, OMITTED)),
        (b",,", (OMITTED, OMITTED, OMITTED)),
        (b"1,", (Bare("1"), OMITTED)),
        (b",1", (OMITTED, Bare("1"))),
        (b"1,,3", (Bare("1"), OMITTED, Bare("3"))),
        (b'"a",', (Quoted("a"), OMITTED)),
        (b'"a",,"b",', (Quoted("a"), OMITTED, Quoted("b"), OMITTED)),
        # Escapes inside quotes.
        (b'"a\\"b"', (Quoted('a"b'),)),
        (b'"a\\\\b"', (Quoted("a\\b"),)),
        (b'"a\\,b"', (Quoted("a,b"),)),
        (b'"\\x\\y\\z"', (Quoted("xyz"),)),
        (b'"\\\\"', (Quoted("\\"),)),
        (b'"\\""', (Quoted('"'),)),
        (b'"\\\\",1', (Quoted("\\"), Bare("1"))),
        (b'"\\,",\\,', (Quoted(","), Bare("\\"), OMITTED)),  # no escapes outside quotes
        # The closing quote, not a comma, ends a string.
        (b'"a,b",1', (Quoted("a,b"), Bare("1"))),
        # A quote that does not open the field is just a byte of a bare field.
        (b'1"2"', (Bare('1"2"'),)),
        (b' "a"', (Bare(' "a"'),)),
        # Spaces are kept, never trimmed.
        (b" 1", (Bare(" 1"),)),
        (b'" a "', (Quoted(" a "),)),
        # Bytes are latin-1: every byte value survives.
        (b'"\x00\xff\x80"', (Quoted("\x00\xff\x80"),)),
        (b"\xe9", (Bare("\xe9"),)),
    ],
)
def test_tokenize(text, tokens):
    """tokenize splits at commas outside quotes and resolves escapes inside them."""
    assert tokenize(text) == tokens


@pytest.mark.parametrize(
    ("text", "index"),
    [
        # Unterminated quotes.
        (b'"', 1),
        (b'"abc', 1),
        (b'1,"abc', 2),
        (b'1,2,"abc,', 3),
        (b'"abc\\"', 1),  # the escaped quote does not close the string
        (b'"abc\\', 1),  # a trailing backslash escapes nothing
        # Bytes after the closing quote.
        (b'"a"b', 1),
        (b'"a" ', 1),
        (b'"a""b"', 1),
        (b'1,"a"b,2', 2),
        (b'1,2,"a"\x00', 3),
    ],
)
def test_tokenize_errors(text, index):
    """Malformed quotes raise ParamParseFail with the parameter's 1-based index."""
    with pytest.raises(ParamParseFail) as info:
        tokenize(text)
    assert info.value.ext == index
    assert info.value.code == 0x01080000 | index


def test_tokenize_all_latin1_bytes_round_trip():
    """All 256 byte values in a quoted string come back as the same latin-1 text."""
    raw = bytes(range(256))
    escaped = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b",", b"\\,")
    (token,) = tokenize(b'"' + escaped + b'"')
    assert token == Quoted(raw.decode("latin-1"))
    assert token.text.encode("latin-1") == raw


def test_tokenize_all_bytes_bare():
    """Every byte but the comma is kept as-is in a bare field."""
    raw = bytes(b for b in range(256) if b not in b',"')
    assert tokenize(raw) == (Bare(raw.decode("latin-1")),)


def test_omitted_is_a_singleton():
    """OMITTED is the only instance of Omitted and names itself."""
    assert isinstance(OMITTED, Omitted)
    assert repr(OMITTED) == "OMITTED"
    assert tokenize(b",")[0] is OMITTED
    assert repr(REQUIRED) == "REQUIRED"


# -- parse_int -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("7", 7),
        ("007", 7),
        ("123", 123),
        ("-5", -5),
        ("-0", 0),
        ("0x1F", 31),
        ("0X1f", 31),
        ("0x7FF", 0x7FF),
        ("0x1800", 0x1800),
        ("-0x10", -16),
        ("0x0", 0),
        ("4294967295", 2**32 - 1),
        ("0xFFFFFFFF", 2**32 - 1),
    ],
)
def test_parse_int(text, value):
    """Decimal with an optional '-', or hex with 0x/0X (at_commom.c digit parsing)."""
    assert parse_int(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "-", "--1", "+1", "0x", "-0x", "0x-1", "0xg", "1 ", " 1", "1 2", "\t1", "1\r", "1.0", "1e3",
     "abc", "1_000", "0x_1", "\u00b2", "\u0661", "\u00bd", "0b101", "0o7", "\x00"],
)
def test_parse_int_rejects(text):
    """Anything else in a numeric field, a space included, is a ValueError."""
    with pytest.raises(ValueError):
        parse_int(text)


# -- Int and Str specs -----------------------------------------------------------------------


def test_int_range_inclusive():
    """Int accepts lo and hi themselves and rejects one beyond, with the index in ext."""
    spec = Int(0, 3)
    assert spec.convert(Bare("0"), 1) == 0
    assert spec.convert(Bare("3"), 1) == 3
    assert spec.convert(Bare("0x3"), 1) == 3
    for text in ("4", "-1", "0x4", "99999999999999999999"):
        with pytest.raises(ParamInvalid) as info:
            spec.convert(Bare(text), 5)
        assert info.value.ext == 5
        assert info.value.code == 0x01070005


def test_int_choices():
    """With choices, a value in range but not listed is ParamInvalid."""
    spec = Int(0, 10, choices=(1, 5))
    assert spec.convert(Bare("5"), 1) == 5
    with pytest.raises(ParamInvalid) as info:
        spec.convert(Bare("3"), 2)
    assert info.value.ext == 2


def test_int_unparsable_is_parse_fail():
    """A number with a space (or any other stray byte) is ParamParseFail with its index."""
    for text in ("1 ", " 1", "1a", "0x", "-"):
        with pytest.raises(ParamParseFail) as info:
            Int(0, 100).convert(Bare(text), 3)
        assert info.value.ext == 3


def test_int_given_a_string_is_type_mismatch():
    """A quoted value where a number belongs is ParamTypeMismatch, even if it looks numeric."""
    with pytest.raises(ParamTypeMismatch) as info:
        Int(0, 10).convert(Quoted("1"), 2)
    assert info.value.ext == 2
    assert info.value.code == 0x01050002


def test_str_given_a_number_is_type_mismatch():
    """An unquoted value where a string belongs is ParamTypeMismatch."""
    with pytest.raises(ParamTypeMismatch) as info:
        Str(32).convert(Bare("abc"), 1)
    assert info.value.ext == 1


def test_str_length_bounds():
    """Str accepts min_len..max_len bytes and rejects others with ParamLengthMismatch."""
    spec = Str(3, min_len=1)
    assert spec.convert(Quoted("a"), 1) == "a"
    assert spec.convert(Quoted("abc"), 1) == "abc"
    for text in ("", "abcd"):
        with pytest.raises(ParamLengthMismatch) as info:
            spec.convert(Quoted(text), 4)
        assert info.value.ext == 4
        assert info.value.code == 0x01040004


def test_str_length_counts_bytes():
    """Length is in bytes: latin-1 text has one character per byte."""
    (token,) = tokenize(b'"\xff\xfe"')
    assert Str(2).convert(token, 1) == "\xff\xfe"
    with pytest.raises(ParamLengthMismatch):
        Str(1).convert(token, 1)


# -- bind ------------------------------------------------------------------------------------


def test_bind_values():
    """bind returns one converted value per spec, in order."""
    tokens = tokenize(b'0,"TCP","192.168.1.2",0x50')
    specs = (Int(0, 4), Str(6), Str(64), Int(0, 65535))
    assert bind(tokens, specs) == [0, "TCP", "192.168.1.2", 80]


def test_bind_range_error_names_the_parameter():
    """A value out of range is ParamInvalid whose ext is its 1-based index."""
    with pytest.raises(ParamInvalid) as info:
        bind(tokenize(b"1,9"), (Int(0, 5), Int(0, 5)))
    assert info.value.ext == 2
    assert info.value.code == 0x01070002


def test_bind_space_in_number():
    """``AT+X=1, 2`` fails: a space makes the second field unparsable."""
    with pytest.raises(ParamParseFail) as info:
        bind(tokenize(b"1, 2"), (Int(0, 5), Int(0, 5)))
    assert info.value.ext == 2


@pytest.mark.parametrize(
    ("text", "specs", "error", "ext"),
    [
        (b'"1"', (Int(0, 5),), ParamTypeMismatch, 1),
        (b'1,2', (Int(0, 5), Str(5)), ParamTypeMismatch, 2),
        (b'1,"abcdef"', (Int(0, 5), Str(5)), ParamLengthMismatch, 2),
        (b'1,"abc",6', (Int(0, 5), Str(5), Int(0, 5)), ParamInvalid, 3),
        (b'1,"abc",0x', (Int(0, 5), Str(5), Int(0, 5)), ParamParseFail, 3),
    ],
)
def test_bind_errors(text, specs, error, ext):
    """Each kind of bad parameter raises its own AtError, ext = 1-based index."""
    with pytest.raises(error) as info:
        bind(tokenize(text), specs)
    assert info.value.ext == ext


@pytest.mark.parametrize(
    ("tokens", "specs", "ext"),
    [
        ((Bare("1"), Bare("2"), Bare("3")), (Int(0, 5), Int(0, 5)), 0x0203),
        ((Bare("1"),), (Int(0, 5), Int(0, 5)), 0x0201),
        ((), (Int(0, 5),), 0x0100),
        ((OMITTED,), (), 0x0001),  # AT+X= for a command without parameters
        ((Bare("1"),) * 2, (Int(0, 5, default=0),), 0x0102),
    ],
)
def test_bind_count_mismatch(tokens, specs, ext):
    """Too many or too few parameters: ParamCountMismatch, ext = expected << 8 | given."""
    with pytest.raises(ParamCountMismatch) as info:
        bind(tokens, specs)
    assert info.value.ext == ext
    assert info.value.code == 0x01060000 | ext


def test_bind_count_given_is_capped():
    """The 'given' byte of the count error saturates at 255."""
    with pytest.raises(ParamCountMismatch) as info:
        bind((Bare("1"),) * 300, (Int(0, 5),))
    assert info.value.ext == 0x01FF


def test_bind_defaults_for_missing_trailing():
    """Trailing parameters left out take their defaults."""
    specs = (Int(0, 5), Int(0, 5, default=3), Str(8, default="x"))
    assert bind(tokenize(b"1"), specs) == [1, 3, "x"]
    assert bind(tokenize(b"1,2"), specs) == [1, 2, "x"]
    assert bind(tokenize(b'1,2,"y"'), specs) == [1, 2, "y"]


def test_bind_defaults_for_omitted_fields():
    """``,,`` and a trailing comma omit a field: its default applies."""
    specs = (Int(0, 5), Int(0, 5, default=3), Int(0, 5, default=4))
    assert bind(tokenize(b"1,,2"), specs) == [1, 3, 2]
    assert bind(tokenize(b"1,"), specs) == [1, 3, 4]
    assert bind(tokenize(b"1,,"), specs) == [1, 3, 4]


def test_bind_default_need_not_be_in_range():
    """A default is returned as-is (None is the usual 'not given' marker)."""
    assert bind(tokenize(b"1"), (Int(0, 5), Int(10, 20, default=None))) == [1, None]
    assert bind(tokenize(b"1,"), (Int(0, 5), Str(4, default=None))) == [1, None]


def test_bind_omitted_required_is_parse_fail():
    """Omitting a parameter without a default is ParamParseFail at its index."""
    with pytest.raises(ParamParseFail) as info:
        bind(tokenize(b",1"), (Int(0, 5), Int(0, 5)))
    assert info.value.ext == 1
    with pytest.raises(ParamParseFail) as info:
        bind(tokenize(b"1,"), (Int(0, 5), Int(0, 5)))
    assert info.value.ext == 2


def test_bind_min_count_default_is_leading_required():
    """By default, the parameters before the first one with a default must be given."""
    specs = (Int(0, 5), Int(0, 5), Int(0, 5, default=0), Int(0, 5, default=0))
    with pytest.raises(ParamCountMismatch) as info:
        bind(tokenize(b"1"), specs)
    assert info.value.ext == 0x0401
    assert bind(tokenize(b"1,2"), specs) == [1, 2, 0, 0]


def test_bind_min_count_explicit():
    """min_count overrides the default; omitted fields count as present."""
    specs = (Int(0, 5, default=1), Int(0, 5, default=2))
    assert bind((), specs) == [1, 2]
    with pytest.raises(ParamCountMismatch):
        bind((Bare("3"),), specs, min_count=2)
    assert bind((OMITTED, OMITTED), specs, min_count=2) == [1, 2]
    assert bind((Bare("3"), Bare("4")), specs, min_count=2) == [3, 4]


def test_bind_min_count_zero_still_needs_required_values():
    """With min_count=0 a missing required parameter is still an error (not a count one)."""
    with pytest.raises(ParamParseFail) as info:
        bind((), (Int(0, 5),), min_count=0)
    assert info.value.ext == 1


def test_bind_required_after_default():
    """A required spec after one with a default: the count passes, the value is still needed."""
    specs = (Int(0, 5, default=0), Int(0, 5))
    assert bind(tokenize(b",4"), specs) == [0, 4]
    with pytest.raises(ParamParseFail) as info:
        bind(tokenize(b"1"), specs)
    assert info.value.ext == 2


def test_bind_errors_are_at_errors():
    """Every error bind raises is an AtError, so the front can answer ERROR."""
    for tokens, specs in [
        ((Quoted("a"),), (Int(0, 1),)),
        ((Bare("a"),), (Int(0, 1),)),
        ((Bare("2"),), (Int(0, 1),)),
        ((Bare("a"),), (Str(1),)),
        ((Quoted("ab"),), (Str(1),)),
        ((), (Str(1),)),
    ]:
        with pytest.raises(AtError):
            bind(tokens, specs)
