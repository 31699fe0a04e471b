"""Least privilege inside the daemon, started as the unit starts it: each process keeps only
the capabilities it needs (read from /proc/<pid>/status), and none is open to another process
of the same uid through /proc (PR_SET_DUMPABLE=0).

"service" is the unit's situation: an unprivileged user with ambient CAP_NET_BIND_SERVICE and
CAP_NET_RAW, that bounding set and no_new_privs.  "root" is uid 0 with only those two in its
bounding set (the same sets after exec), for an interpreter the service user cannot run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import Daemon
from tests.netns import netns_available, veth_pair

LINKS = 5
BIND, RAW = 1 << 10, 1 << 13  # CAP_NET_BIND_SERVICE, CAP_NET_RAW
SERVICE_UID = 65534
_UNIT_CAPS = ("--bounding-set=-all,+net_bind_service,+net_raw", "--inh-caps=-all,+net_bind_service,+net_raw")
WRAPS = {
    "service": ("setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups", *_UNIT_CAPS,
                "--ambient-caps=+net_bind_service,+net_raw", "--no-new-privs", "--"),
    "root": ("setpriv", *_UNIT_CAPS, "--no-new-privs", "--"),
}
# Another process of the service: the daemon's uid and capabilities (so that only
# dumpability, not a capability it lacks, can keep it out), no CAP_SYS_PTRACE.
PEERS = WRAPS
_RING_FD = re.compile(r"/memfd:bridged-link\d+-(up|down)")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to start the daemon as the unit does")


def _usable_by(user: str) -> None:
    """Skip unless ``user`` can run this interpreter with its packages."""
    if user == "root":
        return
    check = [sys.executable, "-c", "import uvloop, structlog, bridged"]
    if subprocess.run([*PEERS[user], *check], capture_output=True, timeout=30, cwd=os.getcwd()).returncode:
        pytest.skip(f"the service user cannot run {sys.executable} (its files are private to root)")


@pytest.fixture
def service_dir(monkeypatch):
    """A directory for the daemon (pytest's tmp_path is root's alone), with an empty config dir."""
    top = Path(tempfile.mkdtemp(prefix="bridged-priv-"))
    try:
        top.chmod(0o755)
        (top / "etc").mkdir(mode=0o755)
        monkeypatch.setenv("BRIDGED_CONFIG_DIR", str(top / "etc"))
        yield top
    finally:
        shutil.rmtree(top)


def caps(pid: int) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb of a process, as masks."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, _, v in (line.partition(":") for line in f) if k.startswith("Cap")}


def processes(daemon: Daemon) -> dict[str, int]:
    """Role -> pid: the supervisor, the front, link0 .. link4."""
    pids = {"supervisor": daemon.proc.pid, "front": daemon.wait_event("child_started", role="front")[-1]["pid"]}
    pids.update({f"link{k}": daemon.worker_pid(k) for k in range(LINKS)})
    return pids


def assert_holds(pid: int, effective: int, permitted: int | None = None) -> None:
    """Exactly these capabilities, nothing inheritable or ambient."""
    held = caps(pid)
    assert (held["CapEff"], held["CapPrm"], held["CapInh"], held["CapAmb"]) == (
        effective, effective if permitted is None else permitted, 0, 0), held


def _start(tmp: Path, user: str, config: str = "", wrap: tuple[str, ...] = (), station: str = "lo") -> Daemon:
    _usable_by(user)
    if user == "service":
        os.chown(tmp, SERVICE_UID, SERVICE_UID)  # the daemon makes its pty link and state directory here
    return Daemon(tmp, config, wrap=wrap + WRAPS[user], station=station).start()


@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
@pytest.mark.parametrize("user", ["service", "root"])
@pytest.mark.parametrize("group_range, front_keeps, socket_kind", [
    ("0 2147483647", BIND, "datagram"),  # ping sockets allowed: no CAP_NET_RAW anywhere
    ("1 0", BIND | RAW, "raw"),  # not allowed: the front keeps CAP_NET_RAW for AT+PING
])
def test_each_process_keeps_only_what_it_needs(service_dir, user, group_range, front_keeps, socket_kind):
    """The supervisor holds both capabilities permitted only; the front CAP_NET_BIND_SERVICE (AT+CIPSERVER
    on ESP-AT's port 333 works) and CAP_NET_RAW only without ping sockets (AT+PING still answers);
    link workers none with the default local_ports; no process has an ambient or inheritable one."""
    with veth_pair() as net:
        subprocess.run([*net.exec_a(), "sysctl", "-qw", f"net.ipv4.ping_group_range={group_range}"],
                       check=True, capture_output=True, timeout=10)
        daemon = _start(service_dir, user, wrap=net.exec_a(), station="veth0")
        try:
            host = daemon.host()
            host.boot()
            pids = processes(daemon)
            assert_holds(pids["supervisor"], 0, BIND | RAW)
            assert_holds(pids["front"], front_keeps)
            for k in range(LINKS):
                assert_holds(pids[f"link{k}"], 0)
            assert re.fullmatch(rb"\+PING:\d+\r\n\r\nOK\r\n", host.ask(b'AT+PING="%s"' % net.b_ip.encode()))
            assert daemon.wait_event("ping_answered")[-1]["socket"] == socket_kind
            host.command(b"AT+CIPMUX=1")
            assert host.ask(b"AT+CIPSERVER=1") == b"\r\nOK\r\n"  # port 333
            daemon.wait_event("server_started", port=333)
            host.close()
        finally:
            assert daemon.stop() == 0


@pytest.mark.parametrize("user", ["service", "root"])
def test_low_local_ports_give_link_workers_cap_net_bind_service(service_dir, user):
    """With ports below 1024 in [links] local_ports each link worker keeps CAP_NET_BIND_SERVICE,
    and nothing else, and a UDP link binds local port 10."""
    daemon = _start(service_dir, user, '[links]\nlocal_ports = "1-65535"\n')
    try:
        host = daemon.host()
        host.boot()
        pids = processes(daemon)
        for k in range(LINKS):
            assert_holds(pids[f"link{k}"], BIND)
        assert_holds(pids["supervisor"], 0, BIND | RAW)
        peer = subprocess.Popen([sys.executable, "-c", "import socket; s = socket.socket(socket.AF_INET, "
                                 "socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1], "
                                 "flush=True); s.settimeout(10); print(s.recvfrom(10)[1][1], flush=True)"],
                                stdout=subprocess.PIPE, text=True)
        try:
            port = int(peer.stdout.readline())
            assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,10,0' % port) == b"CONNECT\r\n\r\nOK\r\n"
            host.command(b"AT+CIPSEND=1", b">")
            host.write(b"!")
            host.expect(b"SEND OK\r\n")
            assert peer.stdout.readline().strip() == "10"  # the datagram came from port 10
        finally:
            peer.kill()
            peer.wait(5)
        host.close()
    finally:
        assert daemon.stop() == 0


def _peer_can_read_fds(user: str, pid: int) -> bool:
    """Whether another process of the service may see where /proc/<pid>/fd/1 leads."""
    return _peer_can(user, "import os, sys; os.readlink(sys.argv[1])", f"/proc/{pid}/fd/1")


def _peer_can(user: str, code: str, path: str) -> bool:
    # -S: the probe needs only os and sys, not the site-packages a start would scan (it runs ~60 times).
    probe = subprocess.run([*PEERS[user], sys.executable, "-S", "-c", f"try:\n    {code}\nexcept PermissionError:\n"
                            "    raise SystemExit(3)", path], capture_output=True, text=True, timeout=30)
    assert probe.returncode in (0, 3), probe.stderr
    return probe.returncode == 0


def _peer_can_open(user: str, path: str) -> bool:
    return _peer_can(user, "import sys; open(sys.argv[1], 'rb').close()", path)


@pytest.mark.parametrize("user", ["service", "root"])
def test_no_process_is_open_to_its_own_uid(service_dir, user):
    """Every process is non-dumpable: its /proc files are root's, and another process of the service
    (same uid and capabilities, no CAP_SYS_PTRACE) can neither follow its fds nor open its memory or
    environment, nor (Python 3.11) the front's duplicate of a ring's memfd; the same peer can follow
    the fds of an ordinary process of the service."""
    daemon = _start(service_dir, user)
    control = subprocess.Popen([*WRAPS[user], "sleep", "30"])
    try:
        daemon.host().boot()
        assert _peer_can_read_fds(user, control.pid)  # the probe would see into a dumpable process
        pids = processes(daemon)
        for role, pid in pids.items():
            assert os.stat(f"/proc/{pid}/fd").st_uid == 0, role
            assert not _peer_can_read_fds(user, pid), role
            assert not _peer_can_open(user, f"/proc/{pid}/mem"), role
            assert not _peer_can_open(user, f"/proc/{pid}/environ"), role
        front = pids["front"]
        rings = [fd for fd in os.listdir(f"/proc/{front}/fd") if _RING_FD.search(os.readlink(f"/proc/{front}/fd/{fd}"))]
        if sys.version_info < (3, 13):
            assert len(rings) == 2 * LINKS  # mmap's duplicates: the reason for this check
        else:
            assert rings == []  # mmap(trackfd=False) keeps none
        for fd in rings:
            assert not _peer_can_open(user, f"/proc/{front}/fd/{fd}"), fd
    finally:
        control.kill()
        control.wait(5)
        assert daemon.stop() == 0
