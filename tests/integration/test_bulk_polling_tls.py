"""Bulk polling (``links.bulkpoll``) on an SSL link: AT+CIPSEND=0,8192 back to back to a
loopback TLS sink (certificates as test_tls makes them): the worker polls (a TLS send goes
one record at a time, the rest of the same commits counting toward no streak), every byte
reaches the peer in order, and a small request after the stream goes too."""

from __future__ import annotations

import hashlib
import random
import socket
import ssl
import threading
import time

from tests.harness import Demux
from tests.integration.test_tls import pki  # noqa: F401 (the fixture)


class _TlsSink:
    def __init__(self, issued) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(issued.cert, issued.key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.got = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(20)
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(20)
            tls = self.ctx.wrap_socket(conn, server_side=True)
            while data := tls.recv(262144):
                self.got += data
        except (OSError, ssl.SSLError):
            pass  # the test's end closes it, or its 20 s timeout


def _switches(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(b"voluntary_ctxt_switches"))


def test_an_ssl_bulk_upload_polled_arrives_whole_and_in_order(make_daemon, pki):  # noqa: F811
    daemon = make_daemon('[sntp]\nsource = "host"\n[links]\nread_window_ms = 20\n')
    sink = _TlsSink(pki["server"])
    try:
        host = daemon.host()
        host.boot()
        host.command(b"AT+CIPMUX=1")
        assert b"CONNECT" in host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % sink.port, timeout=20)
        demux, rng, up = Demux(host), random.Random(443), bytearray()
        worker = daemon.worker_pid(0)
        for i in range(150):
            if i == 30:
                start = _switches(worker)
            payload = rng.randbytes(8192)
            assert b"SEND OK" in demux.send(0, payload)
            up += payload
        per_send = (_switches(worker) - start) / 120
        print(f"worker wake-ups per send: {per_send:.2f}")
        time.sleep(0.05)
        assert b"SEND OK" in demux.send(0, b"GET / HTTP/1.0\r\n")
        up += b"GET / HTTP/1.0\r\n"
        deadline = time.monotonic() + 20  # (the sink may have all of it already: no event to wait for)
        while len(sink.got) < len(up) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sink.got) == len(up), f"{len(sink.got)} of {len(up)}"
        assert hashlib.sha256(sink.got).digest() == hashlib.sha256(up).digest()
    finally:
        sink.sock.close()
