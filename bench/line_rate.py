"""CPU at line rate: 0.5 MB/s each way (a saturated 5 Mbaud UART) for ~10 s.

Every writer is paced by a token bucket (rate 0.5 MB/s, or 0.1 MB/s per link;
burst two pieces):

* passthrough, one link: the client writes random bytes to the pty in 1 KiB
  pieces at 0.5 MB/s while the TCP peer on 127.0.0.1 sends other random
  bytes in 1 KiB pieces at 0.5 MB/s; the client reads the pty raw.  Daemon
  in ``AT+CIPMODE=1`` + ``AT+CIPSEND`` with the default AT+TRANSINTVL (20 ms).
* five links (``AT+CIPMUX=1``): uplink as ``AT+CIPSEND=<id>,<n>`` sends
  (``CHUNK`` bytes each), each link's sends paced to 0.1 MB/s, one command at
  a time on the serial line as an MCU must; downlink from five peers, each
  sending 1 KiB pieces paced to 0.1 MB/s, arriving as ``+IPD,<id>,<len>:``
  frames parsed by length.
* baseline: socat ``PTY <-> TCP``, the same 1 KiB pieces paced at 0.5 MB/s
  both ways, the same client code as the passthrough case; measured before
  and after the daemon's two cases, the mean of both is the baseline.

Reported: CPU seconds per wall second (cores) of the daemon's process tree
(of the socat process for the baseline) from the first byte until every byte
arrived both ways, hash-checked; also the rate achieved each way.
"""

from __future__ import annotations

import contextlib

from .common import MB, BenchError, HashMismatch, TreeCpu, now, percentile
from .streams import (
    Bridge,
    DuplexPeer,
    PacedWriter,
    check_downlinks,
    daemon_with_peers,
    make_payload,
    paced_cipsends,
    read_raw,
    wait_both_ways,
)

RATE = 500_000  # bytes/s each way: 5 Mbaud, 8N1
PIECE = 1024
CHUNK = 2048  # AT+CIPSEND size in the five-link case
LINKS = 5
STEP_TIMEOUT = 10.0


def one_link(kind: str, seconds: float, rate: float = RATE, config: str = "",
             keep: list[str] | None = None) -> dict[str, float]:
    """One link at ``rate`` each way; ``keep`` receives the sha256 of (up, down)."""
    n = int(rate * seconds)
    up, up_digest = make_payload(n)
    down, down_digest = make_payload(n)
    limit = seconds * 3 + 10
    with DuplexPeer(payload=down, rate=rate, piece=PIECE, send_timeout=limit) as peer, \
            Bridge(kind, peer.port, wait_connected=peer.connected.wait, config=config) as b:
        writer = PacedWriter(b.client, up, PIECE, rate, limit)
        cpu = b.cpu()
        cpu.start()
        t0 = now()
        peer.go.set()
        writer.start()
        got, t_down = read_raw(b.client, n, limit, f"{kind} line rate downlink")
        writer.join_checked(limit)
        peer.check_rx(f"{kind} line rate uplink", n, up_digest, limit)
        t_up = peer.rx_last_at
        elapsed = now() - t0
        cpu_s = cpu.stop()
        if got != down_digest:
            raise HashMismatch(f"{kind} line rate downlink: read {n} bytes sha256 {got}; "
                               f"the peer sent sha256 {down_digest}")
        if peer.errors:
            raise BenchError(f"{kind}: peer errors {peer.errors}")
    if keep is not None:
        keep += [up_digest, down_digest]
    return {"seconds": elapsed, "cpu_s": cpu_s, "cores": cpu_s / elapsed,
            "up_mb_s": n / MB / (t_up - t0), "down_mb_s": n / MB / (t_down - t0),
            "cpu_ms_per_mb": cpu_s * 1000 / (2 * n / MB), **_wakeups(cpu, cpu_s, elapsed)}


def _wakeups(cpu, cpu_s: float, elapsed: float) -> dict[str, float]:
    """Wake-ups per second and CPU per wake-up: at a paced rate these explain the CPU."""
    n = max(cpu.wakeups, 1)
    return {"wakeups_s": cpu.wakeups / elapsed, "us_per_wakeup": cpu_s * 1e6 / n}


def five_links(seconds: float, rate: float = RATE, chunk: int = CHUNK) -> dict[str, float]:
    per = rate / LINKS
    n = int(per * seconds)
    ups = [make_payload(n) for _ in range(LINKS)]
    downs = [make_payload(n) for _ in range(LINKS)]
    limit = seconds * 3 + 10
    who = "five links line rate"
    with contextlib.ExitStack() as stack:
        peers, d, demux = daemon_with_peers(stack, [dn[0] for dn in downs], limit, rate=per, piece=PIECE)
        cpu = TreeCpu(d.pid)
        cpu.start()
        t0 = now()
        for p in peers:
            p.go.set()
        send_ms = paced_cipsends(demux, [u[0] for u in ups], per, chunk, t0 + limit, who, STEP_TIMEOUT)
        t_down, t_up = wait_both_ways(demux, peers, ups, downs, who, max(t0 + limit - now(), 10.0))
        elapsed = now() - t0
        cpu_s = cpu.stop()
        check_downlinks(demux, downs, who)
    total = LINKS * n
    return {"seconds": elapsed, "cpu_s": cpu_s, "cores": cpu_s / elapsed,
            "up_mb_s": total / MB / (t_up - t0),
            "down_mb_s": total / MB / (t_down - t0),
            "cpu_ms_per_mb": cpu_s * 1000 / (2 * total / MB), "sends": len(send_ms),
            **_wakeups(cpu, cpu_s, elapsed),
            "send_p50_ms": percentile(send_ms, 50), "send_max_ms": max(send_ms)}


def run(seconds: float = 10.0) -> dict[str, float]:
    # socat before and after the daemon: the machine drifts within a run, and
    # a light process's CPU figure moves most, so the baseline is their mean.
    before = one_link("socat", seconds)
    p = one_link("bridged", seconds)
    m = five_links(seconds)
    after = one_link("socat", seconds)
    s = {k: (before[k] + after[k]) / 2 for k in before}
    out: dict[str, float] = {"seconds": seconds}
    for name, r in (("pt", p), ("five", m), ("socat", s)):
        out[f"{name}_cores"] = r["cores"]
        out[f"{name}_up_mb_s"] = r["up_mb_s"]
        out[f"{name}_down_mb_s"] = r["down_mb_s"]
        out[f"{name}_cpu_ms_per_mb"] = r["cpu_ms_per_mb"]
        out[f"{name}_wakeups_s"] = r["wakeups_s"]
        out[f"{name}_us_per_wakeup"] = r["us_per_wakeup"]
    out["five_sends"] = m["sends"]
    out["five_send_p50_ms"] = m["send_p50_ms"]
    out["five_send_max_ms"] = m["send_max_ms"]
    sc = s["cores"]
    out["pt_ratio"] = p["cores"] / sc if sc > 0 else float("inf")
    out["five_ratio"] = m["cores"] / sc if sc > 0 else float("inf")
    return out


def main() -> None:
    r = run()
    for name, label in (("pt", "bridged passthrough, 1 link"),
                        ("five", "bridged 5 links (CIPSEND + +IPD)"),
                        ("socat", "socat PTY<->TCP")):
        print(f"{label:34s} {r[f'{name}_cores']:.3f} cores  "
              f"(up {r[f'{name}_up_mb_s']:.3f} MB/s, down {r[f'{name}_down_mb_s']:.3f} MB/s, "
              f"{r[f'{name}_cpu_ms_per_mb']:.1f} ms CPU/MB, {r[f'{name}_wakeups_s']:.0f} wake-ups/s "
              f"at {r[f'{name}_us_per_wakeup']:.0f} us)")
    print(f"ratios vs socat: passthrough {r['pt_ratio']:.1f}x, five links {r['five_ratio']:.1f}x")


if __name__ == "__main__":
    main()
