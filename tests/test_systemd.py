"""Tests for bridged.systemd: sd_notify over a real datagram socket, watchdog."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from bridged import systemd


@pytest.fixture
def abstract_socket(monkeypatch):
    """The same in the abstract namespace ("@name" in $NOTIFY_SOCKET)."""
    name = f"bridged-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_ready(notify_socket):
    """ready() sends READY=1 and reports success."""
    assert systemd.ready() is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_ready_with_status(notify_socket):
    """ready() can carry a status line in the same datagram."""
    assert systemd.ready("5 links up")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=5 links up"


def test_abstract_socket(abstract_socket):
    """A NOTIFY_SOCKET starting with '@' is an abstract socket."""
    assert systemd.notify("READY=1")
    assert abstract_socket.recv(4096) == b"READY=1"


@pytest.mark.parametrize(("call", "expected"), [
    (systemd.stopping, b"STOPPING=1"),
    (systemd.watchdog_ping, b"WATCHDOG=1"),
])
def test_helpers(notify_socket, call, expected):
    """Each helper sends its assignment."""
    assert call()
    assert notify_socket.recv(4096) == expected


def test_status_one_line(notify_socket):
    """status() sends STATUS= with newlines folded, keeping one assignment."""
    assert systemd.status("front up\nlinks: 5")
    assert notify_socket.recv(4096) == b"STATUS=front up links: 5"


def test_reloading(notify_socket):
    """reloading() sends RELOADING=1 with the monotonic time systemd asks for."""
    assert systemd.reloading()
    lines = notify_socket.recv(4096).split(b"\n")
    assert lines[0] == b"RELOADING=1"
    assert lines[1].startswith(b"MONOTONIC_USEC=") and int(lines[1].split(b"=")[1]) > 0


def test_no_notify_socket(monkeypatch):
    """Outside systemd every call returns False and does nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog_ping() is False


@pytest.mark.parametrize("value", ["", "vsock:2:1234", "relative/path"])
def test_unusable_notify_socket(monkeypatch, value):
    """An empty or unsupported $NOTIFY_SOCKET is treated as no systemd."""
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False


def test_socket_gone(tmp_path, monkeypatch):
    """A NOTIFY_SOCKET nobody listens on gives False, not an exception."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    """The ping interval is half of WATCHDOG_USEC, in seconds."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0


def test_watchdog_for_another_process(monkeypatch):
    """WATCHDOG_PID naming another process (inherited variable) means no watchdog."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon"])
def test_no_watchdog(monkeypatch, usec):
    """A missing, zero or malformed WATCHDOG_USEC means no watchdog."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert systemd.watchdog_interval() is None


def test_watchdog_pid_malformed(monkeypatch):
    """A malformed WATCHDOG_PID means no watchdog rather than a crash."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "x")
    assert systemd.watchdog_interval() is None


def test_a_manager_that_stops_reading_does_not_hold_the_sender(tmp_path, monkeypatch):
    """With the notify socket's queue full (the manager stopped reading), notify()
    gives up within its bound and says so, instead of blocking the supervisor."""
    import time

    path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.connect(path)
    sender.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            for _ in range(100_000):  # the receive queue holds a bounded number of datagrams
                sender.send(b"WATCHDOG=1")
        started = time.monotonic()
        assert systemd.notify("WATCHDOG=1") is False
        assert time.monotonic() - started < 3.0
    finally:
        sender.close()
        manager.close()
