"""The supervisor's start of all its children (`Children._start_all`): the forks
come one right after another, the child_started lines and the front's
WorkerStarted after the last (what the supervisor writes between two forks is
copied again after each, page by page)."""

from __future__ import annotations

import subprocess

import pytest
from structlog.testing import capture_logs

from bridged import children, spawn
from bridged.config import default_config
from bridged.ipc.control import recv_message
from bridged.ipc.messages import WorkerStarted
from bridged.supervisor import Supervisor

pytestmark = pytest.mark.timeout(30)


def test_the_forks_come_first_then_the_lines_and_the_announcements(tmp_path, monkeypatch):
    """Nothing is logged or sent to the front between the six forks; afterwards
    child_started for the front and links 0-4 in that order, each with its pid,
    and the front's channel holds each worker's WorkerStarted with its control socket."""
    sup = Supervisor(default_config(), "", None, tmp_path)
    sup.rings = [(None, None)] * len(sup.workers)  # the stand-ins never map them
    stand_ins: list[subprocess.Popen] = []
    pairs: list = []
    channel = []  # the front's end of its channel, kept past the parent's close
    at_fork: list[tuple] = []

    def socketpair():
        pair = real_socketpair()
        pairs.append(pair)
        return pair

    def fork(target, role, link_id, log_config, wakeup):
        """A `sleep` stands for the child (``target`` never runs); what was said by now is noted."""
        if role == "front":
            channel.append(pairs[-1][1].dup())
        at_fork.append((role, link_id, [e["event"] for e in logs], sorted(sup._announcements)))
        stand_ins.append(subprocess.Popen(["sleep", "30"]))
        return stand_ins[-1].pid

    real_socketpair = children.socketpair
    monkeypatch.setattr(children, "socketpair", socketpair)
    monkeypatch.setattr(spawn, "fork", fork)
    try:
        with capture_logs() as logs:
            sup._start_all()
        assert at_fork == [("front", None, [], []), *[("link", i, [], list(range(i))) for i in range(5)]]
        pids = [p.pid for p in stand_ins]
        assert [(e["event"], e["role"], e.get("link_id"), e["pid"]) for e in logs] == [
            ("child_started", "front", None, pids[0]), *[("child_started", "link", i, pids[i + 1]) for i in range(5)]]
        assert sup._announcements == {}
        channel[0].setblocking(False)
        announced = []
        for _ in range(5):
            msg, fds = recv_message(channel[0])
            assert isinstance(msg, WorkerStarted) and len(fds) == 1
            announced.append((msg.link_id, msg.pid))
            children.os.close(fds[0])
        assert announced == [(i, pids[i + 1]) for i in range(5)]
    finally:
        for proc in stand_ins:
            proc.kill()
            proc.wait()
        for sock in (*channel, *sup.liveness.channels()):
            sock.close()
        sup.rings = []
        sup._cleanup()
