"""The link worker's uplink on its read window's ticks (the ring's polled flag) with the
command share and the links' lifetimes: AT+CIPSEND floods on five streaming links, AT+RST
and a link closed and reopened while its worker polls.  Real daemon on a pty, real
loopback peers; every byte hashed."""

from __future__ import annotations

import os
import re
import select
import socket
import time

from tests.harness import Demux
from tests.integration.both_ways import link_zero
from tests.integration.ticks_together import Peer, digest, wait_for


def _small_reads(host, wait: float) -> bool:
    """host._fill as a driver reading its UART in 64-byte pieces (up to 256 of them a call)."""
    readable, _, _ = select.select([host.fd], [], [], wait)
    if not readable:
        return False
    got = 0
    for _ in range(256):
        try:
            piece = os.read(host.fd, 64)
        except BlockingIOError:
            break
        host.buf += piece
        got += len(piece)
        if len(piece) < 64:
            break
    return bool(got)


def _five_links(host, server) -> list[socket.socket]:
    """Five links (AT+CIPMUX=1 set) to ``server``: the peers' ends, with TCP_NODELAY."""
    conns = []
    for link in range(5):
        assert host.ask(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link, server.getsockname()[1])).endswith(b"OK\r\n")
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(conn)
    return conns


def _flood_ending_in_a_send(host, expect) -> bytes:
    """300 AT and an AT+CIPSEND on link 2 in one write (a driver's retry loop), each answer
    awaited with ``expect`` (the driver's own reader), then the payload: what link 2 sent."""
    flood = bytes([251]) * 2048
    host.write(b"AT\r\n" * 300 + b"AT+CIPSEND=2,%d\r\n" % len(flood))
    for _ in range(300):
        expect(b"\r\nOK\r\n")
    expect(b"\r\nOK\r\n\r\n>")
    host.write(flood)
    expect(b"\r\nSEND OK\r\n")
    return flood


def test_cipsend_floods_on_five_links_while_all_five_peers_stream(daemon):
    """Five links, each peer streaming 1 KiB every 10 ms; the MCU, reading its UART in
    64-byte pieces, sends 2 KiB to each link in turn, each AT+CIPSEND the instant the last
    SEND OK came, a round every 25 ms (each link's sends steady: its worker batches and
    polls), an AT+CIPRECVLEN? per round; then a flood of 300 AT ending in AT+CIPSEND on
    link 2 in one write: every byte whole and in order on every link both ways (hashed),
    every command answered."""
    server = socket.create_server(("127.0.0.1", 0), backlog=8)
    peers: list[Peer] = []
    host = daemon.host()
    try:
        host.boot()
        host.command(b"AT+CIPMUX=1")
        conns = _five_links(host, server)
        host._fill = lambda wait: _small_reads(host, wait)
        peers = [Peer(conn, gap=0.010) for conn in conns]
        demux = Demux(host)
        ups = [bytearray() for _ in range(5)]
        start = time.monotonic()
        for round_ in range(60):
            for link in range(5):
                payload = bytes([(round_ * 5 + link) % 250]) * 2048
                assert demux.send(link, payload).endswith(b"SEND OK\r\n")
                ups[link] += payload
            host.write(b"AT+CIPRECVLEN?\r\n")
            demux.expect(b"+CIPRECVLEN:")
            demux.expect(b"\r\nOK\r\n")
            while time.monotonic() < start + (round_ + 1) * 0.025:
                demux.pump(0.001)
        ups[2] += _flood_ending_in_a_send(host, demux.expect)
        for peer in peers:
            peer.streaming.clear()
        time.sleep(0.1)
        for link, peer in enumerate(peers):
            wait_for(lambda: len(peer.received) >= len(ups[link]), 10, f"link {link}: uplink short")
            assert digest(peer.received) == digest(ups[link]), link
            got = demux.wait_data(link, len(peer.sent), timeout=10)
            assert digest(got) == digest(peer.sent), link
        assert b"ERROR" not in demux.text and b"busy" not in demux.text
    finally:
        for peer in peers:
            peer.join()
        server.close()
        host.close()


def _steady_sends(demux: Demux, link: int | None, count: int, tag: int) -> bytes:
    """AT+CIPSEND of 2 KiB every 50 ms on ``link`` (within two 100 ms windows: steady); what went."""
    up = bytearray()
    start = time.monotonic()
    for i in range(count):
        payload = bytes([(tag + i) % 250]) * 2048
        assert demux.send(link, payload).endswith(b"SEND OK\r\n")
        up += payload
        while time.monotonic() < start + (i + 1) * 0.050:
            demux.pump(0.002)
    return bytes(up)


def _just_after_a_tick(demux: Demux, window: float) -> None:
    while not 0.005 <= time.monotonic() % window <= 0.3 * window:  # the next tick is far
        demux.pump(0.0005)


def _bulk_pair_delays(demux: Demux, peer: Peer, link: int, tag: int) -> list[float]:
    """Two bulk payloads back to back just after a tick: the seconds each took from SEND OK
    to the peer (a payload left for a tick would wait most of the 100 ms window)."""
    delays = []
    _just_after_a_tick(demux, 0.100)
    for k in range(2):
        payload = bytes([(tag + k) % 250]) * 1500
        have = len(peer.received)
        assert demux.send(link, payload).endswith(b"SEND OK\r\n")
        sent_ok = time.monotonic()
        wait_for(lambda: len(peer.received) >= have + len(payload), 2, "the payload never came",
              pump=lambda: demux.pump(0.0005))
        delays.append(time.monotonic() - sent_ok)
        assert peer.received[have:] == payload
    return delays


def test_at_rst_while_polling_then_a_new_link_sends_at_once(make_daemon):
    """Link 0 streams both ways on a 100 ms window (its worker polls the uplink), AT+RST
    mid-stream: ready; the link reopened to a new peer, two bulk payloads back to back just
    after a tick both reach it at once (under 50 ms; three tries), not left for a tick."""
    daemon = make_daemon("[links]\nread_window_ms = 100\n")
    server, host, conn = link_zero(daemon)
    peers = [Peer(conn, gap=0.020)]
    try:
        demux = Demux(host)
        _steady_sends(demux, 0, 30, tag=1)
        host.write(b"AT+RST\r\n")
        host.expect(b"\r\nready\r\n", timeout=10)
        host.command(b"ATE0")
        host.command(b'AT+CWJAP="bridged","password"')
        host.command(b"AT+CIPMUX=1")
        runs = []
        for attempt in range(3):
            assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1]).endswith(b"OK\r\n")
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peers.append(Peer(conn, gap=0.020))
            runs.append(_bulk_pair_delays(Demux(host), peers[-1], 0, tag=attempt * 2))
            host.command(b"AT+CIPCLOSE=0", b"OK\r\n")
            if max(runs[-1]) < 0.050:
                break
        print(f"SEND OK to the peer, two payloads per try: {runs}")
        assert max(runs[-1]) < 0.050, runs
    finally:
        for peer in peers:
            peer.join()
        server.close()
        host.close()


def test_a_link_closed_and_reopened_in_a_tight_loop_while_polling(make_daemon):
    """Twenty times: link 0 streams both ways on a 20 ms window for 0.3 s (its worker polls),
    then AT+CIPCLOSE and at once AT+CIPSTART to a new peer, and a bulk payload: every
    connection's peer gets exactly its own bytes, in order, then the end."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    server, host, conn = link_zero(daemon)
    peers = []
    demux = Demux(host)
    try:
        for round_ in range(20):
            peer = Peer(conn, gap=0.005)
            peers.append(peer)
            up = bytearray()
            start = time.monotonic()
            for i in range(25):  # 2 KiB every 12 ms: steady on a 20 ms window
                payload = bytes([(round_ * 25 + i) % 250]) * 2048
                assert demux.send(0, payload).endswith(b"SEND OK\r\n")
                up += payload
                while time.monotonic() < start + (i + 1) * 0.012:
                    demux.pump(0.001)
            host.write(b"AT+CIPCLOSE=0\r\n")
            demux.expect(b"0,CLOSED\r\n")
            demux.expect(b"\r\nOK\r\n")
            wait_for(lambda: peer.eof or not peer.thread.is_alive(), 5, "no end for the peer")
            assert digest(peer.received) == digest(up), (round_, len(peer.received), len(up), peer.reset)
            host.write(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d\r\n' % server.getsockname()[1])
            demux.expect(b"\r\nOK\r\n")
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = Peer(conn, gap=0.005)
        peers.append(peer)
        last = bytes(range(256)) * 8
        assert demux.send(0, last).endswith(b"SEND OK\r\n")
        wait_for(lambda: len(peer.received) >= len(last), 5, "the last payload never came")
        assert bytes(peer.received) == last
    finally:
        for peer in peers:
            peer.join()
        server.close()
        host.close()



_NOTICE = re.compile(rb"\r\n\+IPD,\d,\d+\r\n")  # passive mode's notices, anywhere between messages
_RECVDATA = re.compile(rb"\+CIPRECVDATA:(\d+),")
_RECVLEN = re.compile(rb"\+CIPRECVLEN:([-\d,]+)\r\n\r\nOK\r\n")


class _PassiveDriver:
    """A driver in passive mode on five links, each command the instant the last one's final
    result came, reading its UART in 64-byte pieces; notices are dropped as they come (the
    payloads here hold no '\\r\\n+IPD,': runs of one byte value)."""

    def __init__(self, host) -> None:
        self.host = host
        self.got = [bytearray() for _ in range(5)]

    def _until(self, find, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            self.host.buf[:] = _NOTICE.sub(b"", self.host.buf)
            found = find(self.host.buf)
            if found is not None:
                return found
            assert time.monotonic() < deadline, f"waited; have {bytes(self.host.buf[-300:])!r}"
            _small_reads(self.host, 0.002)

    def _through(self, text: bytes) -> None:
        def find(buf):
            i = buf.find(text)
            if i < 0:
                return None
            assert b"ERROR" not in buf[:i] and b"busy" not in buf[:i], bytes(buf[: i + len(text)])
            del buf[: i + len(text)]
            return True
        self._until(find)

    def send(self, link: int, payload: bytes) -> None:
        self.host.write(b"AT+CIPSEND=%d,%d\r\n" % (link, len(payload)))
        self._through(b"\r\nOK\r\n\r\n>")
        self.host.write(payload)
        self._through(b"\r\nSEND OK\r\n")

    def recvlen(self) -> list[int]:
        self.host.write(b"AT+CIPRECVLEN?\r\n")

        def find(buf):
            m = _RECVLEN.search(buf)
            if m is None:
                return None
            values = [int(v) for v in m.group(1).split(b",")]
            del buf[: m.end()]
            return values
        return self._until(find)

    def read(self, link: int, n: int) -> None:
        self.host.write(b"AT+CIPRECVDATA=%d,%d\r\n" % (link, n))

        def find(buf):
            m = _RECVDATA.search(buf)
            if m is None or len(buf) < m.end() + int(m.group(1)) + 6:
                return None
            end = m.end() + int(m.group(1))
            assert buf[end : end + 6] == b"\r\nOK\r\n", bytes(buf[m.start() : end + 6])
            self.got[link] += buf[m.end() : end]
            del buf[: end + 6]
            return True
        self._until(find)


def test_passive_reads_and_cipsend_floods_on_five_links_while_all_five_peers_stream(daemon):
    """Passive mode (AT+CIPRECVTYPE=5,1: no read window there) on five links, each peer
    streaming 1 KiB every 10 ms: the driver sends 2 KiB to each link in turn, polls
    AT+CIPRECVLEN? and reads up to 2 KiB of each link with data, a round every 25 ms, then
    300 AT and AT+CIPSEND in one write; every byte hashed both ways on every link, no ERROR
    nor busy, every read whole."""
    server = socket.create_server(("127.0.0.1", 0), backlog=8)
    peers: list[Peer] = []
    host = daemon.host()
    try:
        host.boot()
        host.command(b"AT+CIPMUX=1")
        host.command(b"AT+CIPRECVTYPE=5,1")
        conns = _five_links(host, server)
        peers = [Peer(conn, gap=0.010) for conn in conns]
        driver, ups = _PassiveDriver(host), [bytearray() for _ in range(5)]
        start = time.monotonic()
        for round_ in range(60):
            for link in range(5):
                payload = bytes([(round_ * 5 + link) % 250]) * 2048
                driver.send(link, payload)
                ups[link] += payload
            for link, unread in enumerate(driver.recvlen()):
                if unread > 0:
                    driver.read(link, min(unread, 2048))
            while time.monotonic() < start + (round_ + 1) * 0.025:
                _small_reads(host, 0.001)
        ups[2] += _flood_ending_in_a_send(host, driver._through)
        for peer in peers:
            peer.streaming.clear()
        deadline = time.monotonic() + 20
        while any(len(driver.got[i]) < len(peers[i].sent) for i in range(5)):
            assert time.monotonic() < deadline, [(len(driver.got[i]), len(peers[i].sent)) for i in range(5)]
            for link, unread in enumerate(driver.recvlen()):
                if unread > 0:
                    driver.read(link, min(unread, 2048))
        for link, peer in enumerate(peers):
            wait_for(lambda: len(peer.received) >= len(ups[link]), 10, f"link {link}: uplink short")
            assert digest(peer.received) == digest(ups[link]), link
            assert digest(driver.got[link]) == digest(peer.sent), link
    finally:
        for peer in peers:
            peer.join()
        server.close()
        host.close()
