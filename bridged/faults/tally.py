"""Injected-fault counts that outlive a front (``bridged status``'s ``faults.counts``).

Theory of operation.  The front counts every injected fault, its own and the
link workers' (`bridged.faults.front`).  Counted in the front's memory, the
numbers started from 0 again whenever the supervisor forked a new front
(after a crash, a liveness kill or a reload), so `bridged status` and
`bridged fleet status` under-reported a long fault run.  So the counts live
in a small anonymous shared mapping (`Tally`, one 8-byte counter per
`CATALOG` kind) that the supervisor makes before it forks anything
(`create`); every child inherits the same memory, and each front finds it
with `inherited` and adds to it.  Only one front runs at a time, so the
counters have one writer; a link worker unmaps them (`release`): its faults
reach the front as messages.  A process that no supervisor forked (a unit
test's front) gets a `Tally` of its own.
"""

from __future__ import annotations

import mmap
import struct

from bridged.faults.catalog import CATALOG

__all__ = ["Tally", "create", "inherited", "release"]

_SLOT = struct.Struct("=Q")
_INDEX = {k.name: i for i, k in enumerate(CATALOG)}
_inherited: Tally | None = None


class Tally:
    """Injected faults per kind, in memory that a fork shares."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SLOT.size * len(CATALOG))  # MAP_SHARED | MAP_ANONYMOUS

    def add(self, name: str, hits: int = 1) -> int:
        """Count ``hits`` more of kind ``name``; its count now."""
        offset = _SLOT.size * _INDEX[name]
        (count,) = _SLOT.unpack_from(self._map, offset)
        _SLOT.pack_into(self._map, offset, count + hits)
        return count + hits

    def get(self, name: str) -> int:
        return _SLOT.unpack_from(self._map, _SLOT.size * _INDEX[name])[0]

    def counts(self) -> dict[str, int]:
        """The kinds injected at least once, in catalog order."""
        return {k.name: n for k, (n,) in zip(CATALOG, _SLOT.iter_unpack(self._map)) if n}


def create() -> Tally:
    """The supervisor's, before it forks: every child inherits it (`inherited`)."""
    global _inherited
    _inherited = Tally()
    return _inherited


def inherited() -> Tally | None:
    """The supervisor's `Tally`, in a process it forked (or itself); None elsewhere."""
    return _inherited


def release() -> None:
    """In a child that does not count (a link worker): unmap the supervisor's `Tally`."""
    global _inherited
    if _inherited is not None:
        _inherited._map.close()
        _inherited = None
