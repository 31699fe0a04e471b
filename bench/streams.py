"""Shared pieces of the data-mode benchmarks (passthrough, AT+CIPSENDL,
+IPD downlink, line rate, five links).

* ``DuplexPeer``: one TCP peer on 127.0.0.1 that hashes everything it
  receives and, once told to, sends its own payload (as fast as it can or
  paced by a token bucket), on the same connection.
* ``TokenBucket``: pacing for paced writers.
* ``IpdDemux``: splits what the daemon writes to the pty into ``+IPD``
  payloads (taken by their announced length, hashed per link) and the rest
  (replies), which must be exactly what is expected.
* ``Bridge``: a context manager giving a pty whose bytes reach a TCP peer,
  either socat or bridged in passthrough, so both sides run the same code.
* ``read_raw`` / ``PacedWriter``: raw pty transfers with hashing.

Rules as in common.py: every wait has a timeout, every loop is bounded by a
count or a deadline, only 127.0.0.1 is addressed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import threading
import time

from .common import (
    MB,
    BenchError,
    Daemon,
    HashMismatch,
    PtyClient,
    Socat,
    TreeCpu,
    _Server,
    now,
)

__all__ = [
    "DuplexPeer",
    "TokenBucket",
    "IpdDemux",
    "Bridge",
    "PacedWriter",
    "make_payload",
    "read_raw",
    "write_all",
    "enter_passthrough",
    "leave_passthrough",
    "cpu_fields",
    "open_links",
    "daemon_with_peers",
    "paced_cipsends",
    "wait_both_ways",
    "check_downlinks",
    "cipsend",
    "PROMPT",
    "OK",
]

PROMPT = b"\r\nOK\r\n\r\n>"
OK = b"\r\nOK\r\n"
FAILURES = (b"ERROR\r\n", b"FAIL\r\n")
GUARD_SILENCE = 0.05  # > the 20 ms +++ guard time, with room for a busy machine


def make_payload(nbytes: int) -> tuple[bytes, str]:
    data = os.urandom(nbytes)
    return data, hashlib.sha256(data).hexdigest()


def cpu_fields(prefix: str, cpu_s: float, elapsed: float, nbytes: int) -> dict[str, float]:
    """The CPU figures every benchmark reports: seconds, per MB, cores used."""
    return {
        f"{prefix}_cpu_s": cpu_s,
        f"{prefix}_cpu_s_per_mb": cpu_s / (nbytes / MB) if nbytes else float("nan"),
        f"{prefix}_cores": cpu_s / elapsed if elapsed > 0 else float("nan"),
    }


def versus(b: dict, s: dict) -> dict[str, float]:
    """bridged against socat: throughput and CPU per MB, each side and the ratio."""
    b_cpu, s_cpu = b["x_cpu_s_per_mb"], s["x_cpu_s_per_mb"]
    return {
        "bridged_mb_s": b["mb_s"],
        "socat_mb_s": s["mb_s"],
        "ratio": b["mb_s"] / s["mb_s"],
        "bridged_cpu_ms_per_mb": b_cpu * 1000,
        "socat_cpu_ms_per_mb": s_cpu * 1000,
        "cpu_ratio": b_cpu / s_cpu if s_cpu > 0 else float("inf"),
    }


# ------------------------------------------------------------------ pacing


class TokenBucket:
    """``rate`` bytes per second, at most ``capacity`` bytes of burst."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = 0.0
        self.t = now()

    def _refill(self) -> None:
        t = now()
        self.tokens = min(self.capacity, self.tokens + (t - self.t) * self.rate)
        self.t = t

    def available(self) -> float:
        self._refill()
        return self.tokens

    def wait_time(self, n: int) -> float:
        """Seconds until ``n`` tokens are there (0 if they are)."""
        self._refill()
        return max(0.0, (n - self.tokens) / self.rate)

    def take(self, n: int) -> None:
        self._refill()
        self.tokens -= n

    def wait_take(self, n: int, deadline: float) -> bool:
        """Sleep until ``n`` tokens are there, take them; False past ``deadline``."""
        for _ in range(100000):
            w = self.wait_time(n)
            if w <= 0:
                self.take(n)
                return True
            if now() + w > deadline:
                return False
            time.sleep(w)
        return False


# -------------------------------------------------------------------- peers


class DuplexPeer(_Server):
    """A TCP peer on 127.0.0.1 that sinks and sources at once.

    Everything received is sha256-hashed and counted.  After ``go`` is set,
    ``payload`` is sent on the (single) connection: as fast as the socket
    takes it in ``piece``-byte writes, or paced at ``rate`` bytes/s in
    ``piece``-byte writes.  The connection stays open until ``close()``.
    """

    def __init__(self, payload: bytes = b"", rate: float | None = None, piece: int = 65536,
                 send_timeout: float = 120.0) -> None:
        self.payload = payload
        self.rate = rate
        self.piece = piece
        self.send_timeout = send_timeout
        self.go = threading.Event()
        self.connected = threading.Event()
        self.sent = 0
        self.sent_at: float | None = None  # when the last byte was handed to the socket
        self.rx_bytes = 0
        self.rx_hash = hashlib.sha256()
        self.rx_last_at: float | None = None  # when the last byte so far arrived
        self._cond = threading.Condition()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        if self.connections > 1:
            raise BenchError(f"peer on port {self.port}: unexpected connection #{self.connections}")
        sender = threading.Thread(target=self._send_wrapper, args=(conn,), daemon=True,
                                  name=f"peer-{self.port}-send")
        sender.start()
        self.connected.set()
        while not self.stopping.is_set():
            try:
                data = conn.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as exc:
                self.errors.append(f"recv: {exc!r}")
                break
            if not data:
                break
            with self._cond:
                self.rx_hash.update(data)
                self.rx_bytes += len(data)
                self.rx_last_at = now()
                self._cond.notify_all()
        # Keep the connection until the sender is done (or we are closing).
        for _ in range(int(self.send_timeout * 10) + 1):
            if not sender.is_alive() or self.stopping.is_set():
                break
            sender.join(0.1)

    def _send_wrapper(self, conn: socket.socket) -> None:
        try:
            self._send(conn)
        except Exception as exc:
            self.errors.append(f"send: {exc!r}")

    def _send(self, conn: socket.socket) -> None:
        if not self.payload:
            return
        while not self.go.wait(0.1):  # bounded by close()
            if self.stopping.is_set():
                return
        view = memoryview(self.payload)
        total = len(view)
        deadline = now() + self.send_timeout
        bucket = TokenBucket(self.rate, 2 * self.piece) if self.rate else None
        while self.sent < total:
            if self.stopping.is_set():
                return
            if now() > deadline:
                raise BenchError(f"peer on port {self.port}: sent {self.sent} of {total} bytes "
                                 f"in {self.send_timeout} s")
            n = min(self.piece, total - self.sent)
            if bucket is not None and not bucket.wait_take(n, deadline):
                continue
            off = 0
            while off < n:  # a piece is written whole before the next is paced
                if self.stopping.is_set() or now() > deadline:
                    break
                try:
                    off += conn.send(view[self.sent + off:self.sent + n])
                except socket.timeout:
                    continue
            self.sent += off
        self.sent_at = now()

    def wait_rx(self, n: int, timeout: float) -> bool:
        deadline = now() + timeout
        with self._cond:
            while self.rx_bytes < n:
                left = deadline - now()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def rx_digest(self) -> str:
        with self._cond:
            return self.rx_hash.copy().hexdigest()

    def check_rx(self, who: str, nbytes: int, digest: str, timeout: float) -> None:
        if not self.wait_rx(nbytes, timeout):
            raise HashMismatch(f"{who}: peer received {self.rx_bytes} of {nbytes} bytes "
                               f"within {timeout} s")
        got = self.rx_digest()
        if self.rx_bytes != nbytes or got != digest:
            raise HashMismatch(f"{who}: peer holds {self.rx_bytes} bytes sha256 {got}; "
                               f"sent {nbytes} bytes sha256 {digest}")
        if self.errors:
            raise BenchError(f"{who}: peer errors {self.errors}")


# ---------------------------------------------------------------- raw pty


def write_all(client: PtyClient, data: bytes, piece: int, timeout: float) -> None:
    """Write ``data`` to the pty in ``piece``-byte writes (each given ``timeout``)."""
    view = memoryview(data)
    for off in range(0, len(view), piece):
        client.write(view[off:off + piece], timeout)


def read_raw(client: PtyClient, nbytes: int, timeout: float, who: str) -> tuple[str, float]:
    """Read exactly ``nbytes`` raw bytes from the pty; (sha256, time of the last byte).

    Bytes beyond ``nbytes`` in the same read stay in ``client.buf``.
    """
    h = hashlib.sha256()
    got = 0
    last = now()
    if client.buf:
        take = bytes(client.buf[:nbytes])
        del client.buf[:len(take)]
        h.update(take)
        got += len(take)
    deadline = now() + timeout
    fd = client.fd
    while got < nbytes:
        left = deadline - now()
        if left <= 0:
            raise HashMismatch(f"{who}: read {got} of {nbytes} bytes from the pty within "
                               f"{timeout} s")
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not r:
            continue
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise BenchError(f"{who}: read from the pty failed: {exc}") from exc
        if not chunk:
            raise BenchError(f"{who}: end of file on the pty")
        last = now()
        if got + len(chunk) > nbytes:
            extra = got + len(chunk) - nbytes
            client.buf += chunk[-extra:]
            chunk = chunk[:-extra]
        h.update(chunk)
        got += len(chunk)
    return h.hexdigest(), last


class PacedWriter(threading.Thread):
    """Writes ``data`` to the pty in ``piece``-byte writes, optionally paced."""

    def __init__(self, client: PtyClient, data: bytes, piece: int, rate: float | None,
                 timeout: float) -> None:
        super().__init__(daemon=True, name="pty-writer")
        self.client = client
        self.data = data
        self.piece = piece
        self.rate = rate
        self.timeout = timeout
        self.written = 0
        self.done_at: float | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            deadline = now() + self.timeout
            view = memoryview(self.data)
            bucket = TokenBucket(self.rate, 2 * self.piece) if self.rate else None
            while self.written < len(view) and not self.stop.is_set():
                n = min(self.piece, len(view) - self.written)
                if bucket is not None and not bucket.wait_take(n, deadline):
                    raise BenchError(f"pty writer: paced past its {self.timeout} s deadline")
                self.client.write(view[self.written:self.written + n],
                                  max(deadline - now(), 0.1))
                self.written += n
            self.done_at = now()
        except BaseException as exc:  # reported by join_checked
            self.error = exc

    def join_checked(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            self.stop.set()
            raise BenchError(f"pty writer still running after {timeout} s "
                             f"({self.written} of {len(self.data)} bytes written)")
        if self.error is not None:
            raise BenchError(f"pty writer failed after {self.written} of {len(self.data)} "
                             f"bytes: {self.error}")


# ------------------------------------------------------------ passthrough


def enter_passthrough(client: PtyClient, transintvl: int | None = None) -> None:
    if transintvl is not None:
        client.expect(b"AT+TRANSINTVL=%d\r\n" % transintvl, OK)
    client.expect(b"AT+CIPMODE=1\r\n", OK)
    client.expect(b"AT+CIPSEND\r\n", PROMPT)


def leave_passthrough(client: PtyClient) -> None:
    """Silence, ``+++`` in one write, silence (no reply expected), AT+CIPMODE=0."""
    stray = client.drain(quiet=GUARD_SILENCE, timeout=1.0)
    if stray:
        raise BenchError(f"unexpected bytes from the pty before +++: {stray[-200:]!r} "
                         f"({len(stray)} bytes)")
    client.write(b"+++")
    got = client.drain(quiet=GUARD_SILENCE * 2, timeout=1.0)
    if got:
        raise BenchError(f"+++ (leaving passthrough) was answered with {got!r}; "
                         f"expected nothing (AT+SYSMSG is 0)")
    client.expect(b"AT+CIPMODE=0\r\n", OK)
    client.expect(b"AT\r\n", OK)


class Bridge:
    """A pty whose bytes go to a TCP peer on 127.0.0.1 and back, raw.

    ``kind`` "socat": socat PTY <-> TCP.  ``kind`` "bridged": the daemon, Wi-Fi
    joined, TCP link open, in passthrough (``AT+CIPMODE=1``, ``AT+CIPSEND``);
    leaving the context leaves passthrough (+++ with guard times, then
    ``AT+CIPMODE=0``) and checks the daemon still answers ``AT``.
    ``pid`` is the process (tree) whose CPU counts.
    """

    def __init__(self, kind: str, port: int, transintvl: int | None = None,
                 wait_connected=None, config: str = "", pace: bool = False) -> None:
        assert kind in ("socat", "bridged")
        self.kind = kind
        self.config = config  # the daemon's extra config (bench.common.Daemon)
        self.pace = pace  # the daemon's [uart] pace
        self.port = port
        self.transintvl = transintvl
        self.wait_connected = wait_connected
        self._ctx = None
        self.client: PtyClient | None = None
        self.pid = 0

    def _socat(self) -> Socat:
        return Socat(self.port)

    def _open_link(self) -> None:
        """The daemon's AT+CIPSTART (Wi-Fi already joined)."""
        self._ctx.tcp_connect(self.port)

    def __enter__(self) -> "Bridge":
        self._ctx = self._socat() if self.kind == "socat" else Daemon(config=self.config, pace=self.pace)
        self._ctx.__enter__()
        try:
            self.client = self._ctx.client
            self.pid = self._ctx.pid
            if self.kind == "bridged":
                self._ctx.join_wifi()
                self._open_link()
            if self.wait_connected is not None and not self.wait_connected(5.0):
                raise BenchError(f"{self.kind}: the peer never saw the connection")
            if self.kind == "bridged":
                enter_passthrough(self.client, self.transintvl)
        except BaseException as exc:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.kind == "bridged":
                leave_passthrough(self.client)
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        self._ctx.__exit__(exc_type, exc, tb)

    def cpu(self) -> TreeCpu:
        return TreeCpu(self.pid)


# ---------------------------------------------------------------- +IPD demux


class IpdDemux:
    """What the daemon writes to the pty, split into +IPD payloads and replies.

    A frame is ``\\r\\n+IPD,<len>:`` (``\\r\\n+IPD,<id>,<len>:`` with ``mux``)
    followed by <len> payload bytes, taken by length, so payload bytes are
    never mistaken for messages.  Payloads are hashed and counted per link;
    everything else goes to ``text``, which ``expect`` checks exactly.
    """

    MARK = b"\r\n+IPD,"
    MAX_HEADER = 40

    def __init__(self, client: PtyClient, mux: bool) -> None:
        self.client = client
        self.fd = client.fd
        self.mux = mux
        self.buf = bytearray(client.buf)
        client.buf.clear()
        self.text = bytearray()
        self.hashes: dict[int | None, "hashlib._Hash"] = {}
        self.counts: dict[int | None, int] = {}
        self.frames = 0
        self.data_last_at: float | None = None  # when the last payload byte so far was read
        self._link: int | None = None
        self._left = 0

    # -- input
    def _read(self, wait: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], max(wait, 0.0))
        if not r:
            return False
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return True
        except OSError as exc:
            raise BenchError(f"read from the pty failed: {exc}") from exc
        if not chunk:
            raise BenchError("end of file on the pty")
        self.buf += chunk
        self._parse()
        return True

    def pump(self, wait: float = 0.0) -> None:
        self._read(wait)

    def _parse(self) -> None:
        buf = self.buf
        for _ in range(1 << 20):  # bounded: each turn consumes bytes or returns
            if not buf:
                return
            if self._left:
                n = min(self._left, len(buf))
                with memoryview(buf) as mv:
                    self.hashes[self._link].update(mv[:n])
                del buf[:n]
                self.counts[self._link] += n
                self._left -= n
                self.data_last_at = now()
                continue
            i = buf.find(self.MARK)
            if i < 0:
                keep = 0
                for k in range(len(self.MARK) - 1, 0, -1):
                    if buf.endswith(self.MARK[:k]):
                        keep = k
                        break
                self.text += buf[:len(buf) - keep]
                del buf[:len(buf) - keep]
                return
            start = i + len(self.MARK)
            colon = buf.find(b":", start, start + self.MAX_HEADER)
            if colon < 0:
                if len(buf) - start >= self.MAX_HEADER:
                    raise BenchError(f"malformed +IPD header: {bytes(buf[i:i + 60])!r}")
                self.text += buf[:i]
                del buf[:i]
                return
            header = bytes(buf[start:colon])
            parts = header.split(b",")
            try:
                if self.mux:
                    if len(parts) != 2:
                        raise ValueError
                    link, length = int(parts[0]), int(parts[1])
                else:
                    if len(parts) != 1:
                        raise ValueError
                    link, length = None, int(parts[0])
            except ValueError:
                raise BenchError(f"unexpected +IPD header {header!r} "
                                 f"(mux={self.mux})") from None
            if length <= 0:
                raise BenchError(f"+IPD with length {length}")
            self.text += buf[:i]
            del buf[:colon + 1]
            if link not in self.hashes:
                self.hashes[link] = hashlib.sha256()
                self.counts[link] = 0
            self._link, self._left = link, length
            self.frames += 1

    # -- replies
    def expect(self, reply: bytes, timeout: float,
               failures: tuple[bytes, ...] = FAILURES) -> bytes:
        """Wait for ``reply`` (or a failure) in the text; it must be all the text."""
        deadline = now() + timeout
        for _ in range(1 << 22):
            # A tail that may start "\r\n+IPD," is held back in buf; a reply
            # may end in it ("...OK\r\n" with nothing after yet).
            held = bytes(self.buf) if not self._left and len(self.buf) < len(self.MARK) else b""
            hay = bytes(self.text) + held if held else self.text
            hit = -1
            end = 0
            for t in (reply,) + failures:
                j = hay.find(t)
                if j >= 0 and (hit < 0 or j < hit):
                    hit, end = j, j + len(t)
            if hit >= 0:
                got = bytes(hay[:end])
                from_buf = max(0, end - len(self.text))
                del self.text[:end]
                del self.buf[:from_buf]
                if got != reply:
                    raise BenchError(f"expected {reply!r}, got {got!r}")
                return got
            left = deadline - now()
            if left <= 0:
                break
            self._read(min(left, 0.5))
        raise BenchError(f"timeout after {timeout} s waiting for {reply!r}; text so far "
                         f"{bytes(self.text[-300:])!r}")

    def write(self, data: bytes | memoryview, timeout: float) -> None:
        """Write to the pty, reading (and parsing) whenever there is output."""
        view = memoryview(data)
        deadline = now() + timeout
        for _ in range(1 << 22):
            if not view:
                return
            left = deadline - now()
            if left <= 0:
                break
            r, w, _ = select.select([self.fd], [self.fd], [], min(left, 0.5))
            if r:
                self._read(0)
            if w:
                try:
                    n = os.write(self.fd, view)
                    view = view[n:]
                except BlockingIOError:
                    pass
        raise BenchError(f"write to the pty stalled: {len(view)} of {len(data)} bytes "
                         f"not accepted within {timeout} s")

    def wait_data(self, totals: dict[int | None, int], timeout: float) -> bool:
        """Pump until every link in ``totals`` has that many payload bytes."""
        deadline = now() + timeout
        for _ in range(1 << 22):
            if all(self.counts.get(k, 0) >= v for k, v in totals.items()):
                return True
            left = deadline - now()
            if left <= 0:
                return False
            self._read(min(left, 0.5))
        return False

    def digest(self, link: int | None) -> str:
        h = self.hashes.get(link)
        return (h or hashlib.sha256()).hexdigest()

    def check(self, who: str, link: int | None, nbytes: int, digest: str) -> None:
        got_n = self.counts.get(link, 0)
        got = self.digest(link)
        if got_n != nbytes or got != digest:
            raise HashMismatch(f"{who}: link {link} delivered {got_n} +IPD payload bytes "
                               f"sha256 {got}; the peer sent {nbytes} bytes sha256 {digest}")

    def drain_text(self, quiet: float = 0.1, timeout: float = 1.0) -> bytes:
        deadline = now() + timeout
        while now() < deadline:
            if not self._read(min(quiet, deadline - now())):
                break
        out = bytes(self.text)
        self.text.clear()
        return out


# ------------------------------------------------------------ multi mode


def open_links(daemon: Daemon, ports: list[int]) -> None:
    """``AT+CIPMUX=1``, then ``AT+CIPSTART=<id>,"TCP","127.0.0.1",<port>`` per port."""
    c = daemon.client
    daemon.join_wifi()
    c.expect(b"AT+CIPMUX=1\r\n", OK)
    for link, port in enumerate(ports):
        req = b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d\r\n' % (link, port)
        c.write(req)
        got = c.read_until((b"\r\nOK\r\n", b"ERROR\r\n"), timeout=10.0)
        want = b"%d,CONNECT\r\n\r\nOK\r\n" % link
        if got != want:
            raise BenchError(f"{req!r}: expected {want!r}, got {got!r}")


def daemon_with_peers(stack: contextlib.ExitStack, payloads: list[bytes], send_timeout: float,
                      make_daemon=Daemon, **peer_args) -> tuple[list["DuplexPeer"], Daemon, "IpdDemux"]:
    """One DuplexPeer per payload, a daemon with one TCP link to each
    (``AT+CIPMUX=1``), every peer connected; all closed with ``stack``.
    ``make_daemon``: what stands for the daemon (bench.five_floor's stand-ins)."""
    peers = [stack.enter_context(DuplexPeer(payload=payload, send_timeout=send_timeout, **peer_args))
             for payload in payloads]
    d = stack.enter_context(make_daemon())
    open_links(d, [p.port for p in peers])
    for i, p in enumerate(peers):
        if not p.connected.wait(5.0):
            raise BenchError(f"bridged: peer {i} never saw its TCP connection")
    return peers, d, IpdDemux(d.client, mux=True)


def paced_cipsends(demux: IpdDemux, payloads: list[bytes], rate: float, chunk: int,
                   deadline: float, who: str, step_timeout: float = 10.0) -> list[float]:
    """Send each link's payload as ``AT+CIPSEND=<id>,<chunk>`` commands, one
    at a time as an MCU must, round robin over the links, each link paced to
    ``rate`` bytes/s; the downlink keeps flowing while a link waits for its
    bucket. Returns each send's command-to-SEND OK time in ms."""
    links = len(payloads)
    views = [memoryview(p) for p in payloads]
    offsets = [0] * links
    buckets = [TokenBucket(rate, 2 * chunk) for _ in range(links)]
    start = now()
    for b in buckets:
        b.t = start
    send_ms: list[float] = []
    nxt = 0
    for _ in range(10_000_000):  # bounded also by the deadline
        if all(off >= len(v) for off, v in zip(offsets, views)):
            return send_ms
        if now() > deadline:
            raise BenchError(f"{who}: uplink not done in time ({offsets} bytes sent per link)")
        chosen = -1
        wait = 1.0
        for j in range(links):
            i = (nxt + j) % links
            if offsets[i] >= len(views[i]):
                continue
            w = buckets[i].wait_time(min(chunk, len(views[i]) - offsets[i]))
            if w <= 0:
                chosen = i
                break
            wait = min(wait, w)
        if chosen < 0:
            demux.pump(wait)
            continue
        i = chosen
        k = min(chunk, len(views[i]) - offsets[i])
        buckets[i].take(k)
        a = now()
        cipsend(demux, i, views[i][offsets[i]:offsets[i] + k], step_timeout)
        send_ms.append((now() - a) * 1000)
        offsets[i] += k
        nxt = (i + 1) % links
    raise BenchError(f"{who}: uplink loop bound reached")


def wait_both_ways(demux: IpdDemux, peers: list["DuplexPeer"], ups: list[tuple[bytes, str]],
                   downs: list[tuple[bytes, str]], who: str, timeout: float) -> tuple[float, float]:
    """Wait until every link's +IPD bytes arrived and every peer holds its
    uplink (hash-checked); return when the last byte arrived each way."""
    if not demux.wait_data({i: len(d[0]) for i, d in enumerate(downs)}, timeout):
        raise HashMismatch(f"{who}: +IPD bytes per link {demux.counts}, "
                           f"expected {[len(d[0]) for d in downs]}")
    for i, p in enumerate(peers):
        p.check_rx(f"{who}, link {i} uplink", len(ups[i][0]), ups[i][1], timeout)
    t_up = max((p.rx_last_at for p in peers if p.rx_last_at is not None), default=now())
    return demux.data_last_at or now(), t_up


def check_downlinks(demux: IpdDemux, downs: list[tuple[bytes, str]], who: str) -> None:
    """Every link's +IPD payload hash-checked, and nothing but them on the line."""
    for i, (payload, digest) in enumerate(downs):
        demux.check(who, i, len(payload), digest)
    stray = demux.drain_text(quiet=0.05, timeout=0.5)
    if stray:
        raise BenchError(f"{who}: unexpected bytes {stray[:300]!r}")


def cipsend(demux: IpdDemux, link: int, payload: bytes | memoryview, timeout: float) -> None:
    """``AT+CIPSEND=<link>,<n>``, prompt, payload, ``SEND OK`` (all checked exactly)."""
    n = len(payload)
    demux.write(b"AT+CIPSEND=%d,%d\r\n" % (link, n), timeout)
    demux.expect(PROMPT, timeout)
    demux.write(payload, timeout)
    demux.expect(b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % n, timeout,
                 failures=(b"SEND FAIL\r\n", b"ERROR\r\n"))
