"""A send line repeated in a session (the front's short path, bridged.commands.send.quick_send)
answers exactly as the registry's way would: every check is made again for each line."""

from __future__ import annotations

import signal
import time

import pytest

from tests.harness import udp_peer
from tests.integration.test_faults_at import fault_cli

_LINE = b"AT+CIPSEND=0,4"


@pytest.fixture
def host(shared_or_own_host):
    """A test needing only a booted host shares the module's daemon; one that reads its
    daemon has its own (conftest.shared_or_own_host)."""
    return shared_or_own_host


def _send(host, payload: bytes) -> None:
    assert host.send_data(_LINE, payload).endswith(b"\r\nSEND OK\r\n")


def test_a_repeated_send_line_is_checked_each_time(host, echo_server):
    """The same line gets its prompt while the TCP link is open, ERROR once it is closed,
    one datagram once the link is UDP, ERROR in single-connection mode and in CIPMODE=1."""
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
    for payload in (b"ping", b"pong", b"again"[:4]):  # the second and third from the remembered line
        _send(host, payload)
        assert host.read_ipd() == (0, payload)
    assert host.ask(b"AT+CIPCLOSE=0").endswith(b"0,CLOSED\r\n\r\nOK\r\n")
    assert host.ask(_LINE) == b"\r\nERROR\r\n"  # the link is gone

    peer = udp_peer()
    with peer:
        port = peer.getsockname()[1]
        assert host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d' % port) == b"0,CONNECT\r\n\r\nOK\r\n"
        for payload in (b"dgm1", b"dgm2"):
            _send(host, payload)
            assert peer.recvfrom(64)[0] == payload
        assert host.ask(b"AT+CIPCLOSE=0").endswith(b"0,CLOSED\r\n\r\nOK\r\n")

    host.command(b"AT+CIPMUX=0")
    assert host.ask(_LINE) == b"\r\nERROR\r\n"  # "0,4": a length of 0 and a host, in this mode
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    for payload in (b"solo", b"solo"):
        assert host.send_data(b"AT+CIPSEND=4", payload).endswith(b"\r\nSEND OK\r\n")
        assert host.read_ipd() == (None, payload)
    host.command(b"AT+CIPMODE=1")
    assert host.ask(b"AT+CIPSEND=4") == b"\r\nERROR\r\n"  # the set form needs CIPMODE=0


def _remembered(host, echo_server) -> None:
    """CIPMUX=1, link 0 open to the echo server, _LINE sent twice (the second time the short way)."""
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
    for payload in (b"ping", b"pong"):
        _send(host, payload)
        assert host.read_ipd() == (0, payload)


def test_a_line_remembered_under_cipmux_1_is_bound_again_under_cipmux_0(host, echo_server):
    """AT+CIPSEND=0,4, prompted on link 0 in multi-link mode is ERROR (length 0) in single-link
    mode even while the single link (link 0) is open: the short path keys on AT+CIPMUX too."""
    _remembered(host, echo_server)
    assert host.ask(b"AT+CIPCLOSE=0").endswith(b"0,CLOSED\r\n\r\nOK\r\n")
    host.command(b"AT+CIPMUX=0")
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    assert host.ask(_LINE) == b"\r\nERROR\r\n"


def test_a_remembered_line_to_a_udp_link_is_checked_against_links_deny(make_daemon, echo_server):
    """The line remembered for a TCP link 0 is ERROR once link 0 is a UDP listener whose
    0.0.0.0 remote [links] deny refuses, as the registry's way answers it (no prompt)."""
    daemon = make_daemon('[links]\ndeny = ["0.0.0.0/0"]\nallow = ["127.0.0.0/8"]\n')
    host = daemon.host()
    host.boot()
    _remembered(host, echo_server)
    assert host.ask(b"AT+CIPCLOSE=0").endswith(b"0,CLOSED\r\n\r\nOK\r\n")
    with udp_peer() as probe:  # a free local port for the listener
        local = probe.getsockname()[1]
    assert host.ask(b'AT+CIPSTART=0,"UDP","0.0.0.0",0,%d,2' % local) == b"0,CONNECT\r\n\r\nOK\r\n"
    assert host.ask(_LINE) == b"\r\nERROR\r\n"
    assert host.ask(_LINE) == b"\r\nERROR\r\n"
    host.close()


def test_at_faults_armed_later_hit_a_remembered_line(daemon, echo_server):
    """`bridged fault at_errcode` / `at_delay` after a line was remembered: that line fails with
    the code, then gets its prompt 0.3 s late, and the command after each is untouched."""
    host = daemon.host()
    host.boot()
    _remembered(host, echo_server)
    host.command(b"AT+SYSLOG=1")
    assert fault_cli(daemon, "at_errcode", "code=0x01090000").returncode == 0
    assert host.ask(_LINE) == b"ERR CODE:0x01090000\r\n\r\nERROR\r\n"
    assert host.ask(b"AT") == b"\r\nOK\r\n"  # nothing of the draw left for the next command
    assert fault_cli(daemon, "at_delay", "ms=300").returncode == 0
    started = time.monotonic()
    assert host.send_data(_LINE, b"late").endswith(b"\r\nSEND OK\r\n")
    assert time.monotonic() - started >= 0.3
    assert host.read_ipd() == (0, b"late")
    assert host.ask(b"AT") == b"\r\nOK\r\n"
    host.close()


def test_a_reload_that_lowers_cipsend_max_refuses_a_remembered_length(daemon, echo_server):
    """_LINE (4 bytes), remembered before a reload (SIGHUP) to [links] cipsend_max = 3, is ERROR
    after it, and a 3-byte send goes: nothing of the old session's send lines answers."""
    host = daemon.host()
    host.boot()
    _remembered(host, echo_server)
    daemon.write_config("[links]\ncipsend_max = 3\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("reloading")[-1]["changed"] == ["links.cipsend_max"]
    assert host.expect(b"\r\nready\r\n", timeout=10) == b"\r\nready\r\n"
    host.command(b"ATE0")
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
    assert host.ask(_LINE) == b"\r\nERROR\r\n"  # over the new maximum
    assert host.send_data(b"AT+CIPSEND=0,3", b"max").endswith(b"\r\nSEND OK\r\n")
    assert host.read_ipd() == (0, b"max")
    host.close()
