"""AT+CIPSEND's direct payload path (bridged.uart.direct) against hostile MCUs, peers and operators."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest

from tests.integration.test_faults_at import fault_cli
from tests.readcount import ReadCount

CANCELED = b"\r\nSEND Canceled\r\n"
RING = "[links]\nring_size = 4096\n"  # sends wrap its end often


def _open(host, port: int) -> None:
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % port) == b"CONNECT\r\n\r\nOK\r\n"


def _recv(conn: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    conn.settimeout(timeout)
    got = b""
    while len(got) < n:
        piece = conn.recv(65536)
        if not piece:
            break
        got += piece
    return got


@pytest.fixture
def read_count(daemon):
    counter = ReadCount(daemon)
    yield counter
    counter.close()


@pytest.fixture
def peer():
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def test_plus_at_every_position_of_short_sends(host, peer, read_count):
    """AT+CIPSEND=1..8 with +++ (guard silences) after every prefix: SEND Canceled while three
    bytes or more were left, else the '+' that fit are payload and the rest is refused busy."""
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    expected = b""
    for length in range(1, 9):
        for before in range(length):
            host.command(b"AT+CIPSEND=%d" % length, b">")
            time.sleep(0.04)
            if before:
                read = read_count.now()
                host.write(b"a" * before)
                read_count.wait(read + before)  # read apart from the +++ (ReadCount)
                time.sleep(0.04)
            host.write(b"+++")
            left = length - before
            if left >= 3:
                assert host.expect(CANCELED, timeout=3) == CANCELED, (length, before)
            else:
                answer = host.expect(b"SEND OK\r\n", timeout=3)
                assert answer == b"\r\nbusy p...\r\n\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % length, (length, before)
                expected += b"a" * before + b"+" * left
            time.sleep(0.04)
    assert host.send_data(b"AT+CIPSEND=3", b"end") == b"\r\nRecv 3 bytes\r\n\r\nSEND OK\r\n"
    assert _recv(conn, len(expected) + 3) == expected + b"end"
    conn.close()


def test_plus_split_over_reads_at_every_position(host, peer, read_count):
    """+++ written '+' then '++' (2 ms apart, guard silences around): cancels as one +++ when
    three bytes were left, for every prefix of AT+CIPSEND=6."""
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    for before in range(4):
        host.command(b"AT+CIPSEND=6", b">")
        time.sleep(0.04)
        if before:
            read = read_count.now()
            host.write(b"b" * before)
            read_count.wait(read + before)  # read apart from the +++ (ReadCount)
            time.sleep(0.04)
        host.write(b"+")
        time.sleep(0.002)
        host.write(b"++")
        assert host.expect(CANCELED, timeout=3) == CANCELED, before
        time.sleep(0.04)
    assert host.send_data(b"AT+CIPSEND=3", b"end") == b"\r\nRecv 3 bytes\r\n\r\nSEND OK\r\n"
    assert _recv(conn, 3) == b"end"
    conn.close()


def test_a_peer_reset_mid_payload_fails_the_send(host, peer):
    """The peer resets (RST) while half of a direct payload is read: CLOSED, then SEND FAIL once
    the rest came, and the next command is answered."""
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    host.command(b"AT+CIPSEND=3000", b">")
    host.write(b"a" * 1500)
    time.sleep(0.1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    host.expect(b"CLOSED\r\n", timeout=5)
    host.write(b"b" * 1500)
    assert host.expect(b"SEND FAIL\r\n", timeout=5).endswith(b"\r\nRecv 3000 bytes\r\n\r\nSEND FAIL\r\n")
    assert host.command(b"AT") == b"\r\nOK\r\n"


def test_a_killed_worker_mid_payload_fails_the_send_and_the_slot_works_again(daemon, host, peer):
    """SIGKILL the link's worker while a direct payload is half read: CLOSED, SEND FAIL at its
    end; a new connection on the restarted worker carries the next send whole."""
    daemon.expected_errors |= {"worker_died", "child_died"}
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    host.command(b"AT+CIPSEND=2000", b">")
    host.write(b"k" * 1000)
    time.sleep(0.1)
    os.kill(daemon.worker_pid(0), signal.SIGKILL)
    host.expect(b"CLOSED\r\n", timeout=5)
    host.write(b"k" * 1000)
    assert host.expect(b"SEND FAIL\r\n", timeout=5).endswith(b"\r\nRecv 2000 bytes\r\n\r\nSEND FAIL\r\n")
    conn.close()
    deadline = time.monotonic() + 10
    while True:
        answer = host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % peer.getsockname()[1])
        if answer.endswith(b"OK\r\n") and b"CONNECT" in answer:
            break
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)
    conn, _ = peer.accept()
    payload = os.urandom(2000)
    assert host.send_data(b"AT+CIPSEND=2000", payload) == b"\r\nRecv 2000 bytes\r\n\r\nSEND OK\r\n"
    assert _recv(conn, 2000) == payload
    conn.close()


def test_sigterm_mid_payload_exits_cleanly(daemon, host, peer):
    """SIGTERM while a direct payload is half read: the daemon exits 0 with no traceback."""
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    host.command(b"AT+CIPSEND=3000", b">")
    host.write(b"t" * 1500)
    time.sleep(0.2)
    assert daemon.stop() == 0
    text = daemon.log_text()
    assert "Traceback" not in text and "BufferError" not in text
    conn.close()


def test_status_counts_every_byte_of_a_direct_send(daemon, host, peer):
    """bridged status's rx bytes grows by the command line plus the payload and its surplus."""
    from tests.integration.test_status import status_json

    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    host.command(b"AT+CIPSEND=1000", b">")
    time.sleep(0.05)
    before = status_json(daemon)
    key = _rx_key(before)
    host.write(b"s" * 1000 + b"xyz")
    host.expect(b"SEND OK\r\n")
    after = status_json(daemon)
    assert _get(after, key) - _get(before, key) == 1003
    assert _recv(conn, 1000) == b"s" * 1000
    conn.close()


def _rx_key(status: dict) -> tuple:
    for path, value in _walk(status, ()):
        if path[-1] == "bytes_in" and isinstance(value, int):
            return path
    raise AssertionError(f"no rx bytes in {status}")


def _walk(node, path):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    else:
        yield path, node


def _get(status: dict, key: tuple) -> int:
    for k in key:
        status = status[k]
    return status


def test_input_fault_armed_mid_payload(daemon, host, peer):
    """uart_overrun (3 bytes) armed while a direct payload is half read: the rest goes through the fault (some
    bytes lost), so the MCU must send more; nothing crashes, the peer gets what was counted."""
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    host.command(b"AT+CIPSEND=2000", b">")
    host.write(b"f" * 1000)
    time.sleep(0.1)
    assert fault_cli(daemon, "uart_overrun", "count=1", "bytes=3").returncode == 0
    time.sleep(0.1)
    host.write(b"g" * 1000)
    time.sleep(0.2)
    host.write(b"h" * 3)
    assert host.expect(b"SEND OK\r\n", timeout=5) == b"\r\nRecv 2000 bytes\r\n\r\nSEND OK\r\n"
    got = _recv(conn, 2000)
    assert got[:1000] == b"f" * 1000 and got[1000:1997] == b"g" * 997 and got[1997:] == b"hhh"
    conn.close()


def test_transcript_switched_on_mid_payload(daemon, host, peer):
    """The transcript switched on while a direct payload is half read: the payload arrives
    whole, in order, SEND OK."""
    from tests.integration.test_status import status_cli

    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    payload = os.urandom(3000)
    host.command(b"AT+CIPSEND=3000", b">")
    host.write(payload[:1000])
    time.sleep(0.1)
    assert status_cli(daemon, "--transcript", "on").returncode == 0
    host.write(payload[1000:])
    assert host.expect(b"SEND OK\r\n", timeout=5) == b"\r\nRecv 3000 bytes\r\n\r\nSEND OK\r\n"
    assert _recv(conn, 3000) == payload
    conn.close()


def test_a_partly_full_ring_takes_the_general_path_then_direct_again(make_daemon, peer):
    """With the worker stopped, a 3000-byte send fills most of a 4 KiB ring; the next 2000-byte
    send waits for room (general path), the one after it goes direct again once the ring
    drained; the peer gets all of them in order."""
    daemon = make_daemon("[links]\nring_size = 4096\n[watchdog]\nheartbeat_ms = 60000\n")
    host = daemon.host()
    host.boot()
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    first, second, third = os.urandom(3000), os.urandom(2000), os.urandom(3500)
    pid = daemon.worker_pid(0)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert host.send_data(b"AT+CIPSEND=3000", first) == b"\r\nRecv 3000 bytes\r\n\r\nSEND OK\r\n"
        host.command(b"AT+CIPSEND=2000", b">")
        host.write(second)
        assert host.expect(b"\r\nRecv 2000 bytes\r\n") == b"\r\nRecv 2000 bytes\r\n"
        assert host.read_quiet(0.3) == b""  # no room: SEND OK waits
    finally:
        os.kill(pid, signal.SIGCONT)
    assert host.expect(b"\r\nSEND OK\r\n", timeout=5) == b"\r\nSEND OK\r\n"
    assert _recv(conn, 5000) == first + second
    assert host.send_data(b"AT+CIPSEND=3500", third) == b"\r\nRecv 3500 bytes\r\n\r\nSEND OK\r\n"
    assert _recv(conn, 3500) == third
    conn.close()


def test_a_restart_fault_mid_payload_drops_the_send(daemon, host, peer):
    """at_reset fired while a direct payload is half read: the chip restarts (ready), nothing of
    the payload reaches the peer, and the session works after it."""
    daemon.expected_errors |= {"fault_injected"}
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    host.command(b"AT+CIPSEND=2000", b">")
    host.write(b"r" * 1000)
    time.sleep(0.1)
    assert fault_cli(daemon, "at_reset").returncode == 0
    host.expect(b"\r\nready\r\n", timeout=10)
    host.write(b"r" * 1000)
    time.sleep(0.2)
    host.read_quiet(0.2)
    conn.settimeout(5)
    assert conn.recv(100) == b""  # closed by the restart, with none of the payload
    host.write(b"\r\n")  # what is left of a line the payload's rest may have started
    host.read_quiet(0.2)
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"  # echo on again after the restart
    conn.close()


def test_payload_and_at_rst_in_one_write_restart(daemon, host, peer):
    """A payload with AT+RST right behind it in one write: the forced restart (ready), and the
    payload is not sent, as on the general path."""
    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    host.command(b"AT+CIPSEND=500", b">")
    host.write(b"q" * 500 + b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n", timeout=10)
    conn.settimeout(5)
    got = b""
    while piece := conn.recv(1000):
        got += piece
    assert got == b""
    conn.close()


def test_two_links_each_direct_in_cipmux_1(host, peer):
    """CIPMUX=1: direct sends on two links alternate, each peer gets its own bytes in order."""
    host.command(b"AT+CIPMUX=1")
    port = peer.getsockname()[1]
    conns = []
    for link in (0, 1):
        assert host.ask(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link, port)).endswith(b"OK\r\n")
        conns.append(peer.accept()[0])
    sent = [b"", b""]
    for i in range(20):
        link = i % 2
        payload = os.urandom(100 + i * 97)
        answer = host.send_data(b"AT+CIPSEND=%d,%d" % (link, len(payload)), payload)
        assert answer == b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % len(payload)
        sent[link] += payload
    for link in (0, 1):
        assert _recv(conns[link], len(sent[link])) == sent[link]
        conns[link].close()


def _scenario(rng) -> tuple[int, list[tuple[bytes, float]]]:
    """A send length and the writes (bytes, pause before) an MCU makes for it: data, bursts of
    '+' after guard silences or 2 ms apart, sometimes more bytes than the length, sometimes a
    +++.  Pieces 2 ms apart are '+' bursts only: whether they share a read changes nothing."""
    length = rng.choice([rng.randint(1, 8), rng.randint(9, 600), rng.randint(600, 3000)])
    writes, total, plus = [], 0, False
    while total < length + rng.choice([0, 0, 0, 2, 40]):
        burst = rng.random() < 0.4
        if burst:
            piece = b"+" * rng.randint(1, 4)
        else:
            piece = rng.randbytes(rng.randint(1, min(700, length + 5))).replace(b"+", b"-")
        pause = rng.choice([0.002, 0.06]) if burst and plus else 0.06
        writes.append((piece, pause))
        total += len(piece)
        plus = burst
        if rng.random() < 0.1:
            writes.append((b"+++", 0.06))
            break
    return length, writes


def _play(host, read_count: ReadCount, length: int, writes) -> bytes:
    """The MCU's writes for one send; what it reads back, through an AT's OK written after them
    (each scenario's writes end the send: its length reached, or a guarded +++).  Before a
    guard silence the daemon has read what came before it (ReadCount)."""
    host.command(b"AT+CIPSEND=%d" % length, b">")
    time.sleep(0.06)
    read = read_count.now()
    for piece, pause in writes:
        if pause >= 0.06:
            read_count.wait(read)
        time.sleep(pause)
        host.write(piece)
        read += len(piece)
    out = host.expect(b"\r\nSEND ", timeout=5) + host.expect(b"\r\n")
    time.sleep(0.06)
    host.write(b"\r\nAT\r\n")  # ends any line surplus bytes left open; its OK marks the end
    return out + b"|" + host.expect(b"\r\nOK\r\n", timeout=5)


def _drain(conn: socket.socket) -> bytes:
    conn.settimeout(1.0)
    got = b""
    try:
        while piece := conn.recv(65536):
            got += piece
    except TimeoutError:
        pass
    return got


def test_direct_and_general_paths_agree_on_random_drivers(make_daemon):
    """The same random MCU writes (data, '+' bursts with and without guard silence, surplus,
    +++) against a daemon that reads payloads directly and one with the transcript on (the
    general path): the MCU and the peer see the same bytes."""
    import random

    results = []
    for config in (RING, RING + "[log]\ntranscript = true\n"):
        daemon = make_daemon(config)
        host = daemon.host()
        host.boot()
        server = socket.create_server(("127.0.0.1", 0))
        _open(host, server.getsockname()[1])
        conn, _ = server.accept()
        rng = random.Random(2026)
        read_count = ReadCount(daemon)
        seen = [_play(host, read_count, *_scenario(rng)) for _ in range(16)]
        read_count.close()
        results.append((seen, _drain(conn)))
        conn.close()
        server.close()
        host.close()
    (direct, direct_peer), (general, general_peer) = results
    for i, (a, b) in enumerate(zip(direct, general)):
        assert a == b, (i, a, b)
    assert direct_peer == general_peer


def test_an_overrun_on_demand_leaves_the_direct_path_when_over(daemon, host, peer):
    """uart_overrun on demand (bytes=3) armed at a send's prompt loses the payload's first 3 bytes (the MCU
    writes 3 more; the peer gets the rest); once over, the next AT+CIPSEND is read straight into
    its ring again (status uart.direct_sends counts it, and direct_fallbacks the faulted one, begun
    direct and handed to the general path) and arrives whole."""
    from tests.integration.test_status import status_json

    _open(host, peer.getsockname()[1])
    conn, _ = peer.accept()
    assert host.send_data(b"AT+CIPSEND=5", b"first") == b"\r\nRecv 5 bytes\r\n\r\nSEND OK\r\n"
    uart = status_json(daemon)["uart"]
    before, fallbacks = uart["direct_sends"], uart["direct_fallbacks"]
    assert before >= 1
    host.command(b"AT+CIPSEND=10", b">")
    assert fault_cli(daemon, "uart_overrun", "count=1", "bytes=3").returncode == 0
    host.write(b"abcdefghij123")
    assert host.expect(b"SEND OK\r\n", timeout=5) == b"\r\nRecv 10 bytes\r\n\r\nSEND OK\r\n"
    daemon.wait_event("uart_input_fault_over")
    payload = os.urandom(4000)
    assert host.send_data(b"AT+CIPSEND=4000", payload) == b"\r\nRecv 4000 bytes\r\n\r\nSEND OK\r\n"
    status = status_json(daemon)
    assert status["uart"]["direct_sends"] == before + 1  # this one; the faulted one fell back
    assert status["uart"]["direct_fallbacks"] == fallbacks + 1
    assert status["faults"]["counts"].get("uart_overrun") == 1
    assert _recv(conn, 5 + 10 + 4000) == b"first" + b"defghij123" + payload
    conn.close()
