"""systemctl reload (SIGHUP to the supervisor): a changed configuration is
applied by restarting the session on the same port; a broken one, or one that
changes what only a restart can, is refused and the running one stays."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.harness import Daemon, Demux, notify_state

def _rewrite(daemon: Daemon, extra: str) -> None:
    daemon.write_config(extra)


def _gmr(host) -> bytes:
    return host.ask(b"AT+GMR")


def _echo_round_trip(host, port: int, data: bytes) -> None:
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % port) == b"CONNECT\r\n\r\nOK\r\n"
    demux = Demux(host)
    assert demux.send(None, data).endswith(b"SEND OK\r\n")
    assert demux.wait_data(None, len(data)) == data


def test_a_changed_config_restarts_the_session_with_it(make_daemon, echo_server):
    daemon = make_daemon('[firmware]\nat_version = "4.1.1.0"\n')
    host = daemon.host()
    host.boot()
    assert b"AT version:4.1.1.0" in _gmr(host)
    _echo_round_trip(host, echo_server.port, b"before the reload")
    _rewrite(daemon, '[firmware]\nat_version = "4.1.2.0"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("reloading")[-1]["changed"] == ["firmware.at_version"]
    # The MCU sees the module come back, as after AT+RST, on the same port.
    assert host.expect(b"\r\nready\r\n", timeout=10) == b"\r\nready\r\n"
    host.command(b"ATE0")
    assert b"AT version:4.1.2.0" in _gmr(host)
    host.command(b'AT+CWJAP="bridged","password"')
    _echo_round_trip(host, echo_server.port, b"after the reload, through the same rings")
    assert not daemon.events("child_died")


def test_a_reload_to_another_firmware_version_answers_as_it(make_daemon):
    """A reload to at_version 2.2.0.0 brings the session back as 2.2 answers (AT+CIPSTATE
    unknown, -1 for unused links); a version it cannot emulate is refused, 2.2 stays."""
    daemon = make_daemon()
    daemon.expected_errors |= {"reload_refused"}
    host = daemon.host()
    host.boot()
    assert host.ask(b"AT+CIPSTATE?") == b"\r\nOK\r\n"
    _rewrite(daemon, '[firmware]\nat_version = "2.2.0.0"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    assert host.expect(b"\r\nready\r\n", timeout=10) == b"\r\nready\r\n"
    host.command(b"ATE0")
    assert host.ask(b"AT+CIPSTATE?") == b"\r\nERROR\r\n"
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:-1,-1,-1,-1,-1\r\n\r\nOK\r\n"
    _rewrite(daemon, '[firmware]\nat_version = "\u0664.1.1.0"\n')  # an Arabic-Indic 4
    daemon.proc.send_signal(signal.SIGHUP)
    assert "firmware.at_version" in daemon.wait_event("reload_refused")[-1]["error"]
    assert b"Bin version:2.2.0(" in _gmr(host)  # the same session, no restart
    assert b"ready" not in host.buf


def test_a_broken_config_is_refused_and_the_session_goes_on(make_daemon):
    daemon = make_daemon()
    daemon.expected_errors |= {"reload_refused"}
    host = daemon.host()
    host.boot()
    _rewrite(daemon, "[links]\nchunk = 0\n")
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_event("reload_refused")[-1]
    assert "links.chunk" in refused["error"] and str(daemon.config_path) in refused["error"]
    assert host.ask(b"AT") == b"\r\nOK\r\n"  # no restart: no ready, the same session
    assert b"ready" not in host.buf
    assert len(daemon.events("child_started")) == 6  # the front and five workers, once


def test_keys_only_a_restart_can_apply_are_refused(make_daemon):
    daemon = make_daemon()
    daemon.expected_errors |= {"reload_refused"}
    host = daemon.host()
    host.boot()
    _rewrite(daemon, '[links]\ncount = 3\n[firmware]\nat_version = "4.1.2.0"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("reload_refused")[-1]["needs_restart"] == ["links.count"]
    assert b"AT version:4.1.1.0" in _gmr(host)  # nothing of it applied


def test_an_unchanged_config_changes_nothing(make_daemon):
    daemon = make_daemon()
    host = daemon.host()
    host.boot()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("reload_unchanged")
    assert host.ask(b"AT") == b"\r\nOK\r\n"
    assert len(daemon.events("child_started")) == 6


def test_a_hang_up_of_the_whole_group_is_one_reload(tmp_path):
    """`pkill -HUP bridged` or a terminal's hang-up signals every process: the
    supervisor reloads, and no child dies of the signal."""
    daemon = Daemon(tmp_path, own_group=True).start()
    try:
        host = daemon.host()
        host.boot()
        os.killpg(daemon.proc.pid, signal.SIGHUP)
        daemon.wait_event("reload_unchanged")
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        assert not daemon.events("child_died")
        assert len(daemon.events("child_started")) == 6  # the front and five workers, once
        host.close()
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:  # never leave a daemon group behind a failure
            os.killpg(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(5)


def test_systemd_hears_reloading_then_ready(tmp_path, notify_socket):
    """Under systemd a reload is RELOADING=1 (with MONOTONIC_USEC), then READY=1."""
    sock = notify_socket
    daemon = Daemon(tmp_path).start()
    try:
        assert notify_state(sock).startswith(b"READY=1")
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = notify_state(sock)
        assert reloading.startswith(b"RELOADING=1") and b"MONOTONIC_USEC=" in reloading
        assert notify_state(sock).startswith(b"READY=1")
        assert daemon.stop() == 0
    finally:
        daemon.stop()


def test_systemd_hears_ready_once_after_the_new_session_is_ready(tmp_path, notify_socket):
    """A reload that restarts the session: RELOADING=1, then a single READY=1, sent only
    once the new front has booted and written ready (so `systemctl reload` waits for it)."""
    sock = notify_socket
    daemon = Daemon(tmp_path).start()
    try:
        assert notify_state(sock).startswith(b"READY=1")
        _rewrite(daemon, '[firmware]\nat_version = "4.1.2.0"\nboot_ms = 500\n')
        daemon.proc.send_signal(signal.SIGHUP)
        assert notify_state(sock).startswith(b"RELOADING=1")
        assert notify_state(sock).startswith(b"READY=1")
        assert len(daemon.events("ready")) == 2  # the new front's boot is over
        sock.settimeout(0.2)
        later = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # STATUS= and WATCHDOG=1 may come; a second READY=1 not
            try:
                later.append(sock.recv(4096))
            except TimeoutError:
                pass
        assert not any(m.startswith(b"READY=1") for m in later), later
        assert daemon.stop() == 0
    finally:
        daemon.stop()
