"""Bulk polling (``links.bulkpoll``) when a fault's traffic shaping comes in the middle of a
polled upload (`bridged fault net_bandwidth` / `net_latency` on demand, the Shaper taking over
the sends): every byte still reaches the peer, in order, and the upload never stalls."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from tests.harness import Demux, SinkServer
from tests.integration.test_faults_at import fault_cli

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("fault", [("net_bandwidth", "bytes_per_s=400000", "for=0.5"),
                                   ("net_latency", "ms=5", "for=0.5")])
def test_shaping_that_starts_while_polled_loses_and_reorders_nothing(make_daemon, fault):
    """600 x AT+CIPSEND=0,8192 from a thread; `bridged fault` arms the shaping for half a second
    mid-upload (checked: armed after 0.5-1.1 MB of 4.9 MB): the sink gets every byte in order."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    sink = SinkServer()
    try:
        host = daemon.host()
        host.boot()
        host.command(b"AT+CIPMUX=1")
        assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % sink.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        rng, up, errors = random.Random(99), bytearray(), []
        demux = Demux(host)
        started = threading.Event()

        def upload() -> None:
            try:
                deadline = time.monotonic() + 60
                for i in range(600):
                    if i == 40:
                        started.set()
                    payload = rng.randbytes(8192)
                    answer = demux.send(0, payload)
                    assert b"SEND OK" in answer, answer
                    up.extend(payload)
                    if time.monotonic() > deadline:
                        break
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)
            finally:
                started.set()

        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        assert started.wait(30)
        done = fault_cli(daemon, *fault, "link=0")
        assert done.returncode == 0, done.stderr
        daemon.wait_event("fault_armed")
        at_fire = len(up)
        thread.join(120)
        assert not thread.is_alive() and not errors, errors
        print(f"fault armed after {at_fire} of {len(up)} bytes")
        assert at_fire < len(up), "the upload ended before the fault: nothing attacked"
        deadline = time.monotonic() + 30
        while sum(sink.counts.values()) < len(up) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(sink.counts.values()) == [len(up)]
        assert [h.digest() for h in sink.hashes.values()] == [hashlib.sha256(up).digest()]
        assert os.path.exists(f"/proc/{daemon.worker_pid(0)}")
    finally:
        sink.close()
