"""The ESP-AT parameter grammar and typed parameter specs.

Theory of operation: a set command's text after ``=`` is split into tokens
first (``tokenize``), then checked against a tuple of specs (``bind``).

Grammar (ESP-AT "AT Command Set" index page, and at_commom.c digit parsing):

* Parameters are separated by ``,``.  An empty field (``,,`` or a trailing
  ``,``) is *omitted*: the spec's default applies, or ERROR if it has none.
* Strings are in double quotes.  Inside them ``\\"`` -> ``"``, ``\\\\`` -> ``\\``,
  ``\\,`` -> ``,`` and ``\\<any>`` -> ``<any>``.  A quote must close before the
  next separator; anything after the closing quote but ``,`` is an error.
* Integers are decimal with an optional ``-``, or hex with ``0x``/``0X``.  Any
  other character (a space included) makes the field unparsable.

Bytes are decoded as latin-1 so every byte of an SSID or password survives
the round trip unchanged; formatters encode with latin-1 again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from bridged.at.errors import (
    ParamCountMismatch,
    ParamInvalid,
    ParamLengthMismatch,
    ParamParseFail,
    ParamTypeMismatch,
)

__all__ = [
    "Omitted",
    "OMITTED",
    "Quoted",
    "Bare",
    "Token",
    "tokenize",
    "Int",
    "Str",
    "REQUIRED",
    "bind",
    "parse_int",
]


class _Omitted:
    __slots__ = ()

    def __repr__(self) -> str:
        return "OMITTED"


OMITTED = _Omitted()
Omitted = _Omitted


@dataclass(frozen=True, slots=True)
class Quoted:
    """A double-quoted string parameter, escapes already resolved."""

    text: str


@dataclass(frozen=True, slots=True)
class Bare:
    """An unquoted parameter (a number, or garbage to be rejected later)."""

    text: str


Token = Quoted | Bare | _Omitted


def tokenize(text: bytes) -> tuple[Token, ...]:
    """Split the parameter text of a set command into tokens.

    Raises:
        ParamParseFail: an unterminated quote or bytes after a closing quote,
            with the 1-based index of the offending parameter.
    """
    tokens: list[Token] = []
    i, n = 0, len(text)
    while True:
        index = len(tokens) + 1
        if i < n and text[i] == 0x22:  # '"'
            value, i = _read_quoted(text, i + 1, index)
            tokens.append(Quoted(value))
            if i < n and text[i] != 0x2C:
                raise ParamParseFail(f"bytes after the closing quote of parameter {index}", index)
        else:
            end = text.find(b",", i)
            end = n if end < 0 else end
            field = text[i:end]
            tokens.append(Bare(field.decode("latin-1")) if field else OMITTED)
            i = end
        if i >= n:
            return tuple(tokens)
        i += 1  # the comma
        if i == n:  # a trailing comma omits one more parameter
            tokens.append(OMITTED)
            return tuple(tokens)


def _read_quoted(text: bytes, i: int, index: int) -> tuple[str, int]:
    out = bytearray()
    n = len(text)
    while i < n:
        b = text[i]
        if b == 0x5C:  # backslash: take the next byte literally
            if i + 1 >= n:
                break
            out.append(text[i + 1])
            i += 2
        elif b == 0x22:
            return out.decode("latin-1"), i + 1
        else:
            out.append(b)
            i += 1
    raise ParamParseFail(f"unterminated quote in parameter {index}", index)


class _Required:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def parse_int(text: str) -> int:
    """Parse an ESP-AT integer field (decimal, optional '-', or 0x hex)."""
    body = text[1:] if text.startswith("-") else text
    if body[:2] in ("0x", "0X") and len(body) > 2:
        digits, base = body[2:], 16
        ok = all(c in "0123456789abcdefABCDEF" for c in digits)
    else:
        digits, base = body, 10
        ok = digits.isascii() and digits.isdigit()
    if not ok:
        raise ValueError(text)
    value = int(digits, base)
    return -value if text.startswith("-") else value


@dataclass(frozen=True, slots=True)
class Int:
    """An integer parameter within [lo, hi] (or one of ``choices``)."""

    lo: int
    hi: int
    default: Any = REQUIRED
    choices: tuple[int, ...] | None = None

    def convert(self, token: Token, index: int) -> int:
        if not isinstance(token, Bare):
            raise ParamTypeMismatch(f"parameter {index} must be a number", index)
        try:
            value = parse_int(token.text)
        except ValueError:
            raise ParamParseFail(f"parameter {index} is not a number", index, value=token.text) from None
        if not self.lo <= value <= self.hi or (self.choices is not None and value not in self.choices):
            raise ParamInvalid(f"parameter {index} out of range", index, value=str(value))
        return value


@dataclass(frozen=True, slots=True)
class Str:
    """A quoted string parameter of at most ``max_len`` bytes."""

    max_len: int
    default: Any = REQUIRED
    min_len: int = 0

    def convert(self, token: Token, index: int) -> str:
        if not isinstance(token, Quoted):
            raise ParamTypeMismatch(f"parameter {index} must be a quoted string", index)
        if not self.min_len <= len(token.text) <= self.max_len:
            raise ParamLengthMismatch(
                f"parameter {index} must be {self.min_len}..{self.max_len} bytes long", index
            )
        return token.text


Spec = Int | Str


def bind(tokens: Sequence[Token], specs: Sequence[Spec], *, min_count: int | None = None) -> list[Any]:
    """Check tokens against specs and return the values, defaults filled in.

    Args:
        tokens: from ``tokenize``.
        specs: one per parameter position.
        min_count: how many parameters must be present (omitted counts as
            present); by default the number of leading specs without a default.

    Raises:
        ParamCountMismatch: too many or too few parameters.
        AtError subclasses from the specs' conversions.
    """
    if min_count is None:
        min_count = len(specs)
        for i, spec in enumerate(specs):
            if spec.default is not REQUIRED:
                min_count = i
                break
    if not min_count <= len(tokens) <= len(specs):
        raise ParamCountMismatch(
            f"expected {min_count}..{len(specs)} parameters, got {len(tokens)}",
            (len(specs) << 8) | min(len(tokens), 0xFF),
        )
    values: list[Any] = []
    for index, spec in enumerate(specs, start=1):
        token = tokens[index - 1] if index <= len(tokens) else OMITTED
        if token is OMITTED:
            if spec.default is REQUIRED:
                raise ParamParseFail(f"parameter {index} may not be omitted", index)
            values.append(spec.default)
        else:
            values.append(spec.convert(token, index))
    return values
