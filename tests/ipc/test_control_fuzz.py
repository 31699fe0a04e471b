"""decode() under hypothesis: whatever a compromised peer sends, a control
packet decodes to a message whose every field holds its declared type, or
raises ControlError -- nothing else."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bridged.ipc.messages  # noqa: F401 - registers the application's messages
from bridged.ipc import control
from bridged.ipc.control import ControlError, decode, encode

pytestmark = pytest.mark.timeout(120)

NAMES = sorted(control._REGISTRY)
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=6)


def _holds(hint, value) -> bool:
    """The declared type, checked independently of control._conforms."""
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int
    if hint is str:
        return type(value) is str
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return type(value) is tuple and all(_holds(args[0], item) for item in value)
    return any(_holds(arg, value) for arg in args)


def _check(data: bytes) -> None:
    try:
        msg = decode(data)
    except ControlError:
        return
    cls = type(msg)
    assert control._REGISTRY[cls.__name__] is cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert _holds(hints[f.name], getattr(msg, f.name)), (f.name, getattr(msg, f.name))
    assert decode(encode(msg)) == msg


@st.composite
def packets(draw) -> bytes:
    """JSON objects shaped like messages: a registered type, its fields (some
    dropped, some extra) with values of any JSON type, or of the declared one."""
    name = draw(st.sampled_from(NAMES))
    hints = typing.get_type_hints(control._REGISTRY[name])
    body: dict = {"type": draw(st.one_of(st.just(name), json_values))}
    for field_name, hint in hints.items():
        if draw(st.integers(0, 9)) == 0:
            continue
        body[field_name] = draw(st.one_of(json_values, st.from_type(hint) if hint is not type(None)
                                          else st.none()).map(lambda v: list(v) if isinstance(v, tuple) else v))
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    return json.dumps(body, allow_nan=False).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets())
def test_decode_of_message_shaped_packets(data):
    """A packet shaped like a message decodes with every field of its declared type, or raises ControlError."""
    _check(data)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_decode_of_any_bytes(data):
    """Any bytes at all: a message or ControlError, never another exception."""
    _check(data)


@pytest.mark.parametrize("data", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting past the recursion limit
    b'{"type": "Close", "conn_id": ' + b"9" * 5000 + b"}",  # past int's digit limit
    b'{"type": "Close", "conn_id": 1e999}',
    b'{"type": "Close", "conn_id": NaN}',
    b'{"type": "Close", "conn_id": 1, "conn_id": true}',  # the last duplicate counts
    b'{"type": "Ended", "conn_id": 1, "reason": "\\ud800"}',  # a lone surrogate
    b"\xef\xbb\xbf{}",  # a BOM
])
def test_decode_of_edge_cases(data):
    """Deep nesting, huge or non-finite numbers, duplicate keys, surrogates: a message or ControlError."""
    _check(data)
