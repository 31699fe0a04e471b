"""For tests of the front's slot table (bridged.uart.links) on its own."""

from __future__ import annotations

import asyncio


class Unheard:
    """LinkEvents that hear nothing: the slot table (and what drives it) is under test."""

    def link_data(self, slot, record): pass
    def link_notice(self, slot, length): pass
    def link_closed(self, slot, reason): pass
    def link_ended(self, slot): pass
    def link_accepted(self, slot): pass
    def link_freed(self, slot): pass
    def delivery_room(self): return 32768


async def until(predicate, what: str, timeout: float = 5.0) -> None:
    """Until predicate() holds; fails naming `what` after `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout} s") from None
