"""Bulk upload: AT+CIPSEND=8192 repeated until all bytes are sent.

Random bytes go from the pty through bridged to a TCP sink on 127.0.0.1
that hashes everything it receives; the hash must equal the hash of what was
sent.  Baseline: the same bytes written in 8192-byte chunks to a socat
PTY -> TCP bridge to the same kind of sink.

Throughput is measured from the first byte written to the pty until the sink
holds every byte (for bridged also every SEND OK).  CPU is user + system
seconds of the daemon's whole process tree (or of socat) over that window.
"""

from __future__ import annotations

import hashlib
import os

from .common import MB, BenchError, Daemon, HashMismatch, SinkServer, Socat, TreeCpu, now

CHUNK = 8192
STEP_TIMEOUT = 10.0  # per AT step
DRAIN_TIMEOUT = 30.0  # for the sink to receive the tail


def make_payload(nbytes: int) -> tuple[bytes, str]:
    data = os.urandom(nbytes)
    return data, hashlib.sha256(data).hexdigest()


def _check_sink(who: str, sink: SinkServer, nbytes: int, digest: str) -> None:
    if not sink.wait_bytes(nbytes, DRAIN_TIMEOUT):
        raise HashMismatch(f"{who}: sink received {sink.nbytes} of {nbytes} bytes "
                           f"within {DRAIN_TIMEOUT} s after the last send")
    got = sink.digest()
    if sink.nbytes != nbytes or got != digest:
        raise HashMismatch(f"{who}: sink holds {sink.nbytes} bytes sha256 {got}; "
                           f"sent {nbytes} bytes sha256 {digest}")
    if sink.errors:
        raise BenchError(f"{who}: sink errors {sink.errors}")


def bridged_upload(data: bytes, digest: str, config: str = "") -> dict[str, float]:
    nbytes = len(data)
    view = memoryview(data)
    with SinkServer() as sink, Daemon(config=config) as d:
        c = d.client
        assert c is not None
        d.join_wifi()
        d.tcp_connect(sink.port)
        if not sink.wait_connections(1, 5.0):
            raise BenchError("bridged: the sink never saw the TCP connection")
        cpu = TreeCpu(d.pid)
        cpu.start()
        t0 = now()
        off = 0
        sends = 0
        while off < nbytes:  # bounded: off grows by >= 1 each turn
            n = min(CHUNK, nbytes - off)
            req = b"AT+CIPSEND=%d\r\n" % n
            c.write(req, STEP_TIMEOUT)
            got = c.read_until((b">", b"ERROR\r\n"), STEP_TIMEOUT)
            if got != b"\r\nOK\r\n\r\n>":
                raise BenchError(f"send #{sends} at offset {off}: {req!r} -> {got!r} "
                                 f"(expected b'\\r\\nOK\\r\\n\\r\\n>')")
            c.write(view[off:off + n], STEP_TIMEOUT)
            got = c.read_until((b"SEND OK\r\n", b"SEND FAIL\r\n", b"ERROR\r\n"), STEP_TIMEOUT)
            want = b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % n
            if got != want:
                raise BenchError(f"send #{sends} at offset {off}: after {n} payload bytes "
                                 f"got {got!r}, expected {want!r}")
            off += n
            sends += 1
        t_sent = now()
        _check_sink("bridged", sink, nbytes, digest)
        elapsed = now() - t0
        cpu_s = cpu.stop()
        rest = c.drain(quiet=0.05, timeout=0.5)
        if rest:
            raise BenchError(f"bridged: unexpected bytes after the upload: {rest!r}")
    return {
        "seconds": elapsed,
        "send_seconds": t_sent - t0,
        "mb_s": nbytes / MB / elapsed,
        "cpu_s": cpu_s,
        "cpu_s_per_mb": cpu_s / (nbytes / MB),
        "sends": sends,
    }


def socat_upload(data: bytes, digest: str) -> dict[str, float]:
    nbytes = len(data)
    view = memoryview(data)
    with SinkServer() as sink, Socat(sink.port) as s:
        c = s.client
        assert c is not None
        if not sink.wait_connections(1, 5.0):
            raise BenchError("socat: the sink never saw the TCP connection")
        cpu = TreeCpu(s.pid)
        cpu.start()
        t0 = now()
        for off in range(0, nbytes, CHUNK):
            c.write(view[off:off + CHUNK], STEP_TIMEOUT)
        _check_sink("socat", sink, nbytes, digest)
        elapsed = now() - t0
        cpu_s = cpu.stop()
    return {
        "seconds": elapsed,
        "mb_s": nbytes / MB / elapsed,
        "cpu_s": cpu_s,
        "cpu_s_per_mb": cpu_s / (nbytes / MB),
    }


def run(nbytes: int = 16 * 1024 * 1024) -> dict[str, float]:
    data, digest = make_payload(nbytes)
    b = bridged_upload(data, digest)
    s = socat_upload(data, digest)
    return {
        "bytes": nbytes,
        "bridged_mb_s": b["mb_s"],
        "bridged_cpu_s_per_mb": b["cpu_s_per_mb"],
        "bridged_seconds": b["seconds"],
        "socat_mb_s": s["mb_s"],
        "socat_cpu_s_per_mb": s["cpu_s_per_mb"],
        "socat_seconds": s["seconds"],
        "throughput_ratio": b["mb_s"] / s["mb_s"],
        "cpu_ratio": (b["cpu_s_per_mb"] / s["cpu_s_per_mb"]
                      if s["cpu_s_per_mb"] > 0 else float("inf")),
    }


def main() -> None:
    r = run()
    print(f"bridged CIPSEND=8192: {r['bridged_mb_s']:.2f} MB/s, "
          f"{r['bridged_cpu_s_per_mb'] * 1000:.1f} ms CPU/MB")
    print(f"socat pty->TCP:       {r['socat_mb_s']:.2f} MB/s, "
          f"{r['socat_cpu_s_per_mb'] * 1000:.1f} ms CPU/MB")
    print(f"ratios bridged/socat: throughput {r['throughput_ratio']:.3f}, "
          f"CPU per MB {r['cpu_ratio']:.1f}x")


if __name__ == "__main__":
    main()
