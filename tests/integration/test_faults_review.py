"""Hostile-review regressions for the fault injection: floods, bounds, replays."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.harness import free_port, wait_udp_read
from tests.integration.test_faults_net import _boot, _faults, _start
from tests.integration.test_status import status_json

pytestmark = pytest.mark.timeout(120)


def test_a_udp_flood_under_loss_is_counted_but_not_logged_per_datagram(make_daemon):
    """net_udp_loss at every datagram of a 2000-datagram flood: status counts each, the log has a few lines."""
    daemon, host = _boot(make_daemon, _faults(5, net_udp_loss={"rate": 1, "link": 0}))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    local = free_port(socket.SOCK_DGRAM)
    assert _start(host, 0, "UDP", peer.getsockname()[1], b",%d" % local) == b"0,CONNECT\r\n\r\nOK\r\n"
    try:
        for i in range(2000):
            peer.sendto(b"%04d" % i, ("127.0.0.1", local))
            if i % 100 == 99:
                time.sleep(0.01)  # within the socket's receive buffer
    finally:
        peer.close()
    wait_udp_read(local)  # the whole flood is read (and lost)
    # The worker reports its hits in batches, one a second at most: settled once the count
    # has stood still for more than a batch period and the log's lines add up to it.
    deadline = time.monotonic() + 5.0
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        counted = status_json(daemon)["faults"]["counts"]["net_udp_loss"]
        lines = [e for e in daemon.events("fault_injected") if e.get("name") == "net_udp_loss"]
        if counted != last:
            last, since = counted, time.monotonic()
        elif sum(e.get("hits", 1) for e in lines) == counted and time.monotonic() - since > 1.2:
            break
        time.sleep(0.1)
    assert counted > 500  # the kernel may drop some of the flood itself
    assert 1 <= len(lines) <= 5, len(lines)
    assert sum(e.get("hits", 1) for e in lines) == counted


def test_a_restarted_worker_keeps_the_daemons_fault_schedule(make_daemon, echo_server):
    """net_connect_refused in the first 2 s only: after a worker is killed and forked again at 3 s,
    its connects still succeed (the window is the daemon's, not reopened by the new process)."""
    daemon, host = _boot(make_daemon, _faults(1, net_connect_refused={"at": 0, "for": 2, "link": 1}))
    started = time.monotonic()
    assert _start(host, 1, "TCP", echo_server.port) == b"\r\nERROR\r\n"  # inside the window
    time.sleep(max(0.0, 3 - (time.monotonic() - started)))
    old = daemon.worker_pid(1)
    os.kill(old, signal.SIGKILL)
    daemon.expected_errors |= {"child_died", "worker_died"}
    deadline = time.monotonic() + 10
    while daemon.worker_pid(1) == old:
        assert time.monotonic() < deadline, "worker 1 was not forked again"
        time.sleep(0.02)
    assert _start(host, 1, "TCP", echo_server.port) == b"1,CONNECT\r\n\r\nOK\r\n"
    assert [e["name"] for e in daemon.events("fault_injected")] == ["net_connect_refused"]


def test_a_front_forked_again_does_not_repeat_a_past_reset(make_daemon):
    """at_reset at 1 s, once: after the front is killed at 2.5 s and the daemon forks it again,
    no second at_reset comes (the window is the daemon's, and it is past)."""
    daemon = make_daemon("[faults]\nseed = 1\n[faults.at_reset]\nat = 1\n")
    host = daemon.host()
    host.boot()
    daemon.wait_event("fault_injected", fault="at_reset", timeout=10)
    time.sleep(1.5)  # the front is killed at 2.5 s, past the reset's time (the schedule under test)
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    os.kill(front, signal.SIGKILL)
    daemon.expected_errors |= {"child_died", "front_died", "worker_died"}
    daemon.wait_event("child_started", role="front", count=2, timeout=10)
    host.expect(b"ready\r\n", timeout=15)
    time.sleep(2.0)  # a repeated reset would come within this
    resets = [e for e in daemon.events() if e.get("fault") == "at_reset"
              and e.get("event") in ("fault_injected", "fault_skipped")]
    assert len(resets) == 1, resets


def test_a_condition_fired_for_under_a_millisecond_is_armed_not_refused(daemon):
    """`bridged fault net_latency for=0.0004`: every worker arms it (for 1 ms), none refuses it as for=0."""
    from tests.integration.test_faults_at import fault_cli

    daemon.host().boot()
    done = fault_cli(daemon, "net_latency", "ms=5", "for=0.0004", "link=0")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while not [e for e in daemon.events("fault_armed") if e.get("name") == "net_latency"]:
        assert time.monotonic() < deadline, daemon.events("fault_refused")
        time.sleep(0.05)
    assert daemon.events("fault_refused") == []


def test_events_every_few_ms_with_nothing_to_act_on_do_not_flood_the_log(make_daemon):
    """wifi_drop every 10 ms (an event kind's shortest period): once the station is gone, each
    is skipped, logged ten times a second at most."""
    daemon = make_daemon("[faults]\nseed = 1\n[faults.wifi_drop]\nevery = 0.01\n")
    host = daemon.host()
    host.boot()
    time.sleep(2.5)  # 250 events of the schedule under test
    host.read_quiet(0.2)
    assert host.ask(b"AT") == b"\r\nOK\r\n"  # the front still answers
    skipped = [e for e in daemon.events("fault_skipped") if e.get("fault") == "wifi_drop"]
    assert 3 <= len(skipped) <= 40, len(skipped)
    assert sum(e["skipped"] for e in skipped) > 100
