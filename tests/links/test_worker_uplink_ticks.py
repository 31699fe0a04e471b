"""The MCU's payloads on read batching's ticks (``links.batching``, "The uplink on
the ticks"): a link worker in this process with real rings and a real TCP peer,
driven from the test's loop (the peer's socket too, non-blocking).  While both
directions stream, the front's commits ring no doorbell and every byte still
arrives in order; a doorbell the front skipped just as polling ended is made
good by a look a tick later; the peer's FIN sends the ring's bytes first."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from typing import Callable

import pytest

from bridged.ipc import records, rings
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected
from tests.links.control import recv_control
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)

UP = 2048  # the front's AT+CIPSEND payloads
PIECE = 1024  # the peer's


class _Both:
    """Both directions of one link, paced: the front's payloads into the uplink ring every
    ``up_gap`` s, the peer's 1 KiB pieces every ``down_gap`` s; all that arrives kept."""

    def __init__(self, live: LiveWorker, conn: socket.socket) -> None:
        self.live, self.conn = live, conn
        self.sent_up = bytearray()  # what the front committed, in order
        self.peer_got = bytearray()
        self.down_sent, self.down_got = hashlib.sha256(), hashlib.sha256()
        self.down_sent_n = self.down_got_n = 0
        self.commits = self.unrung = 0  # commits, and those made while the worker polled (no doorbell)
        self.marked_at = 0.0  # when a 0xff byte (the peer's answer: its stream has none) reached the ring

    def commit(self, payload: bytes) -> None:
        up = self.live.up
        self.unrung += up._index[rings._READ + 1] != 0 and up.available() + len(payload) <= up.capacity // 2
        up.stage(0, payload)
        up.commit(len(payload))
        self.commits += 1
        self.sent_up += payload

    def commit_unrung(self, payload: bytes) -> None:
        """Publish with no doorbell, as a commit that loaded the polling flag before the worker's store
        turning it off had landed (no fence between the two processes' stores and loads)."""
        up = self.live.up
        up.stage(0, payload)
        up._index[rings._WRITE] = up.write_index + len(payload)
        self.sent_up += payload

    def take(self) -> None:
        while True:
            try:
                data = self.conn.recv(65536)
            except BlockingIOError:
                break
            if not data:
                break
            self.peer_got += data
        while (record := records.get_record(self.live.down)) is not None:
            self.down_got.update(record.payload)
            if not self.marked_at and b"\xff" in record.payload:
                self.marked_at = time.monotonic()
            self.down_got_n += len(record.payload)

    async def run(self, until: Callable[[], bool], up_gap: float | None, down_gap: float | None,
                  limit: float = 10.0) -> None:
        """Stream until ``until()`` (checked every half millisecond); a direction with no gap is quiet."""
        start = time.monotonic()
        ups = downs = 0
        while not until():
            now = time.monotonic()
            assert now < start + limit, "the condition never came"
            if up_gap is not None and now >= start + ups * up_gap:
                self.commit(bytes([(ups + 1) % 256]) * UP)
                ups += 1
            if down_gap is not None and now >= start + downs * down_gap:
                piece = bytes([(downs + 3) % 251]) * PIECE
                self.conn.sendall(piece)
                self.down_sent.update(piece)
                self.down_sent_n += PIECE
                downs += 1
            self.take()
            await asyncio.sleep(0.0005)

    async def settle(self, limit: float = 5.0) -> float:
        """Wait until the peer has every byte the front committed; the seconds it took."""
        start = time.monotonic()
        while len(self.peer_got) < len(self.sent_up):
            assert time.monotonic() < start + limit, f"the peer got {len(self.peer_got)} of {len(self.sent_up)}"
            self.take()
            await asyncio.sleep(0.001)
        assert bytes(self.peer_got) == bytes(self.sent_up)
        return time.monotonic() - start


async def _connect(live: LiveWorker, server: socket.socket) -> _Both:
    send_message(live.control, Connect(1, "TCP", "127.0.0.1", server.getsockname()[1]))
    conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(server), 5)
    assert isinstance(await recv_control(live.control), Connected)
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _Both(live, conn)


def _polled(live: LiveWorker) -> bool:
    return live.up._index[rings._READ + 1] != 0


def _batch_polled(live: LiveWorker) -> bool:
    """Polled on read batching's ticks: not the bulk upload's polling (links.bulkpoll), which a
    loaded machine's catch-up (payloads committed back to back) may start before batching does."""
    return _polled(live) and live.worker._batch_tick is not None and not live.worker._bulk


def _run(script, read_window_ms: int = 20):
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)

    async def main(live: LiveWorker):
        both = await _connect(live, server)
        try:
            return await script(live, both)
        finally:
            both.conn.close()
            send_message(live.control, Close(1))

    try:
        return drive_worker(main, up_size=65536, down_size=65536, read_window_ms=read_window_ms)
    finally:
        server.close()


def test_a_stream_both_ways_goes_up_on_the_ticks_whole_and_in_order():
    """The MCU's 2 KiB every 20.5 ms (0.1 MB/s, drifting against the 20 ms grid) and the
    peer's 1 KiB every 10 ms for 1.5 s: once read batching goes on, commits ring no
    doorbell (most of them: none without the ticks' polling), and both directions
    arrive whole and in order."""
    async def script(live: LiveWorker, both: _Both) -> None:
        start = time.monotonic()
        await both.run(lambda: time.monotonic() > start + 1.5, 0.0205, 0.010)
        await both.settle()
        while both.down_got_n < both.down_sent_n:
            await asyncio.sleep(0.005)
            both.take()
        assert both.down_got.digest() == both.down_sent.digest()
        assert both.unrung > 0, "every commit rang: the ticks never polled"
        return both.unrung, both.commits

    # Most unrung on a quiet machine (~0.8), none without polling; load ends batching now and
    # then (a send held past two windows is a request): 0.47 and 0.27 seen in loaded make
    # tests.  So the best of three tries, each one still failing with no polling at all.
    tries = []
    for _ in range(3):
        unrung, commits = _run(script)
        tries.append((unrung, commits))
        if unrung >= 0.3 * commits:
            return
    raise AssertionError(f"(unrung, commits) per try: {tries}")


@pytest.mark.parametrize("batching", ["goes on", "ends"])
def test_a_doorbell_skipped_as_polling_ends_costs_at_most_a_tick(batching):
    """Polling on, then off: the MCU goes quiet while the peer streams on (batching goes on),
    or the peer goes quiet while the MCU streams on (batching ends).  A payload published
    right then with no doorbell (the front saw the flag before the worker's store turning it
    off) still reaches the peer, a tick later (the next one, or a one-shot look once batching
    has ended): without that look it would wait for the MCU's next send, here never."""
    async def script(live: LiveWorker, both: _Both) -> None:
        await both.run(lambda: _batch_polled(live), 0.0205, 0.010)
        quiet_up, quiet_down = (None, 0.010) if batching == "goes on" else (0.0205, None)
        await both.run(lambda: not _polled(live), quiet_up, quiet_down)
        assert (live.worker._batch_tick is not None) == (batching == "goes on")
        if batching == "ends" and not live.worker._look_owed:
            return False  # a loaded loop saw the flag off after the one-shot look: again
        both.commit_unrung(b"late" * 100)
        start = time.monotonic()
        # The peer streams on meanwhile (in the first case): batching and its ticks go on.
        await both.run(lambda: len(both.peer_got) >= len(both.sent_up), None, quiet_down, limit=2.0)
        took = time.monotonic() - start
        assert bytes(both.peer_got) == bytes(both.sent_up)
        assert took < 0.5, took  # a 20 ms period, and this machine's load
        assert (live.worker._batch_tick is not None) == (batching == "goes on")
        return True

    assert any(_run(script) for _ in range(3)), "the flag was never seen off before its look"


def test_the_peers_fin_while_polling_sends_the_rings_bytes_first():
    """With a 100 ms window, polling on, a payload committed just after a tick (no doorbell)
    and the peer's FIN right behind it: the worker reads the FIN long before the next
    tick, and sends the payload before the link ends (the peer reads it, then EOF)."""
    async def script(live: LiveWorker, both: _Both) -> None:
        await both.run(lambda: _batch_polled(live), 0.05, 0.020)
        await both.settle()
        while not 0.005 <= time.monotonic() % 0.1 <= 0.03:  # just after a tick of the 100 ms grid
            await asyncio.sleep(0.001)
        assert _polled(live)
        both.commit(b"before the FIN" * 50)
        both.conn.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        while True:
            assert time.monotonic() < start + 5, "no EOF"
            try:
                data = both.conn.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            both.peer_got += data
        assert bytes(both.peer_got) == bytes(both.sent_up)

    _run(script, read_window_ms=100)


@pytest.mark.parametrize("quiet", [0.044, 0.052])
def test_a_request_after_two_windows_of_quiet_goes_at_once_and_its_answer_too(quiet):
    """Both ways stream (polling on), then the MCU goes quiet, its last payload committed just
    after a tick, while the peer streams on (batching goes on).  A request ``quiet`` s later
    (over BOTH_GAP periods: README, a send after two windows of quiet ends it) must reach the
    peer at once, and the peer's answer must be read at once: not held to a tick while the
    polling flag is still on (it was, until two empty ticks after the tick that sent the last
    payload: up to 60 ms after it), then taken for a steady send that goes on batching."""
    async def script(live: LiveWorker, both: _Both) -> None:
        await both.run(lambda: _batch_polled(live), 0.0205, 0.010)
        await both.run(lambda: 0.0015 <= time.monotonic() % 0.020 <= 0.004, None, 0.010)
        both.commit(b"\x01" * UP)  # just after a tick: sent on the next one, 16-18 ms on
        last = time.monotonic()
        await both.run(lambda: time.monotonic() >= last + quiet, None, 0.010)
        if live.worker._batch_tick is None:
            # The peer streams on, so read batching goes on, unless this loaded process (the peer
            # and the worker share its loop) stalled the peer's stream past a window: no test then.
            await both.settle()
            return None
        both.commit(b"=" * 1000 + b"REQUEST")  # bulk: no doorbell for being small (POLLED_BULK)
        asked = time.monotonic()
        await both.run(lambda: bytes(both.peer_got).endswith(b"REQUEST"), None, 0.010, limit=2)
        reached = time.monotonic() - asked
        assert live.worker._batch_tick is None  # a request: batching ended, its answer is read at once
        both.conn.sendall(b"\xff" * 16)
        answered = time.monotonic()
        await both.run(lambda: both.marked_at > 0, None, 0.010, limit=2)
        read = both.marked_at - answered
        print(f"request reached the peer after {reached * 1000:.1f} ms, its answer read after {read * 1000:.1f} ms")
        await both.settle()
        return reached, read

    # Held to a tick, the request waits 12-20 ms; at once, 0.2-5 ms, up to ~9 on a loaded
    # machine.  The answer is read at once because batching ended (asserted in every try, no
    # clock); its time on a loaded machine reached 12.4 and once 29.6 ms, so only a bound that
    # a hold for the next tick and a window besides would break, and three tries.
    tries = []
    for _ in range(3):
        tries.append(_run(script))
        if tries[-1] is not None and tries[-1][0] < 0.012 and tries[-1][1] < 0.025:
            return
    raise AssertionError(f"(request reached, answer read) in s, None where load broke the set-up: {tries}")


def test_small_requests_within_the_stream_go_at_once():
    """Polling on (both ways stream), then the MCU sends 16-byte requests every 30 ms (under
    BOTH_GAP periods apart: steady sends, batching goes on) while the peer streams on.  Each
    reaches the peer at once, as without polling (its answer then waits at most a tick, as
    the README says): held to the tick, it waited up to a period and its answer a whole
    period more (request to answer 28 ms median, 38 ms at most, against 12 and 20)."""
    async def script(live: LiveWorker, both: _Both) -> None:
        await both.run(lambda: _batch_polled(live), 0.0205, 0.010)
        # Only requests made while the worker polls the ring count: a loaded machine may
        # stretch a gap past BOTH_GAP (a request: batching ends, and starts again later).
        delays = []
        for i in range(60):  # bounded: ten polled requests wanted
            due = time.monotonic() + 0.030
            await both.run(lambda: time.monotonic() >= due, None, 0.010)
            polled = _polled(live)
            both.commit(b"Q%02d" % i + b"." * 13)
            asked = time.monotonic()
            await both.run(lambda: len(both.peer_got) >= len(both.sent_up), None, 0.010, limit=2)
            if polled:
                delays.append(time.monotonic() - asked)
                if len(delays) == 10:
                    break
        assert len(delays) >= 5, delays  # the worker polled the ring for most of them
        assert bytes(both.peer_got) == bytes(both.sent_up)
        print(f"small requests reached the peer after {max(delays) * 1000:.1f} ms at most")
        assert sorted(delays)[-2] < 0.006, delays  # one hiccup of a loaded machine allowed

    _run(script)
