"""uart.sup_outbox on a real SEQPACKET socketpair: what the full channel to the supervisor cannot
take now waits, in order, and goes out as the supervisor reads; the front never blocks."""

from __future__ import annotations

import asyncio
import time

from bridged.ipc.control import recv_message, send_message, socketpair
from bridged.ipc.messages import FrontReady, Pong, WorkerRefused
from bridged.uart.sup_outbox import SupervisorOutbox

_FILL_MAX = 100_000  # messages: a SEQPACKET pair fills long before


def _filled_pair():
    """(the front's end, the supervisor's end, how many fillers): the front's end full."""
    front, sup = socketpair()
    front.setblocking(False)
    sup.setblocking(False)
    for count in range(_FILL_MAX):
        try:
            send_message(front, Pong(-1 - count))
        except BlockingIOError:
            return front, sup, count
    raise AssertionError("the channel never filled")


def _read_all(sup) -> list:
    """What the supervisor's end holds now, read as the supervisor reads it."""
    got = []
    for _ in range(_FILL_MAX):
        try:
            received = recv_message(sup)
        except BlockingIOError:
            return got
        assert received is not None, "the front's end closed"
        got.append(received[0])
    raise AssertionError("endless messages")


def test_a_refusal_sent_into_a_full_channel_reaches_the_supervisor_in_order():
    """WorkerRefused and FrontReady said while the channel is full wait (send returns at once), then
    arrive after what was queued before them, in order, once the supervisor reads; of two
    waiting Pongs only the newer goes (it answers the latest ping)."""

    async def main():
        front, sup, fillers = _filled_pair()
        outbox = SupervisorOutbox(asyncio.get_running_loop(), front)
        started = time.monotonic()
        outbox.send(Pong(1))
        outbox.send(WorkerRefused(3, 4242))
        outbox.send(Pong(2))
        outbox.send(FrontReady("tty"))
        assert time.monotonic() - started < 0.1  # never waited on the channel
        await asyncio.sleep(0.05)
        assert len(_read_all(sup)) == fillers  # the supervisor reads: room comes
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 3:  # the front's loop: its writer sends what waits
            assert time.monotonic() < deadline, f"only {got} went out"
            await asyncio.sleep(0.01)
            got += _read_all(sup)
        assert got == [WorkerRefused(3, 4242), Pong(2), FrontReady("tty")]
        outbox.send(Pong(3))  # room again: at once
        assert _read_all(sup) == [Pong(3)]
        outbox.close()
        front.close()
        sup.close()

    asyncio.run(main())


def test_a_gone_supervisor_drops_what_waits_without_raising():
    """The supervisor's end closes while a refusal waits: the writer's try fails quietly (logged),
    nothing is left watched, and later messages are not kept."""

    async def main():
        front, sup, _ = _filled_pair()
        loop = asyncio.get_running_loop()
        outbox = SupervisorOutbox(loop, front)
        outbox.send(WorkerRefused(1, 99))
        assert list(outbox._waiting) == [WorkerRefused(1, 99)]
        sup.close()
        deadline = time.monotonic() + 5
        while outbox._waiting:
            assert time.monotonic() < deadline, "the writer never ran"
            await asyncio.sleep(0.01)
        assert not loop.remove_writer(front.fileno())  # nothing watched any more
        outbox.send(Pong(1))  # EPIPE: logged, not kept
        assert not outbox._waiting
        outbox.close()
        front.close()

    asyncio.run(main())


def test_a_port_failure_said_into_a_full_channel_reaches_the_supervisor_at_close():
    """The front says PortFailed and ends at once (uart.reading): the channel is full, so it waits, and
    close() must still hand it over once the supervisor reads (bounded), not drop it."""
    import threading

    from bridged.ipc.messages import PortFailed

    async def main():
        front, sup, fillers = _filled_pair()
        outbox = SupervisorOutbox(asyncio.get_running_loop(), front)
        outbox.send(PortFailed("/dev/ttyX hung up"))
        got = []

        def supervisor_reads():  # busy for 0.2 s, then reads its channel as its loop does
            time.sleep(0.2)
            deadline = time.monotonic() + 5
            while len(got) < fillers + 1 and time.monotonic() < deadline:
                got.extend(_read_all(sup))
                time.sleep(0.01)

        reader = threading.Thread(target=supervisor_reads)
        reader.start()
        started = time.monotonic()
        outbox.close()  # the front ends right after PortFailed
        assert time.monotonic() - started < 2.0  # bounded
        reader.join(10)
        assert got[fillers:] == [PortFailed("/dev/ttyX hung up")]
        front.close()
        sup.close()

    asyncio.run(main())


def test_close_gives_up_on_a_supervisor_that_never_reads():
    """A supervisor that reads no more: the ending front's last try is bounded (about 1 s), then what
    waits is dropped; close() never hangs the front's exit."""

    async def main():
        front, sup, fillers = _filled_pair()
        outbox = SupervisorOutbox(asyncio.get_running_loop(), front)
        outbox.send(WorkerRefused(2, 77))
        started = time.monotonic()
        outbox.close()
        assert 0.5 < time.monotonic() - started < 2.0
        assert not outbox._waiting and front.gettimeout() == 0.0  # non-blocking as it was
        assert len(_read_all(sup)) == fillers
        front.close()
        sup.close()

    asyncio.run(main())


def test_past_the_cap_ready_and_port_failed_still_wait_refusals_are_dropped():
    """A supervisor that stopped reading while refusals piled up past the cap: a further refusal
    is dropped (logged), but FrontReady and PortFailed, said once per front and never again,
    still wait and arrive, in order, once it reads."""
    from bridged.ipc.messages import PortFailed
    from bridged.uart.sup_outbox import _MAX_WAITING

    async def main():
        front, sup, fillers = _filled_pair()
        outbox = SupervisorOutbox(asyncio.get_running_loop(), front)
        for pid in range(_MAX_WAITING):
            outbox.send(WorkerRefused(pid % 5, 1000 + pid))
        outbox.send(WorkerRefused(0, 99))  # past the cap: dropped
        outbox.send(FrontReady("tty"))
        outbox.send(PortFailed("gone"))
        got = []
        deadline = time.monotonic() + 5
        while len(got) < fillers + _MAX_WAITING + 2:
            assert time.monotonic() < deadline, f"{len(got) - fillers} of {_MAX_WAITING + 2} went out"
            await asyncio.sleep(0.01)
            got += _read_all(sup)
        assert got[fillers:] == ([WorkerRefused(pid % 5, 1000 + pid) for pid in range(_MAX_WAITING)]
                                 + [FrontReady("tty"), PortFailed("gone")])
        outbox.close()
        front.close()
        sup.close()

    asyncio.run(main())
