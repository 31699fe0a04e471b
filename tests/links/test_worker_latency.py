"""net_latency on the uplink: a link worker in this process, its uplink ring written as the
front writes it (SEND OK is given once bytes are in the ring), real loopback peers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest
import uvloop

from bridged.faults import parse_spec
from bridged.ipc import records
from bridged.ipc.control import send_message, socketpair
from bridged.ipc.messages import Close, Connect, Connected, Ended, FireFault, Hello
from bridged.links.worker import Worker
from tests.harness import StampedSink
from tests.links.control import recv_control as _recv
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)


async def _until(control: socket.socket, kind: type) -> object:
    while not isinstance(msg := await _recv(control), kind):
        pass
    return msg


def _run(faults: dict, script, seed: int = 1):
    """A worker for link 0 with `faults` ({name: table}); script(control, uplink ring)."""
    ours, theirs = socketpair()
    specs = [parse_spec(name, table) for name, table in faults.items()]

    async def main():
        ours.setblocking(False)
        with new_ring(16384) as up, new_ring(16384) as down:
            worker = Worker(0, theirs, up, down, 5000, station="lo", faults=specs, fault_seed=seed)
            running = asyncio.create_task(worker.run())
            assert isinstance(await _recv(ours), Hello)
            try:
                return await script(ours, up)
            finally:
                worker.stop()
                await asyncio.wait_for(running, 5.0)

    try:
        return uvloop.run(main())
    finally:
        ours.close()
        theirs.close()


async def _write(ring, data: bytes) -> float:
    """As the front admits a send: into the uplink ring once it has room (the outbox holds
    half a ring at most: back-pressure); the moment SEND OK would be given."""
    async with asyncio.timeout(10):
        while ring.free() < len(data):
            await asyncio.sleep(0.002)
    ring.stage(0, data)
    ring.commit(len(data))
    return time.monotonic()


def test_what_the_mcu_sends_reaches_the_peer_ms_later_in_order():
    """ms 300 +- 200: no byte before ms - jitter after its SEND OK, the first send at least
    100 ms after it; pieces each drawn their own delay arrive whole and in order (hash)."""
    sink = StampedSink()
    payload = os.urandom(40000)
    written: list[float] = []

    async def script(control, up):
        send_message(control, Connect(1, "TCP", "127.0.0.1", sink.port))
        assert isinstance(await _until(control, (Connected,)), Connected)
        for offset in range(0, len(payload), 2000):
            written.append(await _write(up, payload[offset:offset + 2000]))
            await asyncio.sleep(0.01)  # each its own piece, drawn its own delay
        async with asyncio.timeout(10):
            while len(sink.data) < len(payload):
                await asyncio.sleep(0.01)
        send_message(control, Close(1))
        await _until(control, Ended)

    try:
        _run({"net_latency": {"ms": 300, "jitter_ms": 200}}, script)
    finally:
        sink.close()
    assert hashlib.sha256(sink.data).digest() == hashlib.sha256(payload).digest()
    assert sink.first_at(1) - written[0] >= 0.1
    for i, sent in enumerate(written):  # piece i's last byte: never before 100 ms after its SEND OK
        assert sink.first_at((i + 1) * 2000) - sent >= 0.1 - 0.002


def test_without_jitter_each_piece_takes_ms_and_a_close_with_flush_follows_the_data():
    """ms 250: each piece reaches the peer 250 ms (not much more) after its SEND OK; AT+CIPCLOSE's
    flush sends the delayed data, and the peer's FIN comes after it."""
    sink = StampedSink()
    pieces = [os.urandom(1000) for _ in range(5)]
    written: list[float] = []

    async def script(control, up):
        send_message(control, Connect(1, "TCP", "127.0.0.1", sink.port))
        assert isinstance(await _until(control, (Connected,)), Connected)
        for piece in pieces:
            written.append(await _write(up, piece))
            await asyncio.sleep(0.05)
        send_message(control, Close(1, flush=True))
        return await _until(control, Ended)

    try:
        ended = _run({"net_latency": {"ms": 250}}, script)
    finally:
        sink.close()
    assert ended.reason == "closed by host"
    assert bytes(sink.data) == b"".join(pieces)
    for i, sent in enumerate(written):
        assert 0.25 - 0.002 <= sink.first_at((i + 1) * 1000) - sent < 0.25 + 0.15
    assert sink.fin_at is not None and sink.fin_at >= sink.arrivals[-1][0]
    assert sink.fin_at - written[-1] >= 0.25 - 0.002


def test_a_bandwidth_cap_composes_with_the_latency():
    """net_bandwidth 20000 B/s and ms 300: 10000 bytes take their 0.5 s at the cap plus the
    300 ms delay; the first byte no sooner than 300 ms."""
    sink = StampedSink()
    payload = os.urandom(10000)
    written: list[float] = []

    async def script(control, up):
        send_message(control, Connect(1, "TCP", "127.0.0.1", sink.port))
        assert isinstance(await _until(control, (Connected,)), Connected)
        written.append(await _write(up, payload))
        async with asyncio.timeout(10):
            while len(sink.data) < len(payload):
                await asyncio.sleep(0.01)
        send_message(control, Close(1))
        await _until(control, Ended)

    try:
        _run({"net_latency": {"ms": 300}, "net_bandwidth": {"bytes_per_s": 20000}}, script)
    finally:
        sink.close()
    assert bytes(sink.data) == payload
    assert sink.first_at(1) - written[0] >= 0.3 - 0.002
    assert sink.first_at(len(payload)) - written[0] >= 0.3 + len(payload) / 20000 - 0.03


def _datagram_delays(seed: int, faults: dict) -> list[float]:
    """Ten datagrams written to a UDP link's uplink at once: when each reached the peer, from its SEND OK."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    got: list[tuple[bytes, float]] = []

    async def script(control, up):
        send_message(control, Connect(1, "UDP", "127.0.0.1", peer.getsockname()[1]))
        assert isinstance(await _until(control, (Connected,)), Connected)
        started = time.monotonic()
        for n in range(10):
            assert records.put_record(up, records.DATA, b"dgram%d" % n)
        loop = asyncio.get_running_loop()
        for _ in range(10):
            data = await loop.run_in_executor(None, peer.recv, 100)
            got.append((data, time.monotonic() - started))
        send_message(control, Close(1))
        await _until(control, Ended)

    try:
        _run(faults, script, seed)
    finally:
        peer.close()
    assert [d for d, _ in got] == [b"dgram%d" % n for n in range(10)]  # reordering is net_udp_reorder's
    return [t for _, t in got]


def test_datagrams_are_delayed_in_order_and_the_jitter_repeats_with_the_seed():
    """UDP, ms 400 +- 350: each datagram no sooner than 50 ms, in the order sent; seed 5
    gives the same arrival times again (within scheduling noise), seed 6 others."""
    latency = {"net_latency": {"ms": 400, "jitter_ms": 350}}
    first = _datagram_delays(5, latency)
    again = _datagram_delays(5, latency)
    other = _datagram_delays(6, latency)
    assert all(0.05 <= t < 0.75 + 0.2 for t in first), first
    assert max(abs(a - b) for a, b in zip(first, again)) < 0.05, (first, again)
    assert max(abs(a - b) for a, b in zip(first, other)) > 0.1, (first, other)
    plain = _datagram_delays(5, {"net_udp_loss": {"rate": 0}})  # a Shaper, but no latency: at once
    assert max(plain) < 0.1, plain


def test_latency_fired_on_demand_delays_the_uplink_while_it_holds():
    """`bridged fault net_latency ms=300 for=1` on an open link: a send within the second
    takes ms, one after it goes at once (the uplink is back on its direct path)."""
    sink = StampedSink()
    written: list[float] = []

    async def script(control, up):
        send_message(control, Connect(1, "TCP", "127.0.0.1", sink.port))
        assert isinstance(await _until(control, (Connected,)), Connected)
        send_message(control, FireFault("net_latency", ("ms=300",), for_ms=1000))
        await asyncio.sleep(0.1)  # armed before the first send
        written.append(await _write(up, b"a" * 100))
        await asyncio.sleep(1.3)  # past the fault's second, the first send delivered
        written.append(await _write(up, b"b" * 100))
        async with asyncio.timeout(10):
            while len(sink.data) < 200:
                await asyncio.sleep(0.005)
        send_message(control, Close(1))
        await _until(control, Ended)

    try:
        _run({}, script)
    finally:
        sink.close()
    assert bytes(sink.data) == b"a" * 100 + b"b" * 100
    assert sink.first_at(1) - written[0] >= 0.3 - 0.002
    assert sink.first_at(200) - written[1] < 0.1
