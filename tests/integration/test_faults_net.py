"""Network faults ([faults] net_*, tls_fail) end to end: the daemon on a pty,
real loopback peers; each fault's effect as the MCU sees it, and the same
seed giving the same faults in another run."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import ssl
import threading
import time

import pytest

from tests.harness import Demux, EchoServer, Host, SinkServer, StampedSink, free_port, udp_peer
from tests.integration.test_tls import TlsServer, _issue
from tests.together import one_at_a_time, together

pytestmark = pytest.mark.timeout(180)


def _faults(seed: int, **faults: dict) -> str:
    """A [faults] section: the seed, then one table per fault."""
    out = f"[faults]\nseed = {seed}\n"
    for name, table in faults.items():
        out += f"[faults.{name}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
    return out


def _boot(make_daemon, config: str):
    daemon = make_daemon(config)
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    return daemon, host


def _start(host, link_id: int, kind: str, port: int, tail: bytes = b"", timeout: float = 10) -> bytes:
    return host.ask(b'AT+CIPSTART=%d,"%s","127.0.0.1",%d' % (link_id, kind.encode(), port) + tail, timeout=timeout)


def _recvdata(host, link_id: int, length: int) -> bytes:
    """AT+CIPRECVDATA on a link; the payload (passive notices may come first)."""
    host.write(b"AT+CIPRECVDATA=%d,%d\r\n" % (link_id, length))
    before = host.expect(b"+CIPRECVDATA:", timeout=10)[: -len(b"+CIPRECVDATA:")]
    assert re.fullmatch(rb"(\r\n\+IPD,%d,\d+\r\n)*" % link_id, before), before
    n = int(host.expect(b",", timeout=10)[:-1])
    body = host.expect(b"\r\nOK\r\n")
    assert len(body) == n + 6, (n, body[-20:])
    return body[:n]


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    issued, _ = _issue(tmp_path_factory.mktemp("faults-pki"), "server", "localhost")
    return issued


# -- connects -------------------------------------------------------------------------------


def test_a_refused_connect_looks_like_a_closed_port(make_daemon, echo_server):
    """net_connect_refused: the MCU gets the very bytes a closed port gives, and the server sees no connection."""
    _, host = _boot(make_daemon, _faults(1, net_connect_refused={"rate": 1, "link": 1}))
    reference = _start(host, 0, "TCP", free_port())  # a real refusal, on a link without the fault
    assert reference == b"\r\nERROR\r\n"
    assert _start(host, 1, "TCP", echo_server.port) == reference
    time.sleep(0.2)  # a connection would show up within this
    assert echo_server.conns == []
    assert _start(host, 0, "TCP", echo_server.port) == b"0,CONNECT\r\n\r\nOK\r\n"  # link 0 is left alone


def test_a_connect_timeout_takes_the_connect_timeout(make_daemon, echo_server):
    """net_connect_timeout: ERROR only once the timeout passed ([links] connect_timeout_ms, or AT+CIPSTART's)."""
    config = "[links]\nconnect_timeout_ms = 1200\n" + _faults(1, net_connect_timeout={"rate": 1})
    daemon, host = _boot(make_daemon, config)
    started = time.monotonic()
    assert _start(host, 0, "TCP", echo_server.port) == b"\r\nERROR\r\n"
    assert 1.2 <= time.monotonic() - started < 3.0
    started = time.monotonic()
    assert _start(host, 1, "SSL", echo_server.port, b",,,500") == b"\r\nERROR\r\n"
    assert 0.5 <= time.monotonic() - started < 1.0 + 1.2
    assert echo_server.conns == []
    assert [e["reason"] for e in daemon.events("connect_failed")] == ["timed out"] * 2


def test_a_tls_handshake_failure_answers_error(make_daemon, tls_cert):
    """tls_fail: AT+CIPSTART "SSL" answers ERROR as for a certificate refused; the server sees the client give up."""
    server = TlsServer(tls_cert)
    try:
        _, host = _boot(make_daemon, _faults(1, tls_fail={"rate": 1, "link": 2}))
        assert _start(host, 2, "SSL", server.port) == b"\r\nERROR\r\n"
        deadline = time.monotonic() + 5
        while not server.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(server.errors) == 1
        assert _start(host, 0, "SSL", server.port) == b"0,CONNECT\r\n\r\nOK\r\n"  # link 0 is left alone
    finally:
        server.close()


def test_an_ssl_servers_client_fails_its_handshake_unannounced(make_daemon):
    """tls_fail on the SSL server's side: the client's handshake fails and the MCU hears of no connection."""
    daemon, host = _boot(make_daemon, _faults(1, tls_fail={"rate": 1}))
    port = free_port()
    assert host.ask(b'AT+CIPSERVER=1,%d,"SSL",0' % port) == b"\r\nOK\r\n"
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(OSError):  # an SSLError or a reset, as the server drops it
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)):
            pass
    assert daemon.wait_event("server_handshake_failed")[0]["reason"] == "handshake failed (fault tls_fail)"
    assert b"CONNECT" not in host.read_quiet(0.3)


def _connects(make_daemon, seed: int, echo_port: int, tls_port: int) -> dict[int, str]:
    """Connect again and again on links 0 (refusals), 1 (TLS failures), 2 (timeouts), 3 (no fault).

    Only link 2's connects have a short timeout (AT+CIPSTART's, 0.6 s: what each of its
    timeouts costs); the others keep the default, so that a real connect or handshake
    the loaded machine delays is never a failure no fault drew."""
    config = _faults(
        seed, net_connect_refused={"rate": 0.5, "link": 0}, tls_fail={"rate": 0.5, "link": 1},
        net_connect_timeout={"rate": 0.5, "link": 2})
    _, host = _boot(make_daemon, config)
    plan = {0: ("TCP", echo_port, 30, b""), 1: ("SSL", tls_port, 20, b""), 2: ("TCP", echo_port, 10, b",,,600"),
            3: ("TCP", echo_port, 10, b"")}
    seen = {}
    for link_id, (kind, port, times, tail) in plan.items():
        outcome = ""
        for _ in range(times):
            answer = _start(host, link_id, kind, port, tail)
            assert answer in (b"\r\nERROR\r\n", b"%d,CONNECT\r\n\r\nOK\r\n" % link_id), answer
            outcome += "x" if answer == b"\r\nERROR\r\n" else "o"
            if answer != b"\r\nERROR\r\n":
                assert host.command(b"AT+CIPCLOSE=%d" % link_id) == b"%d,CLOSED\r\n\r\nOK\r\n" % link_id
        seen[link_id] = outcome
    return seen


def test_connect_faults_repeat_with_the_seed(make_daemon, tls_cert):
    """The same seed fails the same connects in another run, another seed others; a link no fault names never fails."""
    echo, tls = EchoServer(), TlsServer(tls_cert)
    try:
        make = one_at_a_time(make_daemon)
        first, again, other = together(*(lambda seed=seed: _connects(make, seed, echo.port, tls.port)
                                         for seed in (7, 7, 8)))
    finally:
        echo.close()
        tls.close()
    assert first == again
    for link_id in (0, 1):
        assert "x" in first[link_id] and "o" in first[link_id], first
        assert first[link_id] != other[link_id]
    assert first[3] == other[3] == "o" * 10


# -- latency and bandwidth -----------------------------------------------------------------


def _echo_trips(make_daemon, echo_server, latency: dict) -> tuple[Host, Demux, dict[int, float]]:
    """A daemon with net_latency `latency` on link 1, links 0 and 1 open to the echo server:
    the round trip of a "ping" on each."""
    _, host = _boot(make_daemon, _faults(1, net_latency={**latency, "link": 1}))
    for link_id in (0, 1):
        assert _start(host, link_id, "TCP", echo_server.port) == b"%d,CONNECT\r\n\r\nOK\r\n" % link_id
    demux = Demux(host)
    return host, demux, {link_id: _echo_trip(demux, link_id) for link_id in (0, 1)}


def _echo_trip(demux: Demux, link_id: int) -> float:
    """The round trip of one "ping" through the echo server on ``link_id``."""
    before = len(demux.data.get(link_id, b""))
    started = time.monotonic()
    assert demux.send(link_id, b"ping").endswith(b"SEND OK\r\n")
    assert demux.wait_data(link_id, before + 4)[before:] == b"ping"
    return time.monotonic() - started


# A loaded machine delays a round trip now and then (never shortens one): an upper bound
# on one is timed again, up to three pings, a lower bound never (the latency's own floor).
_TRIES = 3


def test_latency_delays_what_the_network_sends(make_daemon, echo_server):
    """net_latency on link 1: its echo comes back at least ms later, in order; link 0's at once."""
    _, demux, timings = _echo_trips(make_daemon, echo_server, {"ms": 400, "jitter_ms": 100})
    assert timings[1] >= 2 * 0.3  # each way at least ms - jitter_ms
    plain = [timings[0]]  # link 0's at once: under 0.3 s in one of _TRIES pings
    while plain[-1] >= 0.3 and len(plain) < _TRIES:
        plain.append(_echo_trip(demux, 0))
    assert plain[-1] < 0.3, plain
    payload = os.urandom(20000)  # many pieces, each drawn its own jitter: the order stays
    for offset in range(0, len(payload), 2000):
        assert demux.send(1, payload[offset:offset + 2000]).endswith(b"SEND OK\r\n")
    assert demux.wait_data(1, 4 + len(payload), timeout=20)[4:] == payload


def test_latency_delays_what_the_mcu_sends_too(make_daemon, echo_server):
    """net_latency ms 300 on link 1: an echo's round trip grows by 2 x ms; bytes the MCU sent
    reach the peer ms after SEND OK, whole and in order; AT+CIPCLOSE delivers them, then the FIN."""
    host, demux, trips = _echo_trips(make_daemon, echo_server, {"ms": 300})
    tries = [trips]
    while True:  # 2 x ms more than link 0's, plus up to 0.3 s of noise: in one of _TRIES
        assert trips[1] >= 2 * 0.3, tries
        if trips[1] < trips[0] + 2 * 0.3 + 0.3 or len(tries) == _TRIES:
            break
        trips = {link_id: _echo_trip(demux, link_id) for link_id in (0, 1)}
        tries.append(trips)
    assert trips[1] < trips[0] + 2 * 0.3 + 0.3, tries
    assert host.command(b"AT+CIPCLOSE=1") == b"1,CLOSED\r\n\r\nOK\r\n"
    sink = StampedSink()
    try:
        assert _start(host, 1, "TCP", sink.port) == b"1,CONNECT\r\n\r\nOK\r\n"
        pieces = [os.urandom(1500) for _ in range(4)]
        send_ok = []
        for piece in pieces:
            assert demux.send(1, piece).endswith(b"SEND OK\r\n")
            send_ok.append(time.monotonic())  # seen by the host: a little after it was given
        assert host.command(b"AT+CIPCLOSE=1", timeout=10) == b"1,CLOSED\r\n\r\nOK\r\n"
        closed = time.monotonic()
    finally:
        sink.close()
    assert hashlib.sha256(sink.data).digest() == hashlib.sha256(b"".join(pieces)).digest()
    for i, seen in enumerate(send_ok):  # no byte of a send before ms after its SEND OK (pty noise aside)
        assert sink.first_at(i * 1500 + 1) - seen >= 0.3 - 0.05, (i, sink.arrivals, send_ok)
    assert sink.fin_at is not None and sink.fin_at >= sink.arrivals[-1][0]
    assert closed - send_ok[-1] >= 0.3 - 0.05  # the close waited for the delayed data


def test_latency_on_a_tls_link(make_daemon, tls_cert):
    """net_latency ms 200 on an SSL link: the first echo takes 2 x ms or more, then 32 KiB
    sent in 8 KiB pieces come back whole and in order."""
    server = TlsServer(tls_cert)
    try:
        _, host = _boot(make_daemon, _faults(1, net_latency={"ms": 200}))
        assert _start(host, 0, "SSL", server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        demux = Demux(host)
        started = time.monotonic()
        assert demux.send(0, b"ping").endswith(b"SEND OK\r\n")
        assert demux.wait_data(0, 4) == b"ping"
        assert time.monotonic() - started >= 2 * 0.2
        payload = os.urandom(4 * 8192)
        for offset in range(0, len(payload), 8192):
            assert demux.send(0, payload[offset:offset + 8192]).endswith(b"SEND OK\r\n")
        assert demux.wait_data(0, 4 + len(payload), timeout=20)[4:] == payload
    finally:
        server.close()


def test_bandwidth_caps_each_way(make_daemon):
    """net_bandwidth 16000 B/s: 40000 bytes from the peer take 2.5 s or more, 24000 to it 1.5 s or more; hashes equal."""
    _, host = _boot(make_daemon, _faults(1, net_bandwidth={"bytes_per_s": 16000}))
    sink, source = SinkServer(), socket.create_server(("127.0.0.1", 0))
    try:
        assert _start(host, 0, "TCP", sink.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        up = os.urandom(24000)
        demux = Demux(host)
        started = time.monotonic()
        for offset in range(0, len(up), 4000):
            assert demux.send(0, up[offset:offset + 4000]).endswith(b"SEND OK\r\n")
        deadline = time.monotonic() + 20
        while sum(sink.counts.values()) < len(up):
            assert time.monotonic() < deadline, sink.counts
            time.sleep(0.01)
        assert time.monotonic() - started >= len(up) / 16000
        assert [h.digest() for h in sink.hashes.values()] == [hashlib.sha256(up).digest()]

        assert _start(host, 1, "TCP", source.getsockname()[1]) == b"1,CONNECT\r\n\r\nOK\r\n"
        conn, _ = source.accept()
        down = os.urandom(40000)
        started = time.monotonic()
        conn.sendall(down)  # the kernel's buffers take it all: the cap is bridged's
        got = demux.wait_data(1, len(down), timeout=20)
        assert time.monotonic() - started >= len(down) / 16000
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        conn.close()
    finally:
        sink.close()
        source.close()


def test_bandwidth_caps_datagrams_each_way(make_daemon):
    """net_bandwidth 8000 B/s on a UDP link: 12 datagrams of 1000 bytes take 1.3 s or more each way, none lost."""
    _, host = _boot(make_daemon, _faults(1, net_bandwidth={"bytes_per_s": 8000}))
    peer, local = udp_peer(), free_port(socket.SOCK_DGRAM)
    try:
        assert _start(host, 0, "UDP", peer.getsockname()[1], b",%d" % local) == b"0,CONNECT\r\n\r\nOK\r\n"
        demux = Demux(host)
        datagrams = [bytes([i]) * 1000 for i in range(12)]
        started = time.monotonic()
        for datagram in datagrams:
            assert demux.send(0, datagram).endswith(b"SEND OK\r\n")
        assert [peer.recvfrom(2000)[0] for _ in datagrams] == datagrams
        # A datagram goes whole, leaving the bucket in debt: all but the last waited for their bytes.
        assert time.monotonic() - started >= 11 * 1000 / 8000
        started = time.monotonic()
        for datagram in datagrams:
            peer.sendto(datagram, ("127.0.0.1", local))
        assert demux.wait_data(0, 12000, timeout=20) == b"".join(datagrams)
        assert time.monotonic() - started >= 11 * 1000 / 8000
    finally:
        peer.close()


def test_a_delayed_capped_passive_link_keeps_its_window(make_daemon):
    """Passive mode under latency and a cap: unread data stays within the window, a full
    window waits without spinning, and every byte arrives in order."""
    import psutil

    daemon, host = _boot(make_daemon, _faults(1, net_latency={"ms": 50, "jitter_ms": 20},
                                               net_bandwidth={"bytes_per_s": 400000}))
    server = socket.create_server(("127.0.0.1", 0))
    try:
        host.command(b"AT+CIPRECVTYPE=0,1")
        assert _start(host, 0, "TCP", server.getsockname()[1]) == b"0,CONNECT\r\n\r\nOK\r\n"
        conn, _ = server.accept()
        payload = os.urandom(256 * 1024)  # far beyond the window: the peer's sendall blocks
        sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
        sender.start()
        deadline = time.monotonic() + 10
        while b"+CIPRECVLEN:5760," not in host.ask(b"AT+CIPRECVLEN?"):  # the window fills
            assert time.monotonic() < deadline
            time.sleep(0.05)
        tree = [psutil.Process(daemon.proc.pid)] + psutil.Process(daemon.proc.pid).children(recursive=True)
        before = {p.pid: sum(p.cpu_times()[:2]) for p in tree}
        time.sleep(1.0)  # the CPU is measured over this
        used = sum(sum(p.cpu_times()[:2]) - before[p.pid] for p in tree)
        assert used < 0.25, f"the daemon used {used:.2f} s of CPU in 1 s waiting for a read"
        got = bytearray()
        deadline = time.monotonic() + 60
        while len(got) < len(payload):
            assert time.monotonic() < deadline, len(got)
            answer = host.ask(b"AT+CIPRECVLEN?")
            unread = int(re.search(rb"\+CIPRECVLEN:(\d+),", answer).group(1))  # notices may precede it
            assert unread <= 5760
            if unread:
                got += _recvdata(host, 0, 2048)
        sender.join(10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        conn.close()
    finally:
        server.close()


# -- UDP loss and reordering, TCP resets: effect and seed ------------------------------------


def _numbered(host, demux: Demux, link_id: int, count: int) -> list[int]:
    """A UDP peer sends `count` numbered datagrams to the link; the numbers the MCU got, in order."""
    peer = udp_peer()
    local = free_port(socket.SOCK_DGRAM)
    assert _start(host, link_id, "UDP", peer.getsockname()[1], b",%d" % local) == b"%d,CONNECT\r\n\r\nOK\r\n" % link_id
    try:
        for number in range(count):
            peer.sendto(b"%04d" % number, ("127.0.0.1", local))
            time.sleep(0.002)
    finally:
        peer.close()
    deadline = time.monotonic() + 2.0
    last = -1
    while time.monotonic() < deadline:  # until nothing new came for 0.5 s
        demux.pump(0.1)
        size = len(demux.data.get(link_id, b""))
        if size != last:
            last, deadline = size, time.monotonic() + 0.5
    data = bytes(demux.data.get(link_id, b""))
    return [int(data[i:i + 4]) for i in range(0, len(data), 4)]


def _reset_stream(host, demux: Demux, link_id: int) -> tuple[int, int | None]:
    """A peer streams to the link until it fails; the bytes the MCU got before CLOSED, the peer's errno."""
    server = socket.create_server(("127.0.0.1", 0))
    failure: list[int] = []
    connected = threading.Event()

    def stream() -> None:
        conn, _ = server.accept()
        conn.settimeout(5)
        connected.wait(10)  # +IPD only after CONNECT (the front may print them the other way round)
        block = bytes(range(256)) * 16
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                conn.sendall(block)
        except OSError as exc:
            failure.append(exc.errno)
        conn.close()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        assert _start(host, link_id, "TCP", server.getsockname()[1]) == b"%d,CONNECT\r\n\r\nOK\r\n" % link_id
        connected.set()
        demux.expect(b"%d,CLOSED\r\n" % link_id, timeout=30)
        thread.join(10)
    finally:
        server.close()
    return len(demux.data.get(link_id, b"")), (failure or [None])[0]


def _datapath(make_daemon, seed: int) -> tuple:
    config = _faults(seed, net_udp_loss={"rate": 0.3, "link": 0},
                     net_udp_reorder={"rate": 0.2, "depth": 2, "link": 1},
                     net_tcp_reset={"rate": 0.0002, "link": 2})
    daemon, host = _boot(make_daemon, config)
    demux = Demux(host)
    lost, reordered = _numbered(host, demux, 0, 40), _numbered(host, demux, 1, 40)
    reset = _reset_stream(host, demux, 2)
    after = [e["details"]["after_bytes"] for e in daemon.events("fault_injected") if e["name"] == "net_tcp_reset"]
    return lost, reordered, reset, after


def test_datagram_faults_and_resets_repeat_with_the_seed(make_daemon):
    """UDP loss drops datagrams, reordering holds some back `depth` places, a reset ends a stream
    with CLOSED after the drawn byte (the peer gets ECONNRESET); the same seed repeats all of it."""
    make = one_at_a_time(make_daemon)
    first, again, other = together(*(lambda seed=seed: _datapath(make, seed) for seed in (7, 7, 8)))
    lost, reordered, (received, peer_errno), after = first
    assert lost == sorted(lost) and 10 <= len(lost) < 40  # some lost, the rest in order
    assert len(set(reordered)) == len(reordered) >= 35  # only the last few may still be held
    overtaken = [sum(1 for m in reordered[:i] if m > n) for i, n in enumerate(reordered)]
    assert max(overtaken) == 2  # held back, then let through after `depth` later ones
    assert peer_errno == errno.ECONNRESET
    assert after == [received] and received > 0
    assert first == again
    assert other[0] != lost and other[1] != reordered and other[2][0] != received


def _latencies(make_daemon, seed: int, port: int) -> list[float]:
    """Round trips of six pings, one at a time, on a link with net_latency ms 450 +- 400."""
    daemon, host = _boot(make_daemon, _faults(seed, net_latency={"ms": 450, "jitter_ms": 400}))
    assert _start(host, 0, "TCP", port) == b"0,CONNECT\r\n\r\nOK\r\n"
    demux = Demux(host)
    out = []
    for n in range(6):
        started = time.monotonic()
        assert demux.send(0, b"ping%d" % n).endswith(b"SEND OK\r\n")
        assert demux.wait_data(0, 5 * (n + 1), timeout=10)[-5:] == b"ping%d" % n
        out.append(time.monotonic() - started)
    host.close()
    daemon.stop()
    return out


def test_latency_jitter_repeats_with_the_seed(make_daemon, echo_server):
    """Each echo is one send and one read, each drawn its own delay: seed 3 gives the same delays in a second
    run (within the pty's and the scheduler's noise), seed 4 others."""
    make = one_at_a_time(make_daemon)
    runs = []
    for _ in range(_TRIES):
        first, again, other = together(*(lambda seed=seed: _latencies(make, seed, echo_server.port)
                                         for seed in (3, 3, 4)))
        runs.append((first, again, other))
        assert all(0.1 <= t for t in first), first  # 2 x (ms - jitter), a floor no load lowers
        # Under 2 x (ms + jitter) plus the trip; seeds 3 and 4 differ by up to ~0.7 s here,
        # and a loaded machine adds up to ~0.1 s of noise to a round trip (two draws since
        # the uplink is delayed too), now and then more: the three runs go again, up to
        # _TRIES times, until the noise stays within these bounds.
        if (all(t <= 1.75 for t in first) and max(abs(a - b) for a, b in zip(first, again)) < 0.15
                and max(abs(a - b) for a, b in zip(first, other)) > 0.35):
            return
    raise AssertionError(f"seed 3 not repeated, or not told from seed 4, in {_TRIES} runs (3, 3, 4): {runs}")
