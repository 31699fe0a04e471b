"""The options of `bridged fleet` that no other test made do something:
--concurrency, --baud, --start-timeout and `fleet status --probe --within`."""

from __future__ import annotations

from tests.harness import Host
from tests.integration.fleetrun import START_TIMEOUT


def test_concurrency_baud_and_probe_within(fleet_of):
    """--concurrency 1 starts the second device only once the first is ready; --baud is
    each device's speed (AT+UART_CUR?); --probe --within fails a bound no AT round trip meets."""
    fleet = fleet_of(2, "--profile", "fleet", "--concurrency", "1", "--baud", "921600",
                     config="[firmware]\nboot_ms = 300\n")
    fleet.wait_event("fleet_ready")
    order = [(e["event"], e["index"]) for e in fleet.events() if e.get("event") in ("device_started", "device_ready")]
    assert order == [("device_started", 0), ("device_ready", 0), ("device_started", 1), ("device_ready", 1)], order
    for i in range(2):
        host = Host(str(fleet.dir / f"ttyESP{i}"))
        host.expect(b"\r\nready\r\n")
        assert host.command(b"AT+UART_CUR?").endswith(b"+UART_CUR:921600,8,1,0,1\r\n\r\nOK\r\n")
        host.close()
    assert fleet.status("--timeout", "5", "--probe", "--within", "60000", timeout=60).returncode == 0
    tight = fleet.status("--timeout", "5", "--probe", "--within", "0.01", timeout=60)
    assert tight.returncode == 1, tight.stdout + tight.stderr
    assert fleet.stop(timeout=30) == 0, fleet.out()[-3000:]


def test_start_timeout_kills_a_device_not_ready_in_time(fleet_of):
    """--start-timeout: a device not ready within it (a 5 s boot, a 1 s bound) is logged and killed."""
    fleet = fleet_of(1, "--profile", "fleet", "--start-timeout", "1", config="[firmware]\nboot_ms = 5000\n")
    event = fleet.wait_event("device_start_timeout", timeout=START_TIMEOUT)
    assert (event["index"], event["seconds"]) == (0, 1.0)
    died = fleet.wait_event("device_died", timeout=10)
    assert died["index"] == 0
    fleet.stop(timeout=30)
