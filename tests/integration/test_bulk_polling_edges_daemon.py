"""Bulk polling's doorbell races through a real daemon (the front and the worker two processes,
the ring's flag and write index crossing with no fence): AT+CIPSEND payloads of 511, 512 and
8192 bytes with gaps right around the bulk tick (0, 3.5, 4, 4.5 ms), so that polling starts and
ends again and again as the front commits.  Nothing may wait for a tick nobody arms: every byte
reaches the peer in order, and the last one soon after its SEND OK."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

import pytest

from tests.harness import Demux
from tests.integration.both_ways import link_zero

pytestmark = pytest.mark.timeout(120)

_LATE = 44  # of 400 sends 30 ms or more after their SEND OK (see the test's docstring)


def _run(make_daemon) -> int:
    """400 sends around the bulk tick, all checked; how many reached the peer 30 ms or more
    after their SEND OK."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    server, host, conn = link_zero(daemon)
    got, lock = bytearray(), threading.Lock()
    arrivals: list[tuple[float, int]] = []
    stop = threading.Event()

    def peer() -> None:
        conn.settimeout(0.2)
        while not stop.is_set():
            try:
                data = conn.recv(262144)
            except (TimeoutError, socket.timeout):
                continue
            if not data:
                return
            with lock:
                got.extend(data)
                arrivals.append((time.monotonic(), len(got)))

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    try:
        rng, up, demux = random.Random(4004), bytearray(), Demux(host)
        sent_at: list[tuple[float, int]] = []
        for _ in range(400):
            payload = rng.randbytes(rng.choice((511, 512, 8192, 8192)))
            assert b"SEND OK" in demux.send(0, payload)
            up += payload
            sent_at.append((time.monotonic(), len(up)))
            gap = rng.choice((0.0, 0.0035, 0.004, 0.0045))
            end = time.monotonic() + gap
            while time.monotonic() < end:
                pass  # a busy wait: sleep's slack would blur the gaps around the tick
        deadline = time.monotonic() + 5
        while len(got) < len(up) and time.monotonic() < deadline:
            time.sleep(0.005)
        with lock:
            assert len(got) == len(up), f"{len(got)} of {len(up)}"
            assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
            waits = []
            for at, total in sent_at:
                came = next(t for t, n in arrivals if n >= total)
                waits.append(came - at)
        waits.sort()
        print(f"SEND OK -> peer, ms: median {1000 * waits[len(waits) // 2]:.2f}, "
              f"99% {1000 * waits[int(0.99 * len(waits))]:.2f}, max {1000 * waits[-1]:.2f}, "
              f"over 30 ms: {sum(w > 0.03 for w in waits)}")
        assert waits[-1] < 1.0, waits[-1]  # generous: a lost doorbell would be forever
        return sum(w > 0.03 for w in waits)
    finally:
        stop.set()
        thread.join(5)
        conn.close()
        server.close()


def test_sends_around_the_bulk_tick_all_arrive_and_few_wait_for_a_delayed_ack(make_daemon):
    """Every byte in order, none lost to a doorbell race (each run); and on a link with Nagle on
    (AT+CIPTCPOPT's default) few sends reach the peer 30 ms late: with Nagle on while polled,
    the next tick's send waited for the peer's delayed ACK (40 ms): 48-72 of 400 late in every
    run (5 runs; 0-21 with polling off, 5-30 with the fix, 34-39 with the fix under make test's
    load).  The quietest of up to three runs (load only adds), against a bound between those:
    a guard only, the rule itself is tests/links/test_worker_bulk_polling_edges' (no clock)."""
    late = []
    for _ in range(3):
        late.append(_run(make_daemon))
        if late[-1] <= _LATE:
            break
    print(f"sends 30 ms late or more, per run: {late}")
    assert min(late) <= _LATE, late
