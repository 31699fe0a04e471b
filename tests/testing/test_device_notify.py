"""bridged.testing's readiness socket: only the device's own READY=1 counts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from bridged.testing import Device, DeviceOptions

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
# Sends READY=1 to the socket $NOTIFY_SOCKET names (argv[1]) as systemd's sd_notify would.
SPOOF = """
import socket, sys
name = sys.argv[1]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.sendto(b"READY=1", "\\0" + name[1:] if name.startswith("@") else name)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_another_user_cannot_make_a_starting_device_ready(tmp_path):
    """While a device boots (boot_ms 3 s), nobody sends READY=1 to its notify socket: refused,
    and start() still waits for the device's own READY=1, after the boot."""
    if subprocess.run([*NOBODY, sys.executable, "-c", ""], capture_output=True, timeout=30).returncode:
        pytest.skip(f"nobody cannot run {sys.executable} (its files are private to root)")
    device = Device(tmp_path / "d", DeviceOptions(profile="fast", config={"firmware": {"boot_ms": 3000}}))
    started = threading.Thread(target=device.start, daemon=True)
    began = time.monotonic()
    started.start()
    try:
        deadline = time.monotonic() + 20
        name = None
        while name is None:
            assert time.monotonic() < deadline, "the device never started"
            try:
                with open(f"/proc/{device.pid}/environ", "rb") as file:
                    env = dict(v.split("=", 1) for v in file.read().decode().split("\0") if "=" in v)
                name = env.get("NOTIFY_SOCKET")
            except (TypeError, OSError):
                time.sleep(0.02)  # not spawned yet
        spoof = subprocess.run([*NOBODY, sys.executable, "-c", SPOOF, name], capture_output=True, text=True, timeout=30)
        assert spoof.returncode != 0 and "PermissionError" in spoof.stderr, (name, spoof)
        started.join(30)
        assert device.ready and time.monotonic() - began >= 3.0
    finally:
        started.join(30)
        assert device.stop() == 0, device.log_tail()
