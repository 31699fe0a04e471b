"""bridged.testing's readiness socket: only the device's own READY=1 counts."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from bridged.testing import Device, DeviceOptions
from tests.notify import notify, proc_environ, skip_unless_nobody_runs_python


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_another_user_cannot_make_a_starting_device_ready(tmp_path):
    """While a device boots (boot_ms 3 s), nobody sends READY=1 to its notify socket: refused,
    and start() still waits for the device's own READY=1, after the boot."""
    skip_unless_nobody_runs_python()
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
                name = proc_environ(device.pid).get("NOTIFY_SOCKET")
            except (TypeError, OSError):
                time.sleep(0.02)  # not spawned yet
        spoof = notify(name, "READY=1", as_nobody=True)
        assert spoof.returncode != 0 and "PermissionError" in spoof.stderr, (name, spoof)
        started.join(30)
        assert device.ready and time.monotonic() - began >= 3.0
    finally:
        started.join(30)
        assert device.stop() == 0, device.log_tail()
