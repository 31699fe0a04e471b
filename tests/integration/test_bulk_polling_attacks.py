"""Bulk polling (``links.bulkpoll``) attacked through a real daemon on a pty: UDP sends back to
back at full speed, half to the link's remote and half to another peer through
AT+CIPSEND=<id>,<len>,<ip>,<port> (each one datagram of its exact bytes, in order, to its own
peer), and AT+CIPSENDL streaming 64 KiB at full speed with a 3-byte AT+CIPSEND right behind it
(the small one never overtakes the polled stream), and a worker killed right after a polled
upload (its successor rings, the old ring's bytes never reach the new peer).  Hashed both
ways; every wait bounded."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import time

import pytest

from tests.harness import Demux, udp_peer
from tests.integration.both_ways import link_zero, reopened_link_sends_alone


def _switches(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(b"voluntary_ctxt_switches"))


def _take(peer: socket.socket, into: list[bytes], n: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    peer.settimeout(0.2)
    while len(into) < n and time.monotonic() < deadline:
        try:
            into.append(peer.recv(65536))
        except TimeoutError:
            pass


def test_udp_sends_to_two_peers_back_to_back_stay_exact_datagrams(make_daemon):
    """240 sends of 511-2048 bytes at full speed, every third to another peer by address: the
    worker polls (~0.1 wake-ups per send here, ~1 without), each peer gets its datagrams whole."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    a, b = udp_peer(), udp_peer()
    try:
        for peer in (a, b):
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        host = daemon.host()
        host.boot()
        host.command(b"AT+CIPMUX=1")
        with udp_peer() as spare:
            local = spare.getsockname()[1]
        answer = host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d,%d,0' % (a.getsockname()[1], local))
        assert b"CONNECT" in answer, answer
        rng, to_a, to_b = random.Random(31), [], []
        b_port = b.getsockname()[1]
        worker, switches = daemon.worker_pid(0), []
        for i in range(240):
            if i in (40, 240 - 1):
                switches.append(_switches(worker))
            payload = rng.randbytes(rng.randrange(511, 2049))
            if i % 3 == 2:
                answer = host.send_data(b'AT+CIPSEND=0,%d,"127.0.0.1",%d' % (len(payload), b_port), payload)
                to_b.append(payload)
            else:
                answer = Demux(host).send(0, payload)
                to_a.append(payload)
            assert b"SEND OK" in answer, answer
        print(f"worker wake-ups per send: {(switches[1] - switches[0]) / 199:.2f}")  # ~1 unpolled
        got_a, got_b = [], []
        _take(a, got_a, len(to_a))
        _take(b, got_b, len(to_b))
        assert [len(d) for d in got_a] == [len(d) for d in to_a]
        assert got_a == to_a and got_b == to_b
    finally:
        a.close()
        b.close()


def test_a_small_send_right_behind_a_full_speed_cipsendl_never_overtakes_it(make_daemon):
    """AT+CIPSENDL of 64 KiB written at once, then AT+CIPSEND=0,3 at once, four times: the peer
    gets exactly the bytes in the MCU's order."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    server, host, conn = link_zero(daemon)
    try:
        rng = random.Random(77)
        sent = bytearray()
        for _ in range(4):
            stream = rng.randbytes(65536)
            host.write(b"AT+CIPSENDL=0,%d\r\n" % len(stream))
            host.expect(b">")
            host.write(stream)
            host.expect(b"SEND OK\r\n", timeout=20)
            host.write(b"AT+CIPSEND=0,3\r\n")
            host.expect(b">")
            host.write(b"end")
            host.expect(b"SEND OK\r\n")
            sent += stream + b"end"
        got = bytearray()
        conn.settimeout(0.5)
        deadline = time.monotonic() + 15
        while len(got) < len(sent) and time.monotonic() < deadline:
            try:
                got += conn.recv(262144)
            except TimeoutError:
                pass
        assert len(got) == len(sent)
        assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
        conn.close()
    finally:
        server.close()


def test_a_worker_killed_mid_bulk_upload_leaves_nothing_behind_for_the_next_connection(make_daemon):
    """SIGKILL the link's worker right after a bulk upload's last SEND OK (polled: its last
    payloads may wait unrung in the ring), reopen the link on the restarted worker: two bulk
    payloads back to back reach the new peer at once and alone (none of the old ring's bytes)."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    daemon.expected_errors |= {"worker_died", "child_died"}
    server, host, conn = link_zero(daemon)
    try:
        demux = Demux(host)
        for i in range(40):
            assert b"SEND OK" in demux.send(0, bytes([i + 1]) * 8192)
        os.kill(daemon.worker_pid(0), signal.SIGKILL)
        demux.expect(b"0,CLOSED\r\n", timeout=5)
        conn.close()
        conn = reopened_link_sends_alone(host, server, 8192)
        conn.settimeout(0.2)
        with pytest.raises(TimeoutError):
            conn.recv(65536)  # nothing more
        conn.close()
    finally:
        server.close()
