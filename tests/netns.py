"""Test hosts in network namespaces: two namespaces joined by a veth pair.

Only addresses inside the namespaces this module creates are ever used, so
broadcast and multicast tests never leave the machine.
"""

from __future__ import annotations

import functools
import os
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Pair", "Side", "veth_pair", "side_host", "netns_available"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@functools.cache
def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot.

    Asked once per process: six modules' skip marks ask it twice each at collection, and each
    answer was an `ip netns add` and `del` (about 0.35 s of every xdist worker's start)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"brp{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"ip netns add failed: {exc}"
    _ip("netns", "del", name)
    return None


@dataclass(frozen=True)
class Pair:
    a: str  # namespace names
    b: str
    a_if: str  # interface names inside them
    b_if: str
    a_ip: str  # IPv4 addresses on 10.200.N.0/24 inside the namespaces
    b_ip: str
    a_ip6: str
    b_ip6: str

    def exec_a(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.a)

    def exec_b(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.b)


@contextmanager
def veth_pair():
    """Namespaces A and B, 10.200.x.1/24 and .2/24 (fd00:200::1, ::2), with routes for multicast."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"bra{tag}", f"brb{tag}"
    subnet = int(tag[:2], 16) % 200 + 20
    pair = Pair(a, b, "veth0", "veth0", f"10.200.{subnet}.1", f"10.200.{subnet}.2",
                f"fd00:200:{subnet}::1", f"fd00:200:{subnet}::2")
    _ip("netns", "add", a)
    try:
        _ip("netns", "add", b)
        try:
            _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
            _ip("link", "set", f"va{tag}", "netns", a)
            _ip("link", "set", f"vb{tag}", "netns", b)
            for ns, old, ip4, ip6 in ((a, f"va{tag}", pair.a_ip, pair.a_ip6), (b, f"vb{tag}", pair.b_ip, pair.b_ip6)):
                _ip("-n", ns, "link", "set", old, "name", "veth0")
                _ip("-n", ns, "addr", "add", f"{ip4}/24", "broadcast", "+", "dev", "veth0")
                _ip("-n", ns, "-6", "addr", "add", f"{ip6}/64", "dev", "veth0", "nodad")
                _ip("-n", ns, "link", "set", "veth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "veth0")
                _ip("-n", ns, "route", "add", "255.255.255.255/32", "dev", "veth0")
            yield pair
        finally:
            _ip("netns", "del", b)
    finally:
        _ip("netns", "del", a)


@dataclass(frozen=True)
class Side:
    ns: str  # namespace C, joined to A's second interface
    a_if: str  # that interface's name inside A
    a_ip: str  # its address in A, on 10.201.N.0/24
    ip: str  # C's address

    def exec(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns)


@contextmanager
def side_host(pair: Pair):
    """Namespace C on a second veth of A (veth1 there): a segment that is not A's station's."""
    tag = uuid.uuid4().hex[:6]
    ns = f"brc{tag}"
    subnet = int(tag[:2], 16) % 200 + 20
    side = Side(ns, "veth1", f"10.201.{subnet}.1", f"10.201.{subnet}.2")
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", f"vc{tag}", "type", "veth", "peer", "name", f"vd{tag}")
        _ip("link", "set", f"vc{tag}", "netns", pair.a)
        _ip("link", "set", f"vd{tag}", "netns", ns)
        for where, old, name, ip4 in ((pair.a, f"vc{tag}", "veth1", side.a_ip), (ns, f"vd{tag}", "veth0", side.ip)):
            _ip("-n", where, "link", "set", old, "name", name)
            _ip("-n", where, "addr", "add", f"{ip4}/24", "broadcast", "+", "dev", name)
            _ip("-n", where, "link", "set", name, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "veth0")
        yield side
    finally:
        _ip("netns", "del", ns)  # takes its veth end, and so the pair, with it
