"""Conformance suite for bridged.ipc.rings.Ring, at several capacities."""

from __future__ import annotations

import array
import hashlib
import os
import random
import select
import signal
import socket
import struct
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridged.ipc.rings import Ring
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)

CAPACITIES = [4096, 8192, 1 << 16]
WAIT = 10.0  # seconds; every wait in this file is bounded by it


@pytest.fixture(params=CAPACITIES, ids=lambda c: f"cap{c}")
def ring(request):
    with new_ring(request.param) as ring:
        yield ring


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def advance(ring: Ring, n: int) -> None:
    """Move both indices forward by n on an empty ring."""
    while n:
        step = ring.put_nowait(bytes(min(n, ring.capacity)))
        assert ring.get_nowait(step) == bytes(step)
        n -= step


def check_invariants(ring: Ring) -> None:
    assert ring.available() + ring.free() == ring.capacity
    assert ring.write_index - ring.read_index == ring.available()


# -- creation and basic state ------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, 1, 2048, 4095, 4097, 6144, 12288])
def test_create_rejects_bad_capacity(capacity):
    """A capacity that is not a power of two >= 4096 is refused."""
    with pytest.raises(ValueError):
        Ring.create(capacity)


def test_fresh_ring_is_empty(ring):
    """A new ring has zero indices, full free space and silent doorbells."""
    assert (ring.write_index, ring.read_index) == (0, 0)
    assert ring.available() == 0 and ring.free() == ring.capacity
    assert ring.readable_views(100) == [] and ring.get_nowait(100) == b""
    assert not readable(ring.data_fd) and not readable(ring.space_fd)


def test_shared_block_is_large_enough(ring):
    """The block holds the 128-byte header plus the data area, shared, under its label."""
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    mine = [m for m in maps if len(m) >= 6 and m[5] == f"/memfd:{ring.name}"]
    sizes = [int(m[0].split("-")[1], 16) - int(m[0].split("-")[0], 16) for m in mine if m[1][3] == "s"]
    assert any(size >= 128 + ring.capacity for size in sizes), mine


def test_put_copies_what_fits(ring):
    """put_nowait takes what fits, then 0 when full; get_nowait returns it in order."""
    data = os.urandom(ring.capacity + 100)
    assert ring.put_nowait(data) == ring.capacity
    assert ring.put_nowait(b"more") == 0
    assert ring.free() == 0
    assert ring.get_nowait(ring.capacity * 2) == data[: ring.capacity]
    check_invariants(ring)


def test_put_accepts_any_buffer(ring):
    """Non-byte buffers (array of u16) are taken as their raw bytes."""
    values = array.array("H", [1, 2, 0xFFFF])
    assert ring.put_nowait(values) == 6
    assert ring.get_nowait(10) == values.tobytes()


# -- wrap-around ---------------------------------------------------------------------


def offsets(capacity: int) -> list[int]:
    """Every offset for small rings, a sample (always with both edges) otherwise."""
    if capacity <= 8192:
        return list(range(capacity))
    rng = random.Random(capacity)
    picked = {0, 1, 2, capacity // 2, capacity - 2, capacity - 1}
    return sorted(picked | set(rng.sample(range(capacity), 256)))


def test_wrap_at_every_offset(ring):
    """A full ring starting at any offset splits into [cap - off, off] and round-trips."""
    cap = ring.capacity
    base = os.urandom(2 * cap)
    for offset in offsets(cap):
        advance(ring, offset - ring.write_index % cap)
        expect = [cap] if offset == 0 else [cap - offset, offset]
        assert [len(v) for v in ring.writable_views(cap)] == expect
        block = base[offset : offset + cap]
        assert ring.put_nowait(block) == cap
        assert [len(v) for v in ring.readable_views(cap)] == expect
        assert ring.get_nowait(cap) == block
        assert ring.write_index == ring.read_index
        assert ring.write_index % cap == offset


@pytest.mark.parametrize("size", [1, 7, 100, 4000])
def test_partial_wrap(ring, size):
    """A chunk that crosses the end lands in two pieces and reads back whole."""
    advance(ring, ring.capacity - size // 2 - 1)
    data = os.urandom(size)
    assert ring.put_nowait(data) == size
    views = ring.readable_views(size)
    assert [len(v) for v in views] == [size // 2 + 1, size - size // 2 - 1][: len(views)]
    assert b"".join(views) == data
    ring.consume(size)
    check_invariants(ring)


def test_skip_views_and_peek(ring):
    """skip/offset address bytes past the indices without moving them."""
    advance(ring, ring.capacity - 3)
    assert ring.put_nowait(b"abcdefgh") == 8
    assert b"".join(ring.readable_views(4, skip=2)) == b"cdef"
    assert ring.peek(3, 4) == b"efg"
    ring.stage(2, b"XY")
    ring.stage(0, b"12")
    ring.commit(4)
    assert ring.get_nowait(100) == b"abcdefgh12XY"



# -- random sequences ------------------------------------------------------------------


def ops_strategy(max_size: int, max_get: int):
    op = st.one_of(
        st.tuples(st.just("put"), st.integers(0, max_size)),
        st.tuples(st.just("write"), st.integers(0, max_size), st.floats(0, 1)),
        st.tuples(st.just("get"), st.integers(0, max_get)),
        st.tuples(st.just("read"), st.integers(0, max_get), st.floats(0, 1)),
    )
    return st.lists(op, max_size=60)


class Driver:
    """Runs put/get operations against a ring and a plain bytes model."""

    def __init__(self, ring: Ring, seed: int) -> None:
        self.ring, self.rng = ring, random.Random(seed)
        self.model = bytearray()
        self.hash_in, self.hash_out = hashlib.sha256(), hashlib.sha256()
        self.full_seen = 0

    def produced(self, data: bytes) -> None:
        self.model += data
        self.hash_in.update(data)

    def consumed(self, data: bytes) -> None:
        assert data == self.model[: len(data)]
        del self.model[: len(data)]
        self.hash_out.update(data)

    def run(self, op) -> None:
        ring, free, avail = self.ring, self.ring.free(), self.ring.available()
        if op[0] == "put":
            data = self.rng.randbytes(op[1])
            n = ring.put_nowait(data)
            assert n == min(op[1], free)
            self.full_seen += n < op[1]
            self.produced(data[:n])
        elif op[0] == "write":
            views = ring.writable_views(op[1])
            assert sum(map(len, views)) == min(op[1], free) and len(views) <= 2
            data = self.rng.randbytes(sum(map(len, views)))
            pos = 0
            for view in views:
                view[:] = data[pos : pos + len(view)]
                pos += len(view)
            n = int(len(data) * op[2])
            ring.commit(n)
            self.produced(data[:n])
        elif op[0] == "get":
            data = ring.get_nowait(op[1])
            assert len(data) == min(op[1], avail)
            self.consumed(data)
        else:
            views = ring.readable_views(op[1])
            assert sum(map(len, views)) == min(op[1], avail) and len(views) <= 2
            n = int(sum(map(len, views)) * op[2])
            self.consumed(b"".join(views)[:n])
            ring.consume(n)
        check_invariants(ring)
        assert ring.available() == len(self.model)

    def drain(self) -> None:
        self.consumed(self.ring.get_nowait(self.ring.capacity))
        assert self.hash_in.digest() == self.hash_out.digest()


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("capacity", [4096, 1 << 16])
@SETTINGS
@given(start=st.integers(0, 1 << 17), ops=ops_strategy(9000, 9000), seed=st.integers())
def test_random_sequences(capacity, start, ops, seed):
    """Any sequence of puts, view writes, gets and view reads moves bytes in order."""
    with new_ring(capacity) as ring:
        advance(ring, start % (2 * capacity))
        driver = Driver(ring, seed)
        for op in ops:
            driver.run(op)
        driver.drain()


@pytest.mark.parametrize("capacity", [4096, 8192])
@SETTINGS
@given(ops=st.lists(st.integers(1, 64), min_size=20, max_size=200), seed=st.integers())
def test_clogged_consumer(capacity, ops, seed):
    """A producer pushing large chunks into a slow consumer loses and reorders nothing."""
    with new_ring(capacity) as ring:
        driver = Driver(ring, seed)
        for bite in ops:
            driver.run(("put", capacity // 2 + bite))
            driver.run(("read", bite, 1.0))
        driver.drain()
        assert driver.full_seen > 0  # the ring really was clogged


# -- doorbells ---------------------------------------------------------------------------


def test_data_doorbell_rings_after_commit(ring):
    """data_fd becomes readable after a commit and is silent again once cleared."""
    ring.commit(0)
    assert ring.put_nowait(b"") == 0
    assert not readable(ring.data_fd)
    ring.stage(0, b"hi")
    assert not readable(ring.data_fd)  # staged is not published
    ring.commit(2)
    assert readable(ring.data_fd)
    assert ring.clear_data_doorbell() is True
    assert not readable(ring.data_fd)
    assert ring.clear_data_doorbell() is False


def test_space_doorbell_rings_after_consume(ring):
    """space_fd becomes readable after consume, get_nowait and discard_all only."""
    ring.put_nowait(b"abcdef")
    assert ring.get_nowait(0) == b"" and not readable(ring.space_fd)
    ring.consume(1)
    assert readable(ring.space_fd)
    assert ring.clear_space_doorbell() is True and not readable(ring.space_fd)
    assert ring.get_nowait(2) == b"bc" and readable(ring.space_fd)
    ring.clear_space_doorbell()
    assert ring.discard_all() == 3
    assert readable(ring.space_fd)
    assert ring.available() == 0 and ring.read_index == ring.write_index == 6
    assert not readable(ring.data_fd) or ring.clear_data_doorbell()


# -- misuse ---------------------------------------------------------------------------------


def test_space_doorbell_only_while_the_producer_wants_it(ring):
    ring.want_space_doorbell(False)
    ring.put_nowait(b"abcdef")
    ring.consume(2)
    assert not ring.clear_space_doorbell()  # the consumer saved the syscall
    ring.want_space_doorbell(True)
    ring.consume(2)
    assert ring.clear_space_doorbell()
    assert ring.get_nowait(10) == b"ef"


def test_commit_and_consume_are_bounded(ring):
    """Publishing more than the free space or consuming more than published is refused."""
    with pytest.raises(ValueError):
        ring.commit(ring.capacity + 1)
    with pytest.raises(ValueError):
        ring.stage(ring.capacity - 1, b"ab")
    ring.put_nowait(b"xyz")
    with pytest.raises(ValueError):
        ring.commit(ring.capacity - 2)
    with pytest.raises(ValueError):
        ring.consume(4)
    with pytest.raises(ValueError):
        ring.peek(2, 2)
    assert (ring.write_index, ring.read_index) == (3, 0)


def test_torn_index_reads_as_no_progress(ring):
    """An impossible index pair (a torn 64-bit load) reports no data and no space."""
    ring.put_nowait(b"abc")
    header = ring._header  # test-only: forge what a torn store would look like
    struct.pack_into("<Q", header, 0, 3 + (1 << 32))
    assert ring.available() == 0 and ring.free() == 0
    assert ring.readable_views(10) == [] and ring.writable_views(10) == []
    struct.pack_into("<Q", header, 0, 3)
    assert ring.get_nowait(10) == b"abc"


def test_reserve_and_publish_at_every_offset(ring):
    """reserve() gives one contiguous span after the head; publish() writes the
    head (wrapped or not) and publishes head plus data in one step."""
    head = b"HEAD"
    for start in range(ring.capacity - 12, ring.capacity + 2):
        advance(ring, (start - ring.write_index) % ring.capacity)  # to slot start % capacity
        span = ring.reserve(len(head), 100)
        slot = (ring.write_index + len(head)) % ring.capacity
        assert len(span) == min(100, ring.capacity - slot)  # stops at the end of the area
        k = min(3, len(span))
        span[:k] = b"xyz"[:k]
        del span
        ring.publish(head, k)
        assert ring.get_nowait(100) == b"HEAD" + b"xyz"[:k]


def test_reserve_respects_free_space_and_publish_its_bounds(ring):
    ring.put_nowait(bytes(ring.capacity - 20))
    assert len(ring.reserve(8, 1000)) == 12
    assert ring.reserve(20, 1000) is None
    with pytest.raises(ValueError):
        ring.publish(b"12345678", 13)
    assert ring.available() == ring.capacity - 20  # nothing published by the failed call


def test_held_doorbells_ring_once_each(ring):
    ring.hold_doorbells()
    for _ in range(3):
        ring.put_nowait(b"ab")
    assert not ring.clear_data_doorbell()
    ring.consume(6)
    assert not ring.clear_space_doorbell()
    ring.release_doorbells()
    assert ring.clear_data_doorbell() and ring.clear_space_doorbell()
    ring.release_doorbells()  # nothing owed any more
    assert not ring.clear_data_doorbell() and not ring.clear_space_doorbell()


# -- views and lifetime -----------------------------------------------------------------------


def test_views_are_zero_copy_socket_buffers(ring):
    """recv_into a writable view and send from a readable view move bytes with no copy."""
    a, b = socket.socketpair()
    with a, b:
        advance(ring, ring.capacity - 10)
        a.sendall(b"0123456789ABCDEF")
        views = ring.writable_views(16)
        got = sum(b.recv_into(view) for view in views)
        ring.commit(got)
        for view in ring.readable_views(16):
            a.sendall(view)
        ring.consume(16)
        assert b.recv(100) == b"0123456789ABCDEF"


def test_settled_views_are_released(ring):
    """Views handed out are released by commit/consume, so close() never trips on them."""
    wviews = ring.writable_views(10)
    ring.commit(0)
    with pytest.raises(ValueError):
        wviews[0][0]
    ring.put_nowait(b"abc")
    rviews = ring.readable_views(10)
    more = ring.readable_views(10)
    with pytest.raises(ValueError):
        rviews[0][0]  # superseded by the later call
    ring.close()
    with pytest.raises(ValueError):
        more[0][0]
    with pytest.raises(OSError):
        os.fstat(ring.data_fd)
    ring.close()  # idempotent


def test_a_ring_has_no_name_in_dev_shm():
    """A ring is anonymous shared memory: nothing in /dev/shm to leak or attach to."""
    before = set(os.listdir("/dev/shm"))
    ring = Ring.create(4096, "probe")
    try:
        assert ring.name == "bridged-probe"
        assert not any(name.startswith("bridged-probe") for name in set(os.listdir("/dev/shm")) - before)
        assert ring.put_nowait(b"mapped") == 6 and ring.get_nowait(100) == b"mapped"
    finally:
        ring.close()


def _reopen_block(ring: Ring) -> int:
    """Open the ring's memory afresh, as another process of our user could
    through /proc/<pid>/fd (3.11 keeps an fd per mapping) or map_files."""
    wanted = f"/memfd:{ring.name} (deleted)"
    for directory in ("/proc/self/fd", "/proc/self/map_files"):
        for entry in os.listdir(directory):
            path = f"{directory}/{entry}"
            try:
                if os.readlink(path) == wanted:
                    return os.open(path, os.O_RDWR)
            except (FileNotFoundError, PermissionError):
                continue
    pytest.skip("the ring's memory cannot be reopened here (map_files needs CAP_SYS_ADMIN)")


def test_a_rings_memory_cannot_be_resized():
    """Whoever reopens a ring's memory (a worker of our user through /proc) can
    neither shrink it, which would crash every process mapping it with SIGBUS,
    nor grow it: the size is sealed; the ring goes on working."""
    ring = Ring.create(4096, "sealed")
    fd = _reopen_block(ring)
    try:
        size = os.fstat(fd).st_size
        for wrong in (0, size // 2, size * 2):
            try:
                os.ftruncate(fd, wrong)
            except PermissionError:
                continue
            os.ftruncate(fd, size)  # put it back before anything touches the ring
            pytest.fail(f"the ring's memory could be resized to {wrong}")
        assert os.fstat(fd).st_size == size
        assert ring.put_nowait(b"still mapped") == 12 and ring.get_nowait(100) == b"still mapped"
    finally:
        os.close(fd)
        ring.close()


# -- processes ----------------------------------------------------------------------------------


# The daemon forks before it starts threads; pytest may have threads (timeouts,
# earlier tests' servers) when these tests fork.  The child only touches the
# ring and leaves with os._exit, so no lock a thread held is ever needed.
_FORK_IN_THREADS = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


@contextmanager
def forked(child):
    """Run child() in a forked process; yield its pid; reap it with a timeout."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    try:
        yield pid
        assert select.select([pidfd], [], [], WAIT)[0], "child did not exit in time"
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(pidfd)


def wait_readable(fd: int) -> None:
    if not select.select([fd], [], [], WAIT)[0]:
        raise TimeoutError(f"fd {fd} not readable within {WAIT} s")


SOURCE_SIZE = 1 << 20


def produce(ring: Ring, total: int, seed: int, result_fd: int) -> None:
    """Push `total` pseudo-random bytes in random chunk sizes; report their hash."""
    rng = random.Random(seed)
    source = memoryview(rng.randbytes(SOURCE_SIZE + 70000))
    digest, sent = hashlib.sha256(), 0
    while sent < total:
        if ring.free() == 0:
            ring.clear_space_doorbell()  # clear, re-check, then sleep: no lost wake-up
            if ring.free() == 0:
                wait_readable(ring.space_fd)
            continue
        pos, size = sent % SOURCE_SIZE, min(rng.choice((1, 17, 1500, 20000, 70000)), total - sent)
        chunk = source[pos : pos + size]
        if rng.random() < 0.5:
            n = ring.put_nowait(chunk)
        else:
            views = ring.writable_views(size)
            n = 0
            for view in views:
                view[:] = chunk[n : n + len(view)]
                n += len(view)
            ring.commit(n)
        digest.update(chunk[:n])
        sent += n
    os.write(result_fd, digest.digest())


def consume(ring: Ring, total: int, seed: int) -> bytes:
    rng = random.Random(seed)
    digest, received = hashlib.sha256(), 0
    while received < total:
        if ring.available() == 0:
            ring.clear_data_doorbell()
            if ring.available() == 0:
                wait_readable(ring.data_fd)
            continue
        views = ring.readable_views(rng.choice((1, 999, 4096, 65536)))
        n = 0
        for view in views:
            digest.update(view)
            n += len(view)
        ring.consume(n)
        received += n
    assert ring.available() == 0
    return digest.digest()


@_FORK_IN_THREADS
def test_two_processes_move_64_mib():
    """A forked producer and this process as consumer move 64 MiB; hashes match."""
    total = 64 << 20
    with new_ring(1 << 16) as ring:
        result_r, result_w = os.pipe()
        with forked(lambda: produce(ring, total, 7, result_w)):
            got = consume(ring, total, 8)
            wait_readable(result_r)
            assert os.read(result_r, 64) == got
        os.close(result_r)
        os.close(result_w)
        assert ring.write_index == ring.read_index == total


@_FORK_IN_THREADS
def test_a_childs_close_leaves_the_parents_mapping():
    """A child that closes an inherited ring unmaps it for itself only; the data stays shared."""
    with new_ring(4096, f"close-{os.getpid()}") as ring:
        ring.put_nowait(b"from parent")

        def child():
            assert ring.get_nowait(100) == b"from parent"
            ring.put_nowait(b"from child")
            ring.close()
            assert f"/memfd:{ring.name}" not in Path("/proc/self/maps").read_text()

        with forked(child):
            pass
        assert ring.get_nowait(100) == b"from child"
