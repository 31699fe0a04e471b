"""What the AT transcript costs: AT+CIPSEND=8192 upload and AT round trips
with ``[log] transcript`` off and on (to a file), beside socat, in one run.

The upload is cipsend_throughput's (random bytes, every reply checked, the
sink's sha256 compared); with the transcript on, the file is read back after
the daemon stopped and the RX bytes between each ``data_start`` and
``data_end`` mark must hash to the payload too, so the figure is that of a
transcript that really holds every byte.  The round trips are at_latency's.
The transcript goes to a temporary directory (1 GiB cap, one file), never
into the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from . import at_latency, cipsend_throughput
from .common import MB, HashMismatch

__all__ = ["run"]


def _config(path: Path) -> str:
    return (f'[log]\ntranscript = true\ntranscript_path = "{path}"\n'
            "transcript_max_bytes = 1073741824\ntranscript_files = 1\n")


def _check_transcript(path: Path, digest: str, nbytes: int) -> int:
    """sha256 of the payload bytes the transcript recorded; returns the file's size."""
    from bridged.uart.transcript import Direction, MarkKind, parse_line

    sha = hashlib.sha256()
    inside, count = False, 0
    with open(path) as f:
        for text in f:
            line = parse_line(text)
            if line.mark is MarkKind.DATA_START:
                inside = True
            elif line.mark is MarkKind.DATA_END:
                inside = False
            elif inside and line.direction is Direction.RX:
                sha.update(line.data)
                count += len(line.data)
    if count != nbytes or sha.hexdigest() != digest:
        raise HashMismatch(f"transcript: {count} payload bytes sha256 {sha.hexdigest()}; "
                           f"sent {nbytes} bytes sha256 {digest}")
    return path.stat().st_size


def run(nbytes: int, at_count: int) -> dict[str, float]:
    data, digest = cipsend_throughput.make_payload(nbytes)
    tmp = Path(tempfile.mkdtemp(prefix="bench-transcript-"))
    try:
        path = tmp / "transcript"
        off = cipsend_throughput.bridged_upload(data, digest)
        on = cipsend_throughput.bridged_upload(data, digest, config=_config(path))
        file_bytes = _check_transcript(path, digest, nbytes)
        os.unlink(path)
        socat = cipsend_throughput.socat_upload(data, digest)
        at_off = at_latency.bridged_round_trips(at_count)
        at_on = at_latency.bridged_round_trips(at_count, config=_config(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "off_mb_s": off["mb_s"],
        "on_mb_s": on["mb_s"],
        "socat_mb_s": socat["mb_s"],
        "off_cpu_ms_per_mb": off["cpu_s_per_mb"] * 1000,
        "on_cpu_ms_per_mb": on["cpu_s_per_mb"] * 1000,
        "socat_cpu_ms_per_mb": socat["cpu_s_per_mb"] * 1000,
        "file_bytes_per_payload_byte": file_bytes / nbytes,
        "at_off_p50_ms": at_off["p50"],
        "at_off_p99_ms": at_off["p99"],
        "at_on_p50_ms": at_on["p50"],
        "at_on_p99_ms": at_on["p99"],
    }


def lines(r: dict[str, float]) -> str:
    return (f"CIPSEND off {r['off_mb_s']:.2f} MB/s {r['off_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" | on {r['on_mb_s']:.2f} MB/s {r['on_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" ({r['file_bytes_per_payload_byte']:.1f} file bytes per payload byte)"
            f" | socat {r['socat_mb_s']:.2f} MB/s {r['socat_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f"\n        AT p50/p99 off {r['at_off_p50_ms']:.3f}/{r['at_off_p99_ms']:.3f} ms"
            f" | on {r['at_on_p50_ms']:.3f}/{r['at_on_p99_ms']:.3f} ms"
            "  (hashes match, in the sink and in the transcript)")


def main() -> None:
    r = run(16 * 1024 * 1024, 2000)
    print(lines(r))
    print(f"(MB = {MB} bytes)")


if __name__ == "__main__":
    main()
