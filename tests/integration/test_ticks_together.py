"""The three ways the daemon saves wake-ups, attacked together on one daemon: the front's
passthrough tick (bridged.uart.reading), the link worker's uplink on its read window's
ticks (bridged.links.batching: the ring's polled flag), and the command share
(bridged.uart.dispatch); here around passthrough (links: test_ticks_together_links.py).
Real daemon on a pty, real loopback peers; every byte hashed."""

from __future__ import annotations

import contextlib

import socket
import time

import pytest

from bridged.ops.protocol import request
from tests.harness import Demux, free_port
from tests.integration.test_status import connect, control_path
from tests.integration.ticks_together import ANSWER, REQUEST, Peer, digest, passthrough_on, stream_up, wait_for


def _escape_then_send(host, peer: Peer, window: float) -> tuple[float, float]:
    """Passthrough streaming both ways (the worker batching and polling), then the MCU
    stops, waits a little over one window, +++, and once two windows passed since its last
    byte, AT+CIPMODE=0 and AT+CIPSEND of REQUEST just after a tick: the seconds until the
    peer had it after SEND OK, and until its answer was on the UART."""
    up = stream_up(host, 30, 0.050, tag=len(peer.received) % 250)  # 1.5 s, steady: < 2 windows apart
    # A tail alone (over AT+TRANSINTVL after the stream's last piece: its commit waits the
    # interval), mid-window: the request below then comes just after a tick, two windows and
    # more after the tail on the UART, under two windows after the tail's commit.
    stop = time.monotonic()
    while not (time.monotonic() > stop + window * 1.1 and 0.45 <= time.monotonic() % window / window <= 0.55):
        host._fill(0.001)
    host.write(b"t" * 700)
    up += b"t" * 700
    last = time.monotonic()
    while time.monotonic() < last + window * 1.05:
        host._fill(0.002)
    host.write(b"+++")
    host.expect(b"\r\n+QUITT\r\n", timeout=5)
    while time.monotonic() < last + window * 2.05:
        host._fill(0.002)
    host.command(b"AT+CIPMODE=0")
    wait_for(lambda: len(peer.received) >= len(up), 5, "the stream did not reach the peer")
    assert peer.received[-len(up):] == up
    demux = Demux(host)
    host.write(b"AT+CIPSEND=%d\r\n" % len(REQUEST))
    demux.expect(b"\r\nOK\r\n\r\n>")
    while not 0.003 <= time.monotonic() % window <= 0.3 * window:  # just after a tick: the next is far
        demux.pump(0.0005)
    answers = demux.data.get(None, b"").count(ANSWER[:1])
    host.write(REQUEST)
    demux.expect(b"SEND OK\r\n")
    sent_ok = time.monotonic()
    wait_for(lambda: peer.asked_at, 2, "the peer saw no request", pump=lambda: demux.pump(0.0005))
    reached = peer.asked_at - sent_ok
    wait_for(lambda: demux.data.get(None, b"").count(ANSWER[:1]) > answers, 2, "no answer",
          pump=lambda: demux.pump(0.0005))
    back = time.monotonic() - peer.asked_at
    return reached, back


def test_a_send_right_after_escaping_a_batching_passthrough_goes_at_once(make_daemon):
    """Passthrough both ways on a 100 ms read window (the worker batches and polls the uplink
    ring), AT+TRANSINTVL=100; the MCU stops, +++ a window later, and more than two windows
    after its last byte AT+CIPSEND: README says a send two windows or more after the MCU's
    send before it is a request: it goes at once and batching ends, so the peer's answer
    is read at once.  Up to three tries (a loaded machine)."""
    window = 0.100
    daemon = make_daemon(f"[links]\nread_window_ms = {int(window * 1000)}\n")
    host = daemon.host()
    server = socket.create_server(("127.0.0.1", 0))
    peer = None
    try:
        host.boot()
        host.command(b"AT+TRANSINTVL=100")
        runs = []
        for attempt in range(3):
            conn = passthrough_on(host, server)
            peer = Peer(conn, gap=0.040)  # 3 pieces fill the low-water mark: over a window
            reached, back = _escape_then_send(host, peer, window)
            runs.append((round(reached * 1000, 1), round(back * 1000, 1)))
            print(f"try {attempt + 1}: request at the peer {reached * 1000:.1f} ms after SEND OK, "
                  f"its answer on the UART {back * 1000:.1f} ms after the peer sent it")
            peer.join()
            conn.close()
            host.command(b"AT+CIPCLOSE", b"CLOSED\r\n")
            host.read_quiet(0.1)
            host.command(b"AT+CIPMODE=1")
            if reached < 0.040 and back < 0.040:
                break
        assert runs[-1][0] < 40 and runs[-1][1] < 40, runs
    finally:
        if peer is not None:
            peer.join()
        server.close()
        host.close()


def _status(daemon) -> dict:
    with connect(control_path(daemon)) as sock:  # (a 10 s timeout)
        return request(sock, {"cmd": "status"})["status"]


def _short_write_delay(host, peer: Peer, round_: int) -> float:
    """The MCU quiet for 10 windows while the peer streams on, then 16 bytes: the seconds
    until the peer had them (AT+TRANSINTVL packs them first: 20 ms)."""
    stop = time.monotonic()
    while time.monotonic() < stop + 0.2:
        host._fill(0.002)
    short = bytes([0x80 + round_]) * 16
    have = len(peer.received)
    host.write(short)
    wrote = time.monotonic()
    wait_for(lambda: len(peer.received) >= have + 16, 5, "the short write never came", pump=lambda: host._fill(0.0005))
    assert peer.received[have:] == short
    return time.monotonic() - wrote


def _udp_passthrough_on(host) -> socket.socket:
    """UDP passthrough to a peer connected to the link's local port (a datagram each way)."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    local = free_port(socket.SOCK_DGRAM)
    host.command(b"AT+SYSMSG=1")
    host.command(b"AT+CIPMODE=1")
    assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,%d,0' % (peer.getsockname()[1], local)).endswith(b"OK\r\n")
    peer.connect(("127.0.0.1", local))
    host.command(b"AT+CIPSEND", b">")
    return peer


@pytest.mark.parametrize("kind", ["TCP", "UDP"])
def test_passthrough_both_ways_then_a_short_write_an_escape_and_floods(daemon, kind):
    """Passthrough streaming both ways at UART pace (1 KiB every 10 ms each way: over TCP the
    worker batches and polls the uplink ring; UDP never does; the front reads on ticks) for 2 s: every byte
    whole and in order both ways (hashed); a 16-byte write after 200 ms of quiet reaches the
    peer within AT+TRANSINTVL (20 ms) and slack (45 ms; three tries); +++ then, and at once
    300 AT in one write (a driver's retry loop): 300 OK in shares of 64; then AT+CIPMODE=0
    and a flood ending in AT+CIPSEND: its payload reaches the peer whole."""
    host = daemon.host()
    server = socket.create_server(("127.0.0.1", 0))
    peer = None
    try:
        host.boot()
        conn = passthrough_on(host, server) if kind == "TCP" else _udp_passthrough_on(host)
        peer = Peer(conn, gap=0.010)
        up = stream_up(host, 200, 0.010, tag=3)
        delays = []
        for round_ in range(3):
            delays.append(_short_write_delay(host, peer, round_))
            up += bytes([0x80 + round_]) * 16
            if delays[-1] < 0.045:
                break
        print(f"short writes after 200 ms of quiet reached the peer in {[round(d * 1000, 1) for d in delays]} ms")
        peer.streaming.clear()
        time.sleep(0.1)  # the peer's last piece is on its way
        down = bytes(peer.sent)
        assert digest(host.read_exactly(len(down), 10)) == digest(down)
        wait_for(lambda: len(peer.received) >= len(up), 5, "the uplink did not all arrive")
        assert digest(peer.received) == digest(up)
        assert delays[-1] < 0.045, delays
        # +++ with 40 ms of silence each side, then a driver's retries at once.
        time.sleep(0.04)
        host.write(b"+++")
        host.expect(b"\r\n+QUITT\r\n", timeout=5)
        host.write(b"AT\r\n" * 300)
        answers = host.read_exactly(len(b"\r\nOK\r\n") * 300, 20)
        assert answers == b"\r\nOK\r\n" * 300
        assert _status(daemon)["uart"]["max_command_batch"] == 64
        host.command(b"AT+CIPMODE=0")
        payload = bytes(range(256)) * 6
        host.write(b"AT\r\n" * 200 + b"AT+CIPSEND=%d\r\n" % len(payload))
        host.expect(b"\r\nOK\r\n" * 200 + b"\r\nOK\r\n\r\n>", timeout=20)
        host.write(payload)
        host.expect(b"SEND OK\r\n")
        wait_for(lambda: len(peer.received) >= len(up) + len(payload), 5, "the send did not arrive")
        assert peer.received[len(up):] == payload
        conn.close()
    finally:
        if peer is not None:
            peer.join()
        server.close()
        host.close()


@contextlib.contextmanager
def _polled_passthrough_tail(make_daemon, tag: int, fin_after: float | None = None):
    """Passthrough both ways on a 100 ms window (the worker polls the uplink), then the MCU's
    last 1 KiB just after a tick: committed AT+TRANSINTVL after it came, under two windows after
    the piece before, so it may wait unrung in the ring for the next tick.  ``fin_after``: the
    peer's FIN that many seconds after it.  Yields (host, peer, what the MCU sent)."""
    daemon = make_daemon("[links]\nread_window_ms = 100\n")
    host = daemon.host()
    server = socket.create_server(("127.0.0.1", 0))
    peer = None
    try:
        host.boot()
        conn = passthrough_on(host, server)
        peer = Peer(conn, gap=0.020)
        up = stream_up(host, 30, 0.050, tag=tag)
        while not 0.002 <= time.monotonic() % 0.100 <= 0.010:  # just after a tick: the next is far
            host._fill(0.0005)
        last = bytes([251 + tag % 3]) * 1024  # (no 0xff: the peers answer on it)
        host.write(last)
        if fin_after is not None:
            peer.fin_at = time.monotonic() + fin_after
        yield host, peer, up + last
        conn.close()
    finally:
        if peer is not None:
            peer.join()
        server.close()
        host.close()


def test_cipclose_right_after_escaping_a_polled_passthrough_hands_the_peer_every_byte(make_daemon):
    """The last piece waiting unrung (``_polled_passthrough_tail``), +++ with 40 ms guards and
    AT+CIPCLOSE the moment +QUITT comes: the close's flush must send it: the peer gets every
    byte in order (hashed), then the end."""
    with _polled_passthrough_tail(make_daemon, tag=5) as (host, peer, up):
        time.sleep(0.040)  # (a loaded machine may read the last piece late: 20 ms could be data)
        host.write(b"+++")
        host.expect(b"\r\n+QUITT\r\n", timeout=5)
        host.write(b"AT+CIPCLOSE\r\n")
        host.expect(b"CLOSED\r\n", timeout=5)
        host.expect(b"\r\nOK\r\n", timeout=5)
        wait_for(lambda: peer.eof or not peer.thread.is_alive(), 5, "no end for the peer")
        assert digest(peer.received) == digest(up), (len(peer.received), len(up))


def test_the_peers_fin_while_a_polled_passthrough_piece_waits_in_the_ring(make_daemon):
    """The last piece waiting unrung (``_polled_passthrough_tail``) and the peer's FIN 50 ms
    after it, before the next tick: the worker sends what the ring holds before the link
    ends, so the peer (half-closed, reading on) gets every byte in order (hashed)."""
    with _polled_passthrough_tail(make_daemon, tag=9, fin_after=0.050) as (host, peer, up):
        wait_for(lambda: len(peer.received) >= len(up) or not peer.thread.is_alive(), 5, "the uplink stopped short",
                 pump=lambda: host._fill(0.001))
        assert digest(peer.received) == digest(up), (len(peer.received), len(up))

