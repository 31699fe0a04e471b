"""Bulk upload with one ``AT+CIPSENDL=<len>`` (streamed while received).

After ``AT+CIPSENDLCFG=1048576,2920`` (a progress line per MiB handed on),
``AT+CIPSENDL=<n>`` -> ``\\r\\nOK\\r\\n\\r\\n>``, then all n random bytes in
64 KiB writes; the daemon answers ``+CIPSENDL:<sent>,<received>`` lines and
finally ``\\r\\nSEND OK\\r\\n``.  Every byte of the reply is checked: only
progress lines (each count non-decreasing, sent <= received, the last one
<n>,<n>) and SEND OK.  The TCP peer on 127.0.0.1 hashes what it receives.
Time runs from the command until SEND OK is read and the peer holds every
byte.

Baseline: the same bytes in 64 KiB writes to a socat PTY -> TCP bridge, time
until the peer holds every byte.
"""

from __future__ import annotations

import re

from .common import MB, BenchError, Daemon, Socat, TreeCpu, now
from .streams import OK, PROMPT, DuplexPeer, cpu_fields, make_payload, versus

WRITE = 65536
STEP_TIMEOUT = 10.0
DRAIN_TIMEOUT = 60.0
REPORT_SIZE = 1048576
_PROGRESS = re.compile(rb"\+CIPSENDL:(\d+),(\d+)\r\n")


def _read_available(client) -> None:
    """Pull whatever the daemon has written so far into client.buf (no waiting)."""
    for _ in range(64):
        if not client._fill(0):
            return


def bridged_upload(data: bytes, digest: str) -> dict[str, float]:
    n = len(data)
    view = memoryview(data)
    with DuplexPeer() as peer, Daemon() as d:
        c = d.client
        d.join_wifi()
        d.tcp_connect(peer.port)
        if not peer.connected.wait(5.0):
            raise BenchError("bridged: the peer never saw the TCP connection")
        c.expect(b"AT+CIPSENDLCFG=%d,2920\r\n" % REPORT_SIZE, OK)
        cpu = TreeCpu(d.pid)
        cpu.start()
        t0 = now()
        c.expect(b"AT+CIPSENDL=%d\r\n" % n, PROMPT, STEP_TIMEOUT)
        for off in range(0, n, WRITE):
            c.write(view[off:off + WRITE], STEP_TIMEOUT)
            _read_available(c)
        text = c.read_until((b"\r\nSEND OK\r\n", b"SEND FAIL\r\n", b"ERROR\r\n",
                             b"SEND CANCELLED\r\n"), DRAIN_TIMEOUT)
        t_send_ok = now()
        peer.check_rx("bridged CIPSENDL", n, digest, DRAIN_TIMEOUT)
        elapsed = now() - t0
        cpu_s = cpu.stop()
        reports = _check_reply(text, n)
        rest = c.drain(quiet=0.05, timeout=0.5)
        if rest:
            raise BenchError(f"bridged: unexpected bytes after SEND OK: {rest!r}")
        c.expect(b"AT\r\n", OK)
    return {"seconds": elapsed, "send_ok_seconds": t_send_ok - t0, "mb_s": n / MB / elapsed,
            "reports": reports, **cpu_fields("x", cpu_s, elapsed, n)}


def _check_reply(text: bytes, n: int) -> int:
    if not text.endswith(b"\r\nSEND OK\r\n"):
        raise BenchError(f"AT+CIPSENDL={n} ended with {text[-200:]!r}")
    body = text[:-len(b"\r\nSEND OK\r\n")]
    pos = 0
    reports: list[tuple[int, int]] = []
    for m in _PROGRESS.finditer(body):
        if m.start() != pos:
            raise BenchError(f"AT+CIPSENDL: unexpected bytes {body[pos:m.start()]!r} "
                             f"among the progress lines")
        reports.append((int(m.group(1)), int(m.group(2))))
        pos = m.end()
    if pos != len(body):
        raise BenchError(f"AT+CIPSENDL: unexpected bytes {body[pos:pos + 200]!r} "
                         f"before SEND OK")
    if not reports:
        raise BenchError("AT+CIPSENDL: no +CIPSENDL progress line at all")
    for (s0, r0), (s1, r1) in zip(reports, reports[1:]):
        if s1 < s0 or r1 < r0:
            raise BenchError(f"AT+CIPSENDL: progress went backwards: {reports}")
    if any(s > r for s, r in reports):
        raise BenchError(f"AT+CIPSENDL: a report has sent > received: {reports}")
    if reports[-1] != (n, n):
        raise BenchError(f"AT+CIPSENDL: last progress line {reports[-1]}, expected {(n, n)}")
    return len(reports)


def socat_upload(data: bytes, digest: str) -> dict[str, float]:
    n = len(data)
    view = memoryview(data)
    with DuplexPeer() as peer, Socat(peer.port) as s:
        if not peer.connected.wait(5.0):
            raise BenchError("socat: the peer never saw the TCP connection")
        cpu = TreeCpu(s.pid)
        cpu.start()
        t0 = now()
        for off in range(0, n, WRITE):
            s.client.write(view[off:off + WRITE], STEP_TIMEOUT)
        peer.check_rx("socat pty->TCP", n, digest, DRAIN_TIMEOUT)
        elapsed = now() - t0
        cpu_s = cpu.stop()
    return {"seconds": elapsed, "mb_s": n / MB / elapsed, **cpu_fields("x", cpu_s, elapsed, n)}


def run(nbytes: int = 32 * 1024 * 1024) -> dict[str, float]:
    data, digest = make_payload(nbytes)
    b = bridged_upload(data, digest)
    s = socat_upload(data, digest)
    return {
        "bytes": nbytes,
        **versus(b, s),
        "progress_lines": b["reports"],
    }


def main() -> None:
    r = run()
    print(f"bridged AT+CIPSENDL: {r['bridged_mb_s']:.2f} MB/s, "
          f"{r['bridged_cpu_ms_per_mb']:.1f} ms CPU/MB ({r['progress_lines']} progress lines)")
    print(f"socat pty->TCP:      {r['socat_mb_s']:.2f} MB/s, "
          f"{r['socat_cpu_ms_per_mb']:.1f} ms CPU/MB")
    print(f"ratios bridged/socat: throughput {r['ratio']:.3f}, CPU per MB {r['cpu_ratio']:.1f}x")


if __name__ == "__main__":
    main()
