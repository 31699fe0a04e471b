"""The front's end of a worker's control socket, fed raw bytes as a compromised
worker could send them: refused and logged, never a crash; the next good
message is taken."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvloop
from structlog.testing import capture_logs

from bridged.ipc.control import socketpair
from bridged.uart.links import LinkTable, Slot, SlotState
from tests.ringtools import new_ring
from tests.uart.slottools import Unheard as _Unheard
from tests.uart.slottools import until as _until

pytestmark = pytest.mark.timeout(60)

_BAD = [
    b"not json at all",
    b'{"type": "Hello", "link_id": "0", "pid": 1}',
    b'{"type": "Hello", "link_id": 0, "pid": [1]}',
    b'{"type": "Hello", "link_id": true, "pid": 1}',
    b'{"type": "Connected", "conn_id": 1, "remote_ip": 7, "remote_port": 1, "local_ip": "", "local_port": 1}',
    b'{"type": "Ended", "conn_id": 1, "reason": {"a": 1}}',
    b'{"type": "ConnectFailed", "conn_id": "1", "reason": "x"}',
]


def test_a_worker_sending_wrong_types_is_refused_and_logged_not_a_crash():
    """Each malformed message is logged as control_message_refused; then Hello makes the slot IDLE."""
    with new_ring() as up, new_ring() as down:
        front_end, worker_end = socketpair()

        async def main() -> tuple[list[dict], SlotState]:
            loop = asyncio.get_running_loop()
            handled: list[dict] = []
            loop.set_exception_handler(lambda loop, context: handled.append(context))
            slot = Slot(0, up, down)
            table = LinkTable([slot], _Unheard(), 5760)
            table.attach(0, front_end)
            for packet in _BAD:
                worker_end.send(packet)
            await asyncio.sleep(0.1)  # a wrong state change would come within this
            assert slot.state is SlotState.NO_WORKER
            worker_end.send(json.dumps({"type": "Hello", "link_id": 0, "pid": 1}).encode())
            await _until(lambda: slot.state is SlotState.IDLE, "Hello")
            loop.remove_reader(front_end.fileno())
            loop.remove_reader(down.data_fd)
            assert handled == []
            return slot.state

        with capture_logs() as logs, front_end, worker_end:
            assert uvloop.run(main()) is SlotState.IDLE
        refused = [e for e in logs if e["event"] == "control_message_refused"]
        assert len(refused) == len(_BAD) and all(e["link_id"] == 0 for e in refused)


def test_a_connected_message_with_text_for_an_address_is_refused():
    """An address that is no IP address (it would reach the UART in +IPD and +CIPSTATUS) is refused; the connect goes on waiting."""
    with new_ring() as up, new_ring() as down:
        front_end, worker_end = socketpair()

        async def main() -> SlotState:
            slot = Slot(0, up, down, state=SlotState.CONNECTING, conn_id=7)
            table = LinkTable([slot], _Unheard(), 5760)
            table.attach(0, front_end)
            bad = {"type": "Connected", "conn_id": 7, "remote_ip": '1.2.3.4"\r\nOK\r\n', "remote_port": 80,
                   "local_ip": "127.0.0.1", "local_port": 5000}
            worker_end.send(json.dumps(bad).encode())
            worker_end.send(json.dumps(dict(bad, remote_ip="127.0.0.1", remote_port=70000)).encode())
            await asyncio.sleep(0.1)  # a wrong state change would come within this
            assert slot.state is SlotState.CONNECTING and slot.view is None
            worker_end.send(json.dumps(dict(bad, remote_ip="::1")).encode())
            await _until(lambda: slot.state is SlotState.OPEN, "Connected")
            assert (slot.view.remote_ip, slot.view.remote_port) == ("::1", 80)
            asyncio.get_running_loop().remove_reader(front_end.fileno())
            asyncio.get_running_loop().remove_reader(down.data_fd)
            return slot.state

        with capture_logs() as logs, front_end, worker_end:
            assert uvloop.run(main()) is SlotState.OPEN
        assert [e["event"] for e in logs].count("control_message_refused") == 2



def test_a_link_cipsto_expires_admits_nothing_more():
    """AT+CIPSTO's close is a hang-up: from the moment its Close is sent the slot is
    CLOSING, so a send under way admits nothing more (the worker, finishing as soon as
    its ring is empty, would lose what came after and the MCU would have had SEND OK)."""
    from bridged.at.datamode import DataKind
    from bridged.uart.sending import Send

    with new_ring() as up, new_ring() as down:
        front_end, worker_end = socketpair()

        async def main() -> tuple[SlotState, int, bytes | None]:
            slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=7, type="TCP")
            table = LinkTable([slot], _Unheard(), 5760)
            table.attach(0, front_end)
            send = Send(slot, DataKind.SENDL, 8)
            send.take(b"abcd")
            table.expire(0)
            send.take(b"efgh")
            send.payload_done()
            assert json.loads(worker_end.recv(4096))["type"] == "Close"
            asyncio.get_running_loop().remove_reader(front_end.fileno())
            asyncio.get_running_loop().remove_reader(down.data_fd)
            return slot.state, up.available(), send.result()

        with front_end, worker_end:
            assert uvloop.run(main()) == (SlotState.CLOSING, 4, b"\r\nSEND FAIL\r\n")
