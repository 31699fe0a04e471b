"""A ring's eventfd doorbells, and their batching (a part of ``bridged.ipc.rings.Ring``).

Theory of operation
-------------------
Each direction has an eventfd doorbell: the producer rings ``data_fd`` after
publishing, the consumer rings ``space_fd`` after consuming (unless the
producer said it does not need it: ``want_space_doorbell``; the producer's data
doorbell, unless the consumer polls the ring on ticks: ``poll_on_tick``). Python has no
memory fence, so publication goes: data, then index, then the doorbell write.
The doorbell is a syscall whose kernel path (a lock and a wake-up) makes the
stores before it visible to the side that reads the doorbell, also on weakly
ordered CPUs such as ARM; that side reads the indices after its wake-up. On
x86 (TSO) stores are seen in program order, so any index read is safe. On ARM
an index read that no doorbell covered yet (a consumer draining in a loop) is
not formally ordered after the data it covers; the window is the few hundred
instructions between two interpreter stores. Closing it for good would need a
store-release, which pure Python cannot issue.

A burst of records (a worker's reads in one wake-up) rings each doorbell at
most once: ``hold_doorbells`` records what is owed, ``release_doorbells``
rings it. A doorbell whose counter is saturated is ringing already.
"""

from __future__ import annotations

import os

__all__ = ["Doorbells", "clear_doorbell", "new_doorbells", "ring_doorbell"]

_QUIET = 1  # item 1 of a ring's index view, on the producer's line: 1 = consume() need not ring space_fd
_COMMITTED = 2  # item 2, on the producer's line: CLOCK_MONOTONIC ns of the last commit()
_POLLED = 9  # item 9, on the consumer's line: 0, or the consumer reads on ticks: commit() need not ring
# data_fd, unless it comes this many ns or more after the commit before (a request after quiet)
POLLED_BULK = 512  # a polled ring's commit of fewer bytes rings anyway: interactive (a request, keys)


def new_doorbells() -> tuple[int, int]:
    """Two fresh eventfds (data, space), non-blocking and close-on-exec.

    Raises:
        OSError: no descriptors left (none is left open).
    """
    fds: list[int] = []
    try:
        for _ in range(2):  # CLOEXEC: fork keeps the fds, exec'd helpers don't get them
            fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], fds[1]


def ring_doorbell(fd: int) -> None:
    """Ring the doorbell ``fd`` (an eventfd)."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # counter saturated: the doorbell is already ringing


def clear_doorbell(fd: int) -> bool:
    """Reset the doorbell ``fd``; return whether it was ringing."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


class Doorbells:
    """``data_fd`` (the producer published) and ``space_fd`` (the consumer
    freed room); a part of `Ring`, which sets them up."""

    data_fd: int
    space_fd: int
    _index: memoryview  # the ring's header as native 64-bit items (bridged.ipc.rings)

    def clear_space_doorbell(self) -> bool:
        """Reset ``space_fd``; return whether it was ringing."""
        return clear_doorbell(self.space_fd)

    def hold_doorbells(self) -> None:
        """Ring nothing until release_doorbells(): one wake-up for a batch of records."""
        self._held = True

    def release_doorbells(self) -> None:
        self._held = False
        if self._owed_data:
            self._owed_data = False
            ring_doorbell(self.data_fd)
        if self._owed_space:
            self._owed_space = False
            ring_doorbell(self.space_fd)

    def _doorbell(self, fd: int) -> None:
        if not self._held:
            ring_doorbell(fd)
        elif fd == self.data_fd:
            self._owed_data = True
        else:
            self._owed_space = True

    def clear_data_doorbell(self) -> bool:
        """Reset ``data_fd``; return whether it was ringing."""
        try:  # clear_doorbell, inline: a consumer calls this on every wake-up
            os.eventfd_read(self.data_fd)
        except BlockingIOError:
            return False
        return True

    def want_space_doorbell(self, wanted: bool) -> None:
        """Producer: whether consume() rings ``space_fd`` (it does unless told not to).

        A producer that waits for space only now and then (a link worker on
        its downlink) turns the doorbell off and back on around each wait,
        saving the consumer a syscall per consume.  The flag and the read
        index are plain stores in two processes with no fence between a
        store and the next load, so each side may miss the other's store:
        after turning it on, re-check the free space, and keep re-checking
        on a timer while waiting.
        """
        self._index[_QUIET] = 0 if wanted else 1

    def poll_on_tick(self, quiet: float) -> None:
        """Consumer: whether it reads the ring on a periodic tick of its own (``quiet`` > 0),
        so the producer's commit() need not ring ``data_fd``.  It still does for a commit that
        leaves the ring more than half full (a fast producer does not wait for ticks), for one
        that comes ``quiet`` seconds or more after the commit before it (by the producer's
        clock, ``last_commit``): that one may be a request, which goes at once; and for one of
        fewer than POLLED_BULK bytes: a request or keystrokes within a stream, which go at once
        too (their answer waits no longer than without polling).

        The producer stores the write index and then loads this flag; the consumer
        stores the flag and then loads the write index.  With no fence between a store
        and the next load (x86 lets a load pass an earlier store, ARM more), both may see
        the other's old value: a commit skips its doorbell just as the consumer stops
        polling, and finds the ring empty.  So a consumer that turns polling off must
        look at the ring once more a tick later (long after both stores landed): a
        skipped doorbell then costs at most a tick, never data left in the ring.
        """
        self._index[_POLLED] = max(1, round(quiet * 1e9)) if quiet > 0 else 0

    def last_commit(self) -> int:
        """Consumer: when the producer last committed (``time.monotonic_ns()``, 0: never), or
        when the last byte of that commit came if earlier (``Ring.commit``'s ``at``: a stream's
        tail AT+TRANSINTVL held): the time of what it sends, not of its own wake-up (a tick's
        may come a period later)."""
        return self._index[_COMMITTED]
