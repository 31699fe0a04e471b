"""net_latency on the uplink: a link worker in this process, its uplink ring written as the
front writes it (SEND OK is given once bytes are in the ring), real loopback peers."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import socket
import time

import pytest

from bridged.faults import parse_spec
from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected, Ended, FireFault
from tests.harness import StampedSink
from tests.links.control import recv_until as _until
from tests.links.workers import drive_worker

pytestmark = pytest.mark.timeout(60)


def _run(faults: dict, script, seed: int = 1):
    """A worker for link 0 with `faults` ({name: table}); script(control, uplink ring)."""
    specs = [parse_spec(name, table) for name, table in faults.items()]
    return drive_worker(lambda live: script(live.control, live.up), up_size=16384, down_size=16384,
                        station="lo", faults=specs, fault_seed=seed)


async def _connect(control: socket.socket, link_type: str, port: int) -> None:
    """Connection 1 to 127.0.0.1:port, open."""
    send_message(control, Connect(1, link_type, "127.0.0.1", port))
    assert isinstance(await _until(control, (Connected,)), Connected)


async def _close_once_received(control: socket.socket, sink: StampedSink, count: int) -> None:
    """Close(1), and its Ended, once the sink has `count` bytes (10 s at most)."""
    async with asyncio.timeout(10):
        while len(sink.data) < count:
            await asyncio.sleep(0.005)
    send_message(control, Close(1))
    await _until(control, Ended)


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
        await _connect(control, "TCP", sink.port)
        for offset in range(0, len(payload), 2000):
            written.append(await _write(up, payload[offset:offset + 2000]))
            await asyncio.sleep(0.01)  # each its own piece, drawn its own delay
        await _close_once_received(control, sink, len(payload))

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
        await _connect(control, "TCP", sink.port)
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
        await _connect(control, "TCP", sink.port)
        written.append(await _write(up, payload))
        await _close_once_received(control, sink, len(payload))

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
        await _connect(control, "UDP", peer.getsockname()[1])
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
    gives the same arrival times again (within scheduling noise), seed 6 others.

    The noise passed 50 ms on the loaded machine (two suite runs of nine here), so seed 5 runs
    up to four times until two agree; draws that differ from run to run (up to 700 ms apart)
    would not agree in any two."""
    latency = {"net_latency": {"ms": 400, "jitter_ms": 350}}
    runs = [_datagram_delays(5, latency)]
    while not any(max(abs(a - b) for a, b in zip(x, y)) < 0.05 for x, y in itertools.combinations(runs, 2)):
        assert len(runs) < 4, ("no two runs of seed 5 within 50 ms", runs)
        runs.append(_datagram_delays(5, latency))
    first = runs[0]
    other = _datagram_delays(6, latency)
    assert all(0.05 <= t < 0.75 + 0.2 for t in first), first
    assert max(abs(a - b) for a, b in zip(first, other)) > 0.1, (first, other)
    plain = _datagram_delays(5, {"net_udp_loss": {"rate": 0}})  # a Shaper, but no latency: at once
    assert max(plain) < 0.1, plain


def test_latency_fired_on_demand_delays_the_uplink_while_it_holds():
    """`bridged fault net_latency ms=300 for=1` on an open link: a send within the second
    takes ms, one after it goes at once (the uplink is back on its direct path)."""
    sink = StampedSink()
    written: list[float] = []

    async def script(control, up):
        await _connect(control, "TCP", sink.port)
        send_message(control, FireFault("net_latency", ("ms=300",), for_ms=1000))
        await asyncio.sleep(0.1)  # armed before the first send
        written.append(await _write(up, b"a" * 100))
        await asyncio.sleep(1.3)  # past the fault's second, the first send delivered
        written.append(await _write(up, b"b" * 100))
        await _close_once_received(control, sink, 200)

    try:
        _run({}, script)
    finally:
        sink.close()
    assert bytes(sink.data) == b"a" * 100 + b"b" * 100
    assert sink.first_at(1) - written[0] >= 0.3 - 0.002
    assert sink.first_at(200) - written[1] < 0.1
