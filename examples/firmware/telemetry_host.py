"""A stand-in for host firmware: joins the Wi-Fi, connects to a backend and
uploads telemetry over AT, recovering from a lost link the way firmware must.

    python telemetry_host.py PORT HOST TCP_PORT COUNT

PORT is the serial line (bridged's pty). Each record is one JSON line
(``{"seq": N, ...}``) sent with AT+CIPSEND; a record that does not get SEND OK
is sent again after the link is back (so the backend may see one twice).
Exit status 0 once every record got SEND OK, 1 if the device stopped answering
or the link could not be brought back within a minute.

Real firmware (an lwESP POSIX build, a Zephyr native_sim build...) takes the
pty path where this takes PORT.
"""

from __future__ import annotations

import json
import sys
import time

from bridged.atclient import AtClient, AtTimeout

SSID, PASSWORD = "bridged", "password"
RECOVERY_TIMEOUT = 60.0


def link_up(at: AtClient, host: str, port: int) -> None:
    """Join (again) and connect (again) until both hold, within RECOVERY_TIMEOUT.

    Raises:
        AtTimeout: the link could not be brought back in time.
    """
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while time.monotonic() < deadline:
        if b'+CWJAP:"' not in at.command("AT+CWJAP?").text:
            at.command(f'AT+CWJAP="{SSID}","{PASSWORD}"', timeout=20)
        answer = at.command(f'AT+CIPSTART="TCP","{host}",{port}', timeout=20)
        if answer.ok or b"ALREADY CONNECTED" in answer.text:
            return
        time.sleep(0.2)
    raise AtTimeout(f"no link to {host}:{port} within {RECOVERY_TIMEOUT} s")


def main(argv: list[str]) -> int:
    serial, host, port, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    with AtClient(serial, timeout=10) as at:
        at.expect(b"\r\nready\r\n", 30)
        at.command("ATE0")
        resent = 0
        try:
            link_up(at, host, port)
            for seq in range(count):
                record = json.dumps({"seq": seq, "temp_c": 21.5 + seq % 3, "uptime_s": seq}).encode() + b"\n"
                while not at.send(record, timeout=10).ok:  # SEND FAIL or ERROR: the link is gone
                    resent += 1
                    link_up(at, host, port)
                time.sleep(0.05)  # the sensor's period
        except (AtTimeout, ConnectionError) as exc:
            print(f"telemetry: {exc}", file=sys.stderr)
            return 1
    print(f"telemetry: {count} records sent, {resent} sent again")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
