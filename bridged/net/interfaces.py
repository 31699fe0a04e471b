"""Facts about host network interfaces, phrased the way ESP-AT needs them.

bridged pretends to be an ESP32 whose Wi-Fi station is really a Linux
interface.  Answers to AT+CIPSTA?, AT+CIPSTAMAC? and AT+CIFSR are built from
what this module reports about that interface.  Those answers must look
plausible on *any* host -- a laptop, a server, or a container that has
nothing but ``lo`` -- so this module:

* never raises for a missing or odd interface (``exists=False`` instead);
* always produces a 6-byte MAC for an existing interface: the real hardware
  address when there is one, otherwise (``lo``, tun, sit, ...) a stable,
  locally administered MAC derived from the machine id and interface name;
* finds the default-route interface from ``/proc`` directly, without
  running ``ip`` or sending any traffic.

Everything is read fresh on each call; nothing is cached.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import ifaddr

__all__ = [
    "InterfaceInfo",
    "default_route_interface",
    "interface_info",
    "mac_plus_one",
    "own_address",
    "station_interface",
]

_PROC_ROUTE = Path("/proc/net/route")
_PROC_IPV6_ROUTE = Path("/proc/net/ipv6_route")
_SYS_NET = Path("/sys/class/net")
_MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))

# Route flags from <linux/route.h>.
_RTF_UP = 0x0001
_RTF_GATEWAY = 0x0002
_RTF_REJECT = 0x0200

# Interface flags from <linux/if.h>, as /sys/class/net/<name>/flags shows them.
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _ipv4_routes() -> list[tuple[str, int, int, int, int, int]]:
    """Usable rows of /proc/net/route as (iface, dest, gateway, flags, mask, metric).

    Addresses stay as the kernel prints them: host-byte-order integers.
    """
    text = _read_text(_PROC_ROUTE)
    if not text:
        return []
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            iface = fields[0]
            dest, gateway, flags = (int(f, 16) for f in fields[1:4])
            metric = int(fields[6])
            mask = int(fields[7], 16)
        except ValueError:
            continue
        if flags & _RTF_UP and not flags & _RTF_REJECT:
            rows.append((iface, dest, gateway, flags, mask, metric))
    return rows


def _ipv4_default_routes() -> list[tuple[str, int, int, int, int, int]]:
    """IPv4 default routes, lowest metric first (stable for ties)."""
    defaults = [r for r in _ipv4_routes() if r[1] == 0 and r[4] == 0]
    return sorted(defaults, key=lambda r: r[5])


def _ipv6_default_interface() -> str | None:
    """Interface of the lowest-metric usable ::/0 route, if any."""
    text = _read_text(_PROC_IPV6_ROUTE)
    if not text:
        return None
    best: tuple[int, str] | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            dest, dest_len = int(fields[0], 16), int(fields[1], 16)
            metric, flags = int(fields[5], 16), int(fields[8], 16)
        except ValueError:
            continue
        # The kernel keeps an unreachable ::/0 on lo (RTF_REJECT, not RTF_UP).
        if dest or dest_len or not flags & _RTF_UP or flags & _RTF_REJECT:
            continue
        if best is None or metric < best[0]:
            best = (metric, fields[9])
    return best[1] if best else None


def default_route_interface() -> str | None:
    """Interface holding the default route: IPv4 first, then IPv6, else None."""
    defaults = _ipv4_default_routes()
    if defaults:
        return defaults[0][0]
    return _ipv6_default_interface()


def station_interface(configured: str) -> str:
    """Host interface that plays the emulated Wi-Fi station.

    The configured name wins when non-empty; otherwise the default-route
    interface; otherwise ``lo`` (always present, even in bare containers).
    """
    if configured:
        return configured
    return default_route_interface() or "lo"


def _is_mac(text: str) -> bool:
    """True for six colon-separated two-digit hex bytes."""
    parts = text.split(":")
    return len(parts) == 6 and all(
        len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    )


def mac_plus_one(mac: str) -> str:
    """Return ``mac`` with its last byte incremented, wrapping ff -> 00.

    An ESP32's softAP MAC is its station MAC plus one in the last byte.
    """
    if not _is_mac(mac):
        raise ValueError(f"not a MAC address: {mac!r}")
    parts = mac.lower().split(":")
    last = (int(parts[5], 16) + 1) & 0xFF
    return ":".join(parts[:5] + [f"{last:02x}"])


def _machine_id() -> str:
    for path in _MACHINE_ID_FILES:
        text = _read_text(path)
        if text and text.strip():
            return text.strip()
    return ""


def _derived_mac(name: str) -> str:
    """Stable locally administered unicast MAC for an interface without one."""
    digest = hashlib.sha256(f"bridged\0{_machine_id()}\0{name}".encode()).digest()
    return ":".join(["02"] + [f"{b:02x}" for b in digest[:5]])


def _hardware_mac(name: str) -> str | None:
    """The interface's Ethernet-style address, or None if it has none."""
    text = _read_text(_SYS_NET / name / "address")
    if not text:
        return None
    mac = text.strip().lower()
    if not _is_mac(mac):
        return None  # e.g. sit tunnels ("00:00:00:00"), InfiniBand (20 bytes)
    if mac == "00:00:00:00:00:00":
        return None  # lo and friends report all zeros
    return mac


def _valid_name(name: str) -> bool:
    # Linux names: 1..15 bytes, no '/', no whitespace, not "." or "..".
    return (
        0 < len(name) <= 15
        and name not in (".", "..")
        and "/" not in name
        and not any(c.isspace() for c in name)
    )


def _ipv4_gateway(name: str) -> str | None:
    for iface, _dest, gateway, flags, _mask, _metric in _ipv4_default_routes():
        if iface == name and flags & _RTF_GATEWAY and gateway:
            return socket.inet_ntoa(struct.pack("=I", gateway))
    return None


@dataclass(frozen=True)
class InterfaceInfo:
    """Snapshot of one host interface; all-empty with ``exists=False`` if absent."""

    name: str
    exists: bool = False
    is_up: bool = False
    mac: str | None = None
    ipv4: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    ipv6_ll: tuple[str, ...] = ()
    ipv6_gl: tuple[str, ...] = ()

    @property
    def has_ipv4(self) -> bool:
        return self.ipv4 is not None

    @property
    def connected(self) -> bool:
        return self.is_up and self.ipv4 is not None


def _interface_flags(name: str) -> int | None:
    """The interface's IFF_* flags from sysfs, or None when it does not exist."""
    text = _read_text(_SYS_NET / name / "flags")
    if text is None:
        return None
    try:
        return int(text.strip(), 16)
    except ValueError:
        return None


def _addresses(name: str) -> list[ifaddr.IP]:
    """The interface's addresses in getifaddrs() order (ifaddr: no compiled
    dependency, so it installs on 32-bit ARM, and zeroconf brings it anyway)."""
    try:
        adapters = ifaddr.get_adapters()
    except OSError:
        return []
    return [ip for a in adapters if a.name == name for ip in a.ips]


def interface_info(name: str) -> InterfaceInfo:
    """Describe host interface ``name``; never raises for a missing one."""
    if not _valid_name(name):
        return InterfaceInfo(name=name)
    flags = _interface_flags(name)
    if flags is None:
        return InterfaceInfo(name=name)
    operstate = (_read_text(_SYS_NET / name / "operstate") or "").strip()
    is_up = bool(flags & _IFF_UP) and (
        bool(flags & _IFF_LOOPBACK) or operstate in ("up", "unknown")
    )

    ipv4 = netmask = None
    ll: list[str] = []
    gl: list[str] = []
    for ip in _addresses(name):
        if ip.is_IPv4 and ipv4 is None:
            ipv4 = ip.ip
            netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{ip.network_prefix}").netmask)
        elif ip.is_IPv6:
            try:
                ip6 = ipaddress.IPv6Address(ip.ip[0].split("%", 1)[0])
            except ValueError:
                continue
            if ip6.is_link_local:
                ll.append(ip6.compressed)
            elif not (ip6.is_loopback or ip6.is_multicast or ip6.is_unspecified):
                gl.append(ip6.compressed)

    return InterfaceInfo(
        name=name,
        exists=True,
        is_up=is_up,
        mac=_hardware_mac(name) or _derived_mac(name),
        ipv4=ipv4,
        netmask=netmask,
        gateway=_ipv4_gateway(name),
        ipv6_ll=tuple(ll),
        ipv6_gl=tuple(gl),
    )


def own_address(name: str, v6: bool) -> str:
    """The address a link or server on interface ``name`` binds instead of the wildcard.

    Its IPv4 address, or its first global IPv6 address (::1 on a loopback
    interface, which has no other); "" (the wildcard) when it has none.
    """
    info = interface_info(name)
    if not v6:
        return info.ipv4 or ""
    if info.ipv6_gl:
        return info.ipv6_gl[0]
    flags = _interface_flags(name) if info.exists else None
    return "::1" if flags is not None and flags & _IFF_LOOPBACK else ""
