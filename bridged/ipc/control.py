"""Control messages over AF_UNIX SOCK_SEQPACKET socketpairs, with fd passing.

Theory of operation
-------------------
The supervisor creates one socketpair per link before it forks; the front
keeps one end, the link worker the other. SOCK_SEQPACKET is reliable, ordered
and keeps message boundaries, so one packet is one message and no framing or
reassembly exists at this layer. A packet may carry up to ``MAX_FDS`` file
descriptors (SCM_RIGHTS), e.g. an accepted client socket for a worker.

A message is a frozen dataclass registered with ``@message``; on the wire it
is a JSON object ``{"type": ClassName, field: value, ...}`` of at most
``MAX_MESSAGE_SIZE`` bytes. Field values are ints, strs, bools, None, or
lists/tuples of those. Arrays decode as tuples, so declare such fields as
``tuple[...]`` and a decoded message compares equal to the one sent. Strings
are sent as ASCII JSON escapes, which also carries surrogate-escaped bytes.

Anything unexpected on receive (not JSON, unknown type, unknown or missing
field, a value of another type, too many fds, a truncated packet) raises
``ControlError``; received descriptors are closed first so nothing leaks.
An empty packet is EOF: we never send one.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import socket
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE_SIZE",
    "ControlError",
    "decode",
    "encode",
    "message",
    "recv_message",
    "send_message",
    "socketpair",
]

MAX_MESSAGE_SIZE = 64 * 1024
MAX_FDS = 16
_FD_BYTES = array.array("i").itemsize
_ANCBUFSIZE = socket.CMSG_SPACE(MAX_FDS * _FD_BYTES)
_SCALARS = (str, int, type(None))  # bool is an int

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


class ControlError(ValueError):
    """A control packet that is not a valid message."""


def message(cls: T) -> T:
    """Class decorator: register a frozen dataclass as a control message.

    Raises:
        TypeError: not a frozen dataclass, a field named ``type``, or another
            class already registered under the same name.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__}: @message needs a @dataclass(frozen=True) class")
    if any(f.name == "type" for f in dataclasses.fields(cls)):
        raise TypeError(f"{cls.__name__}: the field name 'type' is reserved")
    if _REGISTRY.setdefault(cls.__name__, cls) is not cls:
        raise TypeError(f"a message named {cls.__name__} is already registered")
    return cls


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX SOCK_SEQPACKET pair (blocking, inheritable across fork)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# -- encoding --------------------------------------------------------------------


def _check_value(name: str, value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(item, _SCALARS) for item in value
    ):
        return list(value)
    raise TypeError(f"field {name}: {type(value).__name__} cannot be sent")


def encode(msg: object) -> bytes:
    """Encode a registered message to its packet bytes.

    Raises:
        TypeError: unregistered class or a field value of an unsupported type.
        ControlError: the encoding exceeds ``MAX_MESSAGE_SIZE``.
    """
    cls = type(msg)
    if _REGISTRY.get(cls.__name__) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered message")
    body = {"type": cls.__name__}
    for field in dataclasses.fields(msg):
        if field.init:
            body[field.name] = _check_value(field.name, getattr(msg, field.name))
    data = json.dumps(body, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ControlError(f"{cls.__name__} encodes to {len(data)} bytes, over the limit")
    return data


def _reject(token: str) -> None:
    raise ControlError(f"number {token} is not an int")


def _decode_value(name: str, value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list) and all(isinstance(item, _SCALARS) for item in value):
        return tuple(value)
    raise ControlError(f"field {name}: unsupported value {value!r:.40}")


def decode(data: bytes) -> object:
    """Decode packet bytes into a message instance.

    Raises:
        ControlError: anything but a well-formed message of a registered type.
    """
    try:
        body = json.loads(data, parse_float=_reject, parse_constant=_reject)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and our number errors
        raise ControlError(f"not a JSON message: {exc}") from None
    if not isinstance(body, dict):
        raise ControlError("a message must be a JSON object")
    name = body.pop("type", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ControlError(f"unknown message type {name!r:.60}")
    kwargs = {key: _decode_value(key, value) for key, value in body.items()}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    if not kwargs.keys() <= names:
        raise ControlError(f"{name}: unknown fields {sorted(kwargs.keys() - names)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # missing fields, the class's own checks
        raise ControlError(f"{name}: {exc}") from None


# -- transport -------------------------------------------------------------------


def send_message(sock: socket.socket, msg: object, fds: Sequence[int] = ()) -> None:
    """Send one message, with ``fds`` attached (the caller keeps its copies).

    Raises:
        BlockingIOError: ``sock`` is non-blocking and its buffer is full
            (nothing was sent).
        ControlError: more than ``MAX_FDS`` fds or an oversized message.
    """
    data = encode(msg)
    if len(fds) > MAX_FDS:
        raise ControlError(f"{len(fds)} fds in one message, the limit is {MAX_FDS}")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)
    # A SEQPACKET send is atomic: it queues the whole packet or raises.


def _unpack_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_BYTES])
    return fds.tolist()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def recv_message(sock: socket.socket) -> tuple[object, list[int]] | None:
    """Receive one message and the fds that came with it; None at EOF.

    The fds are close-on-exec and owned by the caller.

    Raises:
        BlockingIOError: ``sock`` is non-blocking and no message is queued.
        ControlError: the packet is not a valid message (its fds are closed).
    """
    # Not socket.recv_fds: up to 3.12 it drops its flags argument, and we
    # want MSG_CMSG_CLOEXEC so the fds do not leak into exec'd helpers.
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_MESSAGE_SIZE, _ANCBUFSIZE, socket.MSG_CMSG_CLOEXEC
    )
    fds = _unpack_fds(ancdata)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ControlError("truncated packet (too large or too many fds)")
        if not data:
            if fds:
                raise ControlError("empty packet carrying fds")
            return None
        return decode(data), fds
    except ControlError:
        _close_all(fds)
        raise
