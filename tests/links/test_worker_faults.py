"""A link worker in this process, sent FireFault as the front's ``bridged fault``
sends it (or a compromised front could): faults armed on demand, FaultFired back."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading

import pytest
from structlog.testing import capture_logs

from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, ConnectFailed, Connected, Ended, FaultFired, FireFault
from tests.links.control import recv_until as _until
from tests.links.workers import drive_worker

pytestmark = pytest.mark.timeout(60)


def _run(link_id: int, script) -> list:
    """script(control) with a worker for `link_id`."""
    return drive_worker(lambda live: script(live.control), link_id=link_id)


def test_fire_fault_arms_the_next_connects_and_reports_each():
    """FireFault net_connect_refused count=2: the next two connects fail, the third opens; two FaultFired come back."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    async def script(control):
        send_message(control, FireFault("net_connect_refused", (), count=2))
        seen: list = []
        answers = []
        for conn_id in (1, 2, 3):
            send_message(control, Connect(conn_id, "TCP", "127.0.0.1", port))
            answers.append(await _until(control, (Connected, ConnectFailed), seen))
        return [answers, seen]

    try:
        with capture_logs() as logs:
            answers, seen = _run(0, script)
    finally:
        server.close()
    assert [type(a) for a in answers] == [ConnectFailed, ConnectFailed, Connected]
    assert answers[0].reason == "Connection refused"
    fired = [m for m in seen if isinstance(m, FaultFired)]
    assert [(f.name, f.conn_id) for f in fired] == [("net_connect_refused", 1), ("net_connect_refused", 2)]
    assert json.loads(fired[0].details) == {"host": "127.0.0.1", "port": port}
    injected = [e for e in logs if e["event"] == "fault_injected"]
    assert [(e["name"], e["link"]) for e in injected] == [("net_connect_refused", 0)] * 2


def test_bad_fire_fault_is_refused_and_logged():
    """Unknown faults, bad keys or values, a front kind and a fault for another link arm nothing; the worker goes on."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    bad = [FireFault("no_such_fault", ()), FireFault("net_connect_refused", ("link",)),
           FireFault("net_connect_refused", ("nope=1",)), FireFault("net_connect_refused", ("link=9",)),
           FireFault("net_connect_refused", (), count=0), FireFault("net_latency", (), for_ms=-5),
           FireFault("net_connect_refused", ("count=3",)), FireFault("at_busy", ())]

    async def script(control):
        for msg in bad:
            send_message(control, msg)
        send_message(control, FireFault("net_connect_refused", ("link=2",)))  # another link's
        send_message(control, Connect(1, "TCP", "127.0.0.1", port))
        return [await _until(control, (Connected, ConnectFailed), [])]

    try:
        with capture_logs() as logs:
            (answer,) = _run(1, script)
    finally:
        server.close()
    assert isinstance(answer, Connected)
    refused = [e for e in logs if e["event"] == "fault_refused"]
    assert [e["name"] for e in refused] == [m.name for m in bad]
    assert "unknown fault" in refused[0]["error"] and "at_busy is not a link worker" in refused[-1]["error"]


def test_fire_fault_resets_an_open_connection():
    """net_tcp_reset armed on an open link: the next byte resets it; the peer sees ECONNRESET, the worker ends the link."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    peer_error: list[int] = []
    armed = threading.Event()

    def peer() -> None:
        conn, _ = server.accept()
        conn.settimeout(5)
        try:
            armed.wait(5)
            conn.sendall(b"after")
            while True:  # bounded by the timeout: each recv waits 5 s at most
                if not conn.recv(100):
                    break
        except OSError as exc:
            peer_error.append(exc.errno)
        conn.close()

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()

    async def script(control):
        send_message(control, Connect(1, "TCP", "127.0.0.1", port))
        seen: list = []
        assert isinstance(await _until(control, Connected, seen), Connected)
        send_message(control, FireFault("net_tcp_reset", ()))
        await asyncio.sleep(0.1)  # taken before the peer's bytes come
        armed.set()
        ended = await _until(control, Ended, seen)
        send_message(control, Close(1))
        return [ended, seen]

    try:
        ended, seen = _run(0, script)
        thread.join(10)
    finally:
        server.close()
    assert ended.reason == "receive failed: Connection reset by peer"
    assert [m.name for m in seen if isinstance(m, FaultFired)] == ["net_tcp_reset"]
    assert peer_error == [errno.ECONNRESET]
