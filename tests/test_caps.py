"""bridged.caps in a process of its own: what `limit` leaves in each capability set (as
/proc/self/status shows them), for root and for a service user with ambient capabilities, and
which processes need CAP_NET_BIND_SERVICE for the port sysctl in force."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bridged.caps import Cap, front_keeps, worker_keeps

BIND, RAW, SETPCAP = 1 << 10, 1 << 13, 1 << 8
# Runs limit(argv[1] as capability numbers, effective=argv[2], hand_down=argv[3]) and prints the sets.
RUNNER = """
import json, sys
from bridged import caps
kept = caps.limit([caps.Cap(int(c)) for c in sys.argv[1].split(",") if c], sys.argv[2] == "1", sys.argv[3] == "1")
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"kept": sorted(kept), **{k: int(status[k], 16) for k in status if k.startswith("Cap")}}))
"""
SERVICE = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
           "--inh-caps=-all,+net_bind_service,+net_raw", "--ambient-caps=+net_bind_service,+net_raw",
           "--bounding-set=-all,+net_bind_service,+net_raw", "--")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv")


def _limit(wrap: tuple[str, ...], keep: str, effective: bool = True, hand_down: bool = False) -> dict:
    if wrap and subprocess.run([*wrap, sys.executable, "-c", "import bridged.caps"], capture_output=True,
                               timeout=30, cwd=os.getcwd()).returncode:
        pytest.skip(f"the service user cannot run {sys.executable} (its files are private to root)")
    result = subprocess.run([*wrap, sys.executable, "-c", RUNNER, keep, str(int(effective)), str(int(hand_down))],
                            capture_output=True, text=True, timeout=30, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # after structlog's default output


@needs_root
def test_root_keeps_only_what_it_names_bounding_set_included():
    """As root: effective, permitted and bounding become the named capabilities; nothing inheritable
    or ambient; with hand_down CAP_SETPCAP stays permitted (not effective) for the children."""
    sets = _limit((), f"{Cap.NET_BIND_SERVICE:d}")
    assert (sets["CapEff"], sets["CapPrm"], sets["CapBnd"], sets["CapInh"], sets["CapAmb"]) == (BIND, BIND, BIND, 0, 0)
    sets = _limit((), f"{Cap.NET_BIND_SERVICE:d},{Cap.NET_RAW:d}", effective=False, hand_down=True)
    assert (sets["CapEff"], sets["CapPrm"], sets["CapBnd"]) == (0, BIND | RAW | SETPCAP, BIND | RAW | SETPCAP)


@needs_root
def test_service_user_loses_its_ambient_capabilities():
    """As the unit's user with ambient capabilities: the ambient set is emptied and only the named
    capability stays; one it never had is not gained; the bounding set, not its to change, stays."""
    sets = _limit(SERVICE, f"{Cap.NET_RAW:d}")
    assert sets["kept"] == [Cap.NET_RAW]
    assert (sets["CapEff"], sets["CapPrm"], sets["CapInh"], sets["CapAmb"]) == (RAW, RAW, 0, 0)
    assert sets["CapBnd"] == BIND | RAW
    sets = _limit(SERVICE, "")
    assert (sets["CapEff"], sets["CapPrm"], sets["CapAmb"]) == (0, 0, 0)
    no_caps = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
    assert _limit(no_caps, f"{Cap.NET_RAW:d}")["kept"] == []


def test_who_needs_cap_net_bind_service():
    """Link workers only with a local port below 1024 allowed; the front for AT+CIPSERVER; CAP_NET_RAW
    only in a front without ping sockets."""
    assert worker_keeps([(1024, 65535)]) == frozenset()
    assert worker_keeps([(1023, 1023), (2000, 3000)]) == {Cap.NET_BIND_SERVICE}
    assert worker_keeps([(1, 65535)]) == {Cap.NET_BIND_SERVICE}
    assert front_keeps(True) == {Cap.NET_BIND_SERVICE}
    assert front_keeps(False) == {Cap.NET_BIND_SERVICE, Cap.NET_RAW}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_no_low_ports_no_cap_net_bind_service():
    """In a network namespace whose net.ipv4.ip_unprivileged_port_start is 0 nobody needs it."""
    code = ("from bridged.caps import front_keeps, worker_keeps\n"
            "open('/proc/sys/net/ipv4/ip_unprivileged_port_start', 'w').write('0')\n"
            "print(sorted(front_keeps(True)), sorted(worker_keeps([(1, 65535)])), sorted(front_keeps(False)))")
    result = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "[] [] [<Cap.NET_RAW: 13>]"
