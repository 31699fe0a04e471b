"""bridged.liveness: missed heartbeats are counted per tick, an answer
resets them, and a child that misses enough is aborted, then killed."""

from __future__ import annotations

import os
import signal
import subprocess

from bridged.ipc.control import recv_message, send_message, socketpair
from bridged.ipc.messages import Ping, Pong
from bridged.liveness import KILL_GRACE, Liveness
from bridged.spawn import Child


def _setup(misses: int = 3):
    proc = subprocess.Popen(["sleep", "30"])
    child = Child("link", 0, pid=proc.pid)
    ours, theirs = socketpair()
    theirs.settimeout(2)
    liveness = Liveness(1.0, misses)
    liveness.watch(child, ours)
    return proc, child, ours, theirs, liveness


def _pings(now: float, liveness: Liveness) -> None:
    liveness.tick(now, lambda child, seq: Ping(seq))


def test_answered_pings_keep_a_child_alive():
    """A child answering every ping is never counted missing, however many ticks."""
    proc, child, ours, theirs, liveness = _setup()
    try:
        for t in range(10):
            _pings(float(t), liveness)
            msg, _ = recv_message(theirs)
            send_message(theirs, Pong(msg.seq))
            assert liveness.read(ours) == Pong(msg.seq)
            assert liveness.answering(child) and child.missed == 0
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_silent_child_is_aborted_after_the_misses_then_killed():
    """No answers: one miss per tick, SIGABRT at the third, SIGKILL after the grace."""
    proc, child, ours, theirs, liveness = _setup()
    try:
        _pings(0.0, liveness)
        _pings(1.0, liveness)
        assert child.missed == 1 and not liveness.answering(child)
        _pings(2.0, liveness)
        assert child.missed == 2 and proc.poll() is None
        _pings(3.0, liveness)
        assert proc.wait(5) == -signal.SIGABRT
        assert child.kill_at == 3.0 + KILL_GRACE
    finally:
        proc.kill()
        proc.wait()


def test_a_stopped_child_gets_sigkill_after_the_grace():
    """A child that ignores SIGABRT is SIGKILLed at kill_at."""
    proc = subprocess.Popen(["sh", "-c", "trap '' ABRT; echo set; exec sleep 30"], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"set\n"  # the trap is in place before the abort can come
    child = Child("front", pid=proc.pid)
    ours, _theirs = socketpair()
    liveness = Liveness(1.0, 1)
    liveness.watch(child, ours)
    try:
        _pings(0.0, liveness)
        _pings(1.0, liveness)  # the one allowed miss: abort
        assert child.kill_at is not None
        _pings(1.0 + KILL_GRACE, liveness)
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_supervisor_held_up_counts_one_miss_per_tick():
    """A long gap between ticks (the supervisor itself was held up) is one miss, not many."""
    proc, child, ours, theirs, liveness = _setup()
    try:
        _pings(0.0, liveness)
        _pings(100.0, liveness)
        assert child.missed == 1 and proc.poll() is None
        msg, _ = recv_message(theirs)
        msg, _ = recv_message(theirs)  # the second ping, seq 2: answered late but in time
        send_message(theirs, Pong(msg.seq))
        liveness.read(ours)
        assert child.missed == 0
        send_message(theirs, Pong(1))  # a stale answer changes nothing
        assert liveness.read(ours) is None
    finally:
        proc.kill()
        proc.wait()


def test_answers_are_read_at_the_tick_and_the_next_one_is_due_then():
    """Nobody calls read: the tick takes the queued answer itself (no miss counted);
    next_due is the next tick, or a stuck child's SIGKILL if that comes first."""
    proc, child, ours, theirs, liveness = _setup(misses=1)
    try:
        _pings(0.0, liveness)
        assert liveness.next_due() == 1.0
        for t in (1.0, 2.0):
            msg, _ = recv_message(theirs)
            send_message(theirs, Pong(msg.seq))
            _pings(t, liveness)
            assert child.missed == 0 and child.answered == msg.seq and child.kill_at is None
        _pings(3.0, liveness)  # the ping of 2.0 went unanswered: the one allowed miss
        assert child.kill_at == 3.0 + KILL_GRACE and liveness.next_due() == 4.0
        liveness.configure(5.0, 1)
        _pings(4.0, liveness)
        assert liveness.next_due() == 3.0 + KILL_GRACE
    finally:
        proc.kill()
        proc.wait()


def test_a_child_that_closes_its_channel_but_lives_on_is_still_aborted():
    """EOF (or an empty packet) on a live child's channel is no reason to stop
    watching it: its pings go unanswered, so it is aborted after the misses."""
    proc, child, ours, theirs, liveness = _setup(misses=2)
    try:
        _pings(0.0, liveness)
        theirs.close()  # a buggy or hostile worker: the channel ends, the process does not
        for t in (1.0, 2.0):
            _pings(t, liveness)
        assert proc.wait(5) == -signal.SIGABRT
        assert child.kill_at == 2.0 + KILL_GRACE
    finally:
        proc.kill()
        proc.wait()


def test_a_flood_of_answers_is_read_a_bounded_amount_per_tick_and_garbage_is_no_eof():
    """A child flooding its channel (stale Pongs, bad packets) costs the tick a bounded
    read and is not taken for dead: its pings go on, a right answer keeps it alive."""
    proc, child, ours, theirs, liveness = _setup(misses=2)
    theirs.setblocking(False)
    try:
        _pings(0.0, liveness)
        sent = 0
        try:
            while sent < 10_000:
                theirs.send(b"not json" if sent % 2 else b'{"type":"Pong","seq":999}')
                sent += 1
        except BlockingIOError:
            pass
        assert sent > 100
        for t in (1.0, 2.0, 3.0):
            _pings(t, liveness)
        assert child.kill_at is not None  # the flood hid no answer: the misses counted
        assert ours.fileno() in liveness._channels  # still watched, not forgotten
    finally:
        proc.kill()
        proc.wait()


def test_descriptors_a_child_sends_with_its_answers_are_closed():
    """A child attaching fds to its Pongs (SCM_RIGHTS) cannot make the supervisor
    run out of descriptors: each one read is closed."""
    proc, child, ours, theirs, liveness = _setup()
    try:
        before = len(os.listdir("/proc/self/fd"))
        _pings(0.0, liveness)
        msg, _ = recv_message(theirs)
        spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
        for _ in range(10):
            send_message(theirs, Pong(msg.seq), spare)
        for fd in spare:
            os.close(fd)
        _pings(1.0, liveness)
        assert child.missed == 0
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        proc.kill()
        proc.wait()
