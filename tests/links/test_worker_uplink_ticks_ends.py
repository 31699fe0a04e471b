"""The polling flag of the MCU's uplink ring (``links.batching``, "The uplink on the ticks")
where polling ends other than by the MCU going quiet: a worker started on a ring whose
dead predecessor left the flag on, a connection the host closed while polling and the
link opened again, passive receive mode switched on mid-stream.  Each time two bulk
payloads committed a moment apart after it (the first rings for the quiet before it, the
second would not while the flag is on) reach the peer at once, not left in the ring."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvloop

from bridged.ipc.control import send_message, socketpair
from bridged.ipc.messages import Close, Connect, Connected, Ended, Hello, SetRecvWindow
from bridged.links.worker import Worker
from tests.links.control import recv_control, recv_until
from tests.links.test_worker_uplink_ticks import _connect, _polled, _run
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)

BULK = 2048


async def _two_bulk_payloads_go_at_once(up, conn: socket.socket, limit: float = 0.2) -> None:
    """Commit a bulk payload, and another once the peer has it (within two windows of the
    first: the flag would spare it a doorbell); the peer must have each within ``limit`` s."""
    got = bytearray()
    for n, fill in enumerate((b"A", b"B"), 1):
        up.stage(0, fill * BULK)
        up.commit(BULK)
        start = time.monotonic()
        while len(got) < n * BULK:
            assert time.monotonic() < start + limit, f"the peer got {len(got)} of {n * BULK} bytes"
            try:
                got += conn.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.001)
    assert bytes(got) == b"A" * BULK + b"B" * BULK


def test_a_worker_started_on_a_ring_its_dead_predecessor_left_polled_turns_polling_off():
    """The flag as a worker killed while polling left it: the new worker clears it on start,
    so its link's payloads ring (no ticks of its own would ever look at the ring)."""
    ours, theirs = socketpair()
    server = socket.create_server(("127.0.0.1", 0))

    async def main() -> None:
        ours.setblocking(False)
        with new_ring(65536) as up, new_ring(65536) as down:
            up.poll_on_tick(0.04)
            worker = Worker(0, theirs, up, down, 5000, read_window_ms=20)
            running = asyncio.create_task(worker.run())
            try:
                assert isinstance(await recv_control(ours), Hello)
                send_message(ours, Connect(1, "TCP", "127.0.0.1", server.getsockname()[1]))
                conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(server), 5)
                assert isinstance(await recv_control(ours), Connected)
                conn.setblocking(False)
                await _two_bulk_payloads_go_at_once(up, conn)
                conn.close()
            finally:
                worker.stop()
                await asyncio.wait_for(running, 5)

    try:
        uvloop.run(main())
    finally:
        for sock in (ours, theirs, server):
            sock.close()


def test_a_link_closed_while_polling_and_opened_again_rings_again():
    """The host closes the connection while polling is on; the link's next connection
    starts with the flag off."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)

    async def script(live, both) -> None:
        await both.run(lambda: _polled(live), 0.0205, 0.010)
        await both.settle()
        send_message(live.control, Close(1))
        await recv_until(live.control, Ended)
        send_message(live.control, Connect(2, "TCP", "127.0.0.1", server.getsockname()[1]))
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(server), 5)
        assert isinstance(await recv_until(live.control, Connected), Connected)
        conn.setblocking(False)
        try:
            await _two_bulk_payloads_go_at_once(live.up, conn)
        finally:
            conn.close()

    try:
        _run(script)
    finally:
        server.close()


def test_passive_mode_switched_on_while_polling_ends_it_within_a_tick():
    """AT+CIPRECVTYPE switches the link to passive receive mode mid-stream: no batching
    there, so the next tick ends polling (and its look sends what the ring holds)."""
    async def script(live, both) -> None:
        await both.run(lambda: _polled(live), 0.0205, 0.010)
        await both.settle()
        send_message(live.control, SetRecvWindow(8192))
        start = time.monotonic()
        await both.run(lambda: not _polled(live), None, None, limit=1)
        assert time.monotonic() - start < 0.1  # a tick, on a loaded machine
        await _two_bulk_payloads_go_at_once(live.up, both.conn)

    _run(script)


def test_a_payload_committed_as_the_peers_fin_lands_goes_before_the_link_ends():
    """The peer's FIN, then a payload committed (its doorbell rung) before the worker ran:
    both wake it in one turn of its loop, the FIN first.  The payload got SEND OK: it goes
    to the peer before the link ends (sending after a FIN is allowed), not dropped with
    the socket because the FIN was handled before the doorbell (polling or not)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)

    async def script(live, both) -> None:
        both.conn.shutdown(socket.SHUT_WR)
        both.commit(b"after the FIN" * 100)
        await both.settle()

    try:
        _run(script)
    finally:
        server.close()
