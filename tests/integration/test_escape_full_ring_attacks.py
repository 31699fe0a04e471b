"""+++ with a full uplink ring, attacked: what a +++ left of a stream (its leftover) against later sends,
a second escape, a link that ends, a restart, and +++ split or broken while the front listens."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import threading
import time

import psutil
import pytest

from tests.harness import Host, free_port
from tests.readcount import ReadCount
from tests.integration.test_escape_full_ring import (
    _DeafPeer,
    _enter_passthrough,
    _stream_until_stalled,
    read_all,
)


def _escape_once_read(host: Host, reads: ReadCount, total: int) -> None:
    """+++ with its guard times once the daemon has read ``total`` bytes from the MCU.

    The silences are the MCU's, but the front hears them between its reads: one the
    loaded machine left unscheduled (or holding the port, then listening from 1 s on)
    past the silence read the bytes before it and the +++ as one piece, data (rightly),
    and the +QUITT waited for never came.  So the bytes before a silence are read
    first (a bounded wait: bytes the front cannot take, the test goes on as before)."""
    reads.wait(total, timeout=10)
    time.sleep(0.05)
    host.write(b"+++")
    time.sleep(0.05)


@pytest.fixture
def reads(daemon):
    counter = ReadCount(daemon)
    yield counter
    counter.close()


def _escape_with_leftover(daemon, host: Host, peer: _DeafPeer, reads: ReadCount) -> bytes:
    """Passthrough into a deaf peer until it stalls, then +++: some of it waits in the front (a leftover);
    what was streamed."""
    _enter_passthrough(host, peer)
    return _stall_then_escape(daemon, host, reads, b"\r\n+QUITT\r\n")


def _cancel_a_stalled_sendl(daemon, host: Host, reads: ReadCount) -> bytes:
    """AT+CIPSENDL on link 0 into a deaf peer until it stalls, then +++: some of it waits in the
    front (a leftover); what was streamed."""
    host.write(b"AT+CIPSENDL=0,%d\r\n" % (1 << 30))
    host.expect(b"\r\nOK\r\n\r\n>")
    return _stall_then_escape(daemon, host, reads, b"\r\nSEND CANCELLED\r\n")


def _stall_then_escape(daemon, host: Host, reads: ReadCount, answer: bytes) -> bytes:
    """Stream until the stalled ring stops the front, +++ once all of it was read, its answer
    and the leftover kept; what was streamed."""
    base = reads.now()
    sent = _stream_until_stalled(host)
    _escape_once_read(host, reads, base + len(sent))
    host.expect(answer, timeout=3)
    assert daemon.wait_event("escaped_bytes_kept")
    return sent


def _reset(peer: _DeafPeer) -> None:
    """The peer resets the connection (RST, unread data and all)."""
    peer.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.conn.close()
    peer.conn = None


def _only_new_bytes_on_a_new_link(host: Host) -> None:
    """A new link on id 0 to a fresh peer: it gets this send's bytes and nothing else."""
    fresh = _DeafPeer()
    try:
        assert host.ask(b"AT+CIPMODE=0") == b"\r\nOK\r\n"
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % fresh.port) == b"CONNECT\r\n\r\nOK\r\n"
        fresh.accept()
        assert b"SEND OK" in host.send_data(b"AT+CIPSEND=4", b"new!")
        assert fresh.read_all(1 << 20, timeout=1.0) == b"new!"
    finally:
        fresh.close()


def _same(got: bytes, want: bytes) -> bool:
    return len(got) == len(want) and hashlib.sha256(got).digest() == hashlib.sha256(want).digest()


def test_a_second_passthrough_escaped_behind_the_leftover_keeps_both(daemon, host, reads):
    """Passthrough again while the first one's leftover waits, a few bytes, +++: the peer gets the first
    session's bytes, then the second's, none lost (the second escape must not drop the first leftover)."""
    peer = _DeafPeer()
    try:
        sent = _escape_with_leftover(daemon, host, peer, reads)
        host.write(b"AT+CIPSEND\r\n")
        host.expect(b"\r\nOK\r\n\r\n>")
        time.sleep(0.1)
        read = reads.now()
        host.write(b"second")  # the ring is still full: held, then heard after 1 s
        _escape_once_read(host, reads, read + 6)
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        got = peer.read_all(len(sent) + 6)
        assert _same(got, sent + b"second")
    finally:
        peer.close()


def test_plus_split_across_the_listen_boundary_is_data(daemon, host, reads):
    """Behind a leftover the ring is full at once: a '+' written while the port is held and '++' after
    the front listens again are no escape; they go to the peer as data, in order, and a real +++ then
    leaves."""
    peer = _DeafPeer()
    try:
        sent = _escape_with_leftover(daemon, host, peer, reads)
        host.write(b"AT+CIPSEND\r\n")
        host.expect(b"\r\nOK\r\n\r\n>")
        time.sleep(0.1)
        read = reads.now()
        host.write(b"x")  # read: the ring has no room, the port is held
        time.sleep(0.1)
        host.write(b"+")  # waits in the port
        reads.wait(read + 2, timeout=10)  # the front listens again and reads it
        time.sleep(0.05)  # (each piece read apart, guard silences between: _escape_once_read)
        host.write(b"++")
        assert b"QUITT" not in host.read_quiet(0.5)
        reads.wait(read + 4, timeout=10)
        host.write(b"++++")  # four: data too
        assert b"QUITT" not in host.read_quiet(0.5)
        _escape_once_read(host, reads, read + 8)
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
        got = peer.read_all(len(sent) + 8)
        assert _same(got, sent + b"x+++++++")
    finally:
        peer.close()


def test_a_cancelled_send_behind_the_leftover_keeps_it(daemon, host, reads):
    """AT+CIPSEND cancelled by +++ while a leftover waits in front of it: the leftover still goes out."""
    peer = _DeafPeer()
    try:
        sent = _escape_with_leftover(daemon, host, peer, reads)
        assert host.ask(b"AT+CIPMODE=0") == b"\r\nOK\r\n"
        host.write(b"AT+CIPSEND=10\r\n")
        host.expect(b">")
        read = reads.now()
        host.write(b"abc")
        _escape_once_read(host, reads, read + 3)
        host.expect(b"SEND Canceled\r\n", timeout=3)
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        got = peer.read_all(len(sent))
        assert _same(got, sent)
    finally:
        peer.close()


def test_so_sndtimeo_behind_the_leftover(daemon, host, reads):
    """so_sndtimeo passes while AT+CIPSEND=<len> waits behind a leftover: SEND FAIL (not SEND OK before its
    bytes are in the ring), and the leftover, sent by the MCU before, still goes out; the payload not."""
    peer = _DeafPeer()
    try:
        sent = _escape_with_leftover(daemon, host, peer, reads)
        assert host.ask(b"AT+CIPTCPOPT=-1,0,500") == b"\r\nOK\r\n"
        assert host.ask(b"AT+CIPMODE=0") == b"\r\nOK\r\n"
        host.write(b"AT+CIPSEND=5\r\n")
        host.expect(b">")
        host.write(b"after")
        answer = host.expect(b"SEND FAIL\r\n", timeout=3)
        assert b"SEND OK" not in answer
        got = peer.read_all(len(sent), timeout=10)
        assert _same(got, sent)
        # The payload would come right behind the leftover, which the peer now reads: a second
        # is room enough to see it (not the 10 s the leftover may take).
        assert peer.read_all(5, timeout=1.0) == b""
    finally:
        peer.close()


def test_a_send_behind_the_leftover_has_send_ok_only_once_it_is_in(daemon, host, reads):
    """AT+CIPSEND=<len> behind a leftover: no SEND OK while the leftover holds the ring; SEND OK once the
    peer reads."""
    peer = _DeafPeer()
    try:
        sent = _escape_with_leftover(daemon, host, peer, reads)
        assert host.ask(b"AT+CIPMODE=0") == b"\r\nOK\r\n"
        host.write(b"AT+CIPSEND=5\r\n")
        host.expect(b">")
        host.write(b"after")
        assert b"SEND" not in host.read_quiet(0.5)
        got = peer.read_all(len(sent) + 5)
        host.expect(b"SEND OK\r\n", timeout=10)
        assert _same(got, sent + b"after")
    finally:
        peer.close()


def test_peer_reset_behind_the_leftover_fails_the_send_once(daemon, host, reads):
    """The peer resets while AT+CIPSEND waits behind a leftover: SEND FAIL, one CLOSED, the leftover dropped
    and logged; a new link on the same id gets nothing of the old bytes."""
    peer = _DeafPeer()
    try:
        _escape_with_leftover(daemon, host, peer, reads)
        assert host.ask(b"AT+CIPMODE=0") == b"\r\nOK\r\n"
        host.write(b"AT+CIPSEND=5\r\n")
        host.expect(b">")
        host.write(b"after")
        time.sleep(0.2)
        _reset(peer)
        host.expect(b"SEND FAIL\r\n", timeout=5)
        host.expect(b"CLOSED\r\n", timeout=5)
        assert daemon.wait_event("escaped_bytes_dropped")
        assert b"CLOSED" not in host.read_quiet(0.5)
        _only_new_bytes_on_a_new_link(host)
    finally:
        peer.close()


def test_restart_with_a_leftover_pending(daemon, host, reads):
    """AT+RST while a leftover waits: it is dropped (logged), and nothing of it reaches a link opened after."""
    peer = _DeafPeer()
    try:
        _escape_with_leftover(daemon, host, peer, reads)
        host.write(b"AT+RST\r\n")
        host.expect(b"ready\r\n", timeout=10)
        host.expect(b"WIFI GOT IP\r\n", timeout=10)
        host.command(b"ATE0")
        assert daemon.wait_event("escaped_bytes_dropped")
        _only_new_bytes_on_a_new_link(host)
    finally:
        peer.close()


def test_front_idles_while_a_leftover_waits(daemon, host, reads):
    """A leftover waiting for a peer that never reads costs the front next to nothing (no spin), and once
    the link ends the poll for it stops."""
    peer = _DeafPeer()
    try:
        _escape_with_leftover(daemon, host, peer, reads)
        front_pid = daemon.front_pid()
        front = psutil.Process(front_pid)
        before = sum(front.cpu_times()[:2])
        time.sleep(2.0)
        assert sum(front.cpu_times()[:2]) - before < 0.3
        _reset(peer)
        host.expect(b"CLOSED\r\n", timeout=5)
        assert daemon.wait_event("escaped_bytes_dropped")
    finally:
        peer.close()


def _reader(peer: _DeafPeer, count: int) -> tuple[threading.Thread, list[bytes]]:
    """The peer starts reading (in a thread) while the MCU still streams."""
    out: list[bytes] = []
    thread = threading.Thread(target=lambda: out.append(peer.read_all(count, timeout=60)), daemon=True)
    thread.start()
    return thread, out


def _stream(host: Host, count: int) -> bytes:
    """``count`` random bytes written as the daemon takes them."""
    data = os.urandom(count)
    host.write(data)
    return data


def _room_back_then_escape(host: Host, peer: _DeafPeer, sent: bytes, more: bytes, reads: ReadCount,
                           base: int) -> None:
    """The peer starts reading (room comes back), the MCU streams ``more``, then +++ once the
    daemon read it all (``base``: its count before ``sent``): the peer gets ``sent`` + ``more``,
    every byte, in order."""
    thread, got = _reader(peer, len(sent) + len(more))
    host.write(more)
    _escape_once_read(host, reads, base + len(sent) + len(more))
    host.expect(b"\r\n+QUITT\r\n", timeout=10)
    thread.join(70)
    assert _same(got[0], sent + more)


def test_room_back_while_listening_keeps_the_order(daemon, host, reads):
    """Room comes back while the front listens with bytes in the +++ buffer, and the MCU streams on: the
    peer gets every byte in order (those of the buffer before the new ones), then +++ leaves."""
    peer = _DeafPeer()
    try:
        _enter_passthrough(host, peer)
        base = reads.now()
        sent = _stream_until_stalled(host)
        _, writable, _ = select.select([], [host.fd], [], 5.0)
        assert writable  # listening
        sent += _stream(host, 8192)  # into the +++ buffer
        _room_back_then_escape(host, peer, sent, os.urandom(1 << 20), reads, base)
    finally:
        peer.close()


def test_room_back_after_the_hold_keeps_the_order(daemon, host, reads):
    """The +++ buffer filled and the MCU is held (uart_input_held); room comes back: every byte reaches the
    peer in order, and the front reads on as the ring drains."""
    peer = _DeafPeer()
    try:
        _enter_passthrough(host, peer)
        base = reads.now()
        sent = _stream_until_stalled(host)
        sent += _stream_until_stalled(host, stall=2.0)
        assert daemon.wait_event("uart_input_held")
        _room_back_then_escape(host, peer, sent, os.urandom(256 << 10), reads, base)
    finally:
        peer.close()


def test_a_reconnected_passthrough_gets_nothing_of_the_old_stream(daemon, host):
    """The peer resets while passthrough listens with bytes in the +++ buffer; the link reconnects
    (AT+CIPRECONNINTV): the new connection gets only what the MCU sends after, not the old stream's tail."""
    peer = _DeafPeer()
    try:
        host.command(b"AT+CIPRECONNINTV=1")
        _enter_passthrough(host, peer)
        _stream_until_stalled(host)
        _, writable, _ = select.select([], [host.fd], [], 5.0)
        assert writable  # listening
        _stream(host, 4096)  # into the +++ buffer
        time.sleep(0.1)
        _reset(peer)
        assert daemon.wait_event("passthrough_reconnected", timeout=10)
        fresh = peer.accept()
        time.sleep(0.3)
        host.write(b"fresh")
        assert peer.read_all(1 << 20, timeout=1.0) == b"fresh"
        time.sleep(0.1)
        host.write(b"+++")
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
        fresh.close()
    finally:
        peer.close()


def test_wifi_drop_then_close_with_a_leftover_pending(daemon, host, reads):
    """AT+CWQAP while a leftover waits (the link stays, as here it does), then AT+CIPCLOSE: OK, the
    leftover dropped and logged, and no CLOSED after."""
    peer = _DeafPeer()
    try:
        _escape_with_leftover(daemon, host, peer, reads)
        assert host.command(b"AT+CWQAP").endswith(b"\r\nOK\r\n")
        assert host.ask(b"AT+CIPCLOSE", timeout=15).endswith(b"\r\nOK\r\n")
        assert daemon.wait_event("escaped_bytes_dropped", timeout=5)
        assert b"CLOSED" not in host.read_quiet(0.5)
    finally:
        peer.close()


def test_front_idles_through_the_hold_and_the_listening(daemon, host):
    """A stalled passthrough stream over 3 s (held, then listening from 1 s on with the MCU quiet, then a
    few bytes into the +++ buffer): the front sleeps throughout (no spin on a readable or a past timer)."""
    peer = _DeafPeer()
    try:
        _enter_passthrough(host, peer)
        _stream_until_stalled(host)
        front_pid = daemon.front_pid()
        front = psutil.Process(front_pid)
        before = sum(front.cpu_times()[:2])
        time.sleep(1.5)
        _stream(host, 1000)
        time.sleep(1.5)
        assert sum(front.cpu_times()[:2]) - before < 0.4
        host.write(b"+++")
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
    finally:
        peer.close()


def test_a_leftover_holds_up_only_its_own_link(daemon, host, reads):
    """AT+CIPMUX=1: AT+CIPSENDL on link 0 to a deaf peer, cancelled with its ring full (a leftover waits);
    a send on link 1 meanwhile is SEND OK at once and its peer gets just its bytes; link 0's peer still
    gets every byte before the +++ once it reads."""
    peer = _DeafPeer()
    other = _DeafPeer()
    try:
        host.command(b"AT+CIPMUX=1")
        assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % peer.port).endswith(b"OK\r\n")
        peer.accept()
        assert host.ask(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d' % other.port).endswith(b"OK\r\n")
        other.accept()
        sent = _cancel_a_stalled_sendl(daemon, host, reads)
        assert b"SEND OK" in host.send_data(b"AT+CIPSEND=1,5", b"other")
        assert other.read_all(1 << 20, timeout=1.0) == b"other"
        assert _same(peer.read_all(len(sent)), sent)
    finally:
        peer.close()
        other.close()


def _front_wakeups(daemon, seconds: float) -> int:
    """The front's voluntary context switches (its event loop's sleeps ended) over ``seconds``."""
    front = psutil.Process(daemon.front_pid())
    before = front.num_ctx_switches().voluntary
    time.sleep(seconds)
    return front.num_ctx_switches().voluntary - before


def test_a_leftover_for_a_peer_deaf_for_long_backs_off_its_poll(daemon, host, reads):
    """A leftover waits for a peer that reads nothing for seconds: the front's look at the ring
    backs off (it woke 20 times a second before), and once the peer reads it still gets every
    byte streamed before the +++, within about the longest wait (1 s)."""
    peer = _DeafPeer()
    try:
        sent = _escape_with_leftover(daemon, host, peer, reads)
        time.sleep(2.0)  # the waits have doubled up to 1 s by now
        wakeups = _front_wakeups(daemon, 3.0)
        assert wakeups < 25, f"the front woke {wakeups} times in 3 s while the peer stayed deaf"
        assert _same(peer.read_all(len(sent), timeout=15), sent)
        daemon.wait_event("escaped_bytes_sent", timeout=5)
    finally:
        peer.close()


def test_cipclose_behind_a_backed_off_leftover_hands_it_over_first(daemon, host, reads):
    """+++ then AT+CIPCLOSE, as drivers end a passthrough, to a peer deaf long enough for the leftover's
    look to back off (1 s) that starts reading just after the close: every byte streamed before the +++
    reaches it (the close takes the leftover into the ring first, as lwIP's close sends its buffer)."""
    peer = _DeafPeer()
    try:
        sent = _escape_with_leftover(daemon, host, peer, reads)
        time.sleep(2.5)  # the look waits 1 s by now
        host.write(b"AT+CIPCLOSE\r\n")
        time.sleep(0.3)  # the close is under way; now the peer reads
        got = peer.read_all(len(sent) + 1, timeout=15)
        assert _same(got, sent), f"{len(sent) - len(got)} of {len(sent)} bytes lost"
        assert host.expect(b"\r\nOK\r\n", timeout=10).endswith(b"CLOSED\r\n\r\nOK\r\n")
        assert not daemon.events("escaped_bytes_dropped")
    finally:
        peer.close()


def test_cipserver_closing_its_clients_hands_a_leftover_over_first(daemon, host, reads):
    """AT+CIPSENDL to a server's client that stopped reading, +++ with part of the stream still in
    the front, then AT+CIPSERVER=0,1 (the server deleted, its clients closed) while the client
    starts reading: it gets every byte streamed before the +++, as AT+CIPCLOSE would hand them over."""
    port = free_port()
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b"AT+CIPSERVER=1,%d" % port) == b"\r\nOK\r\n"
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # deaf: a small window, nothing read
    try:
        client.connect(("127.0.0.1", port))
        host.expect(b"0,CONNECT\r\n")
        sent = _cancel_a_stalled_sendl(daemon, host, reads)
        time.sleep(2.5)  # the leftover's look waits 1 s by now
        host.write(b"AT+CIPSERVER=0,1\r\n")
        time.sleep(0.3)  # the close is under way; now the client reads
        got = read_all(client, len(sent) + 1, timeout=15)
        assert _same(got, sent), f"{len(sent) - len(got)} of {len(sent)} bytes lost"
        assert host.expect(b"\r\nOK\r\n", timeout=10).endswith(b"0,CLOSED\r\n\r\nOK\r\n")
        assert not daemon.events("escaped_bytes_dropped")
    finally:
        client.close()
