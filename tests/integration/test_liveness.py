"""Liveness: the supervisor asks every child for a heartbeat; a stuck one
(SIGSTOP here) is killed with a stack dump and restarted as a crashed one,
and the service watchdog is fed only while the front answers."""

from __future__ import annotations

import json
import os
import signal
import time

from tests import forkserver
from tests.harness import Daemon

FAST = "[watchdog]\nheartbeat_ms = 500\nmissed_heartbeats = 3\n"
UNRESPONSIVE = {"child_unresponsive", "child_died", "worker_died"}


def status_json(daemon: Daemon) -> dict:
    done = forkserver.run(["status", "--json", "--state-dir", str(daemon.state_dir)], timeout=20)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_stopped_worker_is_killed_and_its_slot_works_again(make_daemon, echo_server):
    """SIGSTOP a link worker: after 3 missed 0.5 s heartbeats it is aborted
    (its stack in the log), the MCU sees its link CLOSED, and AT+CIPSTART on
    the slot succeeds with the restarted worker."""
    daemon = make_daemon(FAST)
    daemon.expected_errors |= UNRESPONSIVE
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d' % echo_server.port)
    stuck = daemon.worker_pid(1)
    os.kill(stuck, signal.SIGSTOP)
    host.expect(b"1,CLOSED\r\n", timeout=15)
    event = daemon.wait_event("child_unresponsive", role="link", link_id=1)[0]
    assert (event["pid"], event["missed"], event["seconds"]) == (stuck, 3, 1.5)
    dead = daemon.wait_event("child_died", role="link", link_id=1)[0]
    assert dead["exit_code"] in (-signal.SIGABRT, -signal.SIGKILL)
    if dead["exit_code"] == -signal.SIGABRT:  # faulthandler had its turn
        assert "Fatal Python error: Aborted" in daemon.log_text()
    assert host.ask(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d' % echo_server.port).endswith(b"OK\r\n")
    host.send_data(b"AT+CIPSEND=1,5", b"hello")
    assert host.read_ipd() == (1, b"hello")
    # Restart counts reach the front with the supervisor's next heartbeat (0.5 s here).
    deadline = time.monotonic() + 5
    while (link := status_json(daemon)["links"][1])["restarts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert link["restarts"] == 1 and link["worker_pid"] not in (0, stuck) and link["state"] == "open"
    host.close()


def test_a_stopped_front_restarts_the_session_and_starves_the_watchdog(make_daemon, notify_socket,
                                                                        monkeypatch):
    """SIGSTOP the front: WATCHDOG=1 stops at once; after 6 missed heartbeats
    the front is killed and a new one says ready on the same port, AT works
    and the watchdog is fed again."""
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 500\nmissed_heartbeats = 6\n")
    daemon.expected_errors |= UNRESPONSIVE
    host = daemon.host()
    host.boot()
    _wait_message(notify_socket, b"WATCHDOG=1", 10)
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    os.kill(front, signal.SIGSTOP)
    stopped = time.monotonic()
    _drain(notify_socket, until=stopped + 1.5)  # at most a tick of pings before the miss counts
    late = _drain(notify_socket, until=stopped + 2.7)  # the kill comes after 3 s at the earliest
    assert not any(b"WATCHDOG=1" in m for m in late), late
    assert not daemon.events("child_unresponsive")
    host.expect(b"\r\nready\r\n", timeout=20)
    event = daemon.wait_event("child_unresponsive", role="front")[0]
    assert (event["pid"], event["missed"]) == (front, 6)
    assert host.ask(b"AT").endswith(b"\r\nOK\r\n")  # a new session: echo on, Wi-Fi rejoining
    _wait_message(notify_socket, b"WATCHDOG=1", 10)
    deadline = time.monotonic() + 5  # counts come with the supervisor's heartbeats
    while (restarts := status_json(daemon)["front_restarts"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert restarts == 1
    host.close()


def test_missed_heartbeats_sets_the_patience(make_daemon, echo_server):
    """With 20 missed 0.2 s heartbeats allowed, a worker stopped for 2 s is
    left alone (3 would kill it after 0.6 s) and its link still works."""
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 200\nmissed_heartbeats = 20\n")
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d' % echo_server.port)
    pid = daemon.worker_pid(1)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(2)  # ten heartbeats missed, fewer than the 20 that get it killed
    os.kill(pid, signal.SIGCONT)
    host.send_data(b"AT+CIPSEND=1,5", b"still")
    assert host.read_ipd() == (1, b"still")
    assert not daemon.events("child_unresponsive") and daemon.worker_pid(1) == pid
    host.close()


def _drain(sock, until: float) -> list[bytes]:
    got = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            break
    sock.settimeout(10)
    return got


def _wait_message(sock, text: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no {text!r} from the supervisor"
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if text in sock.recv(4096):
                return
        except TimeoutError:
            continue
