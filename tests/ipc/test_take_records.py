"""take_records, the front's lean batch read: the same records as get_record one by one, at any
wrap, with IPv4/IPv6 addresses, within its budget, stopping at EOF, one space doorbell a batch."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.ipc.records import DATA, EOF, HEADER_SIZE, Record, RecordError, get_record, put_record, take_records
from tests.ipc.test_records import ADDRS, addr_size, advance, to_slot
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("addr", ADDRS, ids=["noaddr", "v4", "v6"])
def test_a_record_split_at_any_point_of_the_wrap_is_taken_whole(addr):
    """Header, address or payload split by the ring's end: the record comes back as put."""
    with new_ring(4096) as ring:
        payload = os.urandom(40)
        total = HEADER_SIZE + addr_size(addr) + len(payload)
        for slot in range(ring.capacity - total - 1, ring.capacity + 1):
            to_slot(ring, slot)
            assert put_record(ring, DATA, payload, addr)
            assert take_records(ring, 1 << 20) == ([Record(DATA, payload, addr)], False), slot
            assert ring.available() == 0


def test_a_batch_ends_at_its_budget_and_after_an_eof():
    """Records while the payloads taken are under the budget (one at least), never past an EOF."""
    with new_ring(4096) as ring:
        for payload in (b"a" * 100, b"b" * 100, b"c" * 100):
            put_record(ring, DATA, payload)
        put_record(ring, EOF, b"7 closed")
        put_record(ring, DATA, b"next")
        assert [r.payload for r in take_records(ring, 150)[0]] == [b"a" * 100, b"b" * 100]
        assert take_records(ring, 0) == ([], True)
        batch, more = take_records(ring, 1 << 20)
        assert [(r.kind, r.payload) for r in batch] == [(DATA, b"c" * 100), (EOF, b"7 closed")] and more
        assert take_records(ring, 1) == ([Record(DATA, b"next")], False)
        assert take_records(ring, 1) == ([], False)


def test_a_batch_rings_the_space_doorbell_once():
    """One consume for the whole batch: the worker is woken once, not per record."""
    with new_ring(4096) as ring:
        for _ in range(5):
            put_record(ring, DATA, b"x" * 10)
        ring.clear_space_doorbell()
        assert len(take_records(ring, 1 << 20)[0]) == 5
        assert ring.clear_space_doorbell() and not ring.clear_space_doorbell()
        assert ring.available() == 0


def test_a_corrupt_record_raises_after_the_good_ones_before_it_are_taken():
    """Good records before a corrupt one are returned; the next call raises, as get_record does."""
    with new_ring(4096) as ring:
        put_record(ring, DATA, b"good")
        ring.put_nowait(b"\x00\x00\x00\x00\x00\x00\x09\x00")  # kind 9
        assert take_records(ring, 1 << 20) == ([Record(DATA, b"good")], True)
        with pytest.raises(RecordError):
            take_records(ring, 1 << 20)


record_st = st.tuples(st.sampled_from([DATA, EOF]), st.integers(0, 1500), st.sampled_from(ADDRS))


@settings(max_examples=100, deadline=None)
@given(start=st.integers(0, 4095), steps=st.lists(st.one_of(record_st, st.integers(0, 3000)), max_size=40))
def test_batches_match_get_record_one_by_one(start, steps):
    """Any mix of puts and batch reads (budgets 0..3000) at any start slot: the records of
    get_record on a twin ring, in order, each batch within the rule of its budget."""
    with new_ring(4096) as ring, new_ring(4096) as twin:
        advance(ring, start)
        advance(twin, start)
        for i, step in enumerate(steps):
            if isinstance(step, int):
                batch, more = take_records(ring, step)
                expected = [get_record(twin) for _ in batch]
                assert batch == expected
                assert sum(len(r.payload) for r in batch[:-1]) < step or not batch
                assert all(r.kind == DATA for r in batch[:-1])
                assert more == (twin.available() > 0)
                if step > 0 and not batch:
                    assert get_record(twin) is None
                continue
            kind, size, addr = step
            payload = bytes([i % 256]) * size
            assert put_record(ring, kind, payload, addr) == put_record(twin, kind, payload, addr)
        while (batch := take_records(ring, 1 << 20)[0]):
            assert batch == [get_record(twin) for _ in batch]
        assert get_record(twin) is None


def test_the_overhead_counts_per_record_so_tiny_records_stop_a_batch_too():
    """Budget 100 with 30 a record: four 1-byte records (each costs 31), not the ring's 400."""
    with new_ring(8192) as ring:
        for _ in range(400):
            assert put_record(ring, DATA, b"x")
        assert len(take_records(ring, 100)[0]) == 100  # payloads only: 100 of them
        assert take_records(ring, 100, 30) == ([Record(DATA, b"x")] * 4, True)


def test_zero_length_records_are_taken_and_a_batch_of_them_ends_with_the_ring():
    """Empty DATA records (payload 0) cost only their overhead; with none, a batch takes all."""
    with new_ring(4096) as ring:
        for _ in range(50):
            assert put_record(ring, DATA, b"")
        assert take_records(ring, 1, 0) == ([Record(DATA, b"")] * 50, False)
        assert ring.available() == 0


@pytest.mark.parametrize("write", [
    lambda w: w + (1 << 32),  # torn: far ahead
    lambda w: w - 20,  # behind the read index (a hostile worker)
    lambda w: w + 4096 + 1,  # more than the capacity published
])
def test_an_impossible_write_index_takes_nothing_and_frees_nothing(write):
    """Indices a buggy worker stored (or a torn load): no records, no consume, no error."""
    with new_ring(4096) as ring:
        advance(ring, 100)
        put_record(ring, DATA, b"abc")
        real = ring.write_index
        struct.pack_into("<Q", ring._header, 0, write(real))  # test-only: the worker's store
        assert take_records(ring, 1 << 20) == ([], False)
        assert ring.read_index == 100
        struct.pack_into("<Q", ring._header, 0, real)
        assert take_records(ring, 1 << 20) == ([Record(DATA, b"abc")], False)


def test_a_write_index_pulled_back_after_the_take_fails_the_consume_not_silently():
    """The worker moves its index back between the parse and the consume: ValueError, as a
    consume past what is published always was, and the read index stays put."""
    with new_ring(4096) as ring:
        put_record(ring, DATA, b"abc")
        ring.published()
        struct.pack_into("<Q", ring._header, 0, 2)
        with pytest.raises(ValueError):
            ring.consume(HEADER_SIZE + 3)
        assert ring.read_index == 0
