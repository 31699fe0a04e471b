"""A reader that pauses and resumes with one syscall each.

Coalescing pauses reading a few hundred times a second (the UART front while
the MCU streams at UART speed, a link worker while data streams in).  With
uvloop, ``remove_reader`` closes the fd's poll handle and the next
``add_reader`` builds a new one: an ioctl, several epoll_ctl calls and an
io_uring submission, plus the handle objects, every time.

A ReadGate is an epoll set of our own holding at most one fd; the event loop
watches the set's fd for good, so the callback runs whenever the watched fd
is readable and the gate is open.  Opening and shutting the gate is one
epoll_ctl.  Readiness is level-triggered as with ``add_reader``: a callback
that leaves data unread is called again.

``open``/``shut`` set what the owner wants from moment to moment (a full
ring); a *hold* is a named reason to stay shut whatever is asked meanwhile
(the UART output backed up, a coalescing pause): the gate opens again when
the last hold is released, if the owner still wants it open then.  So a
pause's end opens only what nothing else keeps shut.

The gate tells its owner (``on_hold``) when it starts and stops *holding*
input: shut for back-pressure (a hold, or ``shut()``), as opposed to a
moment's pause to let reads gather (``shut(hold=False)``, or a hold with
``press=False``).  The UART front
drives RTS from it.
"""

from __future__ import annotations

import asyncio
import select
from typing import Callable

__all__ = ["ReadGate"]


class ReadGate:
    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None],
                 on_hold: Callable[[bool], None] | None = None) -> None:
        self._loop = loop
        self._epoll = select.epoll(1)  # close-on-exec, as Python makes every fd
        self.open_fd: int | None = None  # the fd the gate lets through, when open (read-only)
        self._wanted: int | None = None  # the fd open() asked for last, unless shut() since
        self._holds: set[str] = set()
        self._pauses: set[str] = set()  # holds that are pauses, not back-pressure
        self._pressed = False  # shut() for back-pressure, not a pause
        self._on_hold = on_hold
        self.holding = False  # held shut for back-pressure (a hold or shut())
        self.is_open = False  # open_fd is not None, kept as a plain attribute (hot paths ask it)
        loop.add_reader(self._epoll.fileno(), callback)

    @property
    def holds(self) -> frozenset[str]:
        """The reasons the gate is held shut."""
        return frozenset(self._holds)

    def paused_only(self, reason: str) -> bool:
        """Whether ``reason`` is the only hold and open() was asked last: releasing it would
        open the gate (its owner may read once itself instead, and keep the hold)."""
        return self._wanted is not None and len(self._holds) == 1 and reason in self._holds

    def open(self, fd: int) -> None:
        """Call back whenever ``fd`` is readable (an open gate for another fd is shut first);
        while held, only once the last hold is released.

        After close() it does nothing: callbacks still queued at shutdown may ask.
        """
        if self._epoll.closed:
            return
        self._wanted = fd
        self._pressed = False
        self._tell()
        if self._holds or self.open_fd == fd:
            return
        self._unregister()
        self._epoll.register(fd, select.EPOLLIN)
        self.open_fd = fd
        self.is_open = True

    def shut(self, hold: bool = True) -> None:
        """Stop calling back; call it before closing the fd (a duplicate of a
        closed fd would otherwise keep its registration alive).

        ``hold``: input is held back until further notice; False for a pause
        that reopens by itself in a moment (the owner is not told).
        """
        if self.open_fd is None and self._wanted is None and self._pressed == hold:
            return  # shut so already (a passthrough downlink paused again at every tick)
        self._wanted = None
        self._pressed = hold
        self._unregister()
        self._tell()

    def hold(self, reason: str, press: bool = True) -> None:
        """Stay shut for ``reason`` until release(reason), whatever open() asks meanwhile.

        ``press``: False for a pause (input is not held back: the owner is not told).
        """
        self._holds.add(reason)
        if not press:
            self._pauses.add(reason)
        self._unregister()
        self._tell()

    def release(self, reason: str) -> None:
        """Drop one reason to stay shut; open again if none is left and open() was asked last."""
        self._holds.discard(reason)
        self._pauses.discard(reason)
        if not self._holds and self._wanted is not None:
            self.open(self._wanted)
        else:
            self._tell()

    def _tell(self) -> None:
        # A hold not a pause is left (the pauses are always among the holds: no set difference made).
        holding = self._pressed or self._holds != self._pauses
        if holding != self.holding:
            self.holding = holding
            if self._on_hold is not None:
                self._on_hold(holding)

    def _unregister(self) -> None:
        if self.open_fd is None:
            return
        fd, self.open_fd = self.open_fd, None
        self.is_open = False
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel dropped the registration with it

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._unregister()
        self._wanted = None
        self._holds.clear()
        self._pauses.clear()
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
