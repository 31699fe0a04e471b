"""AT round trip over the pty: ``AT\\r\\n`` -> ``\\r\\nOK\\r\\n``.

Baseline: 5 bytes through socat PTY <-> TCP to an echo server on 127.0.0.1
and back (write 5 bytes, read 5 bytes).  Both sides use the same pty client.
"""

from __future__ import annotations

from .common import BenchError, Daemon, EchoServer, Socat, now, percentile

WARMUP = 50
AT = b"AT\r\n"
OK = b"\r\nOK\r\n"
PING = b"ping\n"  # 5 bytes
TIMEOUT = 5.0  # per round trip


def _stats(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in samples]
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms)}


def bridged_round_trips(count: int, config: str = "") -> dict[str, float]:
    with Daemon(config=config) as d:
        c = d.client
        assert c is not None
        for _ in range(WARMUP):
            c.expect(AT, OK, TIMEOUT)
        samples = []
        for _ in range(count):
            t0 = now()
            c.write(AT, TIMEOUT)
            got = c.read_until((OK, b"ERROR\r\n"), TIMEOUT)
            samples.append(now() - t0)
            if got != OK:
                raise BenchError(f"AT round trip: expected {OK!r}, got {got!r}")
        rest = c.drain(quiet=0.05, timeout=0.5)
        if rest:
            raise BenchError(f"unexpected bytes after the AT round trips: {rest!r}")
    return _stats(samples)


def socat_round_trips(count: int) -> dict[str, float]:
    with EchoServer() as echo, Socat(echo.port) as s:
        c = s.client
        assert c is not None
        for _ in range(WARMUP):
            c.write(PING, TIMEOUT)
            got = c.read_exact(len(PING), TIMEOUT)
            if got != PING:
                raise BenchError(f"socat echo: expected {PING!r}, got {got!r}")
        samples = []
        for _ in range(count):
            t0 = now()
            c.write(PING, TIMEOUT)
            got = c.read_exact(len(PING), TIMEOUT)
            samples.append(now() - t0)
            if got != PING:
                raise BenchError(f"socat echo: expected {PING!r}, got {got!r}")
        if echo.errors:
            raise BenchError(f"echo server errors: {echo.errors}")
    return _stats(samples)


def run(count: int = 2000) -> dict[str, float]:
    b = bridged_round_trips(count)
    s = socat_round_trips(count)
    return {
        "at_p50_ms": b["p50"],
        "at_p99_ms": b["p99"],
        "at_max_ms": b["max"],
        "socat_p50_ms": s["p50"],
        "socat_p99_ms": s["p99"],
        "socat_max_ms": s["max"],
        "p50_ratio": b["p50"] / s["p50"],
        "p99_ratio": b["p99"] / s["p99"],
    }


def main() -> None:
    r = run()
    print(f"bridged AT round trip: p50 {r['at_p50_ms']:.3f} ms  p99 {r['at_p99_ms']:.3f} ms")
    print(f"socat 5-byte echo:     p50 {r['socat_p50_ms']:.3f} ms  p99 {r['socat_p99_ms']:.3f} ms")
    print(f"ratio bridged/socat:   p50 {r['p50_ratio']:.2f}x  p99 {r['p99_ratio']:.2f}x")


if __name__ == "__main__":
    main()
