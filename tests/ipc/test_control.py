"""Control messages over SEQPACKET socketpairs, with fd passing."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import pytest

from bridged.ipc.control import (
    MAX_FDS,
    ControlError,
    decode,
    encode,
    message,
    recv_message,
    send_message,
    socket_from_fd,
    socketpair,
)

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0


# Test-local messages; the names are unusual so they cannot clash with the
# application's messages registered in the same process.
@message
@dataclass(frozen=True)
class CtlTestOpen:
    link_id: int
    host: str
    port: int
    tls: bool = False
    alpn: tuple[str, ...] = ()
    note: str | None = None


@message
@dataclass(frozen=True)
class CtlTestHandOver:
    link_id: int
    derived: int = field(default=0, init=False)


@pytest.fixture
def pair():
    a, b = socketpair()
    a.settimeout(WAIT)
    b.settimeout(WAIT)
    with a, b:
        yield a, b


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_socketpair_is_seqpacket(pair):
    """The helper makes a connected AF_UNIX SOCK_SEQPACKET pair."""
    assert all(s.family == socket.AF_UNIX and s.type == socket.SOCK_SEQPACKET for s in pair)


def test_round_trip_keeps_boundaries(pair):
    """Messages arrive one per packet, in order, equal to what was sent."""
    a, b = pair
    sent = [
        CtlTestOpen(0, "example.com", 443, True, ("h2", "http/1.1"), None),
        CtlTestOpen(4, "ünï\udcff", 0, note="surrogate-escaped bytes survive"),
        CtlTestHandOver(3),
    ]
    for msg in sent:
        send_message(a, msg)
    assert [recv_message(b) for _ in sent] == [(msg, []) for msg in sent]


def test_encoding_is_a_json_object():
    """The wire form is a JSON object tagged with the class name."""
    assert encode(CtlTestHandOver(2)) == b'{"type":"CtlTestHandOver","link_id":2}'
    assert decode(b'{"link_id":2,"type":"CtlTestHandOver"}') == CtlTestHandOver(2)


def test_fd_passing_of_a_tcp_socket(pair):
    """An accepted TCP socket passed as an fd is usable by the receiver."""
    a, b = pair
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=WAIT)
        server.settimeout(WAIT)
        accepted, _ = server.accept()
    with client:
        with accepted:  # the sender's copy goes away; the passed one lives on
            send_message(a, CtlTestHandOver(1), [accepted.fileno()])
        msg, fds = recv_message(b)
        assert msg == CtlTestHandOver(1) and len(fds) == 1
        assert not os.get_inheritable(fds[0])  # MSG_CMSG_CLOEXEC took effect
        with socket.socket(fileno=fds[0]) as passed:
            passed.sendall(b"through the passed fd")
            assert client.recv(100) == b"through the passed fd"


def test_eof_is_none(pair):
    """A closed peer reads as None."""
    a, b = pair
    send_message(a, CtlTestHandOver(0))
    a.close()
    assert recv_message(b) == (CtlTestHandOver(0), [])
    assert recv_message(b) is None


@pytest.mark.parametrize(
    "packet",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"link_id": 1}',
        b'{"type": "NoSuchMessage"}',
        b'{"type": 5}',
        b'{"type": "CtlTestHandOver"}',
        b'{"type": "CtlTestHandOver", "link_id": 1, "extra": 2}',
        b'{"type": "CtlTestHandOver", "link_id": 1, "derived": 2}',
        b'{"type": "CtlTestHandOver", "link_id": 1.5}',
        b'{"type": "CtlTestHandOver", "link_id": NaN}',
        b'{"type": "CtlTestHandOver", "link_id": {"a": 1}}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": "h", "port": 1, "alpn": [[1]]}',
        b"[" * 20_000 + b"]" * 20_000,  # nesting deeper than the recursion limit
    ],
)
def test_malformed_packet_raises(pair, packet):
    """Anything but a valid registered message raises ControlError; the next one is fine."""
    a, b = pair
    a.send(packet)
    send_message(a, CtlTestHandOver(9))
    with pytest.raises(ControlError):
        recv_message(b)
    assert recv_message(b) == (CtlTestHandOver(9), [])


def test_malformed_packet_closes_its_fds(pair):
    """fds that came with a bad packet are closed, not leaked."""
    a, b = pair
    before = open_fds()
    r, w = os.pipe()
    socket.send_fds(a, [b"garbage"], [r, w])
    os.close(r)
    os.close(w)
    with pytest.raises(ControlError):
        recv_message(b)
    assert open_fds() == before


def test_too_many_fds(pair):
    """More than MAX_FDS is refused by the sender and, if forced, by the receiver."""
    a, b = pair
    r, w = os.pipe()
    try:
        with pytest.raises(ControlError):
            send_message(a, CtlTestHandOver(0), [r] * (MAX_FDS + 1))
        before = open_fds()
        socket.send_fds(a, [encode(CtlTestHandOver(0))], [r] * (MAX_FDS + 1))
        with pytest.raises(ControlError):
            recv_message(b)
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_oversized_message_is_refused(pair):
    """A message over 64 KiB raises ControlError and sends nothing."""
    a, b = pair
    with pytest.raises(ControlError):
        send_message(a, CtlTestOpen(0, "x" * 70_000, 1))
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_message(b)


def test_unsendable_values():
    """Floats, dicts, nested lists and unregistered classes cannot be encoded."""

    @dataclass(frozen=True)
    class Unregistered:
        x: int

    for bad in (1.5, {"a": 1}, [[1]]):
        with pytest.raises(TypeError):
            encode(CtlTestOpen(0, "h", bad))
    with pytest.raises(TypeError):
        encode(Unregistered(1))


def test_decorator_checks():
    """@message wants a frozen dataclass with a new name and no 'type' field."""

    class Plain:
        pass

    @dataclass
    class Mutable:
        x: int

    @dataclass(frozen=True)
    class CtlTestOpen:  # noqa: F811 - same name as the registered one on purpose
        x: int

    @dataclass(frozen=True)
    class Typed:
        type: str

    for cls in (Plain, Mutable, CtlTestOpen, Typed):
        with pytest.raises(TypeError):
            message(cls)


def test_nonblocking_send_and_receive(pair):
    """A full non-blocking socket raises BlockingIOError; queued messages stay intact."""
    a, b = pair
    a.setblocking(False)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_message(b)
    sent = 0
    with pytest.raises(BlockingIOError):
        for sent in range(100_000):  # bounded; the kernel buffer fills long before
            send_message(a, CtlTestOpen(sent, "h" * 1000, 1))
    for i in range(sent):
        assert recv_message(b) == (CtlTestOpen(i, "h" * 1000, 1), [])
    with pytest.raises(BlockingIOError):
        recv_message(b)


@pytest.mark.parametrize(
    "packet",
    [
        b'{"type": "CtlTestHandOver", "link_id": true}',  # a bool is no int
        b'{"type": "CtlTestHandOver", "link_id": "1"}',
        b'{"type": "CtlTestHandOver", "link_id": null}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": 5, "port": 1}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": "h", "port": "80"}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": null, "port": 1}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": "h", "port": 1, "tls": 1}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": "h", "port": 1, "alpn": "h2"}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": "h", "port": 1, "alpn": ["h2", 1]}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": "h", "port": 1, "note": 5}',
        b'{"type": "CtlTestOpen", "link_id": 1, "host": ["h"], "port": 1}',
    ],
)
def test_a_value_of_another_type_than_declared_raises(pair, packet):
    """Each field must hold its declared type (int, str, bool, None, tuple[...]); the next message is fine."""
    a, b = pair
    a.send(packet)
    send_message(a, CtlTestOpen(2, "h", 3, True, ("h2",), None))
    with pytest.raises(ControlError):
        recv_message(b)
    assert recv_message(b) == (CtlTestOpen(2, "h", 3, True, ("h2",), None), [])


def test_fields_of_types_that_cannot_be_checked_are_refused_at_registration():
    """float, dict, list and nested tuples cannot be declared: decode() could not check them."""

    @dataclass(frozen=True)
    class CtlTestFloat:
        x: float

    @dataclass(frozen=True)
    class CtlTestList:
        x: list[str]

    @dataclass(frozen=True)
    class CtlTestNested:
        x: tuple[tuple[int, ...], ...]

    @dataclass(frozen=True)
    class CtlTestPair:
        x: tuple[int, str]

    for cls in (CtlTestFloat, CtlTestList, CtlTestNested, CtlTestPair):
        with pytest.raises(TypeError):
            message(cls)


def test_socket_from_fd_takes_only_the_kind_of_socket_expected():
    """A pipe, a UDP or a UNIX socket where a TCP socket is expected is refused and closed; a TCP one is taken."""
    inet = (socket.AF_INET, socket.AF_INET6)
    r, w = os.pipe()
    os.close(w)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unix, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    other.close()
    for fd in (r, udp.detach(), unix.detach()):
        with pytest.raises(ControlError):
            socket_from_fd(fd, inet, socket.SOCK_STREAM)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
    with pytest.raises(ControlError):
        socket_from_fd(10_000, inet, socket.SOCK_STREAM)  # no such fd
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock = socket_from_fd(tcp.detach(), inet, socket.SOCK_STREAM)
    assert (sock.family, sock.type) == (socket.AF_INET6, socket.SOCK_STREAM)
    sock.close()


def test_dontwait_never_blocks_with_fds():
    """MSG_DONTWAIT on a blocking socket whose peer does not read: a message
    with an fd raises BlockingIOError once the buffer is full, never waits."""
    a, b = socketpair()  # blocking, no timeout (with one, Python waits and retries)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the smallest: a few messages fill it
    r, w = os.pipe()
    try:
        with pytest.raises(BlockingIOError):
            for _ in range(1000):
                send_message(a, CtlTestHandOver(1), [r], socket.MSG_DONTWAIT)
        assert a.getblocking()
        assert recv_message(b)[0] == CtlTestHandOver(1)  # what was sent arrives whole
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
