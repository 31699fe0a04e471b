"""Firmware personalities over the pty: each shipped profile answers as its
ESP-AT version does wherever versions differ.

The expected behaviour is written here per version (esp-at-behavior.md
Appendix A, checked against the release cores), not read from
bridged.firmware, so a wrong table there fails here.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

import pytest

from tests.harness import Host, free_port
from tests.shared import SharedDaemon

UNKNOWN = b"ERR CODE:0x01090000\r\n\r\nERROR\r\n"  # an unknown command, with AT+SYSLOG=1
COUNT = rb"ERR CODE:0x0106[0-9a-f]{4}\r\n\r\nERROR\r\n"  # one parameter too many

# A command a version may lack -> a probe its handler answers without the
# 0x0109 "unknown command" code when it exists (an empty query, or a refusal
# of another kind).
PROBES = {
    b"+CIPSTATE": b"AT+CIPSTATE?",
    b"+CIPSENDL": b"AT+CIPSENDL=10",
    b"+CIPSENDLCFG": b"AT+CIPSENDLCFG?",
    b"+CIPSNTPINTV": b"AT+CIPSNTPINTV?",
    b"+CIPFWVER": b"AT+CIPFWVER?",
    b"+TRANSINTVL": b"AT+TRANSINTVL?",
    b"+CIPSSLCPSKHEX": b"AT+CIPSSLCPSKHEX?",
    b"+CIPRECVTYPE": b"AT+CIPRECVTYPE?",
    b"+CIPRECVMODE": b"AT+CIPRECVMODE?",  # in every version
}


@dataclass(frozen=True)
class Version:
    profile: str
    at_version: bytes
    sdk: bytes
    bin_version: bytes
    missing: frozenset[bytes]
    unused: bytes  # AT+CIPRECVLEN? for a link not connected (-1 in 2.x)
    v4_1: bool  # AT+CIPSERVER <netif>, CIPSTART / CIPDOMAIN <timeout>, AT+MDNS options
    keep_alive_opt: bool  # AT+CIPTCPOPT <keep_alive> (2.4)
    time_updated: bool  # +TIME_UPDATED (3.0)
    server_passthrough: bool  # passthrough with a one-client server (2.3)


VERSIONS = [
    Version("esp-at-2.2", b"2.2.0.0", b"v4.2.1", b"2.2.0",
            frozenset(PROBES) - {b"+CIPRECVMODE"}, b"-1", False, False, False, False),
    Version("esp-at-2.4", b"2.4.0.0", b"v4.3.2", b"2.4.0",
            frozenset({b"+CIPFWVER", b"+TRANSINTVL", b"+CIPSSLCPSKHEX", b"+CIPRECVTYPE"}),
            b"-1", False, True, False, True),
    Version("esp-at-3.2", b"3.2.0.0", b"v5.0.2", b"v3.2.0.0", frozenset({b"+CIPRECVTYPE"}),
            b"0", False, True, True, True),
    Version("esp-at-3.4", b"3.4.0.0", b"v5.0.6", b"v3.4.0.0", frozenset(), b"0", False, True, True, True),
    Version("esp-at-4.0", b"4.0.0.0", b"v5.0.4", b"v4.0.0.0", frozenset(), b"0", False, True, True, True),
    Version("esp32", b"4.1.1.0", b"v5.0.8", b"v4.1.1.0", frozenset(), b"0", True, True, True, True),
]


@pytest.fixture(scope="module", params=VERSIONS, ids=[v.profile for v in VERSIONS])
def version(request) -> Version:
    return request.param


@pytest.fixture(scope="module")
def version_daemon(tmp_path_factory, version):
    """One daemon per profile for the module's vhost tests (six starts, not thirty)."""
    # source = "host": +TIME_UPDATED right after AT+CIPSNTPCFG, with no SNTP server to ask.
    shared = SharedDaemon(tmp_path_factory.mktemp(version.profile), '[sntp]\nsource = "host"\n',
                          ("--profile", version.profile))
    yield shared
    shared.stop()


@pytest.fixture
def vhost(version_daemon) -> Host:
    """A booted host (echo off, Wi-Fi joined, AT+SYSLOG=1) on the profile's daemon,
    factory-fresh (AT+RESTORE after the profile's previous test)."""
    host = version_daemon.host()
    host.command(b"AT+SYSLOG=1")
    yield host
    host.close()
    version_daemon.done()


def _checked(host: Host, line: bytes, ok: bool, refusal: bytes = COUNT) -> bytes:
    """Send ``line``: it must end in OK when ``ok``, else in the refusal given."""
    answer = host.ask(line)
    if ok:
        assert answer.endswith(b"\r\nOK\r\n"), (line, answer)
    else:
        assert re.fullmatch(refusal, answer), (line, answer)
    return answer


def test_gmr_and_commands(vhost, version):
    """AT+GMR names the version; commands it lacks answer as unknown ones and AT+CMD? omits them."""
    gmr = vhost.ask(b"AT+GMR")
    assert re.fullmatch(rb"AT version:%s\([^)]* - ESP32 - [^)]*\)\r\nSDK version:%s\r\n"
                        rb"compile time\([^)]*\):[^\r]*\r\nBin version:%s\(WROOM-32\)\r\n\r\nOK\r\n"
                        % (re.escape(version.at_version), re.escape(version.sdk), re.escape(version.bin_version)),
                        gmr), gmr
    listed = vhost.ask(b"AT+CMD?")
    for name, probe in PROBES.items():
        answer = vhost.ask(probe)
        if name in version.missing:
            assert answer == UNKNOWN, (probe, answer)
            assert b'"AT%s"' % name not in listed
        else:
            assert not answer.endswith(UNKNOWN), (probe, answer)
            assert b'"AT%s",' % name in listed


def test_parameters_of_later_versions(vhost, version):
    """<timeout> of AT+CIPDOMAIN, AT+MDNS's service options, AT+CIPTCPOPT's <keep_alive>
    and +TIME_UPDATED exist only from their versions on."""
    _checked(vhost, b'AT+CIPDOMAIN="127.0.0.1"', True)
    _checked(vhost, b'AT+CIPDOMAIN="127.0.0.1",1,1000', version.v4_1)
    # From 4.1 the fifth parameter is read (and "_bad" refused); before, it is one too many.
    mdns = vhost.ask(b'AT+MDNS=1,"bridged","_x",80,"inst","_bad"')
    assert re.fullmatch(rb"ERR CODE:0x010%s[0-9a-f]{4}\r\n\r\nERROR\r\n" % (b"7" if version.v4_1 else b"6"), mdns)
    options = b"+CIPTCPOPT:0,-1,0,0" + (b",0" if version.keep_alive_opt else b"") + b"\r\n\r\nOK\r\n"
    assert vhost.ask(b"AT+CIPTCPOPT?") == options
    _checked(vhost, b"AT+CIPTCPOPT=-1,0,0,30", version.keep_alive_opt)
    vhost.command(b"AT+CIPSNTPCFG=1,0")
    assert (b"+TIME_UPDATED\r\n" in vhost.read_quiet(0.3)) == version.time_updated


def test_server_netif(vhost, version):
    """AT+CIPSERVER takes <netif> from 4.1, and its query then shows it as a fifth field."""
    vhost.command(b"AT+CIPMUX=1")
    port = free_port()
    _checked(vhost, b'AT+CIPSERVER=1,%d,"TCP",0,1' % port, version.v4_1)
    if not version.v4_1:
        vhost.command(b"AT+CIPSERVER=1,%d" % port)
    netif = b",1" if version.v4_1 else b""
    assert vhost.ask(b"AT+CIPSERVER?") == b'+CIPSERVER:1,%d,"TCP",0%s\r\n\r\nOK\r\n' % (port, netif)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        assert vhost.expect(b"0,CONNECT\r\n") == b"0,CONNECT\r\n"
    vhost.expect(b"0,CLOSED\r\n")
    vhost.command(b"AT+CIPSERVER=0")
    if version.v4_1:  # no softAP interface is configured for <netif> 2
        assert vhost.ask(b'AT+CIPSERVER=1,%d,"TCP",0,2' % port).endswith(b"\r\nERROR\r\n")


def _recvlen(version: Version, values: list[bytes | None], mux: bool) -> bytes:
    """The expected line (five link slots): None is a link not connected; in
    single mode only link 0's value, in every version (the cores' handler)."""
    shown = [version.unused if v is None else v for v in values]
    if not mux:
        shown = shown[:1]
    return b"+CIPRECVLEN:" + b",".join(shown) + b"\r\n\r\nOK\r\n"


def test_ciprecvlen_and_cipstart(vhost, version, echo_server):
    """AT+CIPRECVLEN?'s value for unused links (-1 in 2.x) and its field count (one in single
    mode); CIPSTART's <timeout> from 4.1."""
    vhost.command(b"AT+CIPRECVMODE=1")
    assert vhost.ask(b"AT+CIPRECVLEN?") == _recvlen(version, [None] * 5, mux=False)
    start = b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port
    _checked(vhost, start + b",,,5000", version.v4_1, refusal=COUNT)
    if version.v4_1:
        vhost.command(b"AT+CIPCLOSE")
    assert vhost.ask(start) == b"CONNECT\r\n\r\nOK\r\n"
    vhost.write(b"AT+CIPSEND=7\r\n")
    vhost.expect(b">")
    vhost.write(b"seven!!")
    vhost.expect(b"SEND OK\r\n")
    vhost.expect(b"\r\n+IPD,7\r\n")
    assert vhost.ask(b"AT+CIPRECVLEN?") == _recvlen(version, [b"7", None, None, None, None], mux=False)
    vhost.command(b"AT+CIPCLOSE")
    vhost.command(b"AT+CIPMUX=1")
    assert vhost.ask(b"AT+CIPSTART=1,%s" % start.split(b"=", 1)[1]) == b"1,CONNECT\r\n\r\nOK\r\n"
    vhost.write(b"AT+CIPSEND=1,5\r\n")
    vhost.expect(b">")
    vhost.write(b"five!")
    vhost.expect(b"SEND OK\r\n")
    vhost.expect(b"\r\n+IPD,1,5\r\n")
    assert vhost.ask(b"AT+CIPRECVLEN?") == _recvlen(version, [None, b"5", None, None, None], mux=True)
    vhost.command(b"AT+CIPCLOSE=1")


def _cmd_rows(listing: bytes) -> list[bytes]:
    """AT+CMD?'s rows without their index: name and the four form flags."""
    return re.findall(rb"\+CMD:\d+,(\"AT[^\"]*\",\d,\d,\d,\d)\r\n", listing)


def test_missing_commands_are_byte_for_byte_unknown(make_daemon):
    """On 2.2, every form of a command it lacks (=?, ?, set, execute) echoes and answers
    exactly as an unknown command; AT+CMD? is 4.1's list without those rows, renumbered."""
    daemon = make_daemon("", ("--profile", "esp-at-2.2"))
    host = daemon.host()
    host.boot()
    host.command(b"AT+SYSLOG=1")
    host.command(b"ATE1")
    missing = frozenset(PROBES) - {b"+CIPRECVMODE"}
    for name in sorted(missing):
        for form in (b"=?", b"?", b"=1,\"x\"", b""):
            unknown = host.ask(b"AT+BRIDGEDNOSUCH" + form)
            assert unknown == b"AT+BRIDGEDNOSUCH%s\r\n%s" % (form, UNKNOWN)
            assert host.ask(b"AT" + name + form) == unknown.replace(b"+BRIDGEDNOSUCH", name)
    old = host.ask(b"AT+CMD?")
    host.close()
    daemon = make_daemon()
    host = daemon.host()
    host.boot()
    new = host.ask(b"AT+CMD?")
    host.close()
    assert [int(i) for i in re.findall(rb"\+CMD:(\d+),", old)] == list(range(len(_cmd_rows(old))))
    assert _cmd_rows(old) == [row for row in _cmd_rows(new) if row.split(b'"')[1][2:] not in missing]


def test_passthrough_with_a_server(vhost, version):
    """Passthrough with a server limited to one client exists from 2.3; before, single mode only."""
    vhost.command(b"AT+CIPMUX=1")
    vhost.command(b"AT+CIPSERVERMAXCONN=1")
    vhost.command(b"AT+CIPSERVER=1,%d" % free_port())
    refusal = rb"ERR CODE:0x010a[0-9a-f]{4}\r\n\r\nERROR\r\n"
    _checked(vhost, b"AT+CIPMODE=1", version.server_passthrough, refusal=refusal)
    vhost.command(b"AT+CIPMODE=0")
    vhost.command(b"AT+CIPSERVER=0")


def test_links_in_a_profile_with_fewer_slots(make_daemon):
    """Before 4.1, AT+CIPRECVLEN? prints five values in multiple-connection mode even
    with three link slots (the core's link ids 0-4 are hard-coded)."""
    daemon = make_daemon("[links]\ncount = 3\n", ("--profile", "esp-at-2.4"))
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:-1,-1,-1,-1,-1\r\n\r\nOK\r\n"
    host.close()
    daemon = make_daemon("[links]\ncount = 3\n")
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:0,0,0\r\n\r\nOK\r\n"
    host.close()


# -- a WiFiEspAT-like host --------------------------------------------------------


class WiFiEspAt:
    """What WiFiEspAT's "AT 2" mode (EspAtDrv::recvLenQuery) makes of AT+CIPRECVLEN?.

    A value starting with "-" is a link not connected; any other value is a
    connected link, and one the sketch did not open is taken as an incoming
    server client ("missed incoming connection").  Links are opened from
    id 4 downward.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.connected: set[int] = set()
        self.incoming: set[int] = set()
        self.available: dict[int, int] = {}

    def sync(self) -> None:
        answer = self.host.ask(b"AT+CIPRECVLEN?")
        values = re.search(rb"\+CIPRECVLEN:([^\r]*)\r\n", answer).group(1).split(b",")
        for link_id, token in enumerate(values[:5]):
            if token.startswith(b"-"):
                self.connected.discard(link_id)
                self.incoming.discard(link_id)
                self.available[link_id] = 0
            elif token:
                if link_id not in self.connected:
                    self.connected.add(link_id)
                    self.incoming.add(link_id)
                self.available[link_id] = int(token)

    def connect(self, port: int) -> int:
        """client.connect(): a free link from 4 down, then AT+CIPSTART."""
        free = [i for i in range(4, -1, -1) if i not in self.connected]
        assert free, "no free link: connect() would fail without sending AT+CIPSTART"
        link_id = free[0]
        answer = self.host.ask(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link_id, port))
        assert answer == b"%d,CONNECT\r\n\r\nOK\r\n" % link_id
        self.connected.add(link_id)
        return link_id


def test_wifiespat_at2_host_sees_exactly_the_connected_links(make_daemon, echo_server):
    """A WiFiEspAT "AT 2" host on ESP-AT 2.2 sees no phantom links: idle, after a
    remote close, with a server client and new links, -1 marks every unused one."""
    daemon = make_daemon("", ("--profile", "esp-at-2.2"))
    host = daemon.host()
    host.boot()
    for line in (b"ATE0", b"AT+CIPMUX=1", b"AT+CIPRECVMODE=1", b"AT+SYSSTORE=0", b"AT+CWMODE?"):
        host.command(line)
    esp = WiFiEspAt(host)
    esp.sync()
    assert esp.connected == set()
    assert [esp.connect(echo_server.port) for _ in range(2)] == [4, 3]
    esp.sync()
    assert esp.connected == {3, 4} and esp.incoming == set()
    time.sleep(0.5)  # the sketch sits idle; WiFiEspAT syncs again
    esp.sync()
    assert esp.connected == {3, 4} and esp.incoming == set()
    assert esp.connect(echo_server.port) == 2
    host.write(b"AT+CIPSEND=3,2\r\n")
    host.expect(b">")
    host.write(b"hi")
    host.expect(b"SEND OK\r\n")
    host.expect(b"\r\n+IPD,3,2\r\n")
    esp.sync()
    assert esp.connected == {2, 3, 4} and esp.available[3] == 2
    echo_server.wait_connections(3)[0].shutdown(socket.SHUT_RDWR)  # the server ends link 4's connection
    host.expect(b"4,CLOSED\r\n")
    esp.sync()
    assert esp.connected == {2, 3} and esp.incoming == set()
    port = free_port()
    host.command(b"AT+CIPSERVER=1,%d" % port)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        host.expect(b"0,CONNECT\r\n")
        esp.sync()
        assert esp.connected == {0, 2, 3} and esp.incoming == {0}  # accept() gets one client
        assert esp.connect(echo_server.port) == 4
        esp.sync()
        assert esp.connected == {0, 2, 3, 4} and esp.incoming == {0}
        host.command(b"AT+CIPCLOSE=5")
    esp.sync()
    assert esp.connected == set()
    host.close()
