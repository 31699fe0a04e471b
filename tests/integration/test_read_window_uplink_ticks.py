"""The read window with AT+CIPSEND streaming both ways at line rate on one link (the
MCU's 2 KiB sends 20.5 ms apart, the peer's 1 KiB pieces 10 ms apart): the MCU's
payloads go on the window's ticks, so the link worker wakes about once per tick,
not once per tick and once per send; every byte arrives both ways, in order."""

from __future__ import annotations

import hashlib
import time

from tests.harness import Demux
from tests.integration.both_ways import BothWays, link_zero

SENDS = 100  # 2.05 s of the MCU's sends
WINDOWS = (30, 53, 76, 100)  # the sends that bound three windows (polling has set in by the 30th)
PAYLOAD = 2048
GAP = 0.0205  # 0.1 MB/s, drifting against the 20 ms grid


def _switches(pid: int) -> int:
    """The process's voluntary context switches so far (its wake-ups)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(b"voluntary_ctxt_switches"))


def test_cipsend_streaming_both_ways_wakes_the_worker_once_per_tick(make_daemon):
    """Over three half-second windows of the stream the worker wakes at most 75 times a
    second (the quietest window) (about 50 ticks; a doorbell per send besides doubles it), and the
    payloads reach the peer whole and in order while the +IPD data comes whole."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    server, host, conn = link_zero(daemon)
    try:
        down = b"".join(bytes([i % 250]) * 1024 for i in range(int(SENDS * GAP / 0.010)))
        peer = BothWays(conn, down, b"", SENDS * PAYLOAD, gap=0.010)
        peer.start()
        demux, up, worker = Demux(host), bytearray(), daemon.worker_pid(0)
        start, counted = time.monotonic(), {}
        for i in range(SENDS):
            if i in WINDOWS:
                counted[i] = (_switches(worker), time.monotonic())
            payload = bytes([(i * 7 + 1) % 256]) * PAYLOAD
            assert b"SEND OK" in demux.send(0, payload)
            up += payload
            while time.monotonic() < start + (i + 1) * GAP:
                demux.pump(0.002)
        counted[SENDS] = (_switches(worker), time.monotonic())
        # The quietest of three windows: load on the machine only adds wake-ups (a send held
        # past two windows is a request, which ends batching), so it shows the design's figure.
        rates = sorted((counted[b][0] - counted[a][0]) / (counted[b][1] - counted[a][1])
                       for a, b in zip(WINDOWS, WINDOWS[1:]))
        rate = rates[0]
        print(f"worker wake-ups per second while both ways stream: {rates}")
        got = demux.wait_data(0, len(down), timeout=10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        peer.join()
        assert bytes(peer.received) == bytes(up)
        assert rate <= 75, rate
        conn.close()
    finally:
        server.close()
