"""The AT+CIPSERVER listener with real sockets and a slot table whose workers are the
test's ends of real control sockets: a client goes to the lowest free slot's worker
(SCM_RIGHTS); a full server stops listening and listens again once a slot frees; a
refused address is reset before it takes a slot."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
import uvloop
from structlog.testing import capture_logs

from bridged.ipc.control import recv_message, socketpair
from bridged.ipc.messages import Adopt
from bridged.net.policy import Policy
from bridged.uart.links import LinkTable, Slot, SlotState
from bridged.uart.server import Server
from tests.ringtools import new_ring
from tests.uart.slottools import Unheard as _Unheard
from tests.uart.slottools import until as _until
from tests.harness import free_port

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("plain_structlog")]


async def _connect(port: int) -> socket.socket:
    client = socket.socket()
    client.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    except BaseException:
        client.close()
        raise
    return client


async def _adopted(worker_end: socket.socket) -> tuple[object, socket.socket]:
    """The Adopt message a worker gets, and the client socket that came with it."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(worker_end.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        async with asyncio.timeout(5):
            await readable
    finally:
        loop.remove_reader(worker_end.fileno())
    msg, fds = recv_message(worker_end)
    (fd,) = fds
    return msg, socket.socket(fileno=fd)


class Bench:
    """Two link slots whose workers said Hello, and their worker ends."""

    def __init__(self, rings: list) -> None:
        self.slots = [Slot(i, rings[2 * i], rings[2 * i + 1]) for i in range(2)]
        self.table = LinkTable(self.slots, _Unheard(), 5760)
        self.pairs = [socketpair() for _ in self.slots]
        for i, (front_end, worker_end) in enumerate(self.pairs):
            self.table.attach(i, front_end)
            worker_end.send(json.dumps({"type": "Hello", "link_id": i, "pid": os.getpid()}).encode())

    async def ready(self) -> None:
        await _until(lambda: all(s.state is SlotState.IDLE for s in self.slots), "Hello")

    def worker_end(self, link_id: int) -> socket.socket:
        return self.pairs[link_id][1]

    def fail(self, link_id: int) -> None:
        """The worker could not take its client: the slot is free again."""
        slot = self.slots[link_id]
        self.worker_end(link_id).send(json.dumps(
            {"type": "ConnectFailed", "conn_id": slot.conn_id, "reason": "test"}).encode())

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for slot, (front_end, worker_end) in zip(self.slots, self.pairs):
            loop.remove_reader(front_end.fileno())
            loop.remove_reader(slot.downlink.data_fd)
            front_end.close()
            worker_end.close()


def _run(test) -> list[dict]:
    with new_ring() as a, new_ring() as b, new_ring() as c, new_ring() as d, capture_logs() as logs:
        async def main() -> None:
            bench = Bench([a, b, c, d])
            try:
                await bench.ready()
                await test(bench)
            finally:
                bench.close()

        uvloop.run(main())
    return logs


def test_a_client_goes_to_the_lowest_free_slots_worker():
    """The accepted socket reaches slot 0's worker with Adopt; the next client goes to slot 1."""
    async def test(bench: Bench) -> None:
        server = Server(bench.table)
        port = free_port()
        server.start(port, "TCP", 0, "127.0.0.1")
        first = await _connect(port)
        msg, conn = await _adopted(bench.worker_end(0))
        with first, conn:
            assert isinstance(msg, Adopt) and msg.link_type == "TCP" and msg.conn_id == bench.slots[0].conn_id
            assert conn.getpeername() == first.getsockname()  # the very client, not a copy of the listener
            assert bench.slots[0].server and bench.slots[0].state is SlotState.CONNECTING
            second = await _connect(port)
            msg, conn2 = await _adopted(bench.worker_end(1))
            with second, conn2:
                assert conn2.getpeername() == second.getsockname()
        server.stop()

    logs = _run(test)
    assert [e["link_id"] for e in logs if e["event"] == "server_client_accepted"] == [0, 1]


def test_a_full_server_stops_listening_until_a_slot_frees():
    """At AT+CIPSERVERMAXCONN clients the kernel refuses the next one; a freed slot listens again."""
    async def test(bench: Bench) -> None:
        server = Server(bench.table)
        server.max_conn = 1
        port = free_port()
        server.start(port, "TCP", 0, "127.0.0.1")
        client = await _connect(port)
        _, conn = await _adopted(bench.worker_end(0))
        conn.close()
        with pytest.raises(ConnectionRefusedError):
            (await _connect(port)).close()
        bench.fail(0)
        await _until(lambda: bench.slots[0].state is SlotState.IDLE, "the slot freed")
        server.update()  # the front's link_freed
        again = await _connect(port)
        _, conn = await _adopted(bench.worker_end(0))
        for sock in (client, again, conn):
            sock.close()
        server.stop()

    _run(test)


def test_a_refused_client_is_reset_and_takes_no_slot():
    """[links] deny: the client is reset at once, no worker hears of it, the slots stay free."""
    async def test(bench: Bench) -> None:
        server = Server(bench.table, Policy(deny=["127.0.0.0/8"]))
        port = free_port()
        server.start(port, "TCP", 0, "127.0.0.1")
        loop = asyncio.get_running_loop()
        with pytest.raises(ConnectionResetError):  # at the connect already, or at the first read
            async with asyncio.timeout(5):
                with await _connect(port) as client:
                    await loop.sock_recv(client, 1)
        assert all(s.state is SlotState.IDLE for s in bench.slots)
        server.stop()

    logs = _run(test)
    assert not [e for e in logs if e["event"] == "server_client_accepted"]


def test_the_cipsto_tick_runs_only_while_it_could_close_a_client():
    """No client, or AT+CIPSTO=0: no timer armed (an idle server wakes nobody); a client
    taken with a timeout set arms the one-second tick, which stops once the timeout is 0."""
    async def test(bench: Bench) -> None:
        server = Server(bench.table)
        port = free_port()
        server.start(port, "TCP", 0, "127.0.0.1")
        server.timeout = 5
        assert server._tick is None  # nobody to close
        client = await _connect(port)
        _, conn = await _adopted(bench.worker_end(0))
        assert server._tick is not None
        server.timeout = 0
        await _until(lambda: server._tick is None, "the tick's end", timeout=3)
        for sock in (client, conn):
            sock.close()
        server.stop()

    _run(test)
