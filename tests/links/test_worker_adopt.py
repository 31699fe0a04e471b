"""A link worker in this process, handed fds with Adopt as a (possibly
compromised) front could: only a TCP socket is adopted."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from structlog.testing import capture_logs

from bridged.ipc.control import send_message
from bridged.ipc.messages import Adopt, Close, ConnectFailed, Connected, Ended
from bridged.pki import PkiStore
from tests.links.control import recv_control as _recv
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)


def _adopt_each(handed: list[tuple[str, list[int]]]) -> tuple[list[object], list[dict]]:
    """Each (link type, fds) handed to a worker with Adopt, conn_id 1, 2, ...: its answers, and the log."""

    async def script(live: LiveWorker) -> list[object]:
        answers = []
        for conn_id, (link_type, fds) in enumerate(handed, start=1):
            send_message(live.control, Adopt(conn_id, link_type), fds)
            answers.append(await _recv(live.control))
        return answers

    with capture_logs() as logs:
        answers = drive_worker(script)
    return answers, logs


def test_adopt_refuses_what_is_not_a_tcp_socket_and_takes_the_next_client():
    """A pipe, a UDP socket or a UNIX socket handed over with Adopt gets ConnectFailed and a log line; a TCP client is adopted."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unix, unix_peer = socket.socketpair()
    try:
        answers, logs = _adopt_each([("TCP", [fd]) for fd in (r, udp.fileno(), unix.fileno(), accepted.fileno())])
    finally:
        for s in (server, client, accepted, udp, unix, unix_peer):
            s.close()
        os.close(r)
        os.close(w)
    assert [type(a) for a in answers] == [ConnectFailed, ConnectFailed, ConnectFailed, Connected]
    assert [a.conn_id for a in answers] == [1, 2, 3, 4]
    assert [e["conn_id"] for e in logs if e["event"] == "adopt_refused"] == [1, 2, 3]


def test_adopt_refuses_a_tcp_socket_with_no_peer_and_stays_usable():
    """An unconnected or a listening TCP socket handed over with Adopt (TCP or SSL) gets
    ConnectFailed, not an exception that leaves the link busy for ever; a client is adopted next."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    bare = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening = socket.create_server(("127.0.0.1", 0))
    handed = ((bare, "TCP"), (listening, "TCP"), (bare, "SSL"), (accepted, "TCP"))
    try:
        answers, logs = _adopt_each([(link_type, [sock.fileno()]) for sock, link_type in handed])
    finally:
        for s in (server, client, accepted, bare, listening):
            s.close()
    assert [(type(a), a.conn_id) for a in answers] == \
        [(ConnectFailed, 1), (ConnectFailed, 2), (ConnectFailed, 3), (Connected, 4)], answers
    assert [e["conn_id"] for e in logs if e["event"] == "adopt_refused"] == [1, 2, 3]


def test_adopt_with_no_fd_or_two_is_answered():
    """Adopt without a descriptor, or with two, gets ConnectFailed (both fds closed), not
    silence that would leave the front waiting on the connection for ever."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    other = socket.create_connection(server.getsockname())
    other_accepted, _ = server.accept()
    try:
        answers, logs = _adopt_each([("TCP", []), ("TCP", [accepted.fileno(), other_accepted.fileno()])])
        client.settimeout(5)
        accepted.close()
        assert client.recv(1) == b""  # the worker's copy was closed too: the client sees the end
    finally:
        for s in (server, client, accepted, other, other_accepted):
            s.close()
    assert [(type(a), a.conn_id) for a in answers] == [(ConnectFailed, 1), (ConnectFailed, 2)], answers
    assert [e["conn_id"] for e in logs if e["event"] == "adopt_refused"] == [1, 2]


def test_a_failed_ssl_adoption_leaves_no_connect_behind_and_the_next_close_flushes(tmp_path):
    """An SSL adoption whose TLS setup fails (ca_enable, no server_ca.0) answers ConnectFailed and
    forgets its task: the next (TCP) client's host Close still hands the peer all the ring held."""
    server = socket.create_server(("127.0.0.1", 0))
    tls_client = socket.create_connection(server.getsockname())
    tls_accepted, _ = server.accept()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small windows: the ring backs up
    client.connect(server.getsockname())
    accepted, _ = server.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 800  # 200 KiB: far more than both socket buffers hold

    async def script(live: LiveWorker) -> list[object]:
        ours, up = live.control, live.up
        send_message(ours, Adopt(1, "SSL", ca_enable=1), [tls_accepted.fileno()])
        answers = [await _recv(ours)]
        send_message(ours, Adopt(2, "TCP"), [accepted.fileno()])
        answers.append(await _recv(ours))
        accepted.close()  # the worker's copy is the socket now: its close is the peer's FIN
        assert up.put_nowait(payload) == len(payload)  # as the front admits a send (SEND OK)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while up.available() == len(payload):  # the worker took some; the socket is full
            assert loop.time() < deadline, "the worker never sent"
            await asyncio.sleep(0.01)
        send_message(ours, Close(2))
        received = bytearray()
        client.setblocking(False)
        while True:  # read as a slow peer does; the flush must reach us before the FIN
            assert loop.time() < deadline + 10, f"no FIN after {len(received)} bytes"
            try:
                piece = client.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            if not piece:
                break
            received += piece
        answers.append(await _recv(ours))
        return [answers, bytes(received)]

    try:
        answers, received = drive_worker(script, up_size=1 << 18, pki=PkiStore(tmp_path))
    finally:
        for s in (server, tls_client, tls_accepted, client, accepted):
            s.close()
    assert [(type(a), a.conn_id) for a in answers] == \
        [(ConnectFailed, 1), (Connected, 2), (Ended, 2)], answers
    assert len(received) == len(payload) and received == payload
