"""bridged.links.faults: a link worker's faults at its hook points, scoped to its link,
fired on demand, and their reports batched per datagram kind."""

from __future__ import annotations

import asyncio
import errno

import pytest

from bridged.faults import parse_spec
from bridged.faults.spec import FaultError
from bridged.ipc.messages import Connect, FireFault
from bridged.links.faults import Batches, LinkFaults
from bridged.links.tls import TlsError

pytestmark = pytest.mark.timeout(60)

NOW = 100.0
CONNECT = Connect(conn_id=1, link_type="TCP", host="127.0.0.1", port=7)


def faults(*specs: tuple[str, dict], link_id: int = 1, reports: list | None = None) -> LinkFaults:
    report = (lambda name, details: reports.append((name, details))) if reports is not None else None
    return LinkFaults([parse_spec(name, table) for name, table in specs], 1, link_id, start=0.0, report=report)


def test_nothing_configured_shapes_nothing_and_fails_nothing():
    """Without faults the zero-copy paths run: no Shaper, connects and handshakes untouched."""
    plain = faults()
    assert not plain.shapes(datagram=False) and not plain.shapes(datagram=True)
    asyncio.run(plain.before_connect(CONNECT, 5000, NOW))
    assert plain.handshake_fails(NOW, "client") is None


@pytest.mark.parametrize("name, stream, datagram", [
    ("net_latency", True, True),
    ("net_bandwidth", True, True),
    ("net_tcp_reset", True, False),
    ("net_udp_loss", False, True),
    ("net_udp_reorder", False, True),
])
def test_a_data_path_kind_shapes_the_link_types_it_acts_on(name, stream, datagram):
    """Each data-path kind needs a Shaper on the link types it acts on, and only there."""
    table = {} if name in ("net_latency", "net_bandwidth") else {"rate": 0.5}
    link = faults((name, table))
    assert (link.shapes(datagram=False), link.shapes(datagram=True)) == (stream, datagram)


def test_a_refused_connect_fails_as_econnrefused_and_is_reported():
    """net_connect_refused: ConnectionRefusedError at once, reported with the destination."""
    reports: list = []
    link = faults(("net_connect_refused", {"rate": 1}), reports=reports)
    with pytest.raises(ConnectionRefusedError) as caught:
        asyncio.run(link.before_connect(CONNECT, 5000, NOW))
    assert caught.value.errno == errno.ECONNREFUSED
    assert reports == [("net_connect_refused", {"host": "127.0.0.1", "port": 7})]


def test_a_connect_timeout_waits_out_the_commands_timeout():
    """net_connect_timeout: TimeoutError once AT+CIPSTART's timeout (not the default) has passed."""
    link = faults(("net_connect_timeout", {"rate": 1}))

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await link.before_connect(Connect(1, "TCP", "127.0.0.1", 7, timeout_ms=200), 60_000, NOW)
        return loop.time() - started

    assert 0.19 <= asyncio.run(main()) < 5


def test_a_fault_for_another_link_is_not_this_workers():
    """link = 2 in the table: link 1's worker neither fails connects nor shapes."""
    link = faults(("net_connect_refused", {"rate": 1, "link": 2}), ("net_latency", {"link": 2}), link_id=1)
    asyncio.run(link.before_connect(CONNECT, 5000, NOW))
    assert not link.shapes(datagram=False)
    assert faults(("net_connect_refused", {"rate": 1, "link": 2}), link_id=2).plan.enabled("net_connect_refused")


def test_tls_fail_fails_the_handshake_of_either_side():
    """tls_fail gives a TlsError to fail the handshake with, reported with its side."""
    reports: list = []
    link = faults(("tls_fail", {"rate": 1}), reports=reports)
    error = link.handshake_fails(NOW, "server")
    assert isinstance(error, TlsError)
    assert reports == [("tls_fail", {"side": "server"})]


def test_a_fault_on_demand_arms_this_link_for_count_occasions():
    """FireFault arms the kind here: it hits `count` connects, then stops."""
    link = faults()
    demand = link.demand(FireFault("net_connect_refused", (), count=2), NOW)
    assert demand is not None and demand.name == "net_connect_refused"
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            asyncio.run(link.before_connect(CONNECT, 5000, NOW))
    asyncio.run(link.before_connect(CONNECT, 5000, NOW))  # the third connects


def test_a_demand_for_another_link_is_ignored():
    """link=3 on link 1's worker: None, and nothing is armed."""
    link = faults(link_id=1)
    assert link.demand(FireFault("net_connect_refused", ("link=3",)), NOW) is None
    assert not link.plan.enabled("net_connect_refused")


@pytest.mark.parametrize("msg", [
    FireFault("at_busy", ()),  # the front's kind
    FireFault("net_udp_reorder", ("depth",)),  # not key=value
    FireFault("net_udp_reorder", ("count=3",)),  # count has its own field
    FireFault("net_udp_reorder", ("depth=0",)),  # out of range
])
def test_a_bad_demand_is_refused_with_a_fault_error(msg):
    """A kind that is not a worker's, a malformed or reserved key, a bad value: FaultError."""
    with pytest.raises(FaultError):
        faults().demand(msg, NOW)


def test_an_unknown_fault_on_demand_is_a_key_error():
    """An unknown name raises KeyError (the front answers with the known ones)."""
    with pytest.raises(KeyError):
        faults().demand(FireFault("net_gremlins", ()), NOW)


def test_per_datagram_reports_are_batched_and_others_are_not():
    """The first datagram hit is reported at once, later ones in one report a second later;
    a per-connection kind is reported every time."""
    sent: list[tuple[str, int]] = []

    async def main() -> None:
        batches = Batches(asyncio.get_running_loop(), lambda name, details, hits: sent.append((name, hits)))
        for _ in range(50):
            batches.fired("net_udp_loss", {})
        batches.fired("net_connect_refused", {})
        batches.fired("net_connect_refused", {})
        assert sent == [("net_udp_loss", 1), ("net_connect_refused", 1), ("net_connect_refused", 1)]
        async with asyncio.timeout(5):  # the batch's timer: about a second after the first report
            while len(sent) < 4:
                await asyncio.sleep(0.05)
        batches.fired("net_udp_loss", {})
        batches.fired("net_udp_loss", {})
        batches.close()  # the worker stops: what is gathered is reported

    asyncio.run(main())
    assert sent[3:] == [("net_udp_loss", 49), ("net_udp_loss", 2)]
