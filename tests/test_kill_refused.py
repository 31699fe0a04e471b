"""The supervisor's answer to the front's WorkerRefused: only the live worker of
that link is killed; a forged or stale message (wrong pid, link id out of range,
the front's or the supervisor's own pid) is logged and ignored."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from structlog.testing import capture_logs

from bridged.config import default_config
from bridged.ipc.control import send_message, socketpair
from bridged.ipc.messages import WorkerRefused
from bridged.supervisor import Supervisor

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def setup(tmp_path):
    """A supervisor without processes of its own: `sleep`s stand for the front and
    link 0's worker, and the test holds the front's end of the channel."""
    front, worker = subprocess.Popen(["sleep", "30"]), subprocess.Popen(["sleep", "30"])
    sup = Supervisor(default_config(), "", None, tmp_path)
    sup.front.pid, sup.workers[0].pid = front.pid, worker.pid
    ours, theirs = socketpair()
    sup.sup_sock = ours
    yield sup, theirs, front, worker
    for proc in (front, worker):
        proc.kill()
        proc.wait()
    ours.close()
    theirs.close()


def _forge(sup: Supervisor, theirs, msg: WorkerRefused) -> list[dict]:
    send_message(theirs, msg)
    with capture_logs() as logs:
        assert sup._on_front_message()
    return logs


@pytest.mark.parametrize("forged", ["other_pid", "front_pid", "our_pid", "no_pid", "minus_one",
                                    "link_out_of_range", "negative_link", "other_link"])
def test_a_refusal_not_naming_a_live_worker_is_ignored_and_logged(setup, forged):
    """No process is signalled; worker_refusal_ignored says what was asked."""
    sup, theirs, front, worker = setup
    link, pid = {
        "other_pid": (0, worker.pid + 100_000),
        "front_pid": (0, front.pid),
        "our_pid": (0, os.getpid()),
        "no_pid": (0, 0),
        "minus_one": (0, -1),
        "link_out_of_range": (len(sup.workers), worker.pid),
        "negative_link": (-1, worker.pid),
        "other_link": (1, worker.pid),  # link 1's worker is not running: pid 0
    }[forged]
    logs = _forge(sup, theirs, WorkerRefused(link, pid))
    assert [(e["event"], e["log_level"], e["link_id"], e["pid"]) for e in logs] == [
        ("worker_refusal_ignored", "warning", link, pid)]
    assert front.poll() is None and worker.poll() is None


def test_a_refusal_naming_the_live_worker_kills_it(setup):
    """The worker the front names, live on that link, gets SIGKILL, logged at error level."""
    sup, theirs, front, worker = setup
    logs = _forge(sup, theirs, WorkerRefused(0, worker.pid))
    assert [(e["event"], e["log_level"], e["link_id"], e["pid"]) for e in logs] == [
        ("worker_killed_refused", "error", 0, worker.pid)]
    assert worker.wait(5) == -signal.SIGKILL
    assert front.poll() is None


def test_a_refusal_after_the_worker_was_reaped_is_ignored(setup):
    """A refused worker that exited by itself (reaped: its pid may be reused) is not signalled again."""
    sup, theirs, front, worker = setup
    stale = worker.pid
    sup.workers[0].pid = 0  # reaped
    logs = _forge(sup, theirs, WorkerRefused(0, stale))
    assert [e["event"] for e in logs] == ["worker_refusal_ignored"]
    assert worker.poll() is None


def test_a_refusal_said_into_a_full_channel_still_kills_the_worker(setup):
    """The front's channel is full (the supervisor busy elsewhere): its WorkerRefused waits in the
    front's outbox (uart.sup_outbox) and, once the supervisor reads again, kills the worker."""
    import asyncio
    import time

    from bridged.ipc.messages import Pong
    from bridged.uart.sup_outbox import SupervisorOutbox

    sup, theirs, front, worker = setup
    theirs.setblocking(False)
    sup.sup_sock.setblocking(False)
    for filled in range(100_000):  # stale pongs the supervisor ignores, until the channel is full
        try:
            send_message(theirs, Pong(-1))
        except BlockingIOError:
            break
    assert filled < 99_999

    async def front_says_then_supervisor_reads():
        outbox = SupervisorOutbox(asyncio.get_running_loop(), theirs)
        outbox.send(WorkerRefused(0, worker.pid))
        deadline = time.monotonic() + 10
        while worker.poll() is None:  # the supervisor's loop: a message per readable turn
            assert time.monotonic() < deadline, "the refusal never reached the supervisor"
            while sup._on_front_message():
                pass
            await asyncio.sleep(0.01)  # the front's loop: its writer sends what waits
        outbox.close()

    asyncio.run(front_says_then_supervisor_reads())
    assert worker.wait(5) == -signal.SIGKILL
    assert front.poll() is None
