"""ReadGate under uvloop with real sockets: level-triggered, shut, reopened, moved."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from bridged.readgate import ReadGate


@pytest.fixture
def pair():
    """(writer, non-blocking reader) of a socketpair."""
    a, b = socket.socketpair()
    b.setblocking(False)
    with a, b:
        yield a, b


def _run(coro):
    return uvloop.run(asyncio.wait_for(coro, 10.0))


async def _turns(n: int = 5) -> None:
    """A few loop turns in which nothing may arrive (a shut gate's silence)."""
    for _ in range(n):
        await asyncio.sleep(0.005)


async def _until(predicate) -> None:
    """Until ``predicate()`` holds: the callbacks the test expects have come (5 s at most)."""
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.001)


def test_calls_back_while_open_and_readable(pair):
    a, b = pair

    async def main():
        got: list[bytes] = []
        gate = ReadGate(asyncio.get_running_loop(), lambda: got.append(b.recv(1)))
        gate.open(b.fileno())
        a.send(b"xyz")
        # Level-triggered: one byte per call until nothing is left.
        await _until(lambda: len(got) >= 3)
        await _turns()  # and no call more
        assert got == [b"x", b"y", b"z"]
        gate.close()

    _run(main())


def test_a_shut_gate_holds_data_back_until_reopened(pair):
    a, b = pair

    async def main():
        got: list[bytes] = []
        gate = ReadGate(asyncio.get_running_loop(), lambda: got.append(b.recv(100)))
        gate.open(b.fileno())
        gate.shut()
        assert not gate.is_open
        a.send(b"held")
        await _turns()
        assert got == []
        gate.open(b.fileno())
        await _until(lambda: got)
        assert got == [b"held"]
        gate.close()

    _run(main())


def test_open_for_another_fd_moves_the_gate_and_shut_survives_a_closed_fd():
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    for s in (b1, b2):
        s.setblocking(False)

    async def main():
        got: list[tuple[int, bytes]] = []

        def on_readable():
            for s in (b1, b2):
                try:
                    got.append((s.fileno(), s.recv(100)))
                except BlockingIOError:
                    pass

        gate = ReadGate(asyncio.get_running_loop(), on_readable)
        gate.open(b1.fileno())
        gate.open(b2.fileno())  # b1 is no longer watched
        a1.send(b"one")
        await _turns()
        assert got == []
        a2.send(b"two")
        await _until(lambda: got)
        assert (b2.fileno(), b"two") in got and (b1.fileno(), b"one") in got
        fd = b2.fileno()
        b2.close()
        gate.shut()  # after the fd went: no error
        assert not gate.is_open and fd > 0
        gate.close()

    with a1, b1, a2:
        _run(main())


def test_after_close_the_gate_ignores_open_and_shut(pair):
    _, b = pair

    async def main():
        gate = ReadGate(asyncio.get_running_loop(), lambda: None)
        gate.close()
        gate.open(b.fileno())  # a callback queued at shutdown may still ask
        gate.shut()
        gate.close()
        assert not gate.is_open

    _run(main())


def test_a_hold_keeps_the_gate_shut_until_released_and_open_was_asked_last(pair):
    """A held gate ignores open() until every hold is released; it then opens only if open() was asked last."""
    a, b = pair

    async def main():
        got: list[bytes] = []
        gate = ReadGate(asyncio.get_running_loop(), lambda: got.append(b.recv(100)))
        gate.open(b.fileno())
        gate.hold("output backlog")
        gate.hold("after-action")
        gate.open(b.fileno())  # a coalescing timer, say: still held
        a.send(b"held")
        await _turns()
        assert got == [] and not gate.is_open
        assert gate.holds == {"output backlog", "after-action"}
        gate.release("output backlog")
        await _turns()
        assert got == [] and gate.holds == {"after-action"}
        gate.release("after-action")
        await _until(lambda: got)
        assert got == [b"held"] and gate.is_open
        gate.hold("output backlog")
        gate.shut()  # the owner wants it shut (a full ring): a release leaves it so
        gate.release("output backlog")
        a.send(b"later")
        await _turns()
        assert got == [b"held"] and not gate.is_open
        gate.open(b.fileno())
        await _until(lambda: len(got) >= 2)
        assert got == [b"held", b"later"]
        gate.close()


def test_the_owner_hears_holding_not_pauses(pair):
    """on_hold hears when the gate starts and stops holding input (shut), once
    each, but not a pause (shut(hold=False)) nor an open of an open gate."""
    a, b = pair

    async def main():
        heard: list[bool] = []
        gate = ReadGate(asyncio.get_running_loop(), lambda: b.recv(100), on_hold=heard.append)
        gate.open(b.fileno())
        gate.shut(hold=False)
        gate.open(b.fileno())
        assert heard == []
        gate.shut()
        gate.shut()
        assert gate.holding and heard == [True]
        gate.open(b.fileno())
        gate.open(b.fileno())
        assert not gate.holding and heard == [True, False]
        gate.close()
        assert heard == [True, False]  # closing is no hold

    _run(main())


def test_a_pause_ends_without_opening_what_the_owner_shut_meanwhile(pair):
    """A pause (hold with press=False) leaves `holding` alone, and its release opens the gate
    only if the owner's last word was open(): a shut() during the pause (a full ring) stands."""
    a, b = pair

    async def main():
        got: list[bytes] = []
        told: list[bool] = []
        gate = ReadGate(asyncio.get_running_loop(), lambda: got.append(b.recv(64)), on_hold=told.append)
        gate.open(b.fileno())
        gate.hold("pause", press=False)
        assert not gate.holding and told == []  # a pause is not back-pressure
        gate.shut()  # the owner's back-pressure, during the pause
        gate.release("pause")
        a.send(b"x")
        await _turns()
        assert got == [] and not gate.is_open and gate.holding
        gate.open(b.fileno())  # room again
        await _until(lambda: got)
        assert got == [b"x"]
        gate.hold("pause", press=False)
        gate.release("pause")  # nothing else keeps it shut: open again
        assert gate.is_open
        gate.close()

    _run(main())


def test_paused_only_says_whether_releasing_the_pause_would_open(pair):
    """The UART front reads on its coalescing tick itself while only its pause holds the gate:
    never while another hold or a shut() (a full ring) keeps it shut."""
    a, b = pair

    async def main():
        gate = ReadGate(asyncio.get_running_loop(), lambda: None)
        gate.open(b.fileno())
        assert not gate.paused_only("coalesce")  # open: nothing to release
        gate.hold("coalesce")
        assert gate.paused_only("coalesce")
        gate.hold("backlog")
        assert not gate.paused_only("coalesce")  # releasing the pause would not open it
        gate.release("backlog")
        assert gate.paused_only("coalesce")
        gate.shut()  # the owner no longer wants it open (a full ring)
        assert not gate.paused_only("coalesce")
        gate.close()

    _run(main())
