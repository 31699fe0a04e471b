"""Single-producer single-consumer byte rings in shared memory.

Theory of operation
-------------------
A ring is a block of shared memory (a ``memfd``) holding a 128-byte header
and a data area of ``capacity`` bytes (a power of two). The header holds two
64-bit little-endian counters, each on its own 64-byte cache line so the two
processes do not false-share: the *write index* (offset 0) and the *read
index* (offset 64). The rules are those of Linux's
``Documentation/core-api/circular-buffers.rst``:

- exactly one producer and one consumer;
- each side owns one index and is the only one to store it (the producer the
  write index, the consumer the read index); the other side only loads it;
- the producer writes the data before it stores the index that covers it, and
  the consumer reads the data before it stores the index that frees it.

Counters never wrap (64 bits last for centuries); the slot of a counter is
``counter & (capacity - 1)``; ``write - read`` bytes are in the ring.

Each direction has an eventfd doorbell (``bridged.ipc.doorbells``: how it orders
publication on weakly ordered CPUs): the producer rings ``data_fd`` after
publishing, the consumer ``space_fd`` after consuming (unless the producer
said it need not: ``want_space_doorbell``).

An index is stored with one aligned 8-byte store (an item of a native "Q"
memoryview), single-copy atomic on x86-64 and AArch64. On 32-bit CPUs it may
tear into two halves, off by about 2**32: the range check ``0 <= write - read
<= capacity`` fails and the ring reports no data / no space for now, which is
safe: the other side rings its doorbell once the store completes.

Processes and shared memory
---------------------------
The supervisor creates every ring before it forks; children use the inherited
mapping of an anonymous ``memfd`` (``bridged.ipc.memblock``): nothing can attach to
it by name, nothing is left behind however the processes end. ``close()`` drops
the mapping in the calling process only (a child closes other links' rings).

A Ring object keeps no index of its own (state lives in the shared header): a
worker forked again after a crash carries on where the dead one stopped.

Views
-----
``writable_views`` and ``readable_views`` return memoryviews straight into the shared block,
for zero-copy ``sock.recv_into`` / ``sock.send``. They stay valid until the next call that
hands out or settles views on the same side (``writable_views``/``commit``/``publish`` for the
producer, ``readable_views``/``consume``/``discard_all`` for the consumer) or ``close()``; the
ring then releases them. A caller that slices a view must release its slices itself, or
``close()`` fails with ``BufferError``. ``send_to`` and ``recv_behind`` (``bridged.ipc.ringio``:
a link worker's hot paths) do the send or the recv_into and the settling in one call each.
"""

from __future__ import annotations

import mmap
import os
import time

from bridged.ipc.doorbells import _COMMITTED, _POLLED, _QUIET, POLLED_BULK, Doorbells, new_doorbells
from bridged.ipc.memblock import create_block
from bridged.ipc.ringio import StreamIO

__all__ = ["Ring", "MIN_CAPACITY", "HEADER_SIZE"]

MIN_CAPACITY = 4096
HEADER_SIZE = 128
# Indices as items of a native unsigned 64-bit view: memoryview stores and
# loads such an item with one aligned 8-byte access, which x86-64 and ARMv8
# make single-copy atomic.  (struct's "<Q" writes byte by byte: the other
# process could see half an update.)
_WRITE = 0  # item 0: byte offset 0
_READ = 8  # item 8: byte offset 64, its own cache line
# (items 1, _QUIET, 2, _COMMITTED, and 9, _POLLED, are the doorbells': bridged.ipc.doorbells)


def _release(views: list[memoryview]) -> None:
    for view in views:
        view.release()
    views.clear()


class Ring(Doorbells, StreamIO):
    """An SPSC byte ring in shared memory with two eventfd doorbells."""

    def __init__(
        self, block: mmap.mmap, label: str, capacity: int, data_fd: int, space_fd: int
    ) -> None:
        # Use Ring.create(); this only wires up an already created block.
        self._block = block
        self._label = label
        self._capacity = capacity
        self._mask = capacity - 1
        self._buf = memoryview(block)
        self._header = self._buf[:HEADER_SIZE]
        self._index = self._header.cast("Q")
        self._data = self._buf[HEADER_SIZE : HEADER_SIZE + capacity]
        self.data_fd = data_fd
        self.space_fd = space_fd
        self._held = False  # doorbells owed, not yet rung (see hold_doorbells)
        self._owed_data = self._owed_space = False
        self._producer_views: list[memoryview] = []
        self._consumer_views: list[memoryview] = []
        self._closed = False

    @classmethod
    def create(cls, capacity: int, label: str = "ring") -> Ring:
        """Create a ring of ``capacity`` bytes (a power of two >= 4096).

        Args:
            label: shown as ``/memfd:bridged-<label>`` in /proc (e.g. "link2-up").

        Raises:
            ValueError: capacity is not a power of two or is below 4096.
            OSError: no memory or descriptors left.
        """
        if capacity < MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two >= {MIN_CAPACITY}")
        block = create_block(HEADER_SIZE + capacity, label)
        try:
            data_fd, space_fd = new_doorbells()
        except OSError:
            block.close()
            raise
        # A fresh block is zero-filled: both counters start at 0.
        return cls(block, label, capacity, data_fd, space_fd)

    def __repr__(self) -> str:
        if self._closed:
            return f"<Ring {self.name} closed>"
        return (
            f"<Ring {self.name} capacity={self._capacity} "
            f"write={self.write_index} read={self.read_index}>"
        )

    # -- indices ---------------------------------------------------------------

    @property
    def name(self) -> str:
        """The block's label as /proc shows it (no file has this name)."""
        return f"bridged-{self._label}"

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def write_index(self) -> int:
        return self._index[_WRITE]

    @property
    def read_index(self) -> int:
        return self._index[_READ]

    # -- shared helpers ----------------------------------------------------------

    def _load(self) -> tuple[int, int, int | None]:
        """Return (write, read, write - read); the last is None if torn."""
        index = self._index
        write = index[_WRITE]
        read = index[_READ]
        if 0 <= write - read <= self._capacity:
            return write, read, write - read
        for _ in range(3):
            write = index[_WRITE]
            read = index[_READ]
            if 0 <= write - read <= self._capacity:
                return write, read, write - read
        # Still torn: the other side was preempted mid-store (32-bit CPUs only).
        return write, read, None

    def _segments(self, start: int, length: int) -> list[memoryview]:
        """Views covering ``length`` bytes from counter ``start`` (1 or 2 pieces)."""
        if length <= 0:
            return []
        slot = start & self._mask
        first = min(length, self._capacity - slot)
        views = [self._data[slot : slot + first]]
        if length > first:
            views.append(self._data[: length - first])
        return views

    # While an index reads torn, calls that discover data or space (free, available, published,
    # *_views) report none: the other side rings once its store lands. Calls about bytes the
    # caller already knows of (stage, commit, peek, consume) only check against the capacity.

    # -- producer side -------------------------------------------------------------

    def free(self) -> int:
        """Bytes the producer may write now."""
        _, _, used = self._load()
        return 0 if used is None else self._capacity - used

    def writable_views(self, limit: int, skip: int = 0) -> list[memoryview]:
        """Views of the free area, ``skip`` bytes past the write index.

        Returns 0, 1 or 2 contiguous segments totalling
        ``min(limit, free() - skip)`` bytes; nothing is published until
        ``commit()``. Views from an earlier call are released first.
        """
        _release(self._producer_views)
        write, _, used = self._load()
        room = 0 if used is None else self._capacity - used
        views = self._segments(write + skip, min(limit, room - skip))
        self._producer_views.extend(views)
        return views

    def reserve(self, skip: int, limit: int) -> memoryview | None:
        """One contiguous view of at most ``limit`` free bytes, ``skip`` past the write index
        (shorter than the free space where the free area wraps); None when there is no room after
        ``skip``.  The lean form of writable_views for the hot receive path: the caller owns the
        view (a temporary: it must not outlive the next publish)."""
        index = self._index
        write = index[_WRITE]
        used = write - index[_READ]
        if not 0 <= used <= self._capacity:
            return None  # torn read: the other side rings once its store lands
        slot = (write + skip) & self._mask
        n = min(limit, self._capacity - used - skip, self._capacity - slot)
        return self._data[slot : slot + n] if n > 0 else None

    def unpublished(self, length: int) -> bytes:
        """A copy of ``length`` bytes written past the write index, not committed yet: the
        producer's own (no look at the read index, which may read torn on 32-bit CPUs)."""
        return b"".join(bytes(view) for view in self._segments(self._index[_WRITE], length))

    def publish(self, head: bytes, n: int) -> None:
        """Write ``head`` at the write index and publish it with the ``n`` bytes already
        written after it (through ``reserve``), then ring.  ValueError if they exceed the free space."""
        index = self._index
        write = index[_WRITE]
        total = len(head) + n
        slot = write & self._mask
        end = slot + len(head)
        if not 0 <= write - index[_READ] <= self._capacity - total or end > self._capacity:
            self.stage(0, head)  # torn, too big or a wrapped head: the general path
            self.commit(total)
            return
        self._data[slot:end] = head
        if self._producer_views:
            _release(self._producer_views)
        index[_WRITE] = write + total  # data before index
        # _doorbell(data_fd) and ring_doorbell, inline: this runs for every record a link receives.
        if self._held:  # index before doorbell
            self._owed_data = True
            return
        try:
            os.eventfd_write(self.data_fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the doorbell is already ringing

    def stage(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the free area ``offset`` bytes past the write index.

        Unpublished until ``commit()``. Raises ValueError if it does not fit.
        """
        if type(data) is bytes:  # the common case (record headers, joined payloads) in one slice
            write, _, used = self._load()
            slot = (write + offset) & self._mask
            end = slot + len(data)
            if used is not None and 0 <= offset and offset + len(data) <= self._capacity - used \
                    and end <= self._capacity:
                self._data[slot:end] = data
                return
        with memoryview(data) as src, src.cast("B") as flat:
            write, _, used = self._load()
            room = self._capacity if used is None else self._capacity - used
            if offset < 0 or offset + len(flat) > room:
                raise ValueError(f"stage of {len(flat)} bytes at {offset} exceeds free {room}")
            pos = 0
            for view in self._segments(write + offset, len(flat)):
                with view:
                    end = pos + len(view)
                    view[:] = flat[pos:end]
                pos = end

    def commit(self, n: int, at: float = 0.0) -> None:
        """Publish ``n`` bytes written into the free area, then ring ``data_fd`` (unless the
        consumer polls the ring and it is a bulk commit, at most half full, close behind the last: ``poll_on_tick``).
        ``at``: when the last of them came (``time.monotonic()``; 0: now), if earlier than now."""
        write, _, used = self._load()
        room = self._capacity if used is None else self._capacity - used
        if not 0 <= n <= room:
            raise ValueError(f"commit of {n} bytes exceeds free space {room}")
        if self._producer_views:
            _release(self._producer_views)
        if n:
            index = self._index
            now, last = time.monotonic_ns(), index[_COMMITTED]
            now = min(now, int(at * 1e9)) if at else now  # a stream's tail held for AT+TRANSINTVL
            index[_COMMITTED] = now  # its time before the index: whoever sees the bytes sees when they came
            index[_WRITE] = write + n  # data before index
            # index before doorbell; none while the consumer polls (unless the ring fills, a quiet spell ends,
            # or it is small: poll_on_tick)
            quiet = index[_POLLED]
            if not quiet or n < POLLED_BULK or used is None or used + n > self._capacity >> 1 or now - last >= quiet:
                self._doorbell(self.data_fd)

    def put_nowait(self, data: bytes | bytearray | memoryview, at: float = 0.0) -> int:
        """Copy as much of ``data`` as fits, publish it (``at``: as commit's); return the count (0 if full)."""
        with memoryview(data) as src, src.cast("B") as flat:
            n = min(len(flat), self.free())
            if n:
                self.stage(0, flat[:n])
                self.commit(n, at)
        return n

    # -- consumer side -------------------------------------------------------------

    def available(self) -> int:
        """Bytes the consumer may read now."""
        _, _, used = self._load()
        return 0 if used is None else used

    def published(self) -> tuple[memoryview, int, int]:
        """(data area, read index, bytes published: 0 while torn) for a pass of reads
        (``records.take_records``); a slot is ``counter & (capacity - 1)``, data may wrap."""
        index = self._index
        read = index[_READ]
        used = index[_WRITE] - read
        if not 0 <= used <= self._capacity:
            _, read, used = self._load()
        return self._data, read, used or 0

    def readable_views(self, limit: int, skip: int = 0) -> list[memoryview]:
        """Views of published data, ``skip`` bytes past the read index.

        Returns 0, 1 or 2 contiguous segments totalling ``min(limit, available() -
        skip)`` bytes. Views from an earlier call are released first."""
        _release(self._consumer_views)
        _, read, used = self._load()
        views = self._segments(read + skip, min(limit, (used or 0) - skip))
        self._consumer_views.extend(views)
        return views

    def peek(self, length: int, offset: int = 0) -> bytes:
        """Copy ``length`` published bytes from ``offset`` past the read index (else ValueError)."""
        _, read, used = self._load()
        limit = self._capacity if used is None else used
        if offset < 0 or length < 0 or offset + length > limit:
            raise ValueError(f"peek of {length} bytes at {offset} exceeds available {limit}")
        slot = (read + offset) & self._mask
        if slot + length <= self._capacity:  # contiguous: one copy, no list
            return self._data[slot : slot + length].tobytes()
        views = self._segments(read + offset, length)
        try:
            return b"".join(views)
        finally:
            _release(views)

    def consume(self, n: int) -> None:
        """Free ``n`` bytes at the read index, then ring ``space_fd``."""
        index = self._index
        read = index[_READ]
        if not 0 <= n <= index[_WRITE] - read <= self._capacity:  # torn or too much: look again
            _, read, used = self._load()
            limit = self._capacity if used is None else used
            if not 0 <= n <= limit:
                raise ValueError(f"consume of {n} bytes exceeds available {limit}")
        if self._consumer_views:
            _release(self._consumer_views)
        if n:
            self._index[_READ] = read + n  # reads done before index
            if not self._index[_QUIET]:
                self._doorbell(self.space_fd)

    def get_nowait(self, limit: int) -> bytes:
        """Copy out and consume up to ``limit`` bytes (b"" if empty)."""
        views = self.readable_views(limit)
        data = b"".join(views)
        self.consume(len(data))
        return data

    def discard_all(self) -> int:
        """Drop everything published so far; return how many bytes that was."""
        n = self.available()
        self.consume(n)
        return n

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the ring and close its doorbells in this process (idempotent).

        Raises:
            BufferError: the caller still holds a slice of a view it was given.
        """
        if self._closed:
            return
        _release(self._producer_views)
        _release(self._consumer_views)
        self._index.release()
        self._header.release()
        self._data.release()
        self._buf.release()
        self._block.close()
        os.close(self.data_fd)
        os.close(self.space_fd)
        self._closed = True
