"""bridged.net.sntp: the SNTP request, the checks on replies, the era rule, the device clock."""

from __future__ import annotations

import calendar
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridged.net.sntp import (
    PACKET_SIZE,
    RETRY_FIRST,
    RETRY_MAX,
    DeviceClock,
    Rejection,
    ReplyRejected,
    build_request,
    from_ntp,
    offset,
    parse_reply,
    retry_delay,
    to_ntp,
)
from tests.sntpserver import kiss, reply_at

COOKIE = 0x1122_3344_5566_7788
Y2038 = calendar.timegm((2038, 1, 19, 3, 14, 8))  # past the signed 32-bit time_t and NTP era 0


def request() -> bytes:
    return build_request(COOKIE)


def test_request_layout():
    """A request is 48 bytes: version 4, mode 3 (client), the cookie as transmit timestamp, zeros elsewhere."""
    data = request()
    assert len(data) == PACKET_SIZE
    assert data[0] == 0b00_100_011
    assert data[1:40] == bytes(39)
    assert struct.unpack("!Q", data[40:]) == (COOKIE,)


def test_request_refuses_zero_cookie():
    """A zero transmit timestamp would match a server's zero originate: refused."""
    with pytest.raises(ValueError):
        build_request(0)


@pytest.mark.parametrize("unix", [0, 1_700_000_000.25, Y2038, 2_085_978_495, 2_085_978_496,
                                  calendar.timegm((2100, 3, 1, 0, 0, 0))])
def test_timestamps_round_trip_across_the_2036_era_change(unix):
    """1970, today, 2038 and 2100 survive the 32-bit NTP seconds field (RFC 4330 section 3)."""
    assert from_ntp(to_ntp(unix)) == pytest.approx(unix, abs=1e-6)


def test_era_one_timestamp_reads_as_2038():
    """A seconds field with its top bit clear is after 2036-02-07, not before 1968."""
    seconds = to_ntp(Y2038) >> 32
    assert seconds < 0x8000_0000
    assert from_ntp(seconds << 32) == Y2038


@given(st.floats(min_value=-61_505_152, max_value=4_233_462_143, allow_nan=False))
def test_any_time_in_1968_to_2104_round_trips(unix):
    """Conversion is exact to the 2**-32 s fraction anywhere from 1968-01-20 to 2104-02-26."""
    assert abs(from_ntp(to_ntp(unix)) - unix) < 1e-6


def test_a_good_reply_is_accepted():
    """A server reply (mode 4, our cookie, stratum 2) gives its receive and transmit times."""
    reply = parse_reply(reply_at(Y2038)(request()), COOKIE)
    assert reply.stratum == 2 and reply.version == 4
    assert reply.transmit == pytest.approx(Y2038)
    assert reply.receive == pytest.approx(Y2038)


def test_version_3_is_accepted():
    """RFC 4330: an SNTPv3 server's answer is good too."""
    assert parse_reply(reply_at(Y2038, version=3)(request()), COOKIE).version == 3


def test_extra_bytes_after_the_header_are_allowed():
    """Extension fields or a MAC after the 48 bytes do not make a reply bad."""
    assert parse_reply(reply_at(Y2038)(request()) + bytes(20), COOKIE).transmit == pytest.approx(Y2038)


@pytest.mark.parametrize("data, reason", [
    (b"", Rejection.SHORT),
    (b"\x24" + bytes(46), Rejection.SHORT),
    (bytes(48), Rejection.VERSION),
    (b"garbage " * 6, Rejection.MODE),
    (reply_at(Y2038, version=2)(build_request(COOKIE)), Rejection.VERSION),
    (reply_at(Y2038, version=5)(build_request(COOKIE)), Rejection.VERSION),
    (reply_at(Y2038, mode=3)(build_request(COOKIE)), Rejection.MODE),
    (reply_at(Y2038, mode=5)(build_request(COOKIE)), Rejection.MODE),
    (reply_at(Y2038, originate=COOKIE + 1)(build_request(COOKIE)), Rejection.ORIGINATE),
    (reply_at(Y2038, originate=0)(build_request(COOKIE)), Rejection.ORIGINATE),
    (kiss(b"RATE")(build_request(COOKIE)), Rejection.KISS_O_DEATH),
    (kiss(b"DENY")(build_request(COOKIE)), Rejection.KISS_O_DEATH),
    (reply_at(Y2038, leap=3)(build_request(COOKIE)), Rejection.UNSYNCHRONIZED),
    (reply_at(Y2038, stratum=16)(build_request(COOKIE)), Rejection.UNSYNCHRONIZED),
    (reply_at(Y2038, transmit=0)(build_request(COOKIE)), Rejection.ZERO_TRANSMIT),
])
def test_bad_replies_are_rejected_with_their_reason(data, reason):
    """Short, wrong version or mode, another originate, KoD, unsynchronised, zero transmit: each named."""
    with pytest.raises(ReplyRejected) as info:
        parse_reply(data, COOKIE)
    assert info.value.reason is reason


def test_kiss_code_is_in_the_detail():
    """The kiss code (RATE, DENY ...) is what the log shows."""
    with pytest.raises(ReplyRejected, match="DENY"):
        parse_reply(kiss(b"DENY")(request()), COOKIE)


def test_a_forged_kiss_is_not_obeyed_as_one():
    """A kiss-o'-death that does not carry our cookie is just a wrong-originate packet."""
    data = bytearray(kiss(b"DENY")(request()))
    data[24:32] = bytes(8)
    with pytest.raises(ReplyRejected) as info:
        parse_reply(bytes(data), COOKIE)
    assert info.value.reason is Rejection.ORIGINATE


@given(st.binary(max_size=100))
def test_random_bytes_are_rejected_or_accepted_never_crash(data):
    """Any datagram ends in a reply or a ReplyRejected, nothing else."""
    try:
        parse_reply(data, COOKIE)
    except ReplyRejected:
        pass


def test_offset_splits_the_round_trip():
    """RFC 4330's theta: a server 1000 s ahead, 0.2 s round trip, 0.05 s in the server."""
    reply = parse_reply(reply_at(1000.1)(request()), COOKIE)
    reply = type(reply)(reply.stratum, reply.version, receive=1000.075, transmit=1000.125)
    assert offset(reply, sent=0.0, received=0.2) == pytest.approx(1000.0)


def test_retry_delay_doubles_and_is_bounded():
    """15 s, 30 s, 60 s ... up to RETRY_MAX, and never more than the sync interval."""
    assert [retry_delay(n, 3600) for n in range(1, 7)] == [15, 30, 60, 120, 240, 240]
    assert retry_delay(1, 3600) == RETRY_FIRST
    assert retry_delay(10_000, 3600) == RETRY_MAX
    assert retry_delay(3, 20) == 20


def test_device_clock_starts_at_the_epoch_and_steps():
    """Power-on reads 1970-01-01 00:00:00 and counts on; a step moves it by the offset."""
    now = [500.0]
    clock = DeviceClock(lambda: now[0])
    assert clock.now() == 0.0
    now[0] += 128
    assert clock.now() == 128.0
    clock.step(Y2038 - 128)
    assert clock.now() == Y2038
    now[0] += 2
    assert clock.now() == Y2038 + 2


_MIN_UNIX, _MAX_UNIX = -61_505_152, 4_233_462_144  # NTP era 0 at 1968-01-20, era 1 ends in 2104


@given(st.integers(0, 2**64 - 1), st.integers(1, 2**64 - 1), st.floats(0, 1e6), st.floats(0, 10),
       st.integers(-12, 14))
def test_absurd_server_times_leave_a_usable_clock(receive, transmit, uptime, trip, tz):
    """Any receive/transmit pair (1900, 2106, all-ones fractions): the stepped clock stays in 1968..2104 and prints."""
    data = bytearray(reply_at(0)(request()))
    struct.pack_into("!QQ", data, 32, receive, transmit)
    reply = parse_reply(bytes(data), COOKIE)
    now = [0.0]
    clock = DeviceClock(lambda: now[0])
    now[0] += uptime  # the request leaves this long after power-on
    sent = clock.now()
    now[0] += trip
    clock.step(offset(reply, sent, clock.now()))
    assert _MIN_UNIX - 10 <= clock.now() <= _MAX_UNIX + 10
    assert len(time.asctime(time.gmtime(clock.now() + tz * 3600))) == 24
