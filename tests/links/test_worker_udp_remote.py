"""A UDP link's remote modes (AT+CIPSTART <mode> 1 and 2) against the worker's read pauses: a
datagram from a new sender that the kernel holds when the MCU's send comes moves the remote
first, as lwIP moves it on receipt; the send goes to the new sender, not the old remote."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected, RemoteChanged
from tests.links.control import recv_control
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)

_PAUSE_TRIES = 200  # streams of two datagrams until one leaves the worker in a read pause


def _udp_peer() -> socket.socket:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    return peer


async def _in_a_read_pause(live: LiveWorker, old: socket.socket, where: tuple) -> None:
    """The old remote streams 600-byte datagrams 1 ms apart until the worker pauses its reads."""
    for _ in range(_PAUSE_TRIES):
        old.sendto(b"s" * 600, where)
        await asyncio.sleep(0.001)
        old.sendto(b"s" * 600, where)
        await asyncio.sleep(0.001)
        if live.worker._pause is not None:
            return
        await asyncio.sleep(0.02)  # quiet: the next two start a stream afresh
    raise AssertionError("the worker never paused its reads")


async def _connected(live: LiveWorker, old: socket.socket, mode: int) -> tuple:
    """A UDP link in ``mode`` to ``old``, which has heard its first datagram; the link's address."""
    send_message(live.control, Connect(1, "UDP", "127.0.0.1", old.getsockname()[1], udp_mode=mode))
    assert isinstance(await recv_control(live.control), Connected)
    records.put_record(live.up, records.DATA, b"hello")
    _, where = await asyncio.to_thread(old.recvfrom, 64)
    return where


@pytest.mark.parametrize("mode, moves", [(0, False), (1, True), (2, True)])
def test_a_send_behind_a_new_senders_held_datagram_goes_where_the_mode_says(mode, moves):
    """<mode> 1/2: a new sender's datagram waiting in a read pause moves the remote before the
    MCU's next send goes (RemoteChanged first); <mode> 0 keeps the old remote."""
    old, new = _udp_peer(), _udp_peer()

    async def main(live: LiveWorker) -> list:
        where = await _connected(live, old, mode)
        await _in_a_read_pause(live, old, where)
        new.sendto(b"new sender", where)  # in the kernel now; the worker's reads are paused
        records.put_record(live.up, records.DATA, b"reply")  # the MCU's AT+CIPSEND, no remote named
        target = new if moves else old
        data = b""
        while data != b"reply":  # (the old remote's other datagrams were none: it only sent)
            data, _ = await asyncio.to_thread(target.recvfrom, 64)
        messages = []
        async with asyncio.timeout(5):
            while len(messages) < (1 if moves else 0):
                msg = await recv_control(live.control)
                if isinstance(msg, RemoteChanged):
                    messages.append(msg)
        send_message(live.control, Close(1))
        return messages

    try:
        changes = drive_worker(main, up_size=65536, down_size=65536)
        if moves:
            assert [(m.remote_ip, m.remote_port) for m in changes] == [new.getsockname()]
        other = old if moves else new
        other.settimeout(0.2)
        with pytest.raises(TimeoutError):
            while other.recvfrom(64)[0] != b"reply":
                pass
    finally:
        old.close()
        new.close()


@pytest.mark.parametrize("mode", [1, 2])
def test_a_send_and_a_new_senders_datagram_in_one_wake_up(mode):
    """No read pause: the MCU's send (its doorbell rung first) and a new sender's datagram wake the
    worker together, the uplink's event first; the datagram is read first and the send goes to it."""
    old, new = _udp_peer(), _udp_peer()

    async def main(live: LiveWorker) -> None:
        where = await _connected(live, old, mode)
        await asyncio.sleep(0.05)
        assert live.worker._pause is None and live.worker._gate.is_open  # reading, not paused
        records.put_record(live.up, records.DATA, b"reply")  # epoll hands the doorbell's event first
        new.sendto(b"new sender", where)
        data, _ = await asyncio.to_thread(new.recvfrom, 64)
        assert data == b"reply"
        send_message(live.control, Close(1))

    try:
        drive_worker(main, up_size=65536, down_size=65536)
    finally:
        old.close()
        new.close()
