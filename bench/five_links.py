"""Five links streaming at once, as fast as they go.

``AT+CIPMUX=1`` and five TCP links (``AT+CIPSTART=<id>,"TCP","127.0.0.1",
<port>``, one peer per link).  Each link moves ``per_link`` random bytes up
and ``per_link`` other random bytes down, all at the same time:

* uplink: ``AT+CIPSEND=<id>,8192`` (prompt, payload, ``Recv 8192 bytes`` and
  ``SEND OK`` checked exactly), the links taken in turn, one command at a
  time on the serial line; each peer hashes what it receives;
* downlink: every peer sends its bytes as fast as its socket takes them; the
  client parses ``+IPD,<id>,<len>:`` frames by length (between and inside
  the sends' replies) and hashes each link's payload.

Aggregate throughput = all bytes moved (both ways, all links) / time from the
first byte until the last byte arrived, every hash intact.

Also reported: how long one AT+CIPSEND took (command written until SEND OK
read) while the downlink ran.

Baseline: one socat ``PTY <-> TCP`` bridge (a serial line carries one byte
stream) moving the same total both ways at once: the client writes the five
uplink payloads one after the other in 8192-byte writes while the peer sends
the five downlink payloads one after the other; both hashed.
"""

from __future__ import annotations

import contextlib
import hashlib

from .common import MB, BenchError, Daemon, HashMismatch, TreeCpu, now, percentile
from .streams import (
    versus,
    Bridge,
    DuplexPeer,
    PacedWriter,
    cipsend,
    check_downlinks,
    cpu_fields,
    daemon_with_peers,
    make_payload,
    read_raw,
    wait_both_ways,
)

LINKS = 5
CHUNK = 8192
STEP_TIMEOUT = 10.0
LIMIT = 120.0


def bridged_five(ups, downs, make_daemon=Daemon, meter=TreeCpu) -> dict[str, float]:
    """``make_daemon`` and ``meter``: what stands for the daemon and what measures its
    CPU (bench.five_floor runs its stand-ins through the same client)."""
    n = len(ups[0][0])
    with contextlib.ExitStack() as stack:
        peers, d, demux = daemon_with_peers(stack, [dn[0] for dn in downs], LIMIT,
                                            make_daemon=make_daemon, piece=65536)
        views = [memoryview(u[0]) for u in ups]
        cpu = meter(d.pid)
        cpu.start()
        t0 = now()
        for p in peers:
            p.go.set()
        sends = 0
        send_ms: list[float] = []
        for off in range(0, n, CHUNK):  # bounded: n / CHUNK rounds of LINKS sends
            for i in range(LINKS):
                a = now()
                cipsend(demux, i, views[i][off:off + CHUNK], STEP_TIMEOUT)
                send_ms.append((now() - a) * 1000)
                sends += 1
            if now() - t0 > LIMIT:
                raise BenchError(f"five links: uplink not done within {LIMIT} s")
        t_down, t_up = wait_both_ways(demux, peers, ups, downs, "bridged five links", LIMIT)
        elapsed = now() - t0
        cpu_s = cpu.stop()
        check_downlinks(demux, downs, "bridged five links")
    total = 2 * LINKS * n
    return {"seconds": elapsed, "mb_s": total / MB / elapsed,
            "up_seconds": t_up - t0, "down_seconds": t_down - t0,
            "sends": sends, "frames": demux.frames, "send_p50_ms": percentile(send_ms, 50),
            "send_p90_ms": percentile(send_ms, 90), "send_max_ms": max(send_ms),
            **cpu_fields("x", cpu_s, elapsed, total)}


def socat_one(ups, downs, meter=TreeCpu) -> dict[str, float]:
    up = b"".join(u[0] for u in ups)
    down = b"".join(d[0] for d in downs)
    up_digest = hashlib.sha256(up).hexdigest()
    down_digest = hashlib.sha256(down).hexdigest()
    n = len(up)
    with DuplexPeer(payload=down, piece=65536, send_timeout=LIMIT) as peer, \
            Bridge("socat", peer.port, wait_connected=peer.connected.wait) as b:
        writer = PacedWriter(b.client, up, CHUNK, None, LIMIT)
        cpu = meter(b.pid)
        cpu.start()
        t0 = now()
        peer.go.set()
        writer.start()
        got, t_down = read_raw(b.client, len(down), LIMIT, "socat both ways")
        writer.join_checked(LIMIT)
        peer.check_rx("socat both ways", n, up_digest, 30.0)
        t_up = peer.rx_last_at
        elapsed = now() - t0
        cpu_s = cpu.stop()
        if got != down_digest:
            raise HashMismatch(f"socat both ways: read {len(down)} bytes sha256 {got}; "
                               f"the peer sent sha256 {down_digest}")
    total = n + len(down)
    return {"seconds": elapsed, "mb_s": total / MB / elapsed, "up_seconds": t_up - t0,
            "down_seconds": t_down - t0, **cpu_fields("x", cpu_s, elapsed, total)}


def run(per_link: int = 4 * 1024 * 1024) -> dict[str, float]:
    ups = [make_payload(per_link) for _ in range(LINKS)]
    downs = [make_payload(per_link) for _ in range(LINKS)]
    b = bridged_five(ups, downs)
    s = socat_one(ups, downs)
    return {
        "per_link": per_link,
        **versus(b, s),
        "bridged_up_seconds": b["up_seconds"],
        "bridged_down_seconds": b["down_seconds"],
        "socat_up_seconds": s["up_seconds"],
        "socat_down_seconds": s["down_seconds"],
        "sends": b["sends"],
        "frames": b["frames"],
        "send_p50_ms": b["send_p50_ms"],
        "send_p90_ms": b["send_p90_ms"],
        "send_max_ms": b["send_max_ms"],
    }


def main() -> None:
    r = run()
    mib = r["per_link"] / 1024 / 1024
    print(f"bridged, 5 links x {mib:g} MiB up + {mib:g} MiB down at once: "
          f"{r['bridged_mb_s']:.2f} MB/s aggregate (uplink done after "
          f"{r['bridged_up_seconds']:.2f} s, downlink after {r['bridged_down_seconds']:.2f} s), "
          f"{r['bridged_cpu_ms_per_mb']:.1f} ms CPU/MB; all 10 hashes intact")
    print(f"socat, one bridge, same bytes both ways at once: {r['socat_mb_s']:.2f} MB/s aggregate, "
          f"{r['socat_cpu_ms_per_mb']:.1f} ms CPU/MB")
    print(f"ratios bridged/socat: throughput {r['ratio']:.3f}, CPU per MB {r['cpu_ratio']:.1f}x")
    print(f"one AT+CIPSEND=<id>,8192 (command to SEND OK) while the downlink runs: "
          f"p50 {r['send_p50_ms']:.2f} ms, p90 {r['send_p90_ms']:.2f} ms, max {r['send_max_ms']:.2f} ms")


if __name__ == "__main__":
    main()
