"""bridged runs on gateways for years: under the churn a host driver causes
(links opened and closed by the thousand, peers that vanish, server clients,
passive reads, passthrough, resets) no process of the daemon may hold more
than it did after a warm-up.  ``python -m bench.soak`` runs the same cycles
for minutes.

Each test warms up (the first cycles allocate what every later one reuses:
interned strings, the allocator's arenas, a worker's first socket buffers),
samples every process (tests/soakprobe.py), runs its cycle again, bounded
by a count and a time, and samples again.  Descriptors, threads and /dev/shm
entries, and mappings of a file or memfd (a ring, a library), must not grow
at all.  Anonymous mappings and resident memory move with the allocator
(pymalloc takes and returns its arenas with mmap; a freed page is not always
handed back; a worker's TLS and resolver threads are made on first use), so
anonymous mappings are only reported and resident memory gets a bound,
`ANON_BASE_KIB` plus `ANON_PER_CYCLE_KIB` a cycle, per process.  Asyncio
tasks and timers are not counted: nothing the daemon exposes (`bridged
status` included) shows them; a task or timer kept per cycle shows as memory.
"""

from __future__ import annotations

import time

import pytest

from tests.harness import Daemon, Demux, free_port
from tests.integration.test_tls import TlsServer, _issue
from tests.soakcycles import (DriverHost, Peers, control_cycle, failure_cycle, link_cycle, passive_cycle,
                              passthrough_cycle, peer_first_cycle, reset_cycle, server_cycle)
from tests.soakprobe import growth, processes, sample, table

# Anonymous resident memory (RssAnon: the heap; not the rings' shared pages,
# which fill up to the ring size as the ring indices go round), per process,
# over the measured cycles: at most 1 MiB plus 4 KiB a cycle.  Warmed up, a
# process grew by 20-550 KiB here over each test's cycles (the allocator
# touching pages of its arenas for the first time; over minutes, in
# `python -m bench.soak`, it levels off).  A leak of 16 KiB per AT+CIPCLOSE in
# the front fails the link test (tried: 2.4 MiB over its least 150 cycles,
# 6 MiB over 359); a link worker sees a fifth of the cycles, so a leak there
# is caught by this bound from some 40 KiB a cycle (an SSL context, a read
# buffer), smaller ones by bench.soak's trend over minutes.  Descriptors,
# threads and named mappings are exact: they catch whatever holds a kernel object.
ANON_BASE_KIB = 1024
ANON_PER_CYCLE_KIB = 4


@pytest.fixture(scope="module")
def tls_peer(tmp_path_factory):
    issued, _ = _issue(tmp_path_factory.mktemp("soak-pki"), "server", "localhost")
    server = TlsServer(issued)
    yield server
    server.close()


@pytest.fixture
def peers():
    made = Peers()
    yield made
    made.close()


@pytest.fixture
def driver(make_daemon):
    """A booted daemon and a driver reading it 64 bytes at a time."""
    daemon = make_daemon()
    host = DriverHost(daemon.link)
    host.boot()
    yield daemon, host
    host.close()


def soak(daemon: Daemon, cycle, warm: int, most: int, least: int, seconds: float) -> int:
    """Run ``cycle(i)`` ``warm`` times, sample, run it again (at most ``most``
    times or ``seconds``, at least ``least`` times), sample, and assert that
    nothing grew; the count of measured cycles."""
    roles = processes(daemon)
    for i in range(warm):
        cycle(i)
    before = sample(roles)
    deadline = time.monotonic() + seconds
    done = 0
    while done < most and (done < least or time.monotonic() < deadline):
        cycle(warm + done)
        done += 1
    after = sample(roles)
    assert processes(daemon) == roles, "a process was restarted during the soak"
    grown = growth(before, after)
    report = f"{done} cycles\nbefore:\n{table(before)}\nafter:\n{table(after)}"
    print(report)  # with -s: the figures
    for role, g in grown.items():
        assert g["fds"] <= 0 and g["threads"] <= 0 and g["shm"] <= 0 and g["named"] <= 0, (role, g, report)
        assert g["anon_kib"] <= ANON_BASE_KIB + ANON_PER_CYCLE_KIB * done, (role, g, report)
    return done


def test_links_opened_used_and_closed_leak_nothing(driver, peers, tls_peer):
    """AT+CIPSTART/CIPSEND/CIPCLOSE over all five links, TCP, UDP and SSL in turn:
    no process holds a descriptor, thread or /dev/shm entry more afterwards."""
    daemon, host = driver
    peers.tls = tls_peer  # the module's: closed by its fixture, not by peers
    try:
        host.command(b"AT+CIPMUX=1")
        demux = Demux(host)
        assert soak(daemon, lambda i: link_cycle(demux, peers, i), warm=60, most=3000, least=150,
                    seconds=2.5) >= 150
    finally:
        peers.tls = None


def test_peers_that_close_or_reset_first_leak_nothing(driver, peers):
    """Peers that send and close (FIN) or reset (RST) the instant they accept: CONNECT,
    data, CLOSED each time, and nothing held more afterwards."""
    daemon, host = driver
    host.command(b"AT+CIPMUX=1")
    soak(daemon, lambda i: peer_first_cycle(host, peers, i), warm=40, most=2000, least=80, seconds=2)


def test_failed_connects_cut_streams_and_status_requests_leak_nothing(driver, peers):
    """Refused connects, failed TLS handshakes, a flooding peer's link closed mid-stream
    and a status request on the control socket each cycle: nothing held more afterwards."""
    daemon, host = driver
    daemon.expected_errors.add("connect_failed")
    host.command(b"AT+CIPMUX=1")
    demux = Demux(host)
    control = str(daemon.state_dir / "control.sock")
    soak(daemon, lambda i: failure_cycle(demux, peers, i, control), warm=100, most=2000, least=80, seconds=2)


def test_control_clients_that_vanish_mid_request_leak_nothing(driver):
    """Control-socket clients that go away after connecting, mid-header, mid-request,
    after a request that is no JSON or after a status: nothing held more afterwards."""
    daemon, host = driver
    control = str(daemon.state_dir / "control.sock")
    soak(daemon, lambda i: control_cycle(control, i), warm=100, most=1500, least=300, seconds=1.5)
    assert host.ask(b"AT") == b"\r\nOK\r\n"  # the front still serves the MCU


def test_server_clients_that_come_and_vanish_leak_nothing(driver):
    """AT+CIPSERVER with one to five clients at a time that connect, send and vanish
    (FIN or RST): nothing held more afterwards."""
    daemon, host = driver
    port = free_port()
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPSERVER=1,%d" % port)
    soak(daemon, lambda i: server_cycle(host, port, i), warm=20, most=1000, least=50, seconds=2)


def test_passive_reads_leak_nothing(driver, peers):
    """Passive receive: AT+CIPRECVLEN? polled, AT+CIPRECVDATA in 64-byte reads,
    links opened and closed: nothing held more afterwards."""
    daemon, host = driver
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPRECVTYPE=5,1")
    soak(daemon, lambda i: passive_cycle(host, peers, i), warm=30, most=1500, least=60, seconds=2)


def test_passthrough_entered_and_left_leaks_nothing(driver, peers):
    """Passthrough entered with AT+CIPSEND and left with +++ again and again, its link
    reopened every fourth time: nothing held more afterwards."""
    daemon, host = driver
    host.command(b"AT+SYSMSG=1")
    host.command(b"AT+CIPMODE=1")
    soak(daemon, lambda i: passthrough_cycle(host, peers, i), warm=8, most=400, least=16, seconds=2)


def test_resets_leak_nothing(driver, peers):
    """AT+RST again and again, a link open before every other one, the driver
    flushing its input after each: nothing held more afterwards."""
    daemon, host = driver
    host.command(b"AT+CIPMUX=1")
    soak(daemon, lambda i: reset_cycle(host, peers, i), warm=10, most=400, least=20, seconds=2)
