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
``MAX_MESSAGE_SIZE`` bytes. Fields are declared ``int``, ``str``, ``bool``,
``None``, unions of those (``int | None``) or ``tuple[X, ...]`` of one of
them; registration refuses any other annotation. Arrays decode as tuples, so
a decoded message compares equal to the one sent. Strings are sent as ASCII
JSON escapes, which also carries surrogate-escaped bytes.

Anything unexpected on receive (not JSON, unknown type, unknown or missing
field, a value not of its field's declared type -- ``true`` for an int, a
string for a port --, too many fds, a truncated packet) raises
``ControlError``; received descriptors are closed first so nothing leaks.
The peer may be a compromised process: every receiver catches ControlError,
logs it and goes on.  An fd that comes with a message becomes a socket only
through ``socket_from_fd``, which checks that it is one of the expected kind.
An empty packet is EOF: we never send one.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import socket
import stat
import types
import typing
from collections.abc import Collection, Sequence
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
    "socket_from_fd",
    "socketpair",
]

MAX_MESSAGE_SIZE = 64 * 1024
MAX_FDS = 16
_FD_BYTES = array.array("i").itemsize
_ANCBUFSIZE = socket.CMSG_SPACE(MAX_FDS * _FD_BYTES)
_SCALARS = (str, int, type(None))  # bool is an int

_REGISTRY: dict[str, type] = {}
_FIELD_TYPES: dict[type, dict[str, Any]] = {}  # message class -> init field -> declared type
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
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(f"{cls.__name__}: cannot resolve a field's type: {exc}") from None
    types_ = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    for name, hint in types_.items():
        if not _supported(hint):
            raise TypeError(f"{cls.__name__}.{name}: {hint} cannot be sent")
    if _REGISTRY.setdefault(cls.__name__, cls) is not cls:
        raise TypeError(f"a message named {cls.__name__} is already registered")
    _FIELD_TYPES[cls] = types_
    return cls


_SCALAR_TYPES = (int, str, bool, type(None))


def _supported(hint: Any, in_tuple: bool = False) -> bool:
    """Whether fields of this declared type can be sent and checked on receipt."""
    if hint in _SCALAR_TYPES:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return all(_supported(arg, in_tuple) for arg in args)
    return (origin is tuple and not in_tuple and len(args) == 2 and args[1] is Ellipsis
            and _supported(args[0], in_tuple=True))


def _conforms(hint: Any, value: Any) -> bool:
    """Whether a decoded value is of the field's declared type (JSON true is no int)."""
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in _SCALAR_TYPES:
        return isinstance(value, hint)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_conforms(args[0], item) for item in value)
    return any(_conforms(arg, value) for arg in args)  # a union


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
    declared = _FIELD_TYPES[cls]
    if not kwargs.keys() <= declared.keys():
        raise ControlError(f"{name}: unknown fields {sorted(kwargs.keys() - declared.keys())}")
    for key, value in kwargs.items():
        if not _conforms(declared[key], value):
            raise ControlError(f"{name}.{key}: {type(value).__name__} {value!r:.40}, not {declared[key]}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # missing fields, the class's own checks
        raise ControlError(f"{name}: {exc}") from None


# -- transport -------------------------------------------------------------------


def socket_from_fd(fd: int, families: Collection[int], kind: int) -> socket.socket:
    """The socket object for an fd received with a message, if it is a socket
    of one of ``families`` and of type ``kind``; the caller owns it.

    Raises:
        ControlError: not a socket, or another family or type (the fd is closed).
    """
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ControlError("the fd received is not a socket")
        sock = socket.socket(fileno=fd)
    except (OSError, ControlError) as exc:
        try:
            os.close(fd)
        except OSError:
            pass  # not a valid fd at all: nothing to close
        raise ControlError(str(exc)) from None
    if sock.family not in families or sock.type != kind:
        got = f"{getattr(sock.family, 'name', sock.family)}/{getattr(sock.type, 'name', sock.type)}"
        sock.close()
        raise ControlError(f"the socket received is {got}, not one of the kind expected")
    return sock


def send_message(sock: socket.socket, msg: object, fds: Sequence[int] = (), flags: int = 0) -> None:
    """Send one message, with ``fds`` attached (the caller keeps its copies).

    ``flags``: e.g. ``socket.MSG_DONTWAIT``, a send that never waits on a blocking socket.

    Raises:
        BlockingIOError: ``sock`` is non-blocking (or MSG_DONTWAIT without a timeout) and its
            buffer is full (nothing was sent).
        ControlError: more than ``MAX_FDS`` fds or an oversized message.
    """
    data = encode(msg)
    if len(fds) > MAX_FDS:
        raise ControlError(f"{len(fds)} fds in one message, the limit is {MAX_FDS}")
    if fds:
        # Not socket.send_fds: it drops ``flags`` (CPython 3.11 to 3.13), and a
        # MSG_DONTWAIT send would block.
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], flags)
    else:
        sock.send(data, flags)
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
