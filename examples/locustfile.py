"""Telemetry from emulated ESP32s, one bridged per Locust user.

Each user (`bridged.locust.BridgedDevice`) boots its own device, joins the
Wi-Fi (AT+CWJAP), connects to the backend given as ``--host HOST:PORT``
(AT+CIPSTART="TCP") and sends one line of JSON telemetry with AT+CIPSEND
every ``--telemetry-interval`` seconds. Locust's statistics show each AT
command's round trip ("join", "connect", "telemetry") and every ERROR,
SEND FAIL or timeout as a failure.

    locust -f examples/locustfile.py --headless -u 20 -r 5 -t 1m --host 127.0.0.1:9000

Any TCP server reading lines will do as the backend (``socat -u
TCP-LISTEN:9000,fork,reuseaddr -``). Over many machines: the same command with
``--master`` on one and ``--worker --master-host HOST`` on the others; each
worker starts its own users' devices.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

from locust import events, task

from bridged.locust import BridgedDevice


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--telemetry-interval", type=float, default=1.0,
                        help="seconds between two telemetry messages of a device (default 1)")


def backend(host: str | None) -> tuple[str, int]:
    """HOST:PORT (or tcp://HOST:PORT) from --host."""
    if not host:
        raise ValueError("give the backend as --host HOST:PORT")
    parts = urlsplit(host if "//" in host else f"tcp://{host}")
    if not parts.hostname or not parts.port:
        raise ValueError(f"--host {host!r}: expected HOST:PORT")
    return parts.hostname, parts.port


class Sensor(BridgedDevice):
    def wait_time(self) -> float:
        options = self.environment.parsed_options
        return options.telemetry_interval if options is not None else 1.0

    def on_start(self) -> None:
        super().on_start()  # the device is up and has said "ready"
        self.seq = 0
        host, port = backend(self.host)
        self.at.command("ATE0")
        self.at.command('AT+CWJAP="bridged","password"', name="join", timeout=20)
        self.at.command(f'AT+CIPSTART="TCP","{host}",{port}', name="connect", timeout=20)

    @task
    def telemetry(self) -> None:
        self.seq += 1
        reading = {"device": id(self), "seq": self.seq, "time": round(time.time(), 3),
                   "temperature": 20 + self.seq % 7}
        self.at.send(json.dumps(reading).encode() + b"\n", name="telemetry")
