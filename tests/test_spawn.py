"""bridged.spawn: a forked child keeps nothing of the supervisor's signal handling."""

from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest

from bridged import spawn
from bridged.config import LogConfig

pytestmark = pytest.mark.timeout(60)

# The daemon forks before it starts threads; pytest may have threads when this forks.
_FORK_IN_THREADS = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def supervisor_signals():
    """This process handles signals as the supervisor does: through a wake-up pipe."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_fd = signal.set_wakeup_fd(w)
    old = {sig: signal.signal(sig, lambda *_: None) for sig in spawn.SIGNALS}
    try:
        yield r, w
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        os.close(r)
        os.close(w)


def _sleep_then_succeed() -> int:
    time.sleep(0.5)
    return 0


@_FORK_IN_THREADS
def test_a_signal_racing_the_fork_never_reaches_the_supervisors_wakeup_pipe(supervisor_signals):
    """A SIGTERM sent the instant a child is forked (as the supervisor does when
    the front dies during start-up) kills that child and is never written into
    the supervisor's wake-up pipe, where it would read as the supervisor's stop."""
    r, w = supervisor_signals
    for _ in range(40):
        pid = spawn.fork(_sleep_then_succeed, "test", None, LogConfig(), (r, w))
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM  # the default action, in the child
    assert signal.SIGTERM not in _drain(r)


@_FORK_IN_THREADS
def test_a_child_holds_no_end_of_the_wakeup_pipe(supervisor_signals):
    """The child closes both ends of the supervisor's wake-up pipe and has no wake-up fd of its own."""
    r, w = supervisor_signals
    report_r, report_w = os.pipe()

    def target() -> int:
        held = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                held.add(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # the directory listing's own fd, closed by now
                pass
        pipe = os.readlink(f"/proc/{os.getppid()}/fd/{r}")
        os.write(report_w, b"%d %d" % (pipe in held, signal.set_wakeup_fd(-1)))
        return 0

    pid = spawn.fork(target, "test", None, LogConfig(), (r, w))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.read(report_r, 100) == b"0 -1"
    os.close(report_r)
    os.close(report_w)


_PR_SET_CHILD_SUBREAPER = 36


def _orphan_under_subreaper(report_w: int) -> None:
    """In a forked helper that adopts orphans (as a user's systemd does): fork a
    supervisor that dies between forking a child and the child's PR_SET_PDEATHSIG;
    write the child's fate to ``report_w``."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid_r, pid_w = os.pipe()
    supervisor = os.fork()
    if supervisor == 0:
        leave, me = spawn._leave_supervisor_signals, os.getpid()

        def late(wakeup, mask):
            # The child waits here until its supervisor has died and it has a new parent.
            deadline = time.monotonic() + 10
            while os.getppid() == me and time.monotonic() < deadline:
                time.sleep(0.002)
            leave(wakeup, mask)

        spawn._leave_supervisor_signals = late
        pid = spawn.fork(lambda: time.sleep(30) or 0, "test", None, LogConfig(), os.pipe())
        os.write(pid_w, b"%d" % pid)
        os._exit(0)
    child = int(os.read(pid_r, 20))
    os.waitpid(supervisor, 0)
    deadline = time.monotonic() + 10
    fate = b"alive"
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)  # ours now: we are the subreaper
        if pid:
            fate = b"%d" % os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.01)
    else:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    os.write(report_w, fate)


@_FORK_IN_THREADS
def test_a_child_orphaned_before_pdeathsig_ends_also_under_a_subreaper():
    """A supervisor killed between the fork and the child's PR_SET_PDEATHSIG
    leaves no child running, also where orphans go to a subreaper, not to pid 1."""
    report_r, report_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            _orphan_under_subreaper(report_w)
        finally:
            os._exit(0)
    os.close(report_w)
    os.waitpid(helper, 0)
    with os.fdopen(report_r, "rb") as report:
        assert report.read() == b"1"  # it left at once with status 1, it did not run its target
