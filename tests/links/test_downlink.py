"""The link worker's downlink rules (bridged.links.downlink): read batching's
start and grid, the passive receive window, which datagrams are kept; and the
receive window kept by a worker in this process with a real TCP peer."""

from __future__ import annotations

import asyncio
import math
import socket
import threading

import pytest

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected, SetRecvWindow
from bridged.links.batching import both_steady, streams_both_ways
from bridged.links.downlink import keeps_datagram, next_tick, recv_window_need, wants_batching
from tests.links.control import recv_control as _recv
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)

PERIOD = 0.02  # [links] read_window_ms = 20, the default


@pytest.mark.parametrize("since, quiet, period, batching", [
    (0.010, 1.0, PERIOD, True),  # two reads within a period, the MCU quiet: batch
    (0.010, 0.05, PERIOD, False),  # the MCU sent lately: its answer is read at once
    (0.010, 0.08, PERIOD, False),  # quiet for exactly four periods is not enough
    (0.030, 1.0, PERIOD, False),  # a lone piece after a quiet spell
    (0.002, 1.0, 0.0, False),  # batching off ([links] read_window_ms = 0)
])
def test_wants_batching(since, quiet, period, batching):
    """A big piece starts batching only within a period of the last read, the MCU quiet for over 4 periods."""
    assert wants_batching(since, quiet, period) is batching


@pytest.mark.parametrize("since, quiet, unprompted, period, batching", [
    (0.010, 0.015, 0.020, PERIOD, True),  # both stream: the peer's second unprompted piece a period on
    (0.010, 0.045, 0.020, PERIOD, False),  # the MCU has not sent for over two periods: not streaming
    (0.010, 0.015, 0.045, PERIOD, False),  # the peer's unprompted pieces too far apart (a one-off)
    (0.025, 0.015, 0.020, PERIOD, False),  # the peer's pieces over a period apart: not a stream
    (0.010, 0.015, 0.020, 0.0, False),  # batching off ([links] read_window_ms = 0)
])
def test_streams_both_ways(since, quiet, unprompted, period, batching):
    """An unprompted piece starts batching while the MCU sends only if both directions stream steadily."""
    assert streams_both_ways(since, quiet, unprompted, period) is batching


@pytest.mark.parametrize("gap, steady", [(0.020, True), (0.039, True), (0.040, False), (1.0, False)])
def test_a_send_ends_batching_after_two_quiet_periods(gap, steady):
    """A send within two periods of the last continues the MCU's stream; a later one may want an answer."""
    assert both_steady(gap, PERIOD) is steady


@pytest.mark.parametrize("now", [0.0, 0.0189, 0.0191, 0.02, 12.3456, 1000.0199])
def test_next_tick_is_on_the_shared_grid_and_not_too_soon(now):
    """A tick falls on a multiple of the period, at least 1 ms after now and at most a period and 1 ms after."""
    due = next_tick(now, PERIOD)
    assert math.isclose(due / PERIOD, round(due / PERIOD), abs_tol=1e-6)
    assert now + 0.001 < due <= now + PERIOD + 0.001 + 1e-9


def test_next_tick_is_the_same_for_every_worker_in_a_period():
    """Two workers reading in the same period tick together (the front wakes once for both)."""
    assert next_tick(100.003, PERIOD) == next_tick(100.017, PERIOD)


@pytest.mark.parametrize("capacity, window, need", [
    (8192, 2920, 5273),  # a read must make room in the window, not just in the ring
    (8192, 8192, 64),  # a window as big as the ring: any room will do
    (8192, 100000, 64),
])
def test_recv_window_need(capacity, window, need):
    """While the receive window is full the worker waits for what frees room in the window."""
    assert recv_window_need(capacity, window) == need


@pytest.mark.parametrize("n, window, unread, kept", [
    (4064, 0, 4000, True),  # active mode: anything up to half the ring less a header's margin
    (4065, 0, 0, False),
    (500, 1000, 400, True),  # passive: fits in the window
    (700, 1000, 400, False),  # passive, window full: UDP data is lost
    (3000, 1000, 0, True),  # nothing unread: a datagram larger than the window is kept
])
def test_keeps_datagram(n, window, unread, kept):
    """A datagram is kept if it fits half the ring and, in passive mode, the receive window."""
    assert keeps_datagram(n, 8192, window, unread) is kept


def test_a_worker_keeps_unread_data_within_the_receive_window():
    """SetRecvWindow(1000): the ring never holds more than 1000 unread bytes, and every byte arrives as a reader frees the window."""
    payload = bytes(range(256)) * 64  # 16 KiB, more than the 8 KiB ring
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def peer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(payload)
            done.wait(20)

    threading.Thread(target=peer, daemon=True).start()

    async def script(live: LiveWorker) -> tuple[bytes, int]:
        ours, down = live.control, live.down
        send_message(ours, SetRecvWindow(1000))
        send_message(ours, Connect(1, "TCP", "127.0.0.1", server.getsockname()[1]))
        assert isinstance(await _recv(ours), Connected)
        got, most = bytearray(), 0
        async with asyncio.timeout(20):
            while len(got) < len(payload):
                await asyncio.sleep(0.02)  # let the worker fill what the window allows
                most = max(most, down.available())
                while (record := records.get_record(down)) is not None:
                    got += record.payload
        send_message(ours, Close(1))
        return bytes(got), most

    try:
        got, most = drive_worker(script, down_size=8192)
    finally:
        done.set()
        server.close()
    assert got == payload
    assert 0 < most <= 1000 + records.HEADER_SIZE * 4  # data within the window, plus record headers
