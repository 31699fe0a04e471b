"""Downlink in active receive mode (``AT+CIPMODE=0``): ``+IPD`` framing.

A TCP peer on 127.0.0.1 sends random bytes as fast as its socket takes them
(64 KiB writes) to a single-connection link (``AT+CIPMUX=0``); the daemon
writes ``\\r\\n+IPD,<len>:<len bytes>`` to the pty.  The client parses the
frames by length and hashes the payloads; nothing else may appear on the
pty.  Time runs from the peer's first send until the last payload byte is
read.

Baseline: the same bytes from the same kind of peer through a socat
TCP -> PTY bridge, read raw and hashed (so socat moves the bare bytes and
the client does less work than for bridged, whose frames it must parse).
"""

from __future__ import annotations

from .common import MB, BenchError, Daemon, HashMismatch, TreeCpu, now
from .streams import OK, Bridge, DuplexPeer, IpdDemux, cpu_fields, make_payload, read_raw, versus

WRITE = 65536
DRAIN_TIMEOUT = 60.0


def bridged_downlink(data: bytes, digest: str) -> dict[str, float]:
    n = len(data)
    with DuplexPeer(payload=data, piece=WRITE) as peer, Daemon() as d:
        c = d.client
        d.join_wifi()
        d.tcp_connect(peer.port)
        if not peer.connected.wait(5.0):
            raise BenchError("bridged: the peer never saw the TCP connection")
        demux = IpdDemux(c, mux=False)
        cpu = TreeCpu(d.pid)
        cpu.start()
        t0 = now()
        peer.go.set()
        if not demux.wait_data({None: n}, DRAIN_TIMEOUT):
            raise HashMismatch(f"bridged +IPD downlink: {demux.counts.get(None, 0)} of {n} "
                               f"payload bytes within {DRAIN_TIMEOUT} s")
        elapsed = now() - t0
        cpu_s = cpu.stop()
        demux.check("bridged +IPD downlink", None, n, digest)
        stray = demux.drain_text(quiet=0.05, timeout=0.5)
        if stray:
            raise BenchError(f"bridged: unexpected bytes among the +IPD frames: {stray[:300]!r}")
        frames = demux.frames
        demux.write(b"AT\r\n", 5.0)
        demux.expect(OK, 5.0)
        if peer.errors:
            raise BenchError(f"bridged: peer errors {peer.errors}")
    return {"seconds": elapsed, "mb_s": n / MB / elapsed, "frames": frames,
            **cpu_fields("x", cpu_s, elapsed, n)}


def socat_downlink(data: bytes, digest: str) -> dict[str, float]:
    n = len(data)
    with DuplexPeer(payload=data, piece=WRITE) as peer, \
            Bridge("socat", peer.port, wait_connected=peer.connected.wait) as b:
        cpu = b.cpu()
        cpu.start()
        t0 = now()
        peer.go.set()
        got, _ = read_raw(b.client, n, DRAIN_TIMEOUT, "socat TCP->pty")
        elapsed = now() - t0
        cpu_s = cpu.stop()
        if got != digest:
            raise HashMismatch(f"socat TCP->pty: read {n} bytes sha256 {got}; "
                               f"the peer sent sha256 {digest}")
    return {"seconds": elapsed, "mb_s": n / MB / elapsed, **cpu_fields("x", cpu_s, elapsed, n)}


def run(nbytes: int = 32 * 1024 * 1024) -> dict[str, float]:
    data, digest = make_payload(nbytes)
    b = bridged_downlink(data, digest)
    s = socat_downlink(data, digest)
    return {
        "bytes": nbytes,
        **versus(b, s),
        "frames": b["frames"],
        "mean_frame_bytes": nbytes / b["frames"] if b["frames"] else float("nan"),
    }


def main() -> None:
    r = run()
    print(f"bridged +IPD downlink: {r['bridged_mb_s']:.2f} MB/s, "
          f"{r['bridged_cpu_ms_per_mb']:.1f} ms CPU/MB ({r['frames']} frames, "
          f"{r['mean_frame_bytes']:.0f} bytes each on average)")
    print(f"socat TCP->pty:        {r['socat_mb_s']:.2f} MB/s, "
          f"{r['socat_cpu_ms_per_mb']:.1f} ms CPU/MB")
    print(f"ratios bridged/socat: throughput {r['ratio']:.3f}, CPU per MB {r['cpu_ratio']:.1f}x")


if __name__ == "__main__":
    main()
