"""A ring whose consumer polls it on ticks (``Ring.poll_on_tick``): the producer's
commit rings no data doorbell then, unless the ring ends up over half full, the commit
comes after a quiet spell, or it is small (under POLLED_BULK bytes)."""

from __future__ import annotations

import select
import time

import pytest

from bridged.ipc import doorbells, rings
from bridged.ipc.records import DATA, put_record
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(30)


def _rung(fd: int) -> bool:
    """Whether the doorbell rang (and clear it)."""
    if not select.select([fd], [], [], 0)[0]:
        return False
    doorbells.clear_doorbell(fd)
    return True


def test_a_polled_ring_takes_commits_without_a_doorbell_until_it_is_half_full():
    """Fresh: every commit rings.  Polled: commits ring nothing (the data is
    published all the same) until one leaves more than half the ring used; turned
    off, commits ring again.  The flag is the consumer's, on its cache line."""
    with new_ring(8192) as ring:
        ring.stage(0, b"a" * 100)
        ring.commit(100)
        assert _rung(ring.data_fd)
        ring.poll_on_tick(60)
        assert ring._index[rings._READ + 1] == 60 * 10**9  # item 9: byte 72, the read index's line
        for _ in range(3):
            ring.put_nowait(b"b" * 1000)
            assert not _rung(ring.data_fd)
        assert put_record(ring, DATA, b"c" * 504)  # records too (UDP, passthrough's blocks)
        assert not _rung(ring.data_fd)
        assert ring.available() == 100 + 3000 + 504 + 8  # published, unrung
        ring.put_nowait(b"d" * 600)  # 4212 of 8192 bytes: over half full
        assert _rung(ring.data_fd)
        assert ring.get_nowait(100) == b"a" * 100
        ring.poll_on_tick(0)
        ring.put_nowait(b"e")
        assert _rung(ring.data_fd)


def test_polling_does_not_touch_the_space_doorbell_or_the_other_direction():
    """The consumer's consume still rings space_fd; a consumer's poll flag leaves
    the producer's quiet flag (want_space_doorbell) alone, and the reverse."""
    with new_ring(4096) as ring:
        ring.put_nowait(b"x")  # a commit just before: none of those below comes after a quiet spell
        assert _rung(ring.data_fd)
        ring.poll_on_tick(60)
        ring.want_space_doorbell(False)
        ring.put_nowait(b"x" * 512)
        assert not _rung(ring.data_fd)
        assert ring._index[doorbells._QUIET] == 1
        ring.poll_on_tick(0)
        ring.put_nowait(b"x" * 5)
        assert _rung(ring.data_fd)
        ring.want_space_doorbell(True)
        ring.poll_on_tick(60)
        ring.consume(518)
        assert _rung(ring.space_fd)
        assert ring._index[doorbells._POLLED] == 60 * 10**9



def test_a_polled_ring_rings_for_a_commit_after_a_quiet_spell_or_a_small_one():
    """Polled with a 50 ms quiet: bulk commits closer than that to the one before ring
    nothing; one 50 ms or more after it (a request after the MCU went quiet) rings at once,
    and the next close behind it does not; one under POLLED_BULK bytes (a request within
    the stream) always rings.  ``last_commit`` says when the last one was."""
    bulk = b"b" * doorbells.POLLED_BULK
    with new_ring(8192) as ring:
        ring.put_nowait(b"a")
        assert _rung(ring.data_fd)
        ring.poll_on_tick(0.05)
        ring.put_nowait(bulk)
        time.sleep(0.03)
        ring.put_nowait(bulk)
        assert not _rung(ring.data_fd)
        time.sleep(0.06)
        before = time.monotonic_ns()
        ring.put_nowait(bulk)
        assert before <= ring.last_commit() <= time.monotonic_ns()
        assert _rung(ring.data_fd)
        ring.put_nowait(bulk)
        assert not _rung(ring.data_fd)
        ring.put_nowait(b"c" * (doorbells.POLLED_BULK - 1))
        assert _rung(ring.data_fd)
        assert ring.get_nowait(8192) == b"a" + bulk * 4 + b"c" * (doorbells.POLLED_BULK - 1)


def test_a_commit_stamped_with_its_bytes_arrival_is_timed_from_it():
    """A stream's chunk committed late (AT+TRANSINTVL held its tail) carries its last
    byte's arrival (``at``): the next commit's quiet spell is counted from there, so a
    bulk commit one quiet spell after that byte rings, and last_commit() says when it
    came; an ``at`` in the future is taken as now."""
    with new_ring(8192) as ring:
        ring.poll_on_tick(0.040)
        now = time.monotonic()
        ring.put_nowait(b"t" * 700, at=now - 0.050)  # came 50 ms ago, held since
        _rung(ring.data_fd)
        assert abs(ring.last_commit() - (now - 0.050) * 1e9) < 1e6
        ring.put_nowait(b"r" * 1000)  # 50 ms after the tail's byte: a request after quiet
        assert _rung(ring.data_fd)
        ring.put_nowait(b"s" * 1000, at=time.monotonic() + 10)  # (a clock a hair ahead)
        assert not _rung(ring.data_fd)  # steady: right behind the request
        assert ring.last_commit() <= time.monotonic_ns()
