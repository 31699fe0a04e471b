"""Tests for bridged.net.interfaces against the real host (and a private netns).

Nothing here sends traffic: the namespace test only configures addresses and
routes on a dummy interface and reads them back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import bridged
from bridged.net import interfaces
from bridged.net.interfaces import (
    InterfaceInfo,
    default_route_interface,
    interface_info,
    mac_plus_one,
    station_interface,
)

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
REPO_ROOT = Path(bridged.__file__).resolve().parent.parent
IP = shutil.which("ip")


# --- loopback and missing interfaces -----------------------------------------


def test_lo_exists_and_is_up():
    info = interface_info("lo")
    assert info.exists
    assert info.is_up
    assert info.ipv4 == "127.0.0.1"
    assert info.netmask == "255.0.0.0"
    assert info.has_ipv4 and info.connected
    assert "::1" not in info.ipv6_ll
    assert "::1" not in info.ipv6_gl
    assert info.gateway is None


def test_lo_gets_stable_locally_administered_mac():
    mac = interface_info("lo").mac
    assert mac is not None and MAC_RE.match(mac)
    assert mac != "00:00:00:00:00:00"
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert interface_info("lo").mac == mac


@pytest.mark.parametrize("name", ["bridgednope0", "", "../lo", "a" * 40, "bad name"])
def test_missing_interface(name):
    info = interface_info(name)
    assert info == InterfaceInfo(name=name)
    assert not info.exists and not info.is_up
    assert info.mac is info.ipv4 is info.netmask is info.gateway is None
    assert info.ipv6_ll == () and info.ipv6_gl == ()
    assert not info.has_ipv4 and not info.connected


def test_every_host_interface_has_plausible_mac():
    for name in os.listdir("/sys/class/net"):
        info = interface_info(name)
        assert info.exists, name
        assert info.mac is not None and MAC_RE.match(info.mac), (name, info.mac)
        for addr in info.ipv6_ll:
            assert addr.startswith("fe") and "%" not in addr


# --- default route ------------------------------------------------------------


def _ip_default(family: str) -> str | None:
    """Lowest-metric default route device according to `ip route show default`."""
    out = subprocess.run(
        [IP, family, "route", "show", "default"],
        capture_output=True, text=True, check=True,
    ).stdout
    best: tuple[int, str] | None = None
    for line in out.splitlines():
        words = line.split()
        if not words or words[0] != "default" or "dev" not in words:
            continue
        dev = words[words.index("dev") + 1]
        metric = int(words[words.index("metric") + 1]) if "metric" in words else 0
        if best is None or metric < best[0]:
            best = (metric, dev)
    return best[1] if best else None


@pytest.mark.skipif(IP is None, reason="iproute2 `ip` command not installed")
def test_default_route_interface_matches_ip_command():
    expected = _ip_default("-4") or _ip_default("-6")
    assert default_route_interface() == expected


def test_default_route_parsing_prefers_lowest_metric(tmp_path, monkeypatch):
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth1\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth9\t00000000\t00000000\t0201\t0\t0\t1\t00000000\t0\t0\t0\n"  # reject
        "eth1\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
    )
    monkeypatch.setattr(interfaces, "_PROC_ROUTE", route)
    assert default_route_interface() == "eth1"
    assert interfaces._ipv4_gateway("eth1") == "10.0.0.1"
    assert interfaces._ipv4_gateway("wlan0") == "192.168.1.1"
    assert interfaces._ipv4_gateway("eth9") is None


def test_default_route_falls_back_to_ipv6(tmp_path, monkeypatch):
    empty = tmp_path / "route"
    empty.write_text("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n")
    v6 = tmp_path / "ipv6_route"
    z = "0" * 32
    v6.write_text(
        f"{z} 00 {z} 00 {'fd00' + '0' * 27 + '1'} 00000400 00000002 00000000 00000003     eth0\n"
        f"{z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200       lo\n"
    )
    monkeypatch.setattr(interfaces, "_PROC_ROUTE", empty)
    monkeypatch.setattr(interfaces, "_PROC_IPV6_ROUTE", v6)
    assert default_route_interface() == "eth0"
    monkeypatch.setattr(interfaces, "_PROC_IPV6_ROUTE", tmp_path / "absent")
    assert default_route_interface() is None


# --- station_interface / mac_plus_one -----------------------------------------


def test_station_interface_fallbacks(monkeypatch):
    assert station_interface("wlan7") == "wlan7"
    monkeypatch.setattr(interfaces, "default_route_interface", lambda: "eth3")
    assert station_interface("") == "eth3"
    monkeypatch.setattr(interfaces, "default_route_interface", lambda: None)
    assert station_interface("") == "lo"


@pytest.mark.parametrize(
    ("mac", "expected"),
    [
        ("24:0a:c4:00:00:01", "24:0a:c4:00:00:02"),
        ("24:0A:C4:00:00:0F", "24:0a:c4:00:00:10"),
        ("02:00:00:00:00:fe", "02:00:00:00:00:ff"),
        ("02:00:00:00:01:ff", "02:00:00:00:01:00"),  # wraps within the byte
    ],
)
def test_mac_plus_one(mac, expected):
    assert mac_plus_one(mac) == expected


@pytest.mark.parametrize("bad", ["", "00:11:22:33:44", "0:1:2:3:4:5", "zz:00:00:00:00:00"])
def test_mac_plus_one_rejects_garbage(bad):
    with pytest.raises(ValueError):
        mac_plus_one(bad)


# --- a dummy interface in a private network namespace -------------------------

_NS_PROBE = textwrap.dedent(
    """
    import dataclasses, json
    from bridged.net.interfaces import default_route_interface, interface_info
    print(json.dumps({
        "default": default_route_interface(),
        "d0": dataclasses.asdict(interface_info("d0")),
        "lo": dataclasses.asdict(interface_info("lo")),
    }))
    """
)


@pytest.fixture
def netns():
    if IP is None:
        pytest.skip("iproute2 `ip` command not installed")
    name = f"bridged-test-{uuid.uuid4().hex[:8]}"
    res = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root/CAP_SYS_ADMIN): "
                    f"{res.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run([IP, "netns", "delete", name], capture_output=True)


def _ns(ns: str, *args: str) -> None:
    subprocess.run([IP, "-n", ns, *args], check=True, capture_output=True, text=True)


def _probe(ns: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p
    )
    out = subprocess.run(
        [IP, "netns", "exec", ns, sys.executable, "-c", _NS_PROBE],
        check=True, capture_output=True, text=True, env=env, timeout=60,
    ).stdout
    return json.loads(out)


def _add_test_link(ns: str) -> str:
    """Create d0 in ns: a dummy if the driver exists, else a veth pair (d0, d0p)."""
    errors = []
    for kind in (["type", "dummy"], ["type", "veth", "peer", "name", "d0p"]):
        res = subprocess.run([IP, "-n", ns, "link", "add", "d0", *kind],
                             capture_output=True, text=True)
        if res.returncode == 0:
            return kind[1]
        errors.append(f"{kind[1]}: {res.stderr.strip()}")
    pytest.skip("cannot create a dummy or veth interface: " + "; ".join(errors))


def test_dummy_interface_in_netns(netns):
    kind = _add_test_link(netns)
    if kind == "veth":
        _ns(netns, "link", "set", "d0p", "up")
    _ns(netns, "link", "set", "d0", "address", "02:12:34:56:78:9a")
    _ns(netns, "link", "set", "lo", "up")
    _ns(netns, "link", "set", "d0", "up")
    _ns(netns, "addr", "add", "10.77.5.2/24", "dev", "d0")
    _ns(netns, "route", "add", "default", "via", "10.77.5.1", "dev", "d0")
    _ns(netns, "-6", "addr", "add", "2001:DB8:0:7::2/64", "dev", "d0", "nodad")
    _ns(netns, "-6", "addr", "add", "fd12:3456::2/64", "dev", "d0", "nodad")
    _ns(netns, "-6", "addr", "add", "fe80::1234/64", "dev", "d0", "nodad")
    _ns(netns, "-6", "route", "add", "default", "via", "2001:db8:0:7::1", "dev", "d0")

    seen = _probe(netns)
    d0 = seen["d0"]
    assert seen["default"] == "d0"
    assert d0["exists"] and d0["is_up"]
    assert d0["mac"] == "02:12:34:56:78:9a"
    assert d0["ipv4"] == "10.77.5.2"
    assert d0["netmask"] == "255.255.255.0"
    assert d0["gateway"] == "10.77.5.1"
    assert set(d0["ipv6_gl"]) == {"2001:db8:0:7::2", "fd12:3456::2"}
    assert "fe80::1234" in d0["ipv6_ll"]
    assert all(a.startswith("fe80:") for a in d0["ipv6_ll"])
    assert seen["lo"]["ipv4"] == "127.0.0.1" and seen["lo"]["gateway"] is None

    # Without the IPv4 default route, the IPv6 one decides; no IPv4 gateway.
    _ns(netns, "route", "del", "default")
    seen = _probe(netns)
    assert seen["default"] == "d0"
    assert seen["d0"]["gateway"] is None

    if kind == "veth":
        # IFF_UP but the carrier is gone (operstate lowerlayerdown): not up.
        _ns(netns, "link", "set", "d0p", "down")
        seen = _probe(netns)
        assert seen["d0"]["exists"] and not seen["d0"]["is_up"]
        _ns(netns, "link", "set", "d0p", "up")

    # Administratively down: exists, not up, not connected.
    _ns(netns, "link", "set", "d0", "down")
    seen = _probe(netns)
    assert seen["d0"]["exists"] and not seen["d0"]["is_up"]
    assert seen["default"] is None
