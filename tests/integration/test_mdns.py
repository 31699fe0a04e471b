"""AT+MDNS end to end: the daemon advertises in namespace A, a zeroconf browser listens in namespace B.

mDNS is multicast, so every test that sends it runs between two network
namespaces of its own (tests/netns.py); nothing reaches the host's interfaces.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.harness import Daemon
from tests.netns import netns_available, side_host, veth_pair

OK = b"\r\nOK\r\n"
ERROR = b"\r\nERROR\r\n"
TYPE = "_iot._tcp.local."

needs_netns = pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))

# Browses one service type on the given address and prints one JSON line per
# event: added and updated (with the resolved service and its host's
# addresses), removed.
_BROWSER = textwrap.dedent(
    """
    import json, sys
    from zeroconf import AddressResolver, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    address, type_ = sys.argv[1], sys.argv[2]
    zc = Zeroconf(interfaces=[address], ip_version=IPVersion.V4Only)

    def say(**fields):
        print(json.dumps(fields), flush=True)

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Removed:
            say(event="removed", name=name)
            return
        event = "added" if state_change is ServiceStateChange.Added else "updated"
        info = zeroconf.get_service_info(service_type, name, timeout=5000)
        if info is None:
            say(event="unresolved", name=name)
            return
        host = AddressResolver(info.server)
        host.request(zeroconf, 5000)
        say(event=event, name=name, type=info.type, port=info.port, server=info.server,
            txt={k.decode(): (v or b"").decode() for k, v in info.properties.items()},
            addresses=sorted(info.parsed_addresses(IPVersion.All)),
            host_addresses=sorted(host.parsed_addresses(IPVersion.All)))

    browser = ServiceBrowser(zc, type_, handlers=[on_change])
    say(event="ready")
    sys.stdin.read()  # until the test closes our stdin
    browser.cancel()
    zc.close()
    """
)


# Asks once, with an empty cache, for one service's records and its host's addresses.
_RESOLVE = textwrap.dedent(
    """
    import json, sys
    from zeroconf import AddressResolver, IPVersion, Zeroconf

    address, type_, name = sys.argv[1:4]
    zc = Zeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    info = zc.get_service_info(type_, name, timeout=5000)
    host = AddressResolver(info.server) if info else None
    if host is not None:
        host.request(zc, 5000)
    print(json.dumps(None if info is None else sorted(host.parsed_addresses(IPVersion.All))))
    zc.close()
    """
)


def resolve_once(exec_prefix: tuple[str, ...], address: str, name: str) -> list[str] | None:
    """The host addresses a fresh resolver in the namespace learns for ``name``, or None."""
    done = subprocess.run([*exec_prefix, sys.executable, "-c", _RESOLVE, address, TYPE, name],
                          capture_output=True, text=True, timeout=20, check=True)
    return json.loads(done.stdout)


class Browser:
    """The zeroconf browser in namespace B, its events read with timeouts."""

    def __init__(self, exec_prefix: tuple[str, ...], address: str, type_: str = TYPE) -> None:
        self.proc = subprocess.Popen([*exec_prefix, sys.executable, "-c", _BROWSER, address, type_],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next(timeout=15)["event"] == "ready"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._events.put(json.loads(line))
        self._events.put({"event": "exited"})

    def next(self, timeout: float = 15.0) -> dict:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no mDNS event within {timeout} s") from None

    def quiet(self, seconds: float) -> list[dict]:
        """Events seen in the next ``seconds``."""
        seen = []
        try:
            while True:
                seen.append(self._events.get(timeout=seconds))
        except queue.Empty:
            return seen

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def segment(tmp_path):
    """(daemon in namespace A on veth0, browser in namespace B, the namespaces)."""
    with veth_pair() as net:
        daemon = Daemon(tmp_path, wrap=net.exec_a(), station="veth0").start()
        browser = Browser(net.exec_b(), net.b_ip)
        try:
            yield daemon, browser, net
        finally:
            browser.close()
            code = daemon.stop()
            assert code == 0, daemon.log_text()[-3000:]
            assert "Traceback" not in daemon.log_text()


def _why(daemon: Daemon) -> str:
    return daemon.wait_event("command_error")[-1]["why"]


@needs_netns
def test_service_and_host_are_advertised_then_withdrawn(segment):
    """AT+MDNS=1 publishes type, instance, port, TXT and the host's addresses; AT+MDNS=0 removes them."""
    daemon, browser, net = segment
    host = daemon.host()
    host.boot()
    line = b'AT+MDNS=1,"bridged-test","_iot",8080,"Test Thing","_tcp",2,"board","esp32","u","user x"'
    assert host.ask(line) == OK
    added = browser.next()
    assert added == {
        "event": "added",
        "name": f"Test Thing.{TYPE}",
        "type": TYPE,
        "port": 8080,
        "server": "bridged-test.local.",
        "txt": {"board": "esp32", "u": "user x"},
        "addresses": added["addresses"],
        "host_addresses": added["host_addresses"],
    }
    assert net.a_ip in added["addresses"] and net.a_ip6 in added["addresses"]
    assert net.a_ip in added["host_addresses"] and net.a_ip6 in added["host_addresses"]
    assert all(a.startswith(("10.200.", "fd00:200:", "fe80:")) for a in added["addresses"])

    assert host.ask(b"AT+MDNS=0") == OK
    assert browser.next() == {"event": "removed", "name": f"Test Thing.{TYPE}"}
    assert host.ask(b"AT+MDNS=0") == OK  # nothing to stop: still OK
    daemon.wait_event("mdns_stopped")


@needs_netns
def test_enabling_twice_is_error_and_keeps_the_first(segment):
    """A second AT+MDNS=1 answers ERROR (log says why); the first service stays until AT+MDNS=0."""
    daemon, browser, _net = segment
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+MDNS=1,"first","_iot",1000') == OK
    assert browser.next()["name"] == f"first.{TYPE}"  # the instance defaults to the host name
    assert host.ask(b'AT+MDNS=1,"second","_iot",2000') == ERROR
    assert "already enabled" in _why(daemon)
    assert [e for e in browser.quiet(1.5) if e["event"] != "exited"] == []
    assert host.ask(b"AT+MDNS=0") == OK
    assert browser.next() == {"event": "removed", "name": f"first.{TYPE}"}
    assert host.ask(b'AT+MDNS=1,"second","_iot",2000') == OK
    added = browser.next()
    assert (added["name"], added["port"], added["txt"]) == (f"second.{TYPE}", 2000, {})


@needs_netns
def test_restart_restore_and_shutdown_say_goodbye(segment):
    """AT+RST and AT+RESTORE withdraw the service and AT+MDNS works after them; SIGTERM withdraws it too."""
    daemon, browser, _net = segment
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+MDNS=1,"rst","iot",7,"before"') == OK  # "iot" gets its underscore
    assert browser.next()["name"] == f"before.{TYPE}"
    assert host.command(b"AT+RST") == OK
    host.expect(b"\r\nready\r\n")
    host.expect(b"WIFI CONNECTED\r\nWIFI GOT IP\r\n")  # stored credentials: it rejoins by itself
    host.command(b"ATE0")
    assert browser.next() == {"event": "removed", "name": f"before.{TYPE}"}
    assert host.ask(b'AT+MDNS=1,"rst","_iot",7,"after"') == OK
    assert browser.next()["name"] == f"after.{TYPE}"
    assert host.command(b"AT+RESTORE") == OK
    host.boot()  # factory settings: ready, echo on, not joined
    assert browser.next() == {"event": "removed", "name": f"after.{TYPE}"}
    assert host.ask(b'AT+MDNS=1,"rst","_iot",7,"last"') == OK
    assert browser.next()["name"] == f"last.{TYPE}"
    assert daemon.stop() == 0
    assert browser.next() == {"event": "removed", "name": f"last.{TYPE}"}
    assert "Traceback" not in daemon.log_text()


@needs_netns
def test_only_the_station_interface_advertises(tmp_path):
    """With a second interface in A (to namespace C), mDNS answers on the station's segment only."""
    with veth_pair() as net, side_host(net) as side:
        daemon = Daemon(tmp_path, wrap=net.exec_a(), station="veth0").start()
        on_station, elsewhere = Browser(net.exec_b(), net.b_ip), Browser(side.exec(), side.ip)
        try:
            host = daemon.host()
            host.boot()
            assert host.ask(b'AT+MDNS=1,"only","_iot",80') == OK
            added = on_station.next()
            assert added["name"] == f"only.{TYPE}" and side.a_ip not in added["addresses"]
            assert elsewhere.quiet(1.5) == []  # on_station heard it already
            assert host.ask(b"AT+MDNS=0") == OK
            assert on_station.next()["event"] == "removed"
        finally:
            on_station.close()
            elsewhere.close()
            assert daemon.stop() == 0

_BAD = [
    (b"AT+MDNS=1", "expected"),
    (b'AT+MDNS=1,"h","_iot"', "expected"),
    (b'AT+MDNS=1,"h",,80', "omitted"),
    (b'AT+MDNS=2,"h","_iot",80', "out of range"),
    (b'AT+MDNS=0,"h"', "no other parameter"),
    (b"AT+MDNS=0,", "no other parameter"),
    (b'AT+MDNS=1,"h","_iot",0', "out of range"),
    (b'AT+MDNS=1,"h","_iot",65536', "out of range"),
    (b'AT+MDNS=1,"h","_iot","80"', "number"),
    (b'AT+MDNS=1,h,"_iot",80', "quoted"),
    (b'AT+MDNS=1,"","_iot",80', "bytes long"),
    (b'AT+MDNS=1,"a.b","_iot",80', "dot"),
    (b'AT+MDNS=1,"%s","_iot",80' % (b"h" * 64), "bytes long"),
    (b'AT+MDNS=1,"h","_this-is-too-long",80', "service type"),
    (b'AT+MDNS=1,"h","_a b",80', "service type"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_sctp"', "_tcp or _udp"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",0', "out of range"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",11', "out of range"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",2,"k","v"', "needs 4"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",1,"k","v","k2","v2"', "needs 2"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",1,"k"', "needs 2"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",1,"","v"', "bytes long"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",1,"a=b","v"', "'='"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",1,,"v"', "omitted"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp",,"k","v"', "need a txt_number"),
    (b'AT+MDNS=1,"h","_iot",80,"i","_tcp","k","v"', "number"),
    (b'AT+MDNS=1,"h\xff","_iot",80', "UTF-8"),
    (b'AT+MDNS=1,"h\x01","_iot",80', "control character"),
    (b'AT+MDNS=1,"h","_iot",80,"a\x01b"', "instance name"),
    (b'AT+MDNS=1,"h","_iot",80,"_sub"', "instance name"),
    (b"AT+MDNS?", "no query form"),
    (b"AT+MDNS=?", "no test form"),
    (b"AT+MDNS", "no execute form"),
]


def test_bad_parameters_are_error_with_a_reason(host, daemon):
    """Missing, extra or invalid AT+MDNS parameters answer ERROR and log why; nothing is advertised."""
    for number, (line, why) in enumerate(_BAD, start=1):
        assert host.ask(line) == ERROR, line
        events = daemon.wait_event("command_error", count=number)
        assert why in events[-1]["why"], (line, events[-1])
    assert not daemon.events("mdns_started")
    assert host.ask(b"AT") == OK


def test_enabling_before_joining_waits_for_the_station(daemon):
    """Before AT+CWJAP, AT+MDNS=1 is OK (ESP-IDF keeps the configuration) but nothing is opened; AT+MDNS=0 forgets it."""
    host = daemon.host()
    host.expect(b"ready\r\n")
    host.command(b"ATE0")
    assert host.ask(b'AT+MDNS=1,"h","_iot",80') == OK
    assert host.ask(b'AT+MDNS=1,"h","_iot",80') == ERROR  # configured, though not advertising
    assert "already enabled" in _why(daemon)
    assert host.ask(b"AT+MDNS=0") == OK
    assert host.ask(b'AT+MDNS=1,"h2","_iot",81') == OK  # AT+MDNS=0 forgot the first
    assert host.ask(b"AT+MDNS=0") == OK
    assert not daemon.events("mdns_started")


def _started(host, daemon) -> None:
    """A fresh daemon: ready, echo off, not joined (no stored network)."""
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")


def _seen(browser: "Browser", seconds: float) -> list[dict]:
    return [e for e in browser.quiet(seconds) if e["event"] != "exited"]


@needs_netns
def test_the_service_follows_the_wifi(segment):
    """Configured before joining it appears on AT+CWJAP; AT+CWQAP and a mode without station withdraw it,
    joining again (also while joined) announces it again; AT+MDNS=0 forgets it."""
    daemon, browser, net = segment
    host = daemon.host()
    _started(host, daemon)
    name = f"follow.{TYPE}"
    assert host.ask(b'AT+MDNS=1,"follow","_iot",80') == OK
    assert _seen(browser, 1.5) == []  # not joined: nothing answers yet
    assert not daemon.events("mdns_started")

    host.command(b'AT+CWJAP="bridged","password"')
    added = browser.next()
    assert (added["event"], added["name"]) == ("added", name) and net.a_ip in added["host_addresses"]

    assert host.command(b"AT+CWQAP") == OK
    host.expect(b"WIFI DISCONNECT\r\n")
    assert browser.next() == {"event": "removed", "name": name}
    assert _seen(browser, 2.5) == []  # stays withdrawn (the poll does not bring it back)

    host.command(b'AT+CWJAP="bridged","password"')
    assert browser.next()["name"] == name and daemon.wait_event("mdns_started", count=2)
    assert _seen(browser, 2.5) == []  # the poll finds nothing changed: no new announcement

    host.command(b'AT+CWJAP="bridged","password"')  # joined again while joined: the link went down and up
    assert browser.next() == {"event": "removed", "name": name}
    assert browser.next()["name"] == name and daemon.wait_event("mdns_started", count=3)

    assert host.command(b"AT+CWMODE=2") == OK  # softAP only: the station leaves
    host.expect(b"WIFI DISCONNECT\r\n")
    assert browser.next() == {"event": "removed", "name": name}
    assert host.command(b"AT+CWMODE=1") == OK  # auto-connect rejoins
    host.expect(b"WIFI GOT IP\r\n")
    assert browser.next() == {"event": "added", **{k: v for k, v in added.items() if k != "event"}}

    assert host.ask(b"AT+MDNS=0") == OK
    assert browser.next() == {"event": "removed", "name": name}
    assert host.command(b"AT+CWQAP") == OK
    host.expect(b"WIFI DISCONNECT\r\n")
    host.command(b'AT+CWJAP="bridged","password"')
    assert _seen(browser, 1.5) == []  # forgotten: joining again advertises nothing
    assert len(daemon.events("mdns_started")) == 4


def _ip_in(ns_exec: tuple[str, ...], *args: str) -> None:
    subprocess.run([*ns_exec, "ip", *args], check=True, capture_output=True, timeout=10)


@needs_netns
def test_a_changed_address_is_announced(segment):
    """A new IPv6 address and a changed IPv4 address on the station are announced within the poll interval."""
    daemon, browser, net = segment
    host = daemon.host()
    host.boot()
    name = f"moves.{TYPE}"
    assert host.ask(b'AT+MDNS=1,"moves","_iot",80') == OK
    assert net.a_ip in browser.next()["host_addresses"]

    new6 = net.a_ip6.rsplit("::", 1)[0] + "::a"
    _ip_in(net.exec_a(), "-6", "addr", "add", f"{new6}/64", "dev", "veth0", "nodad")
    assert browser.next() == {"event": "removed", "name": name}  # goodbyes from the old responder
    added = browser.next()
    assert added["name"] == name and new6 in added["host_addresses"] and net.a_ip in added["host_addresses"]

    new4 = net.a_ip.rsplit(".", 1)[0] + ".3"
    _ip_in(net.exec_a(), "addr", "del", f"{net.a_ip}/24", "dev", "veth0")
    _ip_in(net.exec_a(), "addr", "add", f"{new4}/24", "dev", "veth0")
    # The old address is gone, so the goodbyes sent from it cannot leave:
    # the new responder's announcements (cache-flush records) replace them.
    moved = browser.next()
    assert (moved["event"], moved["name"]) == ("updated", name)
    assert new4 in moved["host_addresses"], moved
    # A fresh resolver's cache holds only what is answered now.
    now = resolve_once(net.exec_b(), net.b_ip, name)
    assert now is not None and new4 in now and net.a_ip not in now, now
    daemon.wait_event("mdns_station_changed", count=2)
    assert host.ask(b"AT+MDNS=0") == OK
    assert browser.next() == {"event": "removed", "name": name}


def _front_pid(daemon: Daemon) -> int:
    return daemon.wait_event("child_started", role="front")[-1]["pid"]


def _resources(pid: int) -> tuple[int, int]:
    """The front's open file descriptors and threads."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def _back_to(pid: int, baseline: tuple[int, int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _resources(pid) != baseline:
        if time.monotonic() > deadline:
            raise AssertionError(f"front holds {_resources(pid)} fds/threads, {baseline} before")
        time.sleep(0.1)


# Holds UDP port 5353 in namespace A without SO_REUSEADDR, so zeroconf cannot bind it.
_HOLD_5353 = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              "s.bind(('0.0.0.0', 5353)); print('held', flush=True); sys.stdin.read()")


@needs_netns
def test_quick_toggling_and_restart_while_probing_leave_nothing_behind(segment):
    """Many AT+MDNS=1/0 in a row and AT+RST during probing: all answered, no fd or thread left, nothing advertised after."""
    daemon, browser, net = segment
    host = daemon.host()
    host.boot()
    pid = _front_pid(daemon)
    baseline = _resources(pid)
    for _ in range(15):
        assert host.ask(b'AT+MDNS=1,"toggle","_iot",80') == OK
        assert host.ask(b"AT+MDNS=0") == OK
    assert host.ask(b'AT+MDNS=1,"toggle","_iot",80') == OK
    assert host.command(b"AT+RST") == OK  # probing takes about 0.75 s: this cuts it short
    host.expect(b"\r\nready\r\n")
    host.expect(b"WIFI GOT IP\r\n")
    host.command(b"ATE0")
    assert daemon.wait_event("mdns_stopped", count=16)
    assert host.ask(b"AT") == OK
    _back_to(pid, baseline)
    assert resolve_once(net.exec_b(), net.b_ip, f"toggle.{TYPE}") is None
    assert {e["event"] for e in _seen(browser, 0.1)} <= {"added", "removed", "updated"}


@needs_netns
def test_port_5353_taken_is_error_then_retried(segment):
    """zeroconf failing to open its sockets: AT+MDNS=1 while joined is ERROR (log says why), no fd left;
    configured before joining, the failure is logged and retried, and the service appears once the port is free."""
    daemon, browser, net = segment
    host = daemon.host()
    host.boot()
    pid = _front_pid(daemon)
    baseline = _resources(pid)
    holder = subprocess.Popen([*net.exec_a(), sys.executable, "-c", _HOLD_5353],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert host.ask(b'AT+MDNS=1,"held","_iot",80') == ERROR
        assert "cannot open mDNS sockets" in _why(daemon) and "in use" in _why(daemon)
        _back_to(pid, baseline)
        assert host.ask(b"AT+MDNS=0") == OK  # the failed AT+MDNS=1 left nothing configured

        assert host.command(b"AT+CWQAP") == OK
        host.expect(b"WIFI DISCONNECT\r\n")
        assert host.ask(b'AT+MDNS=1,"held","_iot",80') == OK
        host.command(b'AT+CWJAP="bridged","password"')
        assert "in use" in daemon.wait_event("mdns_open_failed")[-1]["error"]
    finally:
        holder.stdin.close()
        holder.wait(10)
    host.command(b"AT+CWQAP")
    host.expect(b"WIFI DISCONNECT\r\n")
    host.command(b'AT+CWJAP="bridged","password"')  # a join retries at once
    assert browser.next()["name"] == f"held.{TYPE}"
    assert host.ask(b"AT+MDNS=0") == OK
    assert browser.next() == {"event": "removed", "name": f"held.{TYPE}"}
    _back_to(pid, baseline)


@needs_netns
def test_station_that_vanishes_or_loses_its_ipv4(tmp_path):
    """The station interface deleted, then back; its IPv4 address removed, then back: withdrawn and advertised again, no crash, no fd left."""
    with veth_pair() as net:
        inside = net.exec_a()
        # A veth pair wholly inside namespace A: its multicast stays there.
        _ip_in(inside, "link", "add", "sta0", "type", "veth", "peer", "name", "sta1")

        def bring_up() -> None:
            _ip_in(inside, "addr", "add", "10.203.0.1/24", "dev", "sta0")
            for name in ("sta0", "sta1"):
                _ip_in(inside, "link", "set", name, "up")

        bring_up()
        daemon = Daemon(tmp_path, wrap=inside, station="sta0").start()
        try:
            host = daemon.host()
            host.boot()
            pid = _front_pid(daemon)
            baseline = _resources(pid)
            assert host.ask(b'AT+MDNS=1,"gone","_iot",80') == OK
            daemon.wait_event("mdns_announced")

            _ip_in(inside, "link", "del", "sta0")  # takes sta1 with it
            assert daemon.wait_event("mdns_station_changed")[-1]["now"] is None
            daemon.wait_event("mdns_stopped")
            assert host.ask(b"AT") == OK
            _ip_in(inside, "link", "add", "sta0", "type", "veth", "peer", "name", "sta1")
            bring_up()
            daemon.wait_event("mdns_announced", count=2)

            _ip_in(inside, "addr", "del", "10.203.0.1/24", "dev", "sta0")
            daemon.wait_event("mdns_stopped", count=2)
            _ip_in(inside, "addr", "add", "10.203.0.1/24", "dev", "sta0")
            daemon.wait_event("mdns_announced", count=3)

            assert host.ask(b"AT+MDNS=0") == OK
            daemon.wait_event("mdns_stopped", count=3)
            _back_to(pid, baseline)
            assert not daemon.events("mdns_follow_failed")
        finally:
            assert daemon.stop() == 0
        assert "Traceback" not in daemon.log_text()
