"""Passive receive mode (``AT+CIPRECVMODE=1``) as a host driver reads it.

A TCP peer on 127.0.0.1 sends random bytes as fast as its socket takes them
(64 KiB writes) to a single-connection link in passive mode; the daemon keeps
them (the worker stops reading at the 5760-byte receive window) and announces
``\\r\\n+IPD,<n>\\r\\n``.  The client reads like Zephyr's esp_at driver: a
notice says n bytes wait, and it takes them with ``AT+CIPRECVDATA=<piece>``,
each command written the instant the previous OK has been read, until the n
are taken; then it waits for the next notice (after a read, what is left is
announced again).  Pieces of 64, 256, 1024 and 2048 bytes, each with the
default ``urc_gap_ms = 5`` and with ``urc_gap_ms = 0`` (a fresh daemon per
setting).  Time runs from the peer's first send until the last byte is read;
the bytes read are hashed against the bytes sent.

Also per setting: each AT+CIPRECVDATA's round trip (command written to its OK
read), p50, mean and p99, the share of the time the driver knew of nothing
unread (waiting for a notice), the daemon's CPU (all its processes) per read,
notices per MB, and two counts that must be 0: ERROR
replies and stale notices (a notice of 0, one below what the driver already
knows to be unread, or a read shorter than a notice promised).

Baseline: the same bytes from the same kind of peer through socat TCP -> PTY,
read raw and hashed.  socat speaks no AT, so it is the ceiling of the pty, not
the same work: the ratio says how much of the line the protocol leaves.
"""

from __future__ import annotations

import hashlib
import re

from .common import MB, BenchError, Daemon, HashMismatch, PtyClient, TreeCpu, now, percentile
from .streams import OK, Bridge, DuplexPeer, make_payload, read_raw

PIECES = (64, 256, 1024, 2048)
GAPS_MS = (5.0, 0.0)
WRITE = 65536
TIMEOUT = 300.0  # seconds for one transfer: 64-byte reads behind a 5 ms wait each took ~45 s/MiB

_NOTICE = re.compile(rb"\r\n\+IPD,(\d+)\r\n")
_REPLY = re.compile(rb"\+CIPRECVDATA:(\d+),")
_ERROR = b"\r\nERROR\r\n"
_END = len(b"\r\nOK\r\n")


def key(piece: int, gap_ms: float) -> str:
    return f"p{piece}_gap{gap_ms:g}"


class _Driver:
    """The notice-driven reader; ``avail`` is what it knows to be unread."""

    def __init__(self, client: PtyClient, piece: int) -> None:
        self.client = client
        self.piece = piece
        self.avail = 0
        self.asked: int | None = None
        self.asked_at = 0.0
        self.hash = hashlib.sha256()
        self.got = 0
        self.rtts: list[float] = []
        self.notices = self.errors = self.stale = 0
        self.idle = 0.0  # seconds with nothing known to be unread: waiting for a notice
        self._idle_since: float | None = None

    def read(self, nbytes: int, timeout: float) -> None:
        deadline = now() + timeout
        buf = self.client.buf
        while self.got < nbytes:
            if self.asked is None and self.avail > 0:
                self.asked = min(self.piece, self.avail)
                self.client.write(b"AT+CIPRECVDATA=%d\r\n" % self.asked)
                self.asked_at = now()
                if self._idle_since is not None:
                    self.idle += self.asked_at - self._idle_since
                    self._idle_since = None
            elif self.asked is None and self._idle_since is None:
                self._idle_since = now()
            if not self._event(buf):
                left = deadline - now()
                if left <= 0:
                    raise HashMismatch(f"read {self.got} of {nbytes} bytes within {timeout} s; "
                                       f"pending {bytes(buf[:200])!r}")
                self.client._fill(min(left, 1.0))

    def _event(self, buf: bytearray) -> bool:
        """Take one notice, reply or ERROR off the head of ``buf``; False if none is whole."""
        if m := _NOTICE.match(buf):
            n = int(m.group(1))
            del buf[: m.end()]
            self.notices += 1
            self.stale += n == 0 or n < self.avail
            self.avail = n
            return True
        if m := _REPLY.match(buf):
            n, start = int(m.group(1)), m.end()
            if len(buf) < start + n + _END:
                return False
            if buf[start + n : start + n + _END] != OK:
                raise BenchError(f"AT+CIPRECVDATA reply not ended by OK: {bytes(buf[:start + n + 8])!r}")
            self.rtts.append(now() - self.asked_at)
            self.hash.update(buf[start : start + n])
            del buf[: start + n + _END]
            self.got += n
            self.stale += n < self.asked
            self.avail = max(0, self.avail - n)
            self.asked = None
            return True
        if buf.startswith(_ERROR):
            del buf[: len(_ERROR)]
            self.rtts.append(now() - self.asked_at)
            self.errors += 1
            self.avail, self.asked = 0, None
            return True
        if len(buf) >= 32 and not (buf.startswith(b"\r\n+IPD,") or buf.startswith(b"+CIPRECVDATA:")):
            raise BenchError(f"unexpected bytes from bridged: {bytes(buf[:200])!r}")
        return False


def bridged_passive(data: bytes, digest: str, piece: int, gap_ms: float) -> dict[str, float]:
    n = len(data)
    with DuplexPeer(payload=data, piece=WRITE) as peer, Daemon(urc_gap_ms=gap_ms) as d:
        c = d.client
        d.join_wifi()
        c.expect(b"AT+CIPRECVMODE=1\r\n", OK)
        d.tcp_connect(peer.port)
        if not peer.connected.wait(5.0):
            raise BenchError("bridged: the peer never saw the TCP connection")
        driver = _Driver(c, piece)
        cpu = TreeCpu(d.pid)
        cpu.start()
        t0 = now()
        peer.go.set()
        driver.read(n, TIMEOUT)
        elapsed = now() - t0
        cpu_s = cpu.stop()
        if driver.hash.hexdigest() != digest:
            raise HashMismatch(f"bridged passive reads of {piece}: read {n} bytes sha256 "
                               f"{driver.hash.hexdigest()}; the peer sent sha256 {digest}")
        # All is read: nothing may follow (a notice now would announce nothing).
        stray = c.drain(quiet=0.05, timeout=0.5)
        driver.stale += len(_NOTICE.findall(stray))
        if _NOTICE.sub(b"", stray):
            raise BenchError(f"bridged: unexpected bytes after the last read: {stray[:300]!r}")
        # Single-connection mode (AT+CIPSTART without a link id): one value, as ESP-AT prints it.
        c.expect(b"AT+CIPRECVLEN?\r\n", b"+CIPRECVLEN:0\r\n\r\nOK\r\n")
        if peer.errors:
            raise BenchError(f"bridged: peer errors {peer.errors}")
    k = key(piece, gap_ms)
    ms = [t * 1000 for t in driver.rtts]
    return {
        f"{k}_mb_s": n / MB / elapsed,
        f"{k}_seconds": elapsed,
        f"{k}_reads": len(driver.rtts),
        f"{k}_rtt_p50_ms": percentile(ms, 50),
        f"{k}_rtt_p99_ms": percentile(ms, 99),
        f"{k}_rtt_mean_ms": sum(ms) / len(ms) if ms else float("nan"),
        f"{k}_idle_share": driver.idle / elapsed,
        f"{k}_cpu_us_per_read": cpu_s / len(driver.rtts) * 1e6 if driver.rtts else float("nan"),
        f"{k}_notices_per_mb": driver.notices / (n / MB),
        f"{k}_errors": driver.errors,
        f"{k}_stale": driver.stale,
    }


def socat_raw(data: bytes, digest: str) -> dict[str, float]:
    n = len(data)
    with DuplexPeer(payload=data, piece=WRITE) as peer, \
            Bridge("socat", peer.port, wait_connected=peer.connected.wait) as b:
        t0 = now()
        peer.go.set()
        got, _ = read_raw(b.client, n, TIMEOUT, "socat TCP->pty")
        elapsed = now() - t0
        if got != digest:
            raise HashMismatch(f"socat TCP->pty: read {n} bytes sha256 {got}; "
                               f"the peer sent sha256 {digest}")
    return {"socat_mb_s": n / MB / elapsed}


def run(nbytes: int = 1024 * 1024, pieces=PIECES, gaps_ms=GAPS_MS) -> dict[str, float]:
    data, digest = make_payload(nbytes)
    out: dict[str, float] = {"bytes": nbytes}
    for gap_ms in gaps_ms:
        for piece in pieces:
            out.update(bridged_passive(data, digest, piece, gap_ms))
    out.update(socat_raw(data, digest))
    out["errors"] = sum(out[f"{key(p, g)}_errors"] for p in pieces for g in gaps_ms)
    out["stale"] = sum(out[f"{key(p, g)}_stale"] for p in pieces for g in gaps_ms)
    return out


def lines(r: dict[str, float]) -> str:
    """One run's figures, a line per gap setting."""
    out = []
    for gap_ms in GAPS_MS:
        cells = []
        for piece in PIECES:
            k = key(piece, gap_ms)
            if f"{k}_mb_s" in r:
                cells.append(f"{piece}: {r[f'{k}_mb_s']:.3f} MB/s "
                             f"(rtt p50 {r[f'{k}_rtt_p50_ms']:.2f} mean {r[f'{k}_rtt_mean_ms']:.2f} "
                             f"p99 {r[f'{k}_rtt_p99_ms']:.2f} ms, waiting for notices "
                             f"{r[f'{k}_idle_share']:.0%}, daemon CPU per read "
                             f"{r[f'{k}_cpu_us_per_read']:.0f} us)")
        out.append(f"gap {gap_ms:g} ms  " + " | ".join(cells))
    out.append(f"socat raw {r['socat_mb_s']:.2f} MB/s | ERRORs {r['errors']:.0f}, "
               f"stale notices {r['stale']:.0f} (hashes match)")
    return "\n        ".join(out)


def main() -> None:
    print(lines(run()))


if __name__ == "__main__":
    main()
