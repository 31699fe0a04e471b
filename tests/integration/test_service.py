"""The daemon as a service: systemd notification, the pty link, timing rules,
and the TCP options AT+CIPSTART passes to the socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.backlog import BacklogServer
from tests.harness import Daemon, Host, Timeout


def _index_of_ready(messages: list[bytes]) -> int:
    """Where READY=1 is among the messages; past the end while it has not come."""
    return next((i for i, m in enumerate(messages) if m.startswith(b"READY=1")), len(messages))


def test_sd_notify_ready_and_watchdog(tmp_path, monkeypatch, notify_socket):
    """Under systemd the supervisor sends READY=1 once serving, and WATCHDOG=1 pings
    (already during the boot, which the watchdog guards too)."""
    sock = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = Daemon(tmp_path).start()
    try:
        received = []
        deadline = time.monotonic() + 10
        while not any(b"WATCHDOG=1" in m for m in received[1 + _index_of_ready(received):]):
            assert time.monotonic() < deadline, received
            received.append(sock.recv(4096))
        assert any(m.startswith(b"READY=1") for m in received)
        assert daemon.stop() == 0
        sock.settimeout(2)
        assert sock.recv(4096).startswith(b"STOPPING=1") or b"STOPPING=1" in sock.recv(4096)
    finally:
        daemon.stop()


def test_stale_pty_link_is_replaced(tmp_path):
    """A symlink left by a dead instance is replaced by the new pty."""
    os.symlink("/dev/pts/nonexistent", tmp_path / "tty")
    daemon = Daemon(tmp_path).start()
    try:
        assert os.readlink(daemon.link).startswith("/dev/pts/")
        host = daemon.host()
        host.expect(b"\r\nready\r\n")
    finally:
        assert daemon.stop() == 0
    assert not os.path.lexists(daemon.link)  # removed at exit


def test_urc_waits_after_a_final_result(make_daemon, echo_server):
    """An unsolicited +IPD never directly follows SEND OK: it waits the profile's gap."""
    daemon = make_daemon("[uart]\nurc_gap_ms = 60\n")
    host = daemon.host()
    host.boot()
    host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port)
    for _ in range(3):
        host.write(b"AT+CIPSEND=3\r\n")
        host.expect(b">")
        host.write(b"gap")
        host.expect(b"SEND OK\r\n")
        sent_ok = time.monotonic()
        host.expect(b"+IPD,3:gap")
        assert time.monotonic() - sent_ok >= 0.05


def test_local_ip_bind(host):
    """AT+CIPSTART's <local IP> binds the socket: the peer sees that address."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d,,"127.0.0.2"' % port) == b"CONNECT\r\n\r\nOK\r\n"
        conn, peer = server.accept()
        assert peer[0] == "127.0.0.2"
        conn.close()
    finally:
        server.close()


def test_connect_timeout(host):
    """A connect that cannot complete ends with ERROR within AT+CIPSTART's <timeout>."""
    server = BacklogServer()
    try:
        server.fill(4)  # the accept queue full: further SYNs are dropped and connects hang
        server.wait_filled()
        started = time.monotonic()
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d,,,600' % server.port, timeout=10) == b"\r\nERROR\r\n"
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        server.close()


@pytest.mark.skipif(subprocess.run(["which", "ss"], capture_output=True).returncode != 0, reason="needs ss (iproute2)")
def test_keep_alive_reaches_the_socket(host, echo_server):
    """keep_alive in AT+CIPSTART switches SO_KEEPALIVE on with that idle time."""
    host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d,60' % echo_server.port)
    conn = echo_server.wait_connections(1)[0]
    local_port = conn.getpeername()[1]
    out = subprocess.run(["ss", "-tno", "state", "established", f"sport = :{local_port}"],
                         capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"timer:\(keepalive,(\d+)(min|sec|ms)", out)
    assert m, out
    assert m.group(2) in ("sec", "min")  # about a minute, not the kernel's 2 h default


def test_serial_port_mode(tmp_path):
    """--port opens a serial device with pyserial (here a pty's slave end) and serves AT on it."""
    import termios
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[wifi]\nstation_interface = "lo"\n[uart]\nbaud = 921600\nflow_control = "rtscts"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridged", "run", "--config", str(cfg), "--port", device,
         "--state-dir", str(tmp_path / "s")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        os.set_blocking(master, False)
        buf = b""
        deadline = time.monotonic() + 10
        while b"\r\nready\r\n" not in buf:
            assert time.monotonic() < deadline, buf
            time.sleep(0.02)
            try:
                buf += os.read(master, 4096)
            except BlockingIOError:
                pass
        attrs = termios.tcgetattr(slave)
        assert attrs[4] == termios.B921600  # the configured speed reached the port
        assert attrs[2] & termios.CRTSCTS
        os.write(master, b"AT+UART_CUR?\r\n")
        buf = b""
        while b"\r\nOK\r\n" not in buf:
            assert time.monotonic() < deadline, buf
            time.sleep(0.02)
            try:
                buf += os.read(master, 4096)
            except BlockingIOError:
                pass
        assert buf == b"AT+UART_CUR?\r\n+UART_CUR:921600,8,1,0,3\r\n\r\nOK\r\n"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        os.close(master)
        os.close(slave)


def test_uart_settings_reach_the_pty(daemon):
    """AT+UART_CUR's speed, stop bits and flow control land in the port's termios.

    (Linux's pty driver forces CS8 without parity, so those two are checked on
    a real port only: pyserial sets them, see test_serial_port_mode.)"""
    import termios

    host = daemon.host()
    host.boot()
    assert host.command(b"AT+UART_CUR=921600,7,3,2,3") == b"\r\nOK\r\n"
    host.command(b"AT")  # the change is made once OK has drained
    attrs = termios.tcgetattr(host.fd)
    assert attrs[4] == termios.B921600
    assert attrs[2] & termios.CSTOPB and attrs[2] & termios.CRTSCTS
    host.command(b"AT+UART_DEF=115200,8,1,1,0")
    host.command(b"AT")
    attrs = termios.tcgetattr(host.fd)
    assert attrs[4] == termios.B115200 and not attrs[2] & termios.CRTSCTS and not attrs[2] & termios.CSTOPB


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "pkill"])
def test_a_signal_to_every_process_stops_them_in_order(tmp_path, echo_server, signum):
    """Ctrl-C in a terminal (SIGINT) and `pkill bridged` (SIGTERM) signal
    every process at once: the supervisor stops the front before the
    workers, so no worker's exit reads as a crash."""
    for attempt in range(3):  # the race it guards against is lost only now and then
        directory = tmp_path / f"d{attempt}"
        directory.mkdir()
        daemon = Daemon(directory, own_group=True).start()
        try:
            host = daemon.host()
            host.boot()
            host.command(b"AT+CIPMUX=1")
            assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port).endswith(b"OK\r\n")
            os.killpg(daemon.proc.pid, signum)
            assert daemon.proc.wait(10) == 0
            host.close()
        finally:
            if daemon.proc.poll() is None:  # never leave a daemon group behind a failure
                os.killpg(daemon.proc.pid, signal.SIGKILL)
                daemon.proc.wait(5)
        errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")]
        assert not errors, errors
        assert daemon.events("stopping")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["term", "int", "hup"])
def test_signals_during_the_stop_do_not_change_its_status(tmp_path, signum):
    """SIGTERM, then one signal after another until the process is gone (an
    impatient admin, systemd's stop and reload racing): it still exits 0, not
    killed by a signal while the interpreter shuts down."""
    daemon = Daemon(tmp_path).start()
    try:
        daemon.host().expect(b"\r\nready\r\n")
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            daemon.proc.send_signal(signum)
            time.sleep(0.002)
        assert daemon.proc.wait(5) == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(5)


def test_run_reads_the_system_files_of_its_instance(tmp_path):
    """Without --config, `run --instance` applies /etc/bridged/bridged.toml, then its own file over it."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "bridged.toml").write_text('[wifi]\nstation_interface = "lo"\n[uart]\nbaud = 57600\n')
    (etc / "ttyTEST.toml").write_text("[uart]\nbaud = 921600\n")
    (etc / "ttyOTHER.toml").write_text("[uart]\nbaud = 9600\n")
    link = str(tmp_path / "tty")
    env = dict(os.environ, BRIDGED_CONFIG_DIR=str(etc), STATE_DIRECTORY=str(tmp_path / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "bridged", "run", "--instance", "ttyTEST", "--pty", link],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(link):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        host = Host(link)
        host.expect(b"\r\nready\r\n")
        assert host.command(b"AT+UART_CUR?\r\n") == b"AT+UART_CUR?\r\n+UART_CUR:921600,8,1,0,1\r\n\r\nOK\r\n"
        host.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
