"""bridged.net.sntp_client against real SNTP servers on loopback (any free port), under asyncio and uvloop."""

from __future__ import annotations

import asyncio
import calendar
import os
import struct
import time

import pytest
from structlog.testing import capture_logs

from bridged.net import sntp_client
from bridged.net.sntp import DeviceClock
from bridged.net.sntp_client import SntpClient
from tests import dnsserver
from tests.sntpserver import SntpServer, kiss, reply_at, silent

Y2038 = calendar.timegm((2038, 1, 19, 3, 14, 8))



@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Short waits: a silent server costs 0.3 s, a failed round 0.5 s."""
    monkeypatch.setattr(sntp_client, "RECV_TIMEOUT", 0.3)
    monkeypatch.setattr(sntp_client, "retry_delay", lambda failed, interval: 0.5)


class Device:
    def __init__(self, interval: float = 3600, online: bool = True, ipv6: bool = True) -> None:
        self.updates = 0
        self._interval = interval
        self._online = online
        self._ipv6 = ipv6

    def interval(self) -> float:
        return self._interval

    def dns_servers(self):
        return ()

    def online(self) -> bool:
        return self._online

    def ipv6(self) -> bool:
        return self._ipv6

    def time_updated(self) -> None:
        self.updates += 1


def start_server(answer, **kwargs) -> SntpServer:
    server = SntpServer.start("127.0.0.1", answer, port=0, **kwargs)
    assert not isinstance(server, str), server
    return server


@pytest.fixture
def servers():
    started: list[SntpServer] = []

    def make(answer, **kwargs) -> SntpServer:
        started.append(start_server(answer, **kwargs))
        return started[-1]

    yield make
    for server in started:
        server.close()


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_answer_sets_the_clock_and_updates_once(run, servers):
    """A server saying 2038 sets the device clock to 2038 and +TIME_UPDATED goes out once."""
    server = servers(reply_at(Y2038))

    async def main():
        client = SntpClient(DeviceClock(), port=server.port, spawn=asyncio.create_task)
        device = Device(interval=0.2)
        client.start(["127.0.0.1"], device)
        await until(lambda: len(server.requests) >= 3)  # three syncs, one update
        client.stop()
        return client.clock.now(), device.updates

    now, updates = run(main())
    assert now == pytest.approx(Y2038, abs=1.0)
    assert updates == 1


def test_restart_updates_again(run, servers):
    """Each start (AT+CIPSNTPCFG=1) earns one more +TIME_UPDATED."""
    server = servers(reply_at(Y2038))

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device()
        client.start(["127.0.0.1"], device)
        await until(lambda: device.updates == 1)
        client.start(["127.0.0.1"], device)
        await until(lambda: device.updates == 2)
        client.stop()

    run(main())


@pytest.mark.parametrize("answer, reason", [
    (lambda request: b"garbage", "short"),
    (reply_at(Y2038, mode=3), "mode"),
    (reply_at(Y2038, originate=1), "originate"),
    (reply_at(Y2038, transmit=0), "zero_transmit"),
])
def test_bad_answers_are_ignored_and_logged(run, servers, answer, reason):
    """Garbage, a client-mode packet, a wrong originate, a zero transmit: clock untouched, reason logged."""
    server = servers(answer)

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device()
        with capture_logs() as logs:
            client.start(["127.0.0.1"], device)
            await until(lambda: any(e["event"] == "sntp_no_answer" for e in logs))
        client.stop()
        return client.clock.now(), device.updates, logs

    now, updates, logs = run(main())
    assert now < 60 and updates == 0
    ignored = [e for e in logs if e["event"] == "sntp_reply_ignored"]
    assert ignored and ignored[0]["reason"] == reason


def test_answer_from_another_port_is_ignored(run, servers):
    """A good reply sent from another source port is not taken."""
    server = servers(reply_at(Y2038), reply_from_other_port=True)

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        with capture_logs() as logs:
            client.start(["127.0.0.1"], Device())
            await until(lambda: any(e["event"] == "sntp_no_answer" for e in logs))
        client.stop()
        return client.clock.now(), logs

    now, logs = run(main())
    assert now < 60
    assert [e["reason"] for e in logs if e["event"] == "sntp_reply_ignored"] == ["source"]


def test_kiss_of_death_moves_on_to_the_next_server_at_once(run, servers, monkeypatch):
    """A DENY kiss ends the wait for that server: the next one is asked well before the receive timeout."""
    monkeypatch.setattr(sntp_client, "RECV_TIMEOUT", 3.0)
    denying = servers(kiss(b"DENY"))  # 127.0.0.1, and the good one on 127.0.0.2, same port
    good = SntpServer.start("127.0.0.2", reply_at(Y2038), port=denying.port)
    if isinstance(good, str):
        pytest.skip(good)

    async def main():
        client = SntpClient(port=denying.port, spawn=asyncio.create_task)
        device = Device()
        with capture_logs() as logs:
            client.start(["127.0.0.1", "127.0.0.2"], device)
            await until(lambda: device.updates == 1, timeout=1.0)
        client.stop()
        return logs

    try:
        logs = run(main())
    finally:
        good.close()
    kisses = [e for e in logs if e["event"] == "sntp_reply_ignored"]
    assert kisses[0]["reason"] == "kiss_o_death" and "DENY" in kisses[0]["detail"]


def test_silent_server_retries_without_flooding(run, servers):
    """No answer: one request per round, rounds apart by the retry delay, never an update."""
    server = servers(silent)

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device()
        client.start(["127.0.0.1"], device)
        await asyncio.sleep(2.0)  # rounds of 0.3 s wait + 0.5 s pause
        client.stop()
        return device.updates

    assert run(main()) == 0
    assert 2 <= len(server.requests) <= 3


def test_offline_sends_nothing_until_woken(run, servers):
    """Without the station's IP no request goes out; wake() after joining asks at once."""
    server = servers(reply_at(Y2038))

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device(online=False)
        client.start(["127.0.0.1"], device)
        await asyncio.sleep(0.2)  # an offline device's client would send within this
        assert server.requests == []
        device._online = True
        client.wake()
        await until(lambda: device.updates == 1, timeout=0.4)
        client.stop()

    run(main())


def test_ignored_replies_are_logged_at_most_once_per_reason_a_while(run, servers):
    """A server answering garbage again and again costs one log line per LOG_EVERY, with a count."""
    server = servers(lambda request: b"x")

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        with capture_logs() as logs:
            client.start(["127.0.0.1"], Device())
            await until(lambda: len(server.requests) >= 3)
        client.stop()
        return logs

    logs = run(main())
    assert len([e for e in logs if e["event"] == "sntp_reply_ignored"]) == 1


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_toggling_leaks_no_socket_and_sends_no_late_update(run, servers):
    """AT+CIPSNTPCFG=1/0 in a tight loop, stopped at every stage of a query: no fd or task left, no update after the stop."""
    server = servers(reply_at(Y2038))

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device()
        before, tasks = _open_fds(), asyncio.all_tasks()
        for turn in range(300):
            client.start(["127.0.0.1"], device)
            for _ in range(turn % 7):  # stop after 0..6 loop turns: resolving, opening, waiting, answered
                await asyncio.sleep(0)
            client.stop()
        updates = device.updates
        await asyncio.sleep(0.3)  # a late update would come within this
        return before, _open_fds(), updates, device.updates, asyncio.all_tasks() - tasks

    before, after, updates_at_stop, updates, others = run(main())
    assert after == before
    assert updates == updates_at_stop
    assert others == set()


def test_rounds_without_answer_leak_no_socket(run, servers):
    """A server that never answers, round after round: the fd count stays where it was."""
    server = servers(silent)

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        before = _open_fds()
        client.start(["127.0.0.1", "127.0.0.1"], Device())
        await until(lambda: len(server.requests) >= 6, timeout=10)
        client.stop()
        await until(lambda: _open_fds() <= before, timeout=5)  # the cancelled round closes its socket
        return before, _open_fds()

    before, after = run(main())
    assert after == before


def flooding(count: int):
    """An answer that first sends ``count`` replies with a guessed cookie (from the server's own address and port)."""
    good = reply_at(Y2038)

    def answer(request: bytes, send) -> bytes:
        reply = good(request)
        guessed = reply[:24] + struct.pack("!Q", 0x1234_5678_9ABC_DEF0) + reply[32:]
        for _ in range(count):
            send(guessed)
        return reply

    return answer


def test_a_flood_of_guessed_cookies_neither_hides_the_answer_nor_stalls_the_loop(run, servers):
    """100 forged replies from the server's own address before the real one (all fit the socket buffer): it is still taken, the loop keeps ticking."""
    server = servers(flooding(100), pass_send=True)

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device()
        lags = []
        with capture_logs() as logs:
            client.start(["127.0.0.1"], device)
            while device.updates == 0 and len(lags) < 500:
                before = time.monotonic()
                await asyncio.sleep(0.005)
                lags.append(time.monotonic() - before)
        client.stop()
        return device.updates, max(lags), logs

    updates, lag, logs = run(main())
    assert updates == 1
    assert lag < 0.5
    ignored = [e for e in logs if e["event"] == "sntp_reply_ignored"]
    assert [e["reason"] for e in ignored] == ["originate"]  # one log line for the whole flood


@pytest.mark.parametrize("ipv6", [True, False])
def test_ipv6_servers_only_with_ipv6(run, ipv6):
    """An IPv6 server is asked only when the device has IPv6 (AT+CIPV6=1); without it the name does not resolve."""
    server = SntpServer.start("::1", reply_at(Y2038), port=0)
    if isinstance(server, str):
        pytest.skip(server)

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device(ipv6=ipv6)
        with capture_logs() as logs:
            client.start(["::1"], device)
            await until(lambda: device.updates or any(e["event"] == "sntp_resolve_failed" for e in logs))
        client.stop()
        return device.updates, logs

    try:
        updates, logs = run(main())
    finally:
        server.close()
    if ipv6:
        assert updates == 1 and len(server.requests) == 1
    else:
        assert updates == 0 and server.requests == []
        assert "not an IPv4 address" in [e for e in logs if e["event"] == "sntp_resolve_failed"][0]["why"]


def test_a_huge_datagram_is_read_in_part_and_still_checked(run, servers):
    """A 60 000-byte answer: the first bytes are read (a reply is 48), the rest is dropped unread, the time is taken."""
    good = reply_at(Y2038)
    server = servers(lambda request: good(request) + b"\0" * 60_000)

    async def main():
        client = SntpClient(port=server.port, spawn=asyncio.create_task)
        device = Device()
        client.start(["127.0.0.1"], device)
        await until(lambda: device.updates == 1)
        client.stop()
        return client.clock.now()

    assert run(main()) == pytest.approx(Y2038, abs=1.0)


def test_a_name_with_many_addresses_costs_one_request(run):
    """A server name with eight addresses: one of them (lwIP's lookup gives one) gets the only request."""
    addresses = [f"127.0.0.{n}" for n in range(141, 149)]
    first = SntpServer.start(addresses[0], reply_at(Y2038), port=0)
    if isinstance(first, str):
        pytest.skip(first)
    others = [SntpServer.start(a, reply_at(Y2038), port=first.port) for a in addresses[1:]]

    class Named(Device):
        def dns_servers(self):
            return ("127.0.0.140",)

    async def main():
        client = SntpClient(port=first.port, spawn=asyncio.create_task)
        device = Named()
        client.start(["many.example"], device)
        await until(lambda: device.updates == 1)
        client.stop()

    try:
        with dnsserver.serving("127.0.0.140", {"many.example": addresses}):
            run(main())
    finally:
        for server in [first, *others]:
            if not isinstance(server, str):
                server.close()
    assert all(not isinstance(s, str) for s in others)
    assert sum(len(s.requests) for s in [first, *others]) == 1
