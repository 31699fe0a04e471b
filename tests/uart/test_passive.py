"""Passive receive mode's bookkeeping on a real ring: counting, reads, and the
notice whose length is fixed when it is written."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.ipc.records import DATA, EOF, put_record
from bridged.uart.passive import Notice, NoticeState, Unread
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def unread():
    with new_ring(65536) as ring:
        yield Unread(ring)


def publish(unread: Unread, *payloads: bytes, kind: int = DATA) -> None:
    for payload in payloads:
        assert put_record(unread.ring, kind, payload)


# -- Notice ------------------------------------------------------------------------


def test_one_notice_until_the_host_reads():
    """Only one notice at a time is queued or unanswered; a read allows the next."""
    notice = Notice()
    assert notice.want(0) is None  # nothing unread, nothing to say
    token = notice.want(10)
    assert token is not None and notice.want(20) is None  # already queued
    assert notice.length(token, 20) == 20 and notice.state is NoticeState.OUT
    assert notice.want(30) is None  # unanswered: ESP-AT waits for a read
    notice.read()
    assert notice.want(30) is not None


def test_the_length_is_what_is_unread_when_written():
    """The notice announces the count at write time, not at queue time."""
    notice = Notice()
    token = notice.want(100)
    assert notice.length(token, 486) == 486


def test_a_notice_with_nothing_unread_is_dropped():
    """Nothing unread when it is written: nothing is written, and the next data gets a notice."""
    notice = Notice()
    token = notice.want(100)
    assert notice.length(token, 0) == 0
    assert notice.state is NoticeState.QUIET
    assert notice.want(5) is not None


def test_a_read_voids_a_queued_notice():
    """A notice queued before a read is never written: a fresh one follows the read's reply."""
    notice = Notice()
    old = notice.want(100)
    notice.read()
    new = notice.want(60)
    assert notice.length(old, 60) == 0  # would announce after the read, ahead of its reply
    assert notice.length(new, 60) == 60


# -- Unread ------------------------------------------------------------------------


def test_count_then_read_in_pieces(unread):
    """Reads take counted bytes in order across records; the total follows."""
    publish(unread, b"abc", b"defgh")
    assert unread.count() and unread.total == 8
    assert unread.count() is False  # nothing new
    assert unread.read(2, one_datagram=False) == b"ab"
    assert unread.read(4, one_datagram=False) == b"cdef"
    assert unread.total == 2
    assert unread.read(100, one_datagram=False) == b"gh"
    assert unread.total == 0 and unread.ring.available() == 0


def test_a_read_takes_only_counted_records(unread):
    """Records published after the last count wait for the next one."""
    publish(unread, b"one")
    unread.count()
    publish(unread, b"two")
    assert unread.read(100, one_datagram=False) == b"one"
    unread.count()
    assert unread.read(100, one_datagram=False) == b"two"


def test_a_read_never_joins_two_datagrams(unread):
    """UDP: one datagram per read, even with room for more."""
    publish(unread, b"first", b"second")
    unread.count()
    assert unread.read(100, one_datagram=True) == b"first"
    assert unread.read(3, one_datagram=True) == b"sec"
    assert unread.read(100, one_datagram=True) == b"ond"


def test_counting_stops_at_eof(unread):
    """An EOF record ends the count; data behind it is not counted."""
    publish(unread, b"last words")
    publish(unread, b"1 closed", kind=EOF)
    unread.count()
    assert unread.total == 10 and unread.eof_seen


def test_take_partial_returns_the_rest_of_a_part_read_record(unread):
    """Back to active mode: the rest of a record reads left in part, then nothing."""
    publish(unread, b"0123456789", b"next")
    unread.count()
    assert unread.read(4, one_datagram=False) == b"0123"
    assert unread.take_partial() == b"456789"
    assert unread.take_partial() is None
    assert (unread.total, unread.scanned, unread.offset) == (0, 0, 0)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(1, 3000)),
        st.tuples(st.just("scan")),  # the front counts and queues a notice if it may
        st.tuples(st.just("read"), st.integers(1, 4096)),  # AT+CIPRECVDATA: reply, then a scan
        st.tuples(st.just("write")),  # the UART output writes its oldest item
        st.tuples(st.just("overtake")),  # ... or its oldest reply, past held notices
        st.tuples(st.just("forget")),  # to active and back before the UART had room
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_every_written_notice_is_exact_where_it_appears(script):
    """Any order of arrivals, scans, reads, writes and mode round trips: a written notice says exactly
    what is unread once the replies written before it are taken off, it is never
    0, and no two are written without a read between them."""
    with new_ring(1 << 20) as ring:
        unread = Unread(ring)
        output: list[tuple[str, int]] = []  # ("notice", token) / ("reply", bytes read)
        arrived = replied = 0  # bytes published; bytes in replies written so far
        read_since_notice = True

        def scan() -> None:
            unread.count()
            token = unread.notice.want(unread.total)
            if token is not None:
                output.append(("notice", token))

        def write(item: tuple[str, int]) -> None:
            nonlocal replied, read_since_notice
            output.remove(item)
            kind, value = item
            if kind == "reply":
                replied += value
                read_since_notice = True
                return
            unread.count()
            n = unread.notice.length(value, unread.total)
            if n:
                assert n == arrived - replied
                assert read_since_notice
                read_since_notice = False

        for op in script:
            if op[0] == "arrive":
                publish(unread, bytes(op[1]))
                arrived += op[1]
            elif op[0] == "scan":
                scan()
            elif op[0] == "read":
                unread.count()
                if unread.total:  # AT+CIPRECVDATA answers ERROR otherwise
                    output.append(("reply", len(unread.read(op[1], one_datagram=False))))
                    scan()
            elif op[0] == "write" and output:
                write(output[0])
            elif op[0] == "forget":
                unread.forget()
                read_since_notice = True  # a new mode, a new first notice
            elif op[0] == "overtake":
                replies = [item for item in output if item[0] == "reply"]
                if replies:
                    write(replies[0])


def test_counting_again_leaves_out_what_reads_took(unread):
    """Back to passive before the rest of a part-read record went out as +IPD
    (the UART was backed up): the count starts over but leaves out what was
    read, so the total never announces bytes no read can return."""
    publish(unread, b"0123456789", b"next")
    unread.count()
    assert unread.read(4, one_datagram=False) == b"0123"
    unread.forget()  # active mode; the partial record waits for UART room
    unread.count()  # passive again
    assert unread.total == 10
    assert unread.read(100, one_datagram=False) == b"456789next"
    assert unread.total == 0
