"""A link worker that writes garbage into its downlink ring (a bug, or a worker a hostile
peer took over): the front refuses the ring, the MCU sees CLOSED, the link id works again."""

from __future__ import annotations

import mmap
import struct

import pytest

from tests.integration.test_passive import server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)

_HEADER = 128  # bytes before a ring's data area (bridged.ipc.rings.HEADER_SIZE)


def _poison(pid: int, label: str, garbage: bytes) -> None:
    """Publish ``garbage`` in the ring ``label`` as the worker ``pid`` would (its memfd, mapped)."""
    with open(f"/proc/{pid}/maps") as maps:  # the mapping: its fd may be closed already
        spans = [line.split()[0] for line in maps if f"/memfd:bridged-{label} " in line]
    assert spans, f"no ring {label} in worker {pid}"
    with open(f"/proc/{pid}/map_files/{spans[0]}", "r+b") as block, mmap.mmap(block.fileno(), 0) as ring:
        capacity = len(ring) - _HEADER
        write, read = struct.unpack_from("<Q", ring, 0)[0], struct.unpack_from("<Q", ring, 64)[0]
        assert write == read, "the ring is not empty"
        for i, byte in enumerate(garbage):
            ring[_HEADER + (write + i) % capacity] = byte
        struct.pack_into("<Q", ring, 0, write + len(garbage))


def test_a_worker_publishing_garbage_gets_closed_and_replaced(daemon, host, server):  # noqa: F811
    """Garbage (a header claiming 2 GiB) then the peer's data: 0,CLOSED once, a
    downlink_refused event, a new worker, and AT+CIPSTART on link 0 works again."""
    # The supervisor may kill the worker before it exits by itself (worker_killed_refused).
    daemon.expected_errors |= {"downlink_refused", "worker_died", "worker_killed_refused", "child_died"}
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    conn.sendall(b"before")
    assert host.read_ipd() == (0, b"before")
    pid = daemon.worker_pid(0)
    _poison(pid, "link0-down", b"\xff\xff\xff\x7f\x00\x00\x01\x00")
    conn.sendall(b"after")  # its record rings the doorbell
    host.expect(b"0,CLOSED\r\n", timeout=10)
    event = daemon.wait_event("downlink_refused", link_id=0)[-1]
    assert "published" in event["error"]
    daemon.wait_event("worker_ready", count=2, link_id=0, timeout=15)
    conn.close()
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1], timeout=10)
    again, _ = server.accept()
    again.sendall(b"fresh")
    assert host.read_ipd() == (0, b"fresh")
    assert b"CLOSED" not in host.read_quiet(0.3)
    again.close()


@pytest.mark.parametrize("ask", [b"AT+CIPRECVLEN?", b"AT+CIPRECVDATA=0,64"])
def test_a_passive_read_of_a_poisoned_ring_refuses_it(daemon, host, server, ask):  # noqa: F811
    """Passive mode: the MCU's own read (AT+CIPRECVLEN?, AT+CIPRECVDATA) may be what
    meets the garbage (no doorbell rang; a drain may meet it first): it gets an answer,
    not a crashed command, and the link is refused (0,CLOSED, downlink_refused)."""
    # The supervisor may kill the worker before it exits by itself (worker_killed_refused).
    daemon.expected_errors |= {"downlink_refused", "worker_died", "worker_killed_refused", "child_died"}
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPRECVTYPE=0,1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    _poison(daemon.worker_pid(0), "link0-down", b"\xff\xff\xff\x7f\x00\x00\x01\x00")
    answer = host.ask(ask, timeout=10)  # an answer, whether the refusal came first or not
    if b"0,CLOSED\r\n" not in answer:
        host.expect(b"0,CLOSED\r\n", timeout=10)
    daemon.wait_event("downlink_refused", link_id=0)
    assert not daemon.events("command_crashed")
    daemon.wait_event("worker_ready", count=2, link_id=0, timeout=15)
    conn.close()
    host.command(b"AT+CIPRECVLEN?")
