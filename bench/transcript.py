"""What the AT transcript costs, off and on (to a file), beside socat, in one run:

* AT+CIPSEND=8192 upload (cipsend_throughput's: random bytes, every reply
  checked, the sink's sha256 compared): MB/s and CPU per MB;
* AT round trips (at_latency's): p50 and p99;
* one link in passthrough at line rate, 0.5 MB/s each way (line_rate's):
  CPU in cores, what a gateway at 5 Mbaud would spend.

With the transcript on, the file is read back after the daemon stopped: the
RX bytes inside the data phases (between ``data_start`` and ``data_end``
marks) must hash to what the MCU sent, and in passthrough the TX bytes to
what the peer sent, so each figure is that of a transcript holding every
byte.  The transcript goes to a temporary directory (1 GiB cap, one file),
never into the repository.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from . import at_latency, cipsend_throughput, line_rate
from .common import MB, HashMismatch

__all__ = ["run", "lines"]


def _config(path: Path) -> str:
    return (f'[log]\ntranscript = true\ntranscript_path = "{path}"\n'
            "transcript_max_bytes = 1073741824\ntranscript_files = 1\n")


def _data_phases(path: Path) -> tuple[bytes, bytes, int]:
    """RX and TX bytes inside data phases, and the file's size; the file is removed."""
    from bridged.uart.transcript import Direction, MarkKind, parse_line

    rx, tx, inside = bytearray(), bytearray(), False
    with open(path) as f:
        for text in f:
            line = parse_line(text)
            if line.mark is MarkKind.DATA_START:
                inside = True
            elif line.mark is MarkKind.DATA_END:
                inside = False
            elif inside and line.direction is not None:
                (rx if line.direction is Direction.RX else tx).extend(line.data)
    size = path.stat().st_size
    path.unlink()
    return bytes(rx), bytes(tx), size


def _check(who: str, data: bytes, digest: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise HashMismatch(f"transcript, {who}: {len(data)} bytes sha256 {got}; expected {digest}")


def run(nbytes: int, at_count: int, line_seconds: float) -> dict[str, float]:
    data, digest = cipsend_throughput.make_payload(nbytes)
    tmp = Path(tempfile.mkdtemp(prefix="bench-transcript-"))
    path = tmp / "transcript"
    try:
        off = cipsend_throughput.bridged_upload(data, digest)
        on = cipsend_throughput.bridged_upload(data, digest, config=_config(path))
        rx, _tx, file_bytes = _data_phases(path)
        _check("CIPSEND payload", rx, digest)
        socat = cipsend_throughput.socat_upload(data, digest)
        at_off = at_latency.bridged_round_trips(at_count)
        at_on = at_latency.bridged_round_trips(at_count, config=_config(path))
        path.unlink()
        line_off = line_rate.one_link("bridged", line_seconds)
        digests: list[str] = []
        line_on = line_rate.one_link("bridged", line_seconds, config=_config(path), keep=digests)
        n = int(line_rate.RATE * line_seconds)
        rx, tx, _ = _data_phases(path)
        _check("passthrough uplink", rx[:n], digests[0])
        _check("passthrough downlink", tx[-n:], digests[1])
        line_socat = line_rate.one_link("socat", line_seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "off_mb_s": off["mb_s"], "on_mb_s": on["mb_s"], "socat_mb_s": socat["mb_s"],
        "off_cpu_ms_per_mb": off["cpu_s_per_mb"] * 1000,
        "on_cpu_ms_per_mb": on["cpu_s_per_mb"] * 1000,
        "socat_cpu_ms_per_mb": socat["cpu_s_per_mb"] * 1000,
        "file_bytes_per_payload_byte": file_bytes / nbytes,
        "at_off_p50_ms": at_off["p50"], "at_off_p99_ms": at_off["p99"],
        "at_on_p50_ms": at_on["p50"], "at_on_p99_ms": at_on["p99"],
        "line_off_cores": line_off["cores"], "line_on_cores": line_on["cores"],
        "line_socat_cores": line_socat["cores"],
    }


def lines(r: dict[str, float]) -> str:
    return (f"CIPSEND off {r['off_mb_s']:.2f} MB/s {r['off_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" | on {r['on_mb_s']:.2f} MB/s {r['on_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" ({r['file_bytes_per_payload_byte']:.1f} file bytes per payload byte)"
            f" | socat {r['socat_mb_s']:.2f} MB/s {r['socat_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f"\n        AT p50/p99 off {r['at_off_p50_ms']:.3f}/{r['at_off_p99_ms']:.3f} ms"
            f" | on {r['at_on_p50_ms']:.3f}/{r['at_on_p99_ms']:.3f} ms"
            f"\n        passthrough at 0.5 MB/s each way: off {r['line_off_cores']:.3f} cores"
            f" | on {r['line_on_cores']:.3f} | socat {r['line_socat_cores']:.3f}"
            "  (hashes match, in the sinks and in the transcript)")


def main() -> None:
    r = run(16 * 1024 * 1024, 2000, 10.0)
    print(lines(r))
    print(f"(MB = {MB} bytes)")


if __name__ == "__main__":
    main()
