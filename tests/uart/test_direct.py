"""uart.direct's reads where the uplink ring's free area wraps, on a real ring and pipe: one read
takes the MCU's bytes across the ring's end, as the general path's one os.read would."""

from __future__ import annotations

import contextlib
import os
import select
import termios
import tty
from types import SimpleNamespace

import pytest

from bridged.at.datamode import DataKind
from bridged.at.parser import Parser
from bridged.ipc.rings import Ring
from bridged.uart.direct import SPARE, DirectPayload
from bridged.uart.sending import Send
from bridged.uart.slots import Slot, SlotState

_CAPACITY = 4096


class _Front(DirectPayload):
    """The parts of Front the direct path uses; a complete payload is only noted."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.loop = SimpleNamespace(time=lambda: 1.0)
        self.parser = Parser()
        self.tap = self.rx_fault = self._paced = self._serial = None
        self.counters = SimpleNamespace(rx_bytes=0, direct_sends=0, direct_fallbacks=0)
        self._spare = bytearray(SPARE)
        self.completed: list[int] = []

    def _payload_complete(self, length: int) -> None:
        self.completed.append(length)

    def _coalesce(self, size: int, now: float) -> None:
        pass


@pytest.fixture
def rig():
    up, down = Ring.create(_CAPACITY, "up"), Ring.create(_CAPACITY, "down")
    read, write = os.pipe()
    os.set_blocking(read, False)
    yield up, down, read, write
    os.close(read)
    os.close(write)
    up.close()
    down.close()


def _start(rig, length: int, before_end: int) -> tuple[_Front, Send]:
    """A direct AT+CIPSEND of ``length`` with the ring's write index ``before_end`` bytes short of its end."""
    up, down, read, _ = rig
    up.stage(0, b"\0" * (_CAPACITY - before_end))
    up.commit(_CAPACITY - before_end)
    up.consume(_CAPACITY - before_end)  # the worker took it: the ring is empty
    slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=1, type="TCP")
    front = _Front(read)
    send = Send(slot, DataKind.SEND, length)
    front.parser.start_data(DataKind.SEND, length, 0.0)
    front._try_direct(send)
    assert send.direct
    return front, send


def test_a_write_across_the_rings_end_is_one_read(rig):
    """'+++xyz' written at once, the free area wrapping after three bytes: one read takes all six
    into the ring (a read of '+++' alone would be a +++ candidate: SEND Canceled after a stall)."""
    front, send = _start(rig, 6, before_end=3)
    os.write(rig[3], b"+++xyz")
    assert front._read_direct(send) is None
    assert send.staged == 6 and front.completed == [6]
    send.pump()
    assert rig[0].get_nowait(100) == b"+++xyz"


def test_a_plus_escape_across_the_rings_end_goes_to_the_parser(rig):
    """'+++' alone, its bytes on both sides of the ring's end: handed to the general path."""
    front, send = _start(rig, 10, before_end=1)
    os.write(rig[3], b"+++")
    assert front._read_direct(send) == b"+++"
    assert not send.direct and send.staged == 0


def test_surplus_behind_a_wrapped_payload_goes_to_the_spare(rig):
    """A payload that wraps the ring's end with bytes behind it, in one write: the payload is
    committed whole, the surplus is left for busy p..."""
    front, send = _start(rig, 100, before_end=40)
    payload = bytes(range(100))
    os.write(rig[3], payload + b"AT\r\n")
    assert front._read_direct(send) is None
    assert front.completed == [100] and front.parser.buffered == 4
    send.pump()
    assert rig[0].get_nowait(200) == payload


def test_a_fallback_while_the_read_index_reads_torn_keeps_every_byte(rig):
    """Handing back to the parser while the worker's read index reads torn (a 32-bit CPU
    preempted mid-store): the bytes read straight into the ring so far still all go back."""
    front, send = _start(rig, 20, before_end=2000)
    os.write(rig[3], b"abcdef")
    assert front._read_direct(send) is None and send.staged == 6
    index = rig[0]._header.cast("Q")
    real = index[8]
    index[8] = real + (1 << 32)  # the read index, half stored
    try:
        assert front._direct_fallback(send, 14, 0) == b""
    finally:
        index[8] = real
        index.release()
    assert not send.direct and front.parser.data.received == 6


def test_a_send_counts_as_direct_once_its_payload_is_read_whole(rig):
    """uart.direct_sends counts a payload that went the direct way whole, when its last byte came;
    one begun there and handed to the general path (a '+++' candidate) counts in direct_fallbacks."""
    front, send = _start(rig, 10, before_end=2000)
    os.write(rig[3], b"abcd")
    assert front._read_direct(send) is None and send.staged == 4
    assert (front.counters.direct_sends, front.counters.direct_fallbacks) == (0, 0)  # begun, not done
    os.write(rig[3], b"efghij")
    assert front._read_direct(send) is None and front.completed == [10]
    assert (front.counters.direct_sends, front.counters.direct_fallbacks) == (1, 0)
    front.parser.start_data(DataKind.SEND, 10, 0.0)
    send = Send(send.slot, DataKind.SEND, 10)
    front._try_direct(send)
    assert send.direct
    os.write(rig[3], b"++")
    assert front._read_direct(send) == b"++" and not send.direct
    assert (front.counters.direct_sends, front.counters.direct_fallbacks) == (1, 1)


_TTY_READ = 4095  # what one read of a pty hands out of a full n_tty buffer


@contextlib.contextmanager
def fresh_rig():
    """A 16 KiB uplink ring and a raw pty: the MCU writes the slave, the front reads the master."""
    up, down = Ring.create(4 * _CAPACITY, "up"), Ring.create(_CAPACITY, "down")
    master, slave = os.openpty()
    try:
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        yield up, down, master, slave
    finally:
        for fd in (master, slave):
            os.close(fd)
        up.close()
        down.close()


@pytest.fixture
def pty_rig():
    with fresh_rig() as rig:
        yield rig


def _pty_send(pty_rig, length: int) -> tuple[_Front, Send]:
    up, down, master, _ = pty_rig
    front = _Front(master)
    send = Send(Slot(0, up, down, state=SlotState.OPEN, conn_id=1, type="TCP"), DataKind.SEND, length)
    front.parser.start_data(DataKind.SEND, length, 0.0)
    front._try_direct(send)
    assert send.direct
    return front, send


def _one_wake_up(pty_rig) -> bool:
    """The MCU writes 8192 bytes at once: does one readable event read all of it?  Whatever it
    read is staged; the rest comes on later reads, whole and in order."""
    front, send = _pty_send(pty_rig, 8192)
    payload = os.urandom(8192)
    os.write(pty_rig[3], payload)
    assert front._read_direct(send) is None
    whole = front.completed == [8192]
    for _ in range(10):  # bounded: a loaded kernel's parts
        if front.completed:
            break
        select.select([pty_rig[2]], [], [], 1.0)
        try:
            front._read_direct(send)
        except BlockingIOError:
            pass
    assert front.completed == [8192] and front.counters.rx_bytes == 8192
    send.pump()
    assert pty_rig[0].get_nowait(8192) == payload
    return whole


def test_an_8_kib_payload_on_a_pty_is_read_in_one_wake_up(pty_rig):
    """A pty hands 8192 bytes written at once out 4095 at a time. One readable event reads all
    of it (the flip buffers behind a full tty buffer come in on the next read), not a third of
    it per wake-up. (A loaded kernel may hand a buffer out in parts: three tries.)"""
    assert any(_one_wake_up(pty_rig) for _ in range(3))


def test_a_full_tty_buffer_and_nothing_behind_it_keeps_what_it_read(pty_rig):
    """A full tty buffer's worth of a longer payload, then nothing: the read on finds the port
    empty (EAGAIN, as a wake-up with nothing to read would), and the buffer read stays staged."""
    front, send = _pty_send(pty_rig, 8192)
    os.write(pty_rig[3], b"x" * _TTY_READ)
    with pytest.raises(BlockingIOError):
        for _ in range(10):  # once (a loaded kernel may hand the buffer out in parts)
            front._read_direct(send)
    assert send.direct and send.staged == _TTY_READ and front.counters.rx_bytes == _TTY_READ
    rest = os.urandom(8192 - _TTY_READ)
    os.write(pty_rig[3], rest)
    assert front._read_direct(send) is None and front.completed == [8192]
    send.pump()
    assert pty_rig[0].get_nowait(8192) == b"x" * _TTY_READ + rest
