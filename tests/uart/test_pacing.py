"""[uart] pace over the daemon's pty: the line rate both ways, AT+UART_CUR, a real port ignores it.

Timings are the feature here, so they are asserted: never faster than the
line (0.95x of the line time, the hard bound), and a looser upper bound for a
loaded 2-core machine; a transfer off them is timed again, up to three
(`_at_line_rate`).  Every transfer is checked byte for byte (sha256).
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import time
import tty

from dataclasses import dataclass
from typing import Callable

import pytest

from tests.harness import Daemon, Demux, Host, SinkServer, _Server

SLOW = 1.6  # the upper bound: line time x this (a loaded machine delays timers, never speeds them)


class SourceServer(_Server):
    """Sends ``payload`` to each connection once it is accepted."""

    payload = b""

    def _serve(self, conn) -> None:
        try:
            conn.sendall(self.payload)
            while conn.recv(65536):
                pass
        except OSError:
            return


@pytest.fixture
def source():
    server = SourceServer()
    yield server
    server.close()


@pytest.fixture
def sink():
    server = SinkServer()
    yield server
    server.close()


def _payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _session(make_daemon, pace: bool, baud: int = 9600) -> Host:
    host = make_daemon(f"[uart]\npace = {str(pace).lower()}\nbaud = {baud}\n").host()
    host.boot()
    return host


@dataclass(frozen=True)
class Received:
    span: float  # seconds from the first read to the last
    after: int  # line bytes read after the first read (+IPD headers too: each took its time)
    total: float  # seconds from AT+CIPSTART to the last read
    total_bytes: int  # line bytes read in that time


def _receive(host: Host, source: SourceServer, payload: bytes) -> Received:
    """Connect to ``source`` and read its +IPD data until all of ``payload`` came."""
    source.payload = payload
    started = time.monotonic()
    host.write(b'AT+CIPSTART="TCP","127.0.0.1",%d\r\n' % source.port)
    connected = host.expect(b"CONNECT\r\n\r\nOK\r\n")
    total_bytes = len(connected) + len(host.buf)
    demux = Demux(host)
    first = None
    after = 0
    deadline = time.monotonic() + 30
    last = first = time.monotonic() if host.buf else None  # it may have come with CONNECT
    demux._parse()
    while len(demux.data.get(None, b"")) < len(payload):
        assert time.monotonic() < deadline, f"{len(demux.data.get(None, b''))} of {len(payload)} bytes came"
        before = len(host.buf)
        if not host._fill(0.05):
            continue
        got = len(host.buf) - before
        total_bytes += got
        if first is None:
            first = time.monotonic()
        else:
            after += got
        last = time.monotonic()
        demux._parse()
    assert hashlib.sha256(demux.data[None]).digest() == hashlib.sha256(payload).digest()
    host.command(b"AT+CIPCLOSE", b"CLOSED\r\n\r\nOK\r\n")
    return Received(last - first, after, last - started, total_bytes)


def _send(host: Host, sink: SinkServer, payload: bytes) -> float:
    """AT+CIPSEND ``payload`` to ``sink``; the seconds from writing it to SEND OK."""
    host.command(b'AT+CIPSTART="TCP","127.0.0.1",%d' % sink.port, b"CONNECT\r\n\r\nOK\r\n")
    host.write(b"AT+CIPSEND=%d\r\n" % len(payload))
    host.expect(b">")
    started = time.monotonic()
    host.write(payload)
    host.expect(b"SEND OK\r\n", timeout=30)
    took = time.monotonic() - started
    deadline = time.monotonic() + 10
    while sum(sink.counts.values()) < len(payload):
        assert time.monotonic() < deadline, "the sink did not get every byte"
        time.sleep(0.01)
    (digest,) = [h.digest() for h in sink.hashes.values()]
    assert digest == hashlib.sha256(payload).digest()
    host.command(b"AT+CIPCLOSE", b"CLOSED\r\n\r\nOK\r\n")
    sink.hashes.clear()
    sink.counts.clear()
    return took


def _within(took: float, line_time: float) -> None:
    assert 0.95 * line_time <= took <= SLOW * line_time + 0.05, (took, line_time)


def _at_line_rate(measure: Callable[[], tuple[float, float]]) -> None:
    """``measure()`` -> (seconds taken, the line time of what moved) `_within` its bounds,
    in one of up to three transfers.

    A timing measurement on a loaded 2-core machine: a daemon or a reader left unscheduled
    for a while is late (slower than SLOW), and the pacer's catch-up after a late wake-up
    (up to 0.25 s of line time) can land just after the reader's first read (faster than
    0.95).  Another transfer then measures again; a pacer off its rate is off in all three."""
    tries = []
    for _ in range(3):
        took, line_time = measure()
        tries.append((round(took, 3), round(line_time, 3)))
        if 0.95 * line_time <= took <= SLOW * line_time + 0.05:
            return
    raise AssertionError(f"off the line rate in three transfers (took, line time): {tries}")


def test_output_goes_at_the_line_rate(make_daemon, source):
    """At 9600 8N1 bytes reach the MCU at 960 a second: N bytes take N * 10 / 9600 s."""
    host = _session(make_daemon, pace=True)

    def measure() -> tuple[float, float]:
        got = _receive(host, source, _payload(1200, 1))
        assert got.after > 1200
        return got.span, got.after * 10 / 9600

    _at_line_rate(measure)


def test_input_is_read_at_the_line_rate(make_daemon, sink):
    """At 9600 8N1 the MCU's payload is taken at 960 bytes a second, none lost."""
    host = _session(make_daemon, pace=True)
    payload = _payload(1200, 2)
    # Then "\r\nRecv 1200 bytes\r\n\r\nSEND OK\r\n" goes out at the same rate.
    answer = len(b"\r\nRecv 1200 bytes\r\n\r\nSEND OK\r\n")
    _at_line_rate(lambda: (_send(host, sink, payload), (len(payload) + answer) * 10 / 9600 - 0.004))


def test_uart_cur_changes_the_pace_and_framing(make_daemon, source, sink):
    """After AT+UART_CUR=19200,8,1,2,0 both ways go at 19200 baud with 11 bits a character (8E1),
    and without flow control input faster than the line is still all taken."""
    host = _session(make_daemon, pace=True)
    host.command(b"AT+UART_CUR=19200,8,1,2,0")

    def receive() -> tuple[float, float]:
        got = _receive(host, source, _payload(2400, 3))
        return got.span, got.after * 11 / 19200

    _at_line_rate(receive)
    payload = _payload(2400, 4)
    answer = len(b"\r\nRecv 2400 bytes\r\n\r\nSEND OK\r\n")
    _at_line_rate(lambda: (_send(host, sink, payload), (len(payload) + answer) * 11 / 19200 - 0.004))


def test_without_pace_the_pty_goes_as_fast_as_it_can(make_daemon, source, sink):
    """pace = false: the same transfers at 9600 baud take a fraction of their line time."""
    host = _session(make_daemon, pace=False)
    got = _receive(host, source, _payload(1200, 5))
    assert got.total < 0.25 * got.total_bytes * 10 / 9600, got
    payload = _payload(1200, 6)
    assert _send(host, sink, payload) < 0.25 * len(payload) * 10 / 9600


def test_a_pty_given_as_port_is_paced(tmp_path, source):
    """A pty given as --port (an emulated MCU's, e.g. Zephyr native_sim's) keeps no line rate of
    its own: it is paced as bridged's own pty (it was taken for a real port and not paced)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    link = tmp_path / "native-sim-uart"
    link.symlink_to(os.ttyname(slave))
    daemon = Daemon(tmp_path, "[uart]\npace = true\nbaud = 9600\n", port=str(link)).start()
    try:
        host = Host(None, fd=master)
        host.boot()

        def measure() -> tuple[float, float]:
            got = _receive(host, source, _payload(1200, 7))
            assert got.after > 1200
            return got.span, got.after * 10 / 9600

        _at_line_rate(measure)
        assert daemon.events("uart_pace_ignored") == []
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
        os.close(master)
        os.close(slave)


def test_a_real_port_ignores_pace():
    """A character device that is no pty (a real UART's driver; /dev/null stands in) keeps its own
    time: pace is not applied there, and a pty's slave end is told apart from it."""
    from bridged.uart.pacing import is_pty, wanted

    fd = os.open("/dev/null", os.O_RDWR)
    master, slave = os.openpty()
    try:
        assert not wanted(True, "/dev/ttyUSB0", fd, serial=True)
        assert not is_pty(fd) and is_pty(slave)
        assert wanted(True, "/dev/pts/9", slave, serial=True)
        assert wanted(True, "pty", master, serial=False)  # bridged's own: the front holds the master
        assert not wanted(False, "pty", master, serial=False)
    finally:
        for each in (fd, master, slave):
            os.close(each)


def test_paced_output_writes_slices_on_one_timer_not_a_spin():
    """Output with a pacer at 115200 8N1: 5760 bytes take 0.5 s in ~3 ms slices, in order, without spinning."""
    import asyncio

    import uvloop

    from bridged.uart.output import Output
    from bridged.uart.pacer import Pacer, char_bits2

    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    data = _payload(5760, 8)

    class Counting(Output):
        pumps = 0

        def _pump(self) -> None:
            self.pumps += 1
            super()._pump()

    def read_all() -> tuple[bytes, float]:
        got = bytearray()
        deadline = time.monotonic() + 10
        while len(got) < len(data):
            assert time.monotonic() < deadline, f"{len(got)} of {len(data)} bytes came"
            if select.select([slave], [], [], 0.1)[0]:
                got += os.read(slave, 65536)
        return bytes(got), time.monotonic()

    async def main():
        loop = asyncio.get_running_loop()
        out = Counting(master, 0.0, lambda: None)
        out.pacer = Pacer(115200, char_bits2(8, 1, 0), loop.time())
        started = time.monotonic()
        reader = asyncio.create_task(asyncio.to_thread(read_all))
        out.reply(data)
        got, ended = await reader
        return got, ended - started, out.pumps

    try:
        got, took, pumps = uvloop.run(main())
    finally:
        os.close(master)
        os.close(slave)
    assert got == data
    _within(took, len(data) * 10 / 115200)
    # ~3 ms slices: ~170 writes (fewer when timers fire late: each makes up the delay), not a spin.
    assert 10 <= pumps <= 0.5 / 0.002, pumps
