"""What a daemon has read from the MCU, for tests that must let a guard silence run only after it."""

from __future__ import annotations

import time

from bridged.ops.protocol import request
from tests.integration.test_status import connect, control_path

__all__ = ["ReadCount"]


class ReadCount:
    """What the daemon has read from the MCU (status uart.bytes_in), over one control connection.

    A guard silence is the MCU's: a front the loaded machine leaves unscheduled longer than the
    pause would read the bytes before it and a +++ after it as one piece (data, rightly), so the
    tests wait until the bytes before a silence are read before they let it run."""

    def __init__(self, daemon) -> None:
        self.path = control_path(daemon)
        self.sock = connect(self.path)

    def now(self) -> int:
        try:
            reply = request(self.sock, {"cmd": "status"})
        except ConnectionError:  # dropped after IDLE_TIMEOUT (10 s) without a request: again
            self.sock.close()
            self.sock = connect(self.path)
            reply = request(self.sock, {"cmd": "status"})
        return reply["status"]["uart"]["bytes_in"]

    def wait(self, total: int, timeout: float = 3.0) -> None:
        """Until ``total`` bytes were read, or ``timeout`` (bytes the session leaves in the port:
        the test goes on as it would have)."""
        deadline = time.monotonic() + timeout
        while self.now() < total and time.monotonic() < deadline:  # bounded
            time.sleep(0.002)

    def close(self) -> None:
        self.sock.close()
