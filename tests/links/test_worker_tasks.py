"""The link worker's one TaskGroup: a connect that fails unexpectedly ends the
worker non-zero with its traceback logged (run_worker, as in the daemon); a
connect the host closes, or one under way when the worker stops, is cancelled
and the worker goes on (or ends) as before."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import uvloop
from structlog.testing import capture_logs

from bridged.config import default_config
from bridged.ipc import records
from bridged.ipc.control import recv_message, send_message, socketpair
from bridged.ipc.messages import Close, Connect, ConnectFailed, Connected, Ended, FireFault, Hello
from bridged.links import connecting
from bridged.links.main import TASK_FAILED, run_worker
from bridged.links.worker import Worker
from tests.links.control import recv_control as _recv, recv_until
from tests.links.workers import LiveWorker, drive_worker
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)


def test_a_task_that_raises_is_logged_and_ends_the_worker(monkeypatch, tmp_path):
    """A connect task raising what no network error raises: the worker exits with TASK_FAILED and logs the traceback."""

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug in the connect path")

    monkeypatch.setattr(connecting, "open_tcp", broken)
    ours, theirs = socketpair()
    send_message(ours, Connect(1, "TCP", "127.0.0.1", 9))  # read once the worker runs
    result: list[int] = []
    ended = threading.Event()
    try:
        with new_ring() as up, new_ring() as down, capture_logs() as logs:
            def watchdog() -> None:  # a worker that swallowed the failure would serve on
                if not ended.wait(20):
                    ours.close()  # EOF: the worker ends with FRONT_GONE, the assert below fails

            threading.Thread(target=watchdog, daemon=True).start()
            result.append(run_worker(default_config(), 0, theirs, up, down, tmp_path))
            ended.set()
    finally:
        ended.set()
        ours.close()
        theirs.close()
    assert result == [TASK_FAILED]
    failed = [e for e in logs if e["event"] == "worker_task_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"
    exc = failed[0]["exc_info"]
    assert isinstance(exc, RuntimeError) and str(exc) == "a bug in the connect path"
    assert exc.__traceback__ is not None  # rendered with the log line (bridged.log)


def test_a_connect_closed_by_the_host_is_cancelled_and_the_worker_goes_on():
    """Close during a connect (held by net_connect_timeout): Ended and an EOF record, and the next connect opens."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    async def script(live: LiveWorker) -> tuple[list[object], records.Record]:
        ours = live.control
        send_message(ours, FireFault("net_connect_timeout", ()))  # the next connect waits 5 s
        send_message(ours, Connect(1, "TCP", "127.0.0.1", port))
        await asyncio.sleep(0.2)
        send_message(ours, Close(1))
        answers = [await _recv(ours)]
        while not isinstance(answers[-1], Ended):
            answers.append(await _recv(ours))
        eof = records.get_record(live.down)
        send_message(ours, Connect(2, "TCP", "127.0.0.1", port))
        while not isinstance(answers[-1], Connected):
            answers.append(await _recv(ours))
        assert not live.running.done()
        await live.stop()
        return answers, eof

    try:
        answers, eof = drive_worker(script)
    finally:
        server.close()
    (ended,) = [a for a in answers if isinstance(a, Ended)]
    assert ended.conn_id == 1 and ended.reason == "closed by host"
    assert eof.kind == records.EOF and eof.payload == b"1 closed by host"
    connected = answers[-1]
    assert isinstance(connected, Connected) and connected.conn_id == 2


def test_stopping_cancels_a_connect_under_way():
    """stop() while a connect waits (net_connect_timeout, 5 s): run() returns at once, not after the connect."""

    async def script(live: LiveWorker) -> float:
        send_message(live.control, FireFault("net_connect_timeout", ()))
        send_message(live.control, Connect(1, "TCP", "127.0.0.1", 9))
        await asyncio.sleep(0.2)
        assert live.worker.connecting is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        await live.stop()
        return loop.time() - started

    assert drive_worker(script) < 1.0


def test_a_connect_right_after_a_cancelled_one_stays_the_running_connect():
    """Close(1) and Connect(2) in one read: the cancelled connect's wind-down must not
    forget connect 2, or a Close(2) could not cancel it and it would open unowned."""

    async def script(live: LiveWorker) -> bool:
        ours, worker = live.control, live.worker
        send_message(ours, FireFault("net_connect_timeout", ()))
        send_message(ours, Connect(1, "TCP", "127.0.0.1", 9))
        deadline = asyncio.get_running_loop().time() + 5
        while worker.connecting is None:
            assert asyncio.get_running_loop().time() < deadline, "connect 1 never started"
            await asyncio.sleep(0.01)
        send_message(ours, FireFault("net_connect_timeout", ()))
        send_message(ours, Close(1))
        send_message(ours, Connect(2, "TCP", "127.0.0.1", 9))
        await recv_until(ours, Ended)
        await asyncio.sleep(0.1)  # the cancelled connect 1 winds down meanwhile
        return worker.connecting is not None and not worker.connecting.done()

    assert drive_worker(script)


def test_a_connect_that_completes_after_its_close_is_not_opened(monkeypatch):
    """A connect whose cancel is lost (3.11's wait_for, in dnspython's resolver, returns a result
    that came with the cancel) must not answer Connected for a connection the host already closed:
    the socket is closed, and the next connect is the link's."""
    real_open_tcp = connecting.open_tcp

    async def cancel_swallowing(*args, **kwargs):
        async def slow():
            await asyncio.sleep(0.3)
            return await real_open_tcp(*args, **kwargs)

        inner = asyncio.ensure_future(slow())
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            return await inner  # as wait_for on 3.11 when its inner finished meanwhile

    monkeypatch.setattr(connecting, "open_tcp", cancel_swallowing)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    async def script(live: LiveWorker) -> list[object]:
        ours = live.control
        send_message(ours, Connect(1, "TCP", "127.0.0.1", port))
        await asyncio.sleep(0.1)
        send_message(ours, Close(1))
        answers = [await _recv(ours)]
        await asyncio.sleep(0.5)  # connect 1 completes meanwhile
        send_message(ours, Connect(2, "TCP", "127.0.0.1", port))
        while not (isinstance(answers[-1], Connected) and answers[-1].conn_id == 2):
            answers.append(await _recv(ours))
        assert not live.running.done()
        await live.stop()
        return answers

    try:
        answers = drive_worker(script)
        server.settimeout(5)
        first, _ = server.accept()  # connect 1's: the worker closed it
        first.settimeout(5)
        assert first.recv(1) == b""
        first.close()
    finally:
        server.close()
    assert [(type(a).__name__, a.conn_id) for a in answers] == [("Ended", 1), ("Connected", 2)], answers


def _pending(sock: socket.socket) -> list[object]:
    """The control messages waiting in ``sock`` now."""
    found = []
    while True:
        try:
            got = recv_message(sock)
        except BlockingIOError:
            return found
        if got is None:
            return found
        found.append(got[0])


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_a_connect_read_as_a_task_fails_is_answered_or_left_unread(run):
    """A Connect that reaches the worker in the loop iteration in which another task fails is
    answered ConnectFailed, or left unread (the front learns of the end from the worker's EOF),
    never taken and dropped: 3.12+'s TaskGroup refuses the connect's task then, and 3.11's runs
    it only for the failure to cancel it unanswered."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    ours, theirs = socketpair()

    async def main() -> list[object]:
        ours.setblocking(False)
        with new_ring() as up, new_ring() as down:
            worker = Worker(0, theirs, up, down, 5000)
            running = asyncio.create_task(worker.run())
            assert isinstance(await _recv(ours), Hello)

            async def planted() -> None:
                send_message(ours, Connect(2, "TCP", "127.0.0.1", port))  # readable as this task fails
                raise RuntimeError("a planted bug")

            worker._spawn(planted(), 1)
            with pytest.raises(BaseExceptionGroup):
                await asyncio.wait_for(running, 5.0)
            return _pending(ours)

    try:
        answers = run(main())
        unread = _pending(theirs)
    finally:
        server.close()
        ours.close()
        theirs.close()
    failed = [a for a in answers if isinstance(a, ConnectFailed) and a.conn_id == 2]
    left = [m for m in unread if isinstance(m, Connect) and m.conn_id == 2]
    assert len(failed) + len(left) == 1, (answers, unread)
    assert not any(isinstance(a, Connected) for a in answers)
