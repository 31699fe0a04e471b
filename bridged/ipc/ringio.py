"""A ring's stream I/O in one call each: a link worker's hot paths (a part of ``bridged.ipc.rings.Ring``).

Theory of operation
-------------------
At a UART's line rate a link worker wakes a hundred times a second or more,
and each wake-up moves one piece: the uplink ring's published bytes to the
socket, or one read of the socket into the downlink ring.  Every Python call
on the way costs a few microseconds from cold caches (more than the work it
does), so each move here is one method that does the ring's part inline:
``send_to`` is ``published`` + ``sock.send`` + ``consume``, ``recv_behind``
is ``reserve`` + ``sock.recv_into`` + ``publish``, with the same rules (see
``rings``: data before index, index before doorbell; a torn index reads as
nothing for now) and the same doorbells (held ones owed, a saturated one
left ringing).  What they do not cover (data that wraps, a ring with no
room) they leave untouched for the general calls.
"""

from __future__ import annotations

import os
import socket
import struct

__all__ = ["StreamIO"]

_WRITE = 0  # the index items of rings.py's header: write, quiet flag, read
_QUIET = 1
_READ = 8


class StreamIO:
    """``send_to`` and ``recv_behind``; a part of ``Ring``, which sets up the block and the fds."""

    _index: memoryview
    _data: memoryview
    _capacity: int
    _mask: int
    _held: bool
    _owed_data: bool
    _owed_space: bool
    _producer_views: list
    _consumer_views: list
    data_fd: int
    space_fd: int

    def send_to(self, sock: socket.socket) -> tuple[int, int]:
        """Consumer: the published bytes in one ``sock.send``, and consume what it took
        (then ring ``space_fd``, unless the producer said not to).

        Returns:
            (bytes sent, bytes still published).  (0, n) with nothing sent: none
            published (n = 0), or they wrap around the end of the data area (the
            caller sends both pieces at once: ``readable_views`` and ``sendmsg``).

        Raises:
            What ``sock.send`` raises (BlockingIOError: the socket is full); nothing is consumed.
        """
        index = self._index
        read = index[_READ]
        used = index[_WRITE] - read
        if not 0 < used <= self._capacity:
            return 0, 0  # nothing, or torn: the producer rings once its store lands
        slot = read & self._mask
        if slot + used > self._capacity:
            return 0, used
        sent = sock.send(self._data[slot:slot + used])  # a temporary slice: released as send returns
        if self._consumer_views:
            for view in self._consumer_views:
                view.release()
            self._consumer_views.clear()
        index[_READ] = read + sent  # reads done before index
        if sent and not index[_QUIET]:
            if self._held:
                self._owed_space = True
            else:
                try:
                    os.eventfd_write(self.space_fd, 1)
                except BlockingIOError:
                    pass  # counter saturated: the doorbell is already ringing
        return sent, used - sent

    def recv_behind(self, sock: socket.socket, limit: int, head: struct.Struct, *fields: int) -> int:
        """Producer: one ``sock.recv_into`` the free area ``head.size`` bytes past the write index
        (at most ``limit`` bytes, up to the end of the data area), then ``head.pack(n, *fields)``
        in front of what came, both published at once, then ring ``data_fd`` (owed while held).

        Returns:
            n, the bytes received (0: EOF, nothing published), or -1 with no room for a byte
            behind the head in one piece (nothing read: the caller waits for space, or goes
            on through ``writable_views``, which wrap).

        Raises:
            What ``sock.recv_into`` raises (BlockingIOError: nothing to read); nothing is published.
        """
        index = self._index
        write = index[_WRITE]
        used = write - index[_READ]
        capacity = self._capacity
        size = head.size
        slot = write & self._mask
        start = slot + size
        room = min(limit, capacity - used - size, capacity - start)
        if not 0 <= used <= capacity or room <= 0:
            return -1  # full, torn, or the head would wrap: the general path
        n = sock.recv_into(self._data[start:start + room])
        if not n:
            return 0
        self._data[slot:start] = head.pack(n, *fields)
        if self._producer_views:
            for view in self._producer_views:
                view.release()
            self._producer_views.clear()
        index[_WRITE] = write + size + n  # data before index
        if self._held:  # index before doorbell
            self._owed_data = True
            return n
        try:
            os.eventfd_write(self.data_fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the doorbell is already ringing
        return n
