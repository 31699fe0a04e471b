"""bridged.net.fence: refusals are counted every time, those of datagrams and server clients logged sparingly."""

from __future__ import annotations

import ipaddress

from structlog.testing import capture_logs

from bridged.net.fence import Fence
from bridged.net.policy import Policy


def _fence(now: list[float]) -> Fence:
    return Fence(Policy(deny=["127.0.0.0/8"], allow=["127.0.0.1:1883"]), lambda: now[0])


def test_connect_refusals_are_each_logged_and_counted():
    """Every refused connect address is one link_refused line with the running count."""
    fence = _fence([0.0])
    with capture_logs() as logs:
        assert fence.check("127.0.0.2", 80) is not None
        assert fence.check("127.0.0.1", 1883) is None
        assert fence.check("127.1", 80) is not None
    assert [(e["event"], e["what"], e["address"], e["port"], e["rule"], e["refused"]) for e in logs] == [
        ("link_refused", "connect", "127.0.0.2", 80, "deny '127.0.0.0/8'", 1),
        ("link_refused", "connect", "127.0.0.1", 80, "deny '127.0.0.0/8'", 2),
    ]
    assert fence.refused == 2


def test_datagram_refusals_log_once_per_address_every_ten_seconds():
    """A flood from one refused address counts each datagram but logs one line per 10 s."""
    now = [0.0]
    fence = _fence(now)
    with capture_logs() as logs:
        for step in range(200):
            now[0] = step * 0.1  # 20 s of datagrams, 10 a second
            assert not fence.admit(("127.0.0.9", 5000 + step % 7), "receive")
        assert fence.admit(("127.0.0.1", 1883), "send")
    assert fence.refused == 200
    assert [(e["address"], e["refused"]) for e in logs] == [("127.0.0.9", 1), ("127.0.0.9", 101)]


def test_verdicts_are_remembered_for_a_second():
    """A datagram verdict is reused for a second, then asked again (self may have changed)."""
    now = [0.0]
    local = {"yes": False}
    policy = Policy(deny=["self"], is_local=lambda ip: local["yes"] and ip == ipaddress.ip_address("192.0.2.1"))
    fence = Fence(policy, lambda: now[0])
    assert fence.admit(("192.0.2.1", 9), "send")
    local["yes"] = True  # the gateway took that address
    now[0] = 0.9
    assert fence.admit(("192.0.2.1", 9), "send")
    now[0] = 1.0
    assert not fence.admit(("192.0.2.1", 9), "send")


def test_no_deny_list_is_open():
    """Without deny entries the worker skips every check."""
    assert Fence(Policy(), lambda: 0.0).open
    assert not _fence([0.0]).open


def test_a_flood_from_many_senders_logs_a_bounded_number_of_lines():
    """Refused datagrams from thousands of (forged) senders within ten seconds give at most 64 log lines,
    yet each is counted."""
    now = [0.0]
    fence = _fence(now)
    with capture_logs() as logs:
        for i in range(5000):
            now[0] = i * 0.001
            assert not fence.admit((f"127.0.{i // 250}.{i % 250 + 2}", 9), "receive")
    assert fence.refused == 5000
    assert len(logs) == 64
