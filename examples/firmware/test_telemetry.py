"""A host-firmware test on bridged.testing: the firmware uploads telemetry
through an emulated ESP32, and the Wi-Fi drops in the middle of the upload.

    pytest examples/firmware          # bridged installed: the plugin loads itself

The firmware here is examples/firmware/telemetry_host.py; a real build takes
the pty path (``bridged_device.port``) the same way.
"""

from __future__ import annotations

import json
import re
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

FIRMWARE = [sys.executable, str(Path(__file__).with_name("telemetry_host.py"))]
RECORDS = 40


@pytest.fixture
def backend():
    """A TCP server on 127.0.0.1 keeping every line it receives."""
    lines: list[bytes] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            lines.extend(self.rfile)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], lines
    server.shutdown()
    server.server_close()


@pytest.mark.bridged(profile="esp32")
def test_telemetry_survives_a_wifi_drop_mid_upload(bridged_device, backend):
    """Every record reaches the backend although the Wi-Fi dropped mid-upload."""
    port, received = backend
    firmware = subprocess.Popen([*FIRMWARE, str(bridged_device.port), "127.0.0.1", str(port), str(RECORDS)],
                                stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(10):  # mid-upload: the 10th record is on its way
            bridged_device.wait_for_transcript(r"^command name=AT\+CIPSEND ", timeout=30)
        bridged_device.fault("wifi_drop", duration_ms=1000)
        assert firmware.wait(timeout=90) == 0
    finally:
        if firmware.poll() is None:
            firmware.kill()
            firmware.wait()
    assert {json.loads(line)["seq"] for line in received} == set(range(RECORDS))
    assert bridged_device.wait_for_transcript(r"^fault\b.*wifi_drop", timeout=5)
    summary = firmware.stdout.read()
    assert re.search(r"sent, [1-9]\d* sent again", summary), summary  # the drop did hit the upload
