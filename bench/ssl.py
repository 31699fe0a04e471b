"""SSL links: ``AT+CIPSTART="SSL",...`` then passthrough, against a TLS peer.

* A TLS server on 127.0.0.1 (port 0) runs in threads of the benchmark
  process: Python ``ssl``, TLS 1.2 at most (bridged speaks TLS 1.2 only), with
  an EC P-256 self-signed certificate (CN localhost) generated with
  ``cryptography`` when the benchmark starts.  It either sinks and hashes
  what it receives (uplink) or sends a given payload (downlink); it records
  every handshake's protocol and cipher so both sides can be seen to use the
  same.
* throughput: ``nbytes`` of random bytes up, then down, through bridged's
  SSL link in passthrough (``AT+CWJAP``, ``AT+CIPSTART="SSL","127.0.0.1",PORT``
  -> ``CONNECT\\r\\n\\r\\nOK\\r\\n``, ``AT+CIPMODE=1``, ``AT+CIPSEND`` -> prompt,
  all before the clock starts; +++ with guard times and ``AT+CIPMODE=0``
  after the check).  Baseline: socat ``PTY,link=...,raw,echo=0 <->
  OPENSSL:127.0.0.1:PORT,verify=0`` moving the same bytes with the same pty
  client code.  Hashes checked; MB/s and CPU per MB of the daemon tree / the
  socat process over the transfer window (the TLS peer is counted on
  neither side).
* handshake latency: ``AT+CIPSTART="SSL",...`` written until ``CONNECT`` /
  ``OK`` read (TCP connect + full TLS 1.2 handshake + the daemon's own path),
  then ``AT+CIPCLOSE`` until ``CLOSED`` / ``OK`` (not timed), ``count`` times
  after 10 warm-up rounds; the next round starts once the server has seen
  the connection end.  Baseline: the same handshake done directly by a
  Python ``ssl`` client socket in the benchmark process (TCP connect, then
  ``do_handshake``; then close, wait for the server likewise), against the
  same server; its SSLContext is built once, outside the timing (bridged
  builds one per AT+CIPSTART, inside it: ~0.1 ms here).

Rules as in common.py: every wait has a timeout, every loop is bounded by a
count, a deadline or the server's close, only 127.0.0.1 is addressed.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import socket
import ssl
import tempfile
import threading

from .common import (
    LOCALHOST,
    MB,
    BenchError,
    Daemon,
    HashMismatch,
    PtyClient,
    Socat,
    TreeCpu,
    _Server,
    now,
    percentile,
)
from .streams import (
    Bridge,
    OK,
    cpu_fields,
    make_payload,
    read_raw,
    write_all,
)

__all__ = ["server_context", "TlsPeer", "SslBridge", "ssl_connect", "run"]

WRITE = 65536
STEP_TIMEOUT = 10.0
DRAIN_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0
CONNECT_REPLY = b"CONNECT\r\n\r\nOK\r\n"
CLOSE_REPLY = b"CLOSED\r\n\r\nOK\r\n"
WARMUP = 10
# A peer that goes away without close_notify (socat and the daemon stop with
# SIGTERM once the transfer is checked) is an end of stream here, not an error.
_ENDS = (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)


# ------------------------------------------------------------- certificate


def server_context() -> ssl.SSLContext:
    """A TLS 1.2 (at most) server context with a fresh EC P-256 self-signed
    certificate for CN=localhost (and DNS:localhost, IP:127.0.0.1)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    t = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - datetime.timedelta(minutes=5))
        .not_valid_after(t + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    tmp = tempfile.mkdtemp(prefix="bench-ssl-")
    try:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ctx


def client_context() -> ssl.SSLContext:
    """The baseline client: TLS 1.2, no certificate checks (bridged's auth_mode 0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ------------------------------------------------------------------- server


class TlsPeer(_Server):
    """A TLS server on 127.0.0.1 that sinks (hashes) or sends ``payload``.

    Connections are served one after the other in one thread.  Every
    connection is handshaken (server side, within HANDSHAKE_TIMEOUT);
    completed handshakes are counted and their (protocol, cipher) recorded.
    Everything received on any connection is sha256-hashed and counted.  With
    a ``payload``, it is sent on the first connection once ``go`` is set, in
    ``piece``-byte writes as fast as the socket takes them; a connection
    then stays open until the peer closes it or ``close()``.
    """

    def __init__(self, context: ssl.SSLContext, payload: bytes = b"", piece: int = WRITE,
                 send_timeout: float = 120.0) -> None:
        self.context = context
        self.payload = payload
        self.piece = piece
        self.send_timeout = send_timeout
        self.go = threading.Event()
        self.handshakes = 0
        self.ended = 0  # connections whose serving is over (peer closed, or close())
        self.suites: set[tuple[str, str]] = set()
        self.sent = 0
        self.rx_bytes = 0
        self.rx_hash = hashlib.sha256()
        self._cond = threading.Condition()
        super().__init__()

    def _accept_loop(self) -> None:
        """Connections are served one at a time in the accept thread.

        None of the benchmarks needs two at once, and a thread started per
        connection put its start-up (2 to 4 ms at times on this machine) into
        the handshake being timed.
        """
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve_wrapper(conn)

    def serve(self, conn: socket.socket) -> None:
        first = self.connections == 1
        conn.settimeout(HANDSHAKE_TIMEOUT)
        tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            try:
                tls.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                raise BenchError(f"TLS server on port {self.port}: handshake failed: {exc!r}") \
                    from None
            cipher = tls.cipher()
            with self._cond:
                self.handshakes += 1
                self.suites.add((tls.version() or "?", cipher[0] if cipher else "?"))
                self._cond.notify_all()
            tls.settimeout(0.2)
            if self.payload and first:
                self._send(tls)
            self._sink(tls)
        finally:
            try:
                tls.close()
            except OSError:
                pass
            with self._cond:
                self.ended += 1
                self._cond.notify_all()

    def _sink(self, tls: ssl.SSLSocket) -> None:
        while not self.stopping.is_set():
            try:
                data = tls.recv(1 << 20)
            except socket.timeout:
                continue
            except _ENDS:
                break
            if not data:
                break
            with self._cond:
                self.rx_hash.update(data)
                self.rx_bytes += len(data)
                self._cond.notify_all()

    def _send(self, tls: ssl.SSLSocket) -> None:
        while not self.go.wait(0.1):  # bounded by close()
            if self.stopping.is_set():
                return
        view = memoryview(self.payload)
        total = len(view)
        deadline = now() + self.send_timeout
        while self.sent < total:
            if self.stopping.is_set():
                return
            if now() > deadline:
                raise BenchError(f"TLS server on port {self.port}: sent {self.sent} of {total} "
                                 f"bytes in {self.send_timeout} s")
            try:
                # SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER: a retry may pass a new view.
                self.sent += tls.send(view[self.sent:self.sent + self.piece])
            except socket.timeout:
                continue

    def _wait(self, attr: str, n: int, timeout: float) -> bool:
        deadline = now() + timeout
        with self._cond:
            while getattr(self, attr) < n:
                left = deadline - now()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def wait_handshakes(self, n: int, timeout: float) -> bool:
        return self._wait("handshakes", n, timeout)

    def wait_ended(self, n: int, timeout: float) -> bool:
        return self._wait("ended", n, timeout)

    def wait_rx(self, n: int, timeout: float) -> bool:
        return self._wait("rx_bytes", n, timeout)

    def check_rx(self, who: str, nbytes: int, digest: str, timeout: float) -> None:
        if not self.wait_rx(nbytes, timeout):
            raise HashMismatch(f"{who}: TLS peer received {self.rx_bytes} of {nbytes} bytes "
                               f"within {timeout} s (errors: {self.errors})")
        with self._cond:
            got, n = self.rx_hash.copy().hexdigest(), self.rx_bytes
        if n != nbytes or got != digest:
            raise HashMismatch(f"{who}: TLS peer holds {n} bytes sha256 {got}; "
                               f"sent {nbytes} bytes sha256 {digest}")
        self.check_errors(who)

    def check_errors(self, who: str) -> None:
        if self.errors:
            raise BenchError(f"{who}: TLS peer errors {self.errors}")


# ------------------------------------------------------------------ bridges


class SslSocat(Socat):
    """socat PTY,link=...,raw,echo=0 OPENSSL:127.0.0.1:PORT,verify=0."""

    def peer_address(self) -> str:
        return f"OPENSSL:{LOCALHOST}:{self.port},verify=0"


def ssl_connect(client: PtyClient, port: int, timeout: float = HANDSHAKE_TIMEOUT) -> float:
    """``AT+CIPSTART="SSL","127.0.0.1",PORT`` -> exactly ``CONNECT\\r\\n\\r\\nOK\\r\\n``;
    seconds from the write to the reply's last byte."""
    req = b'AT+CIPSTART="SSL","127.0.0.1",%d\r\n' % port
    t0 = now()
    client.write(req, timeout)
    got = client.read_until((b"\r\nOK\r\n", b"ERROR\r\n"), timeout)
    dt = now() - t0
    if got != CONNECT_REPLY:
        raise BenchError(f"{req!r}: expected {CONNECT_REPLY!r}, got {got!r}")
    return dt


class SslBridge(Bridge):
    """A pty whose bytes go raw to ``peer`` over TLS and back.

    ``kind`` "socat": socat PTY <-> OPENSSL.  ``kind`` "bridged": the daemon,
    Wi-Fi joined, SSL link open, in passthrough (as ``Bridge``).  Entered once
    the peer has completed the handshake.
    """

    def __init__(self, kind: str, peer: TlsPeer) -> None:
        super().__init__(kind, peer.port,
                         wait_connected=lambda _timeout: peer.wait_handshakes(1, HANDSHAKE_TIMEOUT))
        self.peer = peer

    def _socat(self) -> SslSocat:
        return SslSocat(self.port)

    def _open_link(self) -> None:
        ssl_connect(self.client, self.port)


# --------------------------------------------------------------- throughput


def _suite(peer: TlsPeer) -> str:
    return ", ".join(f"{v} {c}" for v, c in sorted(peer.suites))


def uplink(kind: str, ctx: ssl.SSLContext, data: bytes, digest: str) -> dict:
    n = len(data)
    with TlsPeer(ctx) as peer, SslBridge(kind, peer) as b:
        cpu = TreeCpu(b.pid)
        cpu.start()
        t0 = now()
        write_all(b.client, data, WRITE, STEP_TIMEOUT)
        peer.check_rx(f"{kind} SSL uplink", n, digest, DRAIN_TIMEOUT)
        elapsed = now() - t0
        cpu_s = cpu.stop()
        suite = _suite(peer)
    return {"seconds": elapsed, "mb_s": n / MB / elapsed, "suite": suite,
            **cpu_fields("x", cpu_s, elapsed, n)}


def downlink(kind: str, ctx: ssl.SSLContext, data: bytes, digest: str) -> dict:
    n = len(data)
    with TlsPeer(ctx, payload=data) as peer, SslBridge(kind, peer) as b:
        cpu = TreeCpu(b.pid)
        cpu.start()
        t0 = now()
        peer.go.set()
        got, _ = read_raw(b.client, n, DRAIN_TIMEOUT, f"{kind} SSL downlink")
        elapsed = now() - t0
        cpu_s = cpu.stop()
        if got != digest:
            raise HashMismatch(f"{kind} SSL downlink: read {n} bytes sha256 {got}; "
                               f"the TLS peer sent sha256 {digest}")
        peer.check_errors(f"{kind} SSL downlink")
        suite = _suite(peer)
    return {"seconds": elapsed, "mb_s": n / MB / elapsed, "suite": suite,
            **cpu_fields("x", cpu_s, elapsed, n)}


# ---------------------------------------------------------------- handshake


def _ended(peer: TlsPeer, n: int, who: str) -> None:
    """Each handshake starts with the server idle: the previous connection's
    server thread has seen the close and finished (back to back, its wind-down
    overlaps the next handshake)."""
    if not peer.wait_ended(n, HANDSHAKE_TIMEOUT):
        raise BenchError(f"{who} SSL handshakes: the TLS peer saw {peer.ended} of {n} "
                         f"connections end within {HANDSHAKE_TIMEOUT} s (errors: {peer.errors})")


def handshakes_bridged(ctx: ssl.SSLContext, count: int) -> tuple[list[float], str]:
    """ms from writing AT+CIPSTART="SSL" to reading its OK, ``count`` times."""
    samples: list[float] = []
    with TlsPeer(ctx) as peer, Daemon() as d:
        d.join_wifi()
        c = d.client
        for i in range(WARMUP + count):
            dt = ssl_connect(c, peer.port)
            c.expect(b"AT+CIPCLOSE\r\n", CLOSE_REPLY, timeout=STEP_TIMEOUT)
            _ended(peer, i + 1, "bridged")
            if i >= WARMUP:
                samples.append(dt * 1000.0)
        stray = c.drain(quiet=0.05, timeout=1.0)
        if stray:
            raise BenchError(f"bridged SSL handshakes: unexpected bytes afterwards {stray!r}")
        c.expect(b"AT\r\n", OK)
        if not peer.wait_handshakes(WARMUP + count, HANDSHAKE_TIMEOUT):
            raise BenchError(f"bridged SSL handshakes: the TLS peer completed "
                             f"{peer.handshakes} of {WARMUP + count}")
        peer.check_errors("bridged SSL handshakes")
        suite = _suite(peer)
    return samples, suite


def handshakes_python(ctx: ssl.SSLContext, count: int) -> tuple[list[float], str]:
    """ms for TCP connect + do_handshake by a Python ssl client, ``count`` times."""
    cctx = client_context()
    samples: list[float] = []
    with TlsPeer(ctx) as peer:
        for i in range(WARMUP + count):
            t0 = now()
            raw = socket.create_connection((LOCALHOST, peer.port), timeout=HANDSHAKE_TIMEOUT)
            try:
                s = cctx.wrap_socket(raw, do_handshake_on_connect=False)
            except BaseException:
                raw.close()
                raise
            try:
                s.do_handshake()
                dt = now() - t0
            finally:
                s.close()
            _ended(peer, i + 1, "python")
            if i >= WARMUP:
                samples.append(dt * 1000.0)
        if not peer.wait_handshakes(WARMUP + count, HANDSHAKE_TIMEOUT):
            raise BenchError(f"python SSL handshakes: the TLS peer completed "
                             f"{peer.handshakes} of {WARMUP + count}")
        peer.check_errors("python SSL handshakes")
        suite = _suite(peer)
    return samples, suite


# ---------------------------------------------------------------------- run


def run(nbytes: int = 32 * 1024 * 1024, handshakes: int = 200) -> dict[str, float]:
    ctx = server_context()
    data, digest = make_payload(nbytes)
    out: dict[str, float] = {"bytes": nbytes, "handshakes": handshakes}
    suites: set[str] = set()
    for direction, fn in (("up", uplink), ("down", downlink)):
        b = fn("bridged", ctx, data, digest)
        s = fn("socat", ctx, data, digest)
        suites |= {b["suite"], s["suite"]}
        out[f"{direction}_bridged_mb_s"] = b["mb_s"]
        out[f"{direction}_socat_mb_s"] = s["mb_s"]
        out[f"{direction}_ratio"] = b["mb_s"] / s["mb_s"]
        out[f"{direction}_bridged_cpu_ms_per_mb"] = b["x_cpu_s_per_mb"] * 1000
        out[f"{direction}_socat_cpu_ms_per_mb"] = s["x_cpu_s_per_mb"] * 1000
        out[f"{direction}_cpu_ratio"] = (b["x_cpu_s_per_mb"] / s["x_cpu_s_per_mb"]
                                         if s["x_cpu_s_per_mb"] > 0 else float("inf"))
    b_samples, b_suite = handshakes_bridged(ctx, handshakes)
    p_samples, p_suite = handshakes_python(ctx, handshakes)
    suites |= {b_suite, p_suite}
    out.update({
        "hs_bridged_p50_ms": percentile(b_samples, 50),
        "hs_bridged_p99_ms": percentile(b_samples, 99),
        "hs_bridged_max_ms": max(b_samples),
        "hs_python_p50_ms": percentile(p_samples, 50),
        "hs_python_p99_ms": percentile(p_samples, 99),
        "hs_python_max_ms": max(p_samples),
    })
    out["hs_p50_ratio"] = out["hs_bridged_p50_ms"] / out["hs_python_p50_ms"]
    out["hs_p99_ratio"] = out["hs_bridged_p99_ms"] / out["hs_python_p99_ms"]
    # Every side must have negotiated the same protocol and cipher, or the
    # comparison is not like for like.
    if len(suites) != 1:
        raise BenchError(f"the TLS peer negotiated different suites: {sorted(suites)}")
    out["suite"] = suites.pop()  # type: ignore[assignment]  (a string, for the record)
    return out


def lines(r: dict) -> str:
    out = []
    for d in ("up", "down"):
        out.append(f"{d} bridged {r[f'{d}_bridged_mb_s']:.2f} MB/s "
                   f"{r[f'{d}_bridged_cpu_ms_per_mb']:.1f} ms CPU/MB | socat "
                   f"{r[f'{d}_socat_mb_s']:.2f} MB/s {r[f'{d}_socat_cpu_ms_per_mb']:.1f} ms CPU/MB"
                   f" | ratio {r[f'{d}_ratio']:.3f}, CPU/MB {r[f'{d}_cpu_ratio']:.2f}x")
    out.append(f"handshake bridged CIPSTART p50 {r['hs_bridged_p50_ms']:.2f} p99 "
               f"{r['hs_bridged_p99_ms']:.2f} max {r['hs_bridged_max_ms']:.2f} ms | Python ssl "
               f"p50 {r['hs_python_p50_ms']:.2f} p99 {r['hs_python_p99_ms']:.2f} ms | ratio "
               f"p50 {r['hs_p50_ratio']:.2f}x p99 {r['hs_p99_ratio']:.2f}x")
    return "\n        ".join(out) + f"  ({r['suite']}; hashes match)"


def main() -> None:
    r = run()
    print("SSL " + lines(r))


if __name__ == "__main__":
    main()
