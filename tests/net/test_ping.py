"""Tests for bridged.net.ping: real ICMP echoes on loopback, under asyncio and uvloop,
through a raw socket here and through a ping (datagram) socket inside a private
network namespace whose net.ipv4.ping_group_range allows it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bridged
from bridged.net import ping
from bridged.net.ping import PingNotPermitted, SocketKind, checksum, echo

REPO_ROOT = Path(bridged.__file__).resolve().parent.parent

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                                reason="needs root, unshare and setpriv")



def test_checksum_rfc1071_example():
    """The Internet checksum of RFC 1071's worked example bytes."""
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"\x08\x00\x00\x00\x12\x34\x00\x01") == (~(0x0800 + 0x1234 + 0x0001) & 0xFFFF)


@needs_root
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_raw_socket_echo_on_loopback(run, address):
    """A raw socket gets the loopback reply (and not its own request, which it also sees)."""
    rtt, kind = run(echo(address, 1.0, SocketKind.RAW))
    assert kind is SocketKind.RAW
    assert 0 < rtt < 1.0


@needs_root
def test_concurrent_raw_echoes_each_get_their_own_reply(run):
    """Each raw socket sees every reply; matching by identifier and sequence keeps them apart."""

    async def many():
        return await asyncio.gather(*(echo("127.0.0.1", 1.0, SocketKind.RAW) for _ in range(8)))

    results = run(many())
    assert len(results) == 8 and all(0 < rtt < 1.0 for rtt, _ in results)


_IN_NAMESPACE = textwrap.dedent(
    """
    import asyncio, sys, time
    from bridged.net.ping import echo, SocketKind, PingNotPermitted, PingTimeout
    kind = None if sys.argv[2] == "auto" else SocketKind(sys.argv[2])
    start = time.monotonic()
    try:
        rtt, used = asyncio.run(echo(sys.argv[1], float(sys.argv[3]), kind))
        print("reply", used.value, rtt)
    except PingNotPermitted as exc:
        print("refused", exc)
    except PingTimeout:
        print("timeout", time.monotonic() - start)
    """
)


def _in_namespace(address: str, kind: str, *, group_range: str, net_raw: bool = True,
                  ignore_echo: bool = False, timeout: float = 1.0) -> list[str]:
    """Run one echo in a fresh network namespace (lo up) with the given ping_group_range."""
    setup = ["ip link set lo up", f"sysctl -qw net.ipv4.ping_group_range='{group_range}'"]
    if ignore_echo:
        setup.append("sysctl -qw net.ipv4.icmp_echo_ignore_all=1 net.ipv6.icmp.echo_ignore_all=1")
    drop = [] if net_raw else ["setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw"]
    script = " && ".join(setup) + ' && exec "$@"'
    command = ["unshare", "--net", "sh", "-c", script, "sh", *drop,
               sys.executable, "-c", _IN_NAMESPACE, address, kind, str(timeout)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=20,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@needs_root
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_datagram_socket_when_ping_group_range_allows(address):
    """With our gid in ping_group_range and no CAP_NET_RAW, the ping socket is used and answered."""
    words = _in_namespace(address, "auto", group_range="0 2147483647", net_raw=False)
    assert words[:2] == ["reply", "datagram"] and 0 < float(words[2]) < 1.0


@needs_root
def test_datagram_socket_is_preferred_over_raw():
    """Both allowed: the unprivileged datagram socket is the one opened."""
    words = _in_namespace("127.0.0.1", "auto", group_range="0 0")
    assert words[:2] == ["reply", "datagram"]


@needs_root
def test_raw_socket_when_ping_group_range_refuses():
    """Outside ping_group_range but with CAP_NET_RAW, the raw socket is the fallback."""
    words = _in_namespace("127.0.0.1", "auto", group_range="1 0")
    assert words[:2] == ["reply", "raw"]


@needs_root
def test_neither_allowed_names_both_fixes():
    """No ping socket and no CAP_NET_RAW: PingNotPermitted says how to allow one."""
    words = " ".join(_in_namespace("127.0.0.1", "auto", group_range="1 0", net_raw=False))
    assert words.startswith("refused")
    assert "net.ipv4.ping_group_range" in words and "CAP_NET_RAW" in words


@needs_root
@pytest.mark.parametrize("kind", ["raw", "datagram"])
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_unanswered_echo_times_out_on_time(kind, address):
    """A host that ignores echo requests gives PingTimeout after the timeout, not before, not much later."""
    words = _in_namespace(address, kind, group_range="0 0", ignore_echo=True, timeout=0.4)
    assert words[0] == "timeout"
    assert 0.39 <= float(words[1]) < 1.4


def test_open_icmp_socket_reports_refusal_kind():
    """Asking for a kind that is not allowed raises PingNotPermitted, never another kind."""
    try:
        sock, kind = ping.open_icmp_socket(ping.socket.AF_INET, SocketKind.DATAGRAM)
    except PingNotPermitted as exc:
        assert "ping_group_range" in str(exc)
    else:
        assert kind is SocketKind.DATAGRAM
        sock.close()
