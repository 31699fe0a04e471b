"""Passthrough (``AT+CIPMODE=1`` + ``AT+CIPSEND``): raw bytes both ways.

* uplink: random bytes written to the pty in 64 KiB writes reach a TCP peer
  on 127.0.0.1 that hashes them; time from the first write until the peer
  holds every byte.
* downlink: the peer sends random bytes as fast as its socket takes them;
  time from the peer's first send until the last byte is read from the pty,
  hashed.
* echo latency: the peer echoes; one byte written to the pty, time until it
  is read back, ``count`` times after a warm-up.  The daemon is put in
  ``AT+TRANSINTVL=0`` for this (with the default 20 ms a short write waits
  20 ms before it goes, by the spec); a short run at the default is reported
  for the record.  '+' is never sent, so no byte is held as a +++ candidate.

Baseline for all three: socat ``PTY,raw,echo=0 <-> TCP:127.0.0.1:PORT`` with
the same peer and the same client code.  The daemon enters passthrough before
the clock starts and leaves it (+++ with guard times, ``AT+CIPMODE=0``,
``AT`` -> OK) after the transfer is checked.
"""

from __future__ import annotations

import time

from .common import MB, BenchError, EchoServer, HashMismatch, now, percentile
from .streams import Bridge, DuplexPeer, cpu_fields, make_payload, read_raw, write_all

WRITE = 65536
STEP_TIMEOUT = 10.0
DRAIN_TIMEOUT = 60.0
ECHO_BYTES = bytes(b for b in range(256) if b != ord("+"))
WARMUP = 50


def uplink(kind: str, data: bytes, digest: str) -> dict[str, float]:
    n = len(data)
    with DuplexPeer() as peer, Bridge(kind, peer.port, wait_connected=peer.connected.wait) as b:
        cpu = b.cpu()
        cpu.start()
        t0 = now()
        write_all(b.client, data, WRITE, STEP_TIMEOUT)
        peer.check_rx(f"{kind} passthrough uplink", n, digest, DRAIN_TIMEOUT)
        elapsed = now() - t0
        cpu_s = cpu.stop()
    return {"seconds": elapsed, "mb_s": n / MB / elapsed, **cpu_fields("x", cpu_s, elapsed, n)}


def downlink(kind: str, data: bytes, digest: str) -> dict[str, float]:
    n = len(data)
    with DuplexPeer(payload=data, piece=WRITE) as peer, \
            Bridge(kind, peer.port, wait_connected=peer.connected.wait) as b:
        cpu = b.cpu()
        cpu.start()
        t0 = now()
        peer.go.set()
        got, _ = read_raw(b.client, n, DRAIN_TIMEOUT, f"{kind} passthrough downlink")
        elapsed = now() - t0
        cpu_s = cpu.stop()
        if got != digest:
            raise HashMismatch(f"{kind} passthrough downlink: read {n} bytes sha256 {got}; "
                               f"the peer sent sha256 {digest}")
        if peer.errors:
            raise BenchError(f"{kind}: peer errors {peer.errors}")
    return {"seconds": elapsed, "mb_s": n / MB / elapsed, **cpu_fields("x", cpu_s, elapsed, n)}


def echo(kind: str, count: int, transintvl: int | None = 0) -> dict[str, float]:
    timeout = 5.0
    with EchoServer() as server, Bridge(kind, server.port,
                                        transintvl=transintvl if kind == "bridged" else None,
                                        wait_connected=lambda t: _wait(server, t)) as b:
        c = b.client
        samples = []
        for i in range(WARMUP + count):
            byte = ECHO_BYTES[i % len(ECHO_BYTES):i % len(ECHO_BYTES) + 1]
            t0 = now()
            c.write(byte, timeout)
            got = c.read_exact(1, timeout)
            dt = now() - t0
            if got != byte:
                raise BenchError(f"{kind} passthrough echo #{i}: sent {byte!r}, got {got!r}")
            if i >= WARMUP:
                samples.append(dt * 1000.0)
        if server.errors:
            raise BenchError(f"{kind}: echo server errors {server.errors}")
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
            "max_ms": max(samples)}


def _wait(server: EchoServer, timeout: float) -> bool:
    deadline = now() + timeout
    while server.connections < 1:
        if now() > deadline:
            return False
        time.sleep(0.005)
    return True


def run(nbytes: int = 32 * 1024 * 1024, echo_count: int = 1000,
        default_intvl_count: int = 50) -> dict[str, float]:
    data, digest = make_payload(nbytes)
    out: dict[str, float] = {"bytes": nbytes}
    for direction, fn in (("up", uplink), ("down", downlink)):
        b = fn("bridged", data, digest)
        s = fn("socat", data, digest)
        out[f"{direction}_bridged_mb_s"] = b["mb_s"]
        out[f"{direction}_socat_mb_s"] = s["mb_s"]
        out[f"{direction}_ratio"] = b["mb_s"] / s["mb_s"]
        out[f"{direction}_bridged_cpu_ms_per_mb"] = b["x_cpu_s_per_mb"] * 1000
        out[f"{direction}_socat_cpu_ms_per_mb"] = s["x_cpu_s_per_mb"] * 1000
        out[f"{direction}_cpu_ratio"] = (b["x_cpu_s_per_mb"] / s["x_cpu_s_per_mb"]
                                         if s["x_cpu_s_per_mb"] > 0 else float("inf"))
    b = echo("bridged", echo_count, transintvl=0)
    s = echo("socat", echo_count)
    out.update({
        "echo_bridged_p50_ms": b["p50_ms"], "echo_bridged_p99_ms": b["p99_ms"],
        "echo_bridged_max_ms": b["max_ms"],
        "echo_socat_p50_ms": s["p50_ms"], "echo_socat_p99_ms": s["p99_ms"],
        "echo_socat_max_ms": s["max_ms"],
    })
    if default_intvl_count:
        d = echo("bridged", default_intvl_count, transintvl=None)
        out["echo_bridged_intvl20_p50_ms"] = d["p50_ms"]
        out["echo_bridged_intvl20_p99_ms"] = d["p99_ms"]
    return out


def main() -> None:
    r = run()
    for d, name in (("up", "uplink"), ("down", "downlink")):
        print(f"passthrough {name}: bridged {r[f'{d}_bridged_mb_s']:.2f} MB/s "
              f"{r[f'{d}_bridged_cpu_ms_per_mb']:.1f} ms CPU/MB | socat "
              f"{r[f'{d}_socat_mb_s']:.2f} MB/s {r[f'{d}_socat_cpu_ms_per_mb']:.1f} ms CPU/MB | "
              f"ratio {r[f'{d}_ratio']:.3f}, CPU/MB {r[f'{d}_cpu_ratio']:.1f}x")
    print(f"passthrough 1-byte echo (TRANSINTVL=0): bridged p50 {r['echo_bridged_p50_ms']:.3f} "
          f"p99 {r['echo_bridged_p99_ms']:.3f} ms | socat p50 {r['echo_socat_p50_ms']:.3f} "
          f"p99 {r['echo_socat_p99_ms']:.3f} ms")
    if "echo_bridged_intvl20_p50_ms" in r:
        print(f"passthrough 1-byte echo (TRANSINTVL=20, default): bridged p50 "
              f"{r['echo_bridged_intvl20_p50_ms']:.3f} p99 {r['echo_bridged_intvl20_p99_ms']:.3f} ms")


if __name__ == "__main__":
    main()
