"""`bridged status` over the control socket: what it shows of a running
daemon, who may ask, and that no client can stall the daemon."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from tests import forkserver
from tests.harness import Timeout

HEADER = struct.Struct(">I")


def status_cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return forkserver.run(["status", "--state-dir", str(daemon.state_dir), *args], timeout=20)


def status_json(daemon) -> dict:
    done = status_cli(daemon, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def control_path(daemon) -> str:
    return str(daemon.state_dir / "control.sock")


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def exchange(sock: socket.socket, body: bytes) -> dict:
    """Send one raw frame body; return the decoded reply."""
    sock.sendall(HEADER.pack(len(body)) + body)
    (size,) = HEADER.unpack(recv_exact(sock, 4))
    return json.loads(recv_exact(sock, size))


def read_reply(sock: socket.socket) -> dict:
    (size,) = HEADER.unpack(recv_exact(sock, 4))
    return json.loads(recv_exact(sock, size))


def test_status_shows_an_open_link_and_its_bytes(daemon, echo_server):
    """A TCP link with 1000 bytes echoed: status shows it open, its remote and
    local port, 1000 bytes each way, its +IPD frames and its worker's pid."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d' % echo_server.port)
    payload = os.urandom(1000)
    host.send_data(b"AT+CIPSEND=1,1000", payload)
    got = b""
    while len(got) < 1000:
        link_id, data = host.read_ipd()
        assert link_id == 1
        got += data
    assert got == payload
    local_port = echo_server.wait_connections(1)[0].getpeername()[1]
    status = status_json(daemon)
    link = status["links"][1]
    assert (link["state"], link["type"], link["remote"], link["remote_port"], link["local_port"]) == \
        ("open", "TCP", "127.0.0.1", echo_server.port, local_port)
    assert (link["bytes_up"], link["bytes_down"]) == (1000, 1000)
    assert link["ipd"] >= 1 and link["recv_mode"] == "active" and not link["passthrough"]
    assert link["worker_pid"] == daemon.worker_pid(1) and link["restarts"] == 0 and link["errors"] == 0
    assert [other["state"] for i, other in enumerate(status["links"]) if i != 1] == ["idle"] * 4
    assert status["uart"]["bytes_in"] >= 1000 and status["uart"]["bytes_out"] >= 1000
    assert status["uart"]["kind"] == "pty" and status["uart"]["icount"] is None
    assert status["wifi"] == "connected" and status["ssid"] == "bridged"
    table = status_cli(daemon)
    assert table.returncode == 0, table.stderr
    assert f"127.0.0.1:{echo_server.port}" in table.stdout and "overruns n/a" in table.stdout
    host.close()


@pytest.mark.bridged(profile="esp32")
def test_status_shows_the_uart_settings_in_force(bridged_device):
    """AT+UART_CUR and AT+UART_DEF override the configured framing: status says so
    (read through bridged.testing's device.status(), the same reply as --json)."""
    at = bridged_device.at
    at.expect(b"\r\nready\r\n")
    assert at.command("ATE0").ok
    uart = bridged_device.status()["uart"]
    assert (uart["baud"], uart["flow_control"], uart["source"]) == (115200, "rts", "config")
    assert at.command("AT+UART_CUR=921600,7,3,2,3").ok
    assert at.command("AT").ok  # applied once the OK has drained
    uart = bridged_device.status()["uart"]
    assert (uart["baud"], uart["data_bits"], uart["stop_bits"], uart["parity"], uart["flow_control"],
            uart["source"]) == (921600, 7, "2", "even", "rtscts", "AT+UART_CUR")
    assert at.command("AT+UART_DEF=230400,8,1,0,0").ok
    assert at.command("AT").ok
    uart = bridged_device.status()["uart"]
    assert (uart["baud"], uart["parity"], uart["flow_control"], uart["source"]) == \
        (230400, "none", "none", "AT+UART_DEF")
    done = forkserver.run(["status", "--json", "--control", str(bridged_device.control_path)], timeout=20)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["uart"] == uart


def test_control_socket_mode_and_owner(daemon):
    """The socket is 0660, owned by the daemon's user and group, and gone after the stop."""
    daemon.host().close()
    path = control_path(daemon)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "no control socket"
        time.sleep(0.02)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert daemon.stop() == 0
    assert not os.path.exists(path)


def _as_nobody(path: str) -> str:
    """Connect to ``path`` as uid/gid 65534 in a forked child; what happened, as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                with connect(path) as sock:
                    sock.settimeout(5)  # a refusal comes at once, before any request
                    result = json.dumps(read_reply(sock))
            except TimeoutError:
                result = "not refused"
            except PermissionError:
                result = "EACCES"
            except OSError as exc:
                result = f"OSError {exc}"
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
# A fork, not a subprocess: the service user may not run this interpreter (pyenv's
# under /root). The child only connects a socket and _exits, so the threads it does
# not inherit hold nothing it needs (3.12+ warns about fork in a threaded process).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_peer_with_another_uid_is_refused(make_daemon):
    """Another uid cannot open the 0660 socket; made world-writable, the
    daemon's own check (SO_PEERCRED) still refuses it, and root is served."""
    public = tempfile.mkdtemp(prefix="bridged-ctl-", dir="/tmp")
    try:
        os.chmod(public, 0o711)
        path = os.path.join(public, "control.sock")
        daemon = make_daemon(args=("--control", path))
        daemon.expected_errors.add("control_peer_refused")
        daemon.host().boot()
        assert _as_nobody(path) == "EACCES"
        os.chmod(path, 0o666)
        reply = json.loads(_as_nobody(path))
        assert reply["ok"] is False and "permission denied: uid 65534" in reply["error"]
        daemon.wait_event("control_peer_refused", uid=65534)
        with connect(path) as sock:
            assert exchange(sock, b'{"cmd":"status"}')["ok"] is True
        daemon.stop()
    finally:
        if os.path.exists(os.path.join(public, "control.sock")):
            os.unlink(os.path.join(public, "control.sock"))
        os.rmdir(public)


def test_bad_requests_get_an_error_and_the_daemon_still_serves(daemon):
    """Unknown, malformed and non-object requests get an error reply on a
    connection that stays usable; an oversize one is refused and closed."""
    host = daemon.host()
    host.boot()
    with connect(control_path(daemon)) as sock:
        reply = exchange(sock, b'{"cmd":"reboot"}')
        assert reply == {"ok": False, "error": "unknown cmd 'reboot'; known: fault, status, transcript"}
        assert "malformed JSON" in exchange(sock, b'{"cmd": "status"')["error"]
        assert exchange(sock, b"\xff\xfe")["ok"] is False
        assert exchange(sock, b'["status"]')["error"] == "a request must be a JSON object"
        assert "unknown cmd 42" in exchange(sock, b'{"cmd": 42}')["error"]
        assert exchange(sock, b'{"cmd":"status"}')["ok"] is True  # still in step
    with connect(control_path(daemon)) as sock:
        sock.sendall(HEADER.pack(64 * 1024 + 1) + b"x" * 1000)
        reply = read_reply(sock)
        assert reply["ok"] is False and "the limit is 65536" in reply["error"]
        assert sock.recv(1) == b""  # closed: the rest cannot be skipped safely
    with connect(control_path(daemon)) as sock:
        assert exchange(sock, b'{"cmd":"status"}')["ok"] is True
    assert host.command(b"AT") == b"\r\nOK\r\n"
    host.close()


def test_fifty_clients_are_bounded_and_silent_ones_dropped(daemon):
    """50 clients connect and say nothing: 16 are held, 34 are told busy at
    once; AT is answered meanwhile; the silent 16 are dropped after the idle
    timeout and a new client is served."""
    host = daemon.host()
    host.boot()
    path = control_path(daemon)
    clients = [connect(path) for _ in range(50)]
    try:
        deadline = time.monotonic() + 5
        refused: list[socket.socket] = []
        while len(refused) < 34 and time.monotonic() < deadline:
            refused, _, _ = select.select(clients, [], [], 0.2)
            time.sleep(0.1)
        held = [sock for sock in clients if sock not in refused]
        for sock in refused:
            reply = read_reply(sock)
            assert reply["ok"] is False and reply["error"].startswith("busy: 16 clients"), reply
        assert (len(held), len(refused)) == (16, 34)
        started = time.monotonic()
        assert host.command(b"AT", timeout=2) == b"\r\nOK\r\n"  # the session is not stalled
        for sock in held:
            sock.settimeout(max(0.1, started + 20 - time.monotonic()))
            assert sock.recv(1) == b""  # dropped by the daemon, not left open
        assert time.monotonic() - started < 20
    finally:
        for sock in clients:
            sock.close()
    with connect(path) as sock:
        assert exchange(sock, b'{"cmd":"status"}')["ok"] is True
    host.close()


def test_status_without_a_daemon_says_why(tmp_path):
    """No daemon: one line naming the socket, exit 1; two ways to name it: exit 2."""
    done = forkserver.run(["status", "--state-dir", str(tmp_path)], timeout=20)
    assert done.returncode == 1
    assert done.stderr == f"bridged status: no control socket at {tmp_path}/control.sock: is bridged running? " \
                          "(name it with --instance, --control or --state-dir)\n"
    done = forkserver.run(["status", "--instance", "a", "--control", "b"], timeout=20)
    assert done.returncode == 2 and done.stderr.startswith("bridged status: argument --control")


def test_a_second_daemon_on_the_same_state_dir_is_refused(make_daemon, tmp_path):
    """Two daemons cannot share a state directory: the second ends with one line, exit 1."""
    first = make_daemon()
    first.host().boot()
    done = subprocess.run([sys.executable, "-m", "bridged", "run", "--pty", str(tmp_path / "tty2"),
                           "--state-dir", str(first.state_dir)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert f"bridged: another bridged serves {first.state_dir}/control.sock" in done.stderr


def test_systemd_status_line_summarises(make_daemon, notify_socket, echo_server):
    """STATUS= carries the port, the open links and the bytes moved."""
    daemon = make_daemon()
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port)
    deadline = time.monotonic() + 15
    while True:
        assert time.monotonic() < deadline, "no STATUS= with the open link"
        try:
            message = notify_socket.recv(4096).decode()
        except TimeoutError:
            continue
        if f"STATUS=serving {daemon.link}, 1 link open, " in message:
            break
    assert message.rstrip().endswith(" B down")
    host.close()


def test_transcript_is_switched_at_run_time(make_daemon, tmp_path):
    """`bridged status --transcript on|off` starts and stops the AT transcript of a
    running daemon: what the MCU sends while it is on is in the file, before and after not."""
    path = tmp_path / "at.transcript"
    daemon = make_daemon(f'[log]\ntranscript = false\ntranscript_path = "{path}"\n')
    host = daemon.host()
    host.boot()
    assert host.ask(b"AT+CWHOSTNAME?").endswith(b"OK\r\n")  # before: not recorded
    assert not path.exists()
    done = status_cli(daemon, "--transcript", "on")
    assert (done.returncode, done.stdout) == (0, "transcript on\n"), done.stderr
    assert host.ask(b"AT+CIPSTATUS").endswith(b"OK\r\n")  # while on
    done = status_cli(daemon, "--transcript", "off")
    assert (done.returncode, done.stdout) == (0, "transcript off\n"), done.stderr
    assert host.ask(b"AT+CWSTATE?").endswith(b"OK\r\n")  # after: not recorded
    text = path.read_text()
    assert "AT+CIPSTATUS" in text and "STATUS:" in text
    assert "CWHOSTNAME" not in text and "CWSTATE" not in text
    assert "transcript_on" in text and "transcript_off" in text


def test_transcript_request_needs_a_boolean(daemon):
    """A transcript request without a true/false "on" is refused, and the daemon serves on."""
    with connect(control_path(daemon)) as sock:
        reply = exchange(sock, json.dumps({"cmd": "transcript", "on": "yes"}).encode())
    assert reply["ok"] is False and "true or false" in reply["error"]
    assert status_json(daemon)["uart"]


def test_mcu_strings_reach_the_admins_terminal_without_escape_sequences(daemon):
    """An SSID the MCU chose (logged by a failed join, shown among the recent
    warnings) holds terminal escape sequences: the table shows them escaped,
    never as raw control characters; --json keeps the string as it was."""
    host = daemon.host()
    host.boot()
    ssid = b"\x1b]0;owned\x07\x1b[2J\x9b1m\x7f"
    host.write(b'AT+CWJAP="' + ssid + b'","password"\r\n')
    host.expect(b"ERROR\r\n")
    table = status_cli(daemon)
    assert table.returncode == 0, table.stderr
    assert "wifi_join_failed" in table.stdout
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) < 0xa0 for c in table.stdout), \
        repr(table.stdout)
    assert "\\x1b]0;owned\\x07" in table.stdout
    events = status_json(daemon)["errors"]
    assert any("\x1b]0;owned\x07" in e["detail"] for e in events)
    host.close()


def test_a_control_socket_path_longer_than_a_socket_address_still_serves(make_daemon, tmp_path):
    """/run/bridged/<instance>/control.sock of a by-id instance (a CP2102N's escaped name
    is over 100 bytes) passes the 107 bytes of sun_path: the daemon still starts and
    serves it, and bridged status reaches it by the same path."""
    name = r"serial-by\x2did-usb\x2dSilicon_Labs_CP2102N_USB_to_UART_Bridge_Controller_" \
           r"a8d6c5e1f2d8eb11b3b2a2c8e3d2a1b0\x2dif00\x2dport0"
    folder = tmp_path / "run" / name
    folder.mkdir(parents=True)
    path = folder / "control.sock"
    assert len(os.fsencode(path)) > 107
    daemon = make_daemon(args=("--control", str(path)))
    host = daemon.host()
    host.boot()  # ready: the front serves the socket the supervisor bound before it
    host.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    done = forkserver.run(["status", "--control", str(path), "--json"], timeout=20)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["front_pid"] > 0



def test_the_control_socket_outlives_a_reload(make_daemon):
    """A reload with a changed config stops the front in order and starts a new one: the
    socket file is the supervisor's and stays (3.13's asyncio removed it with the old
    front's server), and status reaches the new front."""
    daemon = make_daemon("rssi = -40\n")
    host = daemon.host()
    host.boot()
    path = control_path(daemon)
    front = status_json(daemon)["front_pid"]
    daemon.write_config("rssi = -50\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("reloading")[-1]["changed"] == ["wifi.rssi"]
    host.expect(b"\r\nready\r\n", timeout=10)
    assert os.path.exists(path)
    assert status_json(daemon)["front_pid"] != front
    host.close()
