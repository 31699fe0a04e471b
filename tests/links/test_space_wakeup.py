"""The worker's wait for downlink room (links.downlink._wait_space) against the front's
consumes: a consume landing between the worker's look and its doorbell reset still wakes it."""

from __future__ import annotations

import asyncio

import pytest

from bridged.links import downlink as downlink_module
from bridged.links.downlink import Downlink
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(30)


class _Waiter(Downlink):
    """Just the downlink's wait for space, on a real ring."""

    def __init__(self, ring, loop) -> None:
        self.downlink, self.loop = ring, loop
        self._init_downlink(0, 2920)


def test_a_consume_between_the_look_and_the_reset_is_not_lost(monkeypatch):
    """The front frees 1000 bytes (doorbell), then 1500 more just as the worker looks (1000 <
    its 2000): the worker resumes on that second doorbell, not on its next poll."""
    monkeypatch.setattr(downlink_module, "_SPACE_POLL", 60.0)  # the poll would come too late

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with new_ring(4096) as ring:
            ring.put_nowait(bytes(ring.capacity))
            woke = asyncio.Event()
            waiter = _Waiter(ring, loop)
            waiter._wait_space(woke.set, need=2000)
            look = ring.free
            racing = []

            def free() -> int:  # the worker's look, with the front's next batch right behind it
                n = look()
                if racing:
                    ring.consume(racing.pop())
                return n

            ring.free = free
            racing.append(1500)
            ring.consume(1000)
            await asyncio.wait_for(woke.wait(), 5.0)
            assert ring.free is free and not racing  # the race happened as described
            ring.__dict__.pop("free")

    asyncio.run(main())
