"""Edges of the uplink ring polled during a bulk upload (``links.bulkpoll``), attacked with a
link worker in this process, real rings and a real loopback peer: a host's Close right after a
payload the front published unrung, commits stamped far in the past or in the future, the ring
exactly half full, 511 and 512-byte commits, a peer that stops reading while polled, and a small
commit after an unrung bulk one (it must never overtake).  Every byte hashed; waits bounded."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from bridged.ipc import rings
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, SetOptions
from tests.links.test_worker_bulk_polling import BULK, RING, _commit, _polled, _tcp
from tests.links.workers import LiveWorker

pytestmark = pytest.mark.timeout(60)


async def _polling(live: LiveWorker, up) -> None:
    """Stream until the worker polls (a loaded machine may end it between commits: again)."""
    for _ in range(5):
        await up.stream(12)
        if _polled(live):
            return
    assert _polled(live), "polling never started"


def _unrung(live: LiveWorker, up, payload: bytes) -> None:
    """Publish ``payload`` as a commit that skipped its doorbell (no eventfd write)."""
    live.up.stage(0, payload)
    live.up._index[rings._WRITE] = live.up.write_index + len(payload)
    up.sent.update(payload)
    up.sent_n += len(payload)


def test_a_close_right_after_an_unrung_payload_hands_it_to_the_peer_first():
    """AT+CIPCLOSE's Close comes the moment the front published a payload with no doorbell
    (polled): the closing flush sends it, then the end (SEND OK said it was sent)."""
    async def script(live: LiveWorker, up) -> None:
        await _polling(live, up)
        _unrung(live, up, b"\x5a" * BULK)
        send_message(live.control, Close(1, True))
        ended = False
        deadline = time.monotonic() + 5
        while not ended:  # the test's loop is the worker's: read without blocking it
            assert time.monotonic() < deadline, f"{up.got_n} of {up.sent_n}, no end"
            try:
                data = up.conn.recv(262144)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            ended = not data
            up.got.update(data)
            up.got_n += len(data)
        assert up.got_n == up.sent_n and up.got.digest() == up.sent.digest()

    _tcp(script)


@pytest.mark.parametrize("skew", [-100.0, -0.0035, 100.0])
def test_commits_stamped_far_off_still_go(skew: float):
    """A stream's commit stamped with its last byte's arrival: long ago (a tail held up),
    just under a tick ago, or (a clock ahead of monotonic) in the future: the payload goes,
    a small commit behind it still rings, and polling ends once the MCU stops."""
    async def script(live: LiveWorker, up) -> None:
        await _polling(live, up)
        payload = b"\x33" * BULK
        live.up.stage(0, payload)
        live.up.commit(len(payload), time.monotonic() + skew)
        up.sent.update(payload)
        up.sent_n += len(payload)
        assert live.up.last_commit() <= time.monotonic_ns()  # never in the future
        assert up.send(b"q\r\n")  # a request behind it rings
        await up.settle()
        await up.until(lambda: not _polled(live), limit=2)

    _tcp(script)


def test_the_ring_exactly_half_full_waits_a_tick_not_forever_and_511_rings():
    """Polled, a commit that leaves the ring exactly half full rings no doorbell (the rule is
    'over half'), yet goes on a tick; 511 bytes ring (interactive), 512 close behind do not."""
    async def script(live: LiveWorker, up) -> None:
        for _ in range(3):
            await _polling(live, up)
            await up.settle()
            if live.up.available() == 0 and _polled(live):
                break
        half = RING // 2
        rang_half = up.send(b"\x11" * half) if _polled(live) else None
        rang_511 = up.send(b"\x22" * 511)
        await up.settle()
        assert rang_511
        assert rang_half in (False, True, None)
        await up.stream(12)
        if _polled(live):
            before, used = live.up.last_commit(), live.up.available()
            rang_512 = up.send(b"\x44" * 512)
            gap = live.up.last_commit() - before  # ns: a commit a quiet spell after the last rings
            quiet = live.up._index[rings._READ + 1]
            await up.settle()
            # (a loaded tick may have ended polling, this loaded loop left a quiet spell, or a
            # worker behind left the ring near half full: each rings by the ring's own rule)
            allowed = not _polled(live) or gap >= quiet or used + 512 > RING // 2
            assert not rang_512 or allowed, (gap, quiet, used)
        await up.settle()

    _tcp(script)


def test_a_peer_that_stops_reading_while_polled_gets_every_byte_once_it_reads():
    """The peer's window closes mid-upload (polled): the worker waits for writability, its
    ticks find nothing sent; once the peer reads again every byte arrives, in order."""
    async def script(live: LiveWorker, up) -> None:
        await _polling(live, up)
        deadline = time.monotonic() + 10
        while live.up.free() >= BULK and time.monotonic() < deadline:  # fill socket and ring
            up.send(b"\x66" * BULK)
            await asyncio.sleep(0.0005)
        assert live.up.free() < BULK, "the socket never filled"
        await asyncio.sleep(0.05)  # ticks with a full socket: polling ends
        await up.settle()
        up.send(b"\x77" * BULK)
        up.send(b"z")
        await up.settle()

    _tcp(script)


def test_a_small_commit_never_overtakes_an_unrung_bulk_one():
    """A bulk payload published unrung (polled), then a 3-byte one that rings: the peer gets
    them in commit order (one ring, one consumer)."""
    async def script(live: LiveWorker, up) -> None:
        await _polling(live, up)
        for i in range(20):
            _unrung(live, up, bytes([i]) * BULK)
            assert up.send(b"k%02d" % i)
            await up.settle()

    _tcp(script)


def test_read_window_0_stamps_that_step_back_start_no_polling():
    """``read_window_ms = 0`` (no ticker): commits whose stamps step back (a stream's arrival
    on the loop's clock behind a commit on the precise one) start no polling: the worker keeps
    serving, every payload rings and arrives."""
    async def script(live: LiveWorker, up) -> None:
        base = time.monotonic()
        for i in range(40):
            payload = bytes([i]) * BULK
            live.up.stage(0, payload)
            live.up.commit(len(payload), base - i * 0.001)  # each stamped before the one before
            up.sent.update(payload)
            up.sent_n += len(payload)
            await up.settle()
        assert not live.worker._bulk and not _polled(live)

    _tcp(script, read_window_ms=0)


def test_polling_sends_with_nagle_off_and_gives_the_links_option_back():
    """A link with AT+CIPTCPOPT's default (Nagle on): while the worker polls, its socket has
    TCP_NODELAY on (a tick's send is a batch already: Nagle would hold the next behind the
    peer's delayed ACK); once polling ends, the link's own option again."""
    async def script(live: LiveWorker, up) -> None:
        sock = live.worker.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        await _polling(live, up)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        await up.settle()
        await up.until(lambda: not _polled(live), limit=2)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0

    _tcp(script)


def test_ciptcpopt_while_polled_keeps_nagle_off_until_polling_ends():
    """AT+CIPTCPOPT (Nagle on) arriving while the worker polls: the tick's sends stay without
    Nagle until polling ends, then the option the MCU set holds."""
    async def script(live: LiveWorker, up) -> None:
        sock = live.worker.sock
        await _polling(live, up)
        send_message(live.control, SetOptions(linger=-1, nodelay=0, keep_alive=0))
        await up.stream(4)  # the message is read meanwhile (the worker shares this loop)
        if _polled(live):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        await up.settle()
        await up.until(lambda: not _polled(live), limit=2)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0

    _tcp(script)
