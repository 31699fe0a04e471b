"""A bulk upload through the daemon (AT+CIPSEND=0,8192 back to back, no downlink): the link
worker polls its uplink ring (``links.bulkpoll``), so it wakes about once per half ring, not
once per send; every byte reaches the peer in order; a small request after the stream and a
bulk one after quiet reach it too."""

from __future__ import annotations

import hashlib
import random
import time

from tests.harness import Demux
from tests.integration.both_ways import BothWays, link_zero

PAYLOAD = 8192
SENDS = 200
WINDOWS = (40, 93, 146, 200)  # the sends that bound three windows (polling sets in by the 3rd)


def _switches(pid: int) -> int:
    """The process's voluntary context switches so far (its wake-ups)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(b"voluntary_ctxt_switches"))


def _upload(demux: Demux, worker: int, rng: random.Random, up: bytearray) -> float:
    """SENDS payloads as fast as the line goes; the worker's wake-ups per send in the
    quietest of three windows (load only adds: a commit a tick after the last rings)."""
    counted = {}
    for i in range(SENDS):
        if i in WINDOWS:
            counted[i] = _switches(worker)
        payload = rng.randbytes(PAYLOAD)
        assert b"SEND OK" in demux.send(0, payload)
        up += payload
    counted[SENDS] = _switches(worker)
    return min((counted[b] - counted[a]) / (b - a) for a, b in zip(WINDOWS, WINDOWS[1:]))


def test_an_upload_of_8_kib_sends_wakes_the_worker_about_once_per_half_ring(make_daemon):
    """Up to three uploads of 200 sends (1.6 MB): the worker wakes at most 0.6 times per send in
    the quietest window (~0.2 on a quiet machine: a doorbell per half ring, 64 KiB; ~1 without
    polling); then a 16-byte request, and 8 KiB after 50 ms of quiet, go too; all in order."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    server, host, conn = link_zero(daemon)
    try:
        rng, up = random.Random(8192), bytearray()
        peer = BothWays(conn, b"", b"", 3 * SENDS * PAYLOAD + 16 + PAYLOAD)
        peer.start()
        demux, worker, rates = Demux(host), daemon.worker_pid(0), []
        for _ in range(3):
            rates.append(_upload(demux, worker, rng, up))
            if rates[-1] <= 0.6:
                break
        print(f"worker wake-ups per send, quietest window of each upload: {rates}")
        assert b"SEND OK" in demux.send(0, b"GET / HTTP/1.0\r\n")
        up += b"GET / HTTP/1.0\r\n"
        time.sleep(0.05)
        tail = rng.randbytes(PAYLOAD)
        assert b"SEND OK" in demux.send(0, tail)
        up += tail
        peer.expect_up = len(up)
        peer.join()
        assert hashlib.sha256(peer.received).digest() == hashlib.sha256(up).digest()
        assert min(rates) <= 0.6, rates
        conn.close()
    finally:
        server.close()
