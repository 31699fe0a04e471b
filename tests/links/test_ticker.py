"""Read batching's periodic timer (bridged.links.ticker): ticks on the monotonic grid until
disarmed, a fired tick not yet called back is dropped by disarm(), through os (3.13+) and libc."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import uvloop

from bridged.links import ticker as ticker_module
from bridged.links.batching import next_tick
from bridged.links.ticker import Ticker

pytestmark = pytest.mark.timeout(30)

PERIOD = 0.02
IMPLEMENTATIONS = ["libc"] + (["os"] if hasattr(os, "timerfd_create") else [])


@pytest.fixture(params=IMPLEMENTATIONS)
def timerfd(request, monkeypatch):
    """Each way to reach timerfd this Python has."""
    impl = ticker_module._LibcTimerfd if request.param == "libc" else ticker_module._OsTimerfd
    monkeypatch.setattr(ticker_module, "_timerfd", impl)
    return request.param


def _run(script):
    async def main():
        return await script(asyncio.get_running_loop())
    return uvloop.run(main())


def test_ticks_fall_on_the_grid_a_period_apart(timerfd):
    """Armed once, the ticker calls back on each multiple of the period (not before it), five times running.

    A late tick must still come before the next is due, which no ticker can do while the machine
    leaves the loop unscheduled for a period (20 ms; seen under the suite's load): up to three runs,
    one with every tick in its period passes.  A tick before its time or off the grid fails at once,
    a ticker a period behind (a wrong period, a tick lost) in every run."""
    async def script(loop):
        times: list[float] = []
        done = loop.create_future()

        def tick():
            times.append(time.monotonic())
            if len(times) == 5:
                done.set_result(None)

        t = Ticker(loop, tick)
        try:
            first = next_tick(time.monotonic(), PERIOD)
            t.arm(first, PERIOD)
            await asyncio.wait_for(done, 5)
            t.disarm()
        finally:
            t.close()
        return first, times

    for _ in range(3):
        first, times = _run(script)
        assert round(first / PERIOD, 6) == round(first / PERIOD)  # on the shared grid
        lags = [(i, at - (first + i * PERIOD)) for i, at in enumerate(times)]
        assert len(lags) == 5 and all(lag >= 0 for _, lag in lags), lags  # never before it is due
        if all(lag < PERIOD for _, lag in lags):  # a late tick still comes before the next is due
            return
    raise AssertionError(f"a tick a period late in each of three runs; the last: {lags}")


def test_disarm_drops_a_tick_that_fired_unread(timerfd):
    """A tick that fired while the loop was busy is not called back once disarmed, nor any later."""
    async def script(loop):
        calls: list[float] = []
        t = Ticker(loop, lambda: calls.append(time.monotonic()))
        try:
            t.arm(time.monotonic() + 0.002, PERIOD)
            time.sleep(0.01)  # the loop busy: the tick fires, unread
            t.disarm()
            await asyncio.sleep(3 * PERIOD)
            disarmed = list(calls)
            t.arm(next_tick(time.monotonic(), PERIOD), PERIOD)  # and it arms again
            await asyncio.sleep(3 * PERIOD)
            t.disarm()
        finally:
            t.close()
        return disarmed, calls

    disarmed, calls = _run(script)
    assert disarmed == []
    assert len(calls) >= 2


def test_close_stops_ticks_and_frees_the_fd(timerfd):
    """close() on an armed ticker: no callback after it, and its fd is closed."""
    async def script(loop):
        calls: list[float] = []
        t = Ticker(loop, lambda: calls.append(time.monotonic()))
        fd = t._fd
        t.arm(next_tick(time.monotonic(), PERIOD), PERIOD)
        t.close()
        t.close()  # idempotent
        await asyncio.sleep(3 * PERIOD)
        return calls, fd

    calls, fd = _run(script)
    assert calls == []
    with pytest.raises(OSError):
        os.fstat(fd)
