"""UDP links end to end: datagram boundaries, remote modes, passive reads,
IPv6, low ports, and broadcast/multicast between two test hosts."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness import Daemon, Demux, udp_peer, wait_udp_read
from tests.netns import netns_available, veth_pair


@pytest.fixture
def host(shared_or_own_host):
    """A test needing only a booted host shares the module's daemon; one that reads its
    daemon has its own (conftest.shared_or_own_host)."""
    return shared_or_own_host


def _free_udp_port() -> int:
    with udp_peer() as s:
        return s.getsockname()[1]


def _state_remote(host, link_id: int) -> tuple[str, int]:
    answer = host.ask(b"AT+CIPSTATE?")
    m = re.search(rb'\+CIPSTATE:%d,"UDP","([^"]+)",(\d+),' % link_id, answer)
    assert m, answer
    return m.group(1).decode(), int(m.group(2))


@pytest.fixture
def mux_host(host):
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPDINFO=1")
    return host


def _passive_link(mux_host, link_id: int) -> tuple[socket.socket, int]:
    """A UDP link in passive mode to a new peer; the peer and the link's local port."""
    peer = udp_peer()
    local = _free_udp_port()
    mux_host.command(b"AT+CIPRECVTYPE=5,1")
    mux_host.ask(b'AT+CIPSTART=%d,"UDP","127.0.0.1",%d,%d' % (link_id, peer.getsockname()[1], local))
    return peer, local


def test_one_send_is_one_datagram_and_back(mux_host):
    """Each AT+CIPSEND is one datagram; each datagram is one +IPD with its sender."""
    peer = udp_peer()
    port = peer.getsockname()[1]
    local = _free_udp_port()
    assert mux_host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d,%d' % (port, local)) == b"0,CONNECT\r\n\r\nOK\r\n"
    demux = Demux(mux_host)
    for size in (1, 700, 1472):
        payload = bytes([size % 251]) * size
        assert demux.send(0, payload).endswith(b"SEND OK\r\n")
        data, addr = peer.recvfrom(65536)
        assert data == payload and addr == ("127.0.0.1", local)
    peer.sendto(b"one", ("127.0.0.1", local))
    peer.sendto(b"two", ("127.0.0.1", local))
    assert mux_host.expect(b"two") == b'\r\n+IPD,0,3,"127.0.0.1",%d:one\r\n+IPD,0,3,"127.0.0.1",%d:two' % (port, port)
    assert _state_remote(mux_host, 0) == ("127.0.0.1", port)
    peer.close()


@pytest.mark.parametrize("mode, expected", [(0, "a"), (1, "b"), (2, "c")])
def test_remote_update_modes(mux_host, mode, expected):
    """<mode> 0 keeps the remote, 1 moves it to the first other sender once, 2 to every sender."""
    peers = {name: udp_peer() for name in "abc"}
    ports = {name: s.getsockname()[1] for name, s in peers.items()}
    local = _free_udp_port()
    mux_host.ask(b'AT+CIPSTART=1,"UDP","127.0.0.1",%d,%d,%d' % (ports["a"], local, mode))
    for name in "bc":
        peers[name].sendto(name.encode(), ("127.0.0.1", local))
        assert mux_host.read_ipd() == (1, name.encode())
    assert _state_remote(mux_host, 1) == ("127.0.0.1", ports[expected])
    Demux(mux_host).send(1, b"reply")
    assert peers[expected].recvfrom(100)[0] == b"reply"
    for s in peers.values():
        s.close()


def test_cipsend_to_a_named_remote(mux_host):
    """AT+CIPSEND=<id>,<len>,<host>,<port> sends this datagram there; the link's remote stays."""
    home, other = udp_peer(), udp_peer()
    mux_host.ask(b'AT+CIPSTART=2,"UDP","127.0.0.1",%d' % home.getsockname()[1])
    host = mux_host
    host.send_data(b'AT+CIPSEND=2,5,"127.0.0.1",%d' % other.getsockname()[1], b"there")
    assert other.recvfrom(100)[0] == b"there"
    host.send_data(b'AT+CIPSEND=2,4,"localhost",%d' % other.getsockname()[1], b"name")
    assert other.recvfrom(100)[0] == b"name"
    assert _state_remote(host, 2) == ("127.0.0.1", home.getsockname()[1])
    assert host.ask(b'AT+CIPSEND=2,4,"127.0.0.1"') == b"\r\nERROR\r\n"  # host without port
    home.close()
    other.close()


def test_passive_reads_keep_datagram_boundaries(mux_host):
    """In passive mode a read returns at most one datagram, however large <len> is."""
    peer, local = _passive_link(mux_host, 3)
    peer.sendto(b"first", ("127.0.0.1", local))
    peer.sendto(b"second", ("127.0.0.1", local))
    mux_host.expect(b"\r\n+IPD,3,")
    port = peer.getsockname()[1]
    assert mux_host.ask(b"AT+CIPRECVDATA=3,100").endswith(b'+CIPRECVDATA:5,"127.0.0.1",%d,first\r\nOK\r\n' % port)
    assert mux_host.ask(b"AT+CIPRECVDATA=3,100").endswith(b'+CIPRECVDATA:6,"127.0.0.1",%d,second\r\nOK\r\n' % port)
    peer.close()


def test_udpv6_echo(host):
    """UDPv6 on ::1, once AT+CIPV6=1."""
    peer = udp_peer("::1", socket.AF_INET6)
    host.command(b"AT+CIPV6=1")
    assert host.ask(b'AT+CIPSTART="UDPv6","::1",%d,0' % peer.getsockname()[1]) == b"CONNECT\r\n\r\nOK\r\n"
    host.command(b"AT+CIPSEND=2", b">")
    host.write(b"v6")
    host.expect(b"SEND OK\r\n")
    data, addr = peer.recvfrom(100)
    assert data == b"v6"
    peer.sendto(b"6v", addr)
    assert host.read_ipd() == (None, b"6v")
    assert host.ask(b'AT+CIPSTART="UDP","::1",9') == b"\r\nERROR\r\n"  # a v6 address needs UDPv6
    peer.close()


LOW_PORTS = '[links]\nlocal_ports = "1-65535"\n'


def test_low_local_port(make_daemon):
    """Drivers ask for small local ports; with CAP_NET_BIND_SERVICE (root here) and local_ports they work."""
    host = make_daemon(LOW_PORTS).host()
    host.boot()
    peer = udp_peer()
    answer = host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,10,0' % peer.getsockname()[1])
    assert answer == b"CONNECT\r\n\r\nOK\r\n"
    host.command(b"AT+CIPSEND=1", b">")
    host.write(b"!")
    host.expect(b"SEND OK\r\n")
    assert peer.recvfrom(10) == (b"!", ("127.0.0.1", 10))
    peer.close()


@pytest.mark.skipif(subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0, reason="needs setpriv")
def test_low_port_without_capability_is_refused(tmp_path):
    """Without CAP_NET_BIND_SERVICE a port below 1024 answers ERROR, and the log says why."""
    daemon = Daemon(tmp_path, LOW_PORTS,
                    wrap=("setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-all")).start()
    try:
        host = daemon.host()
        host.boot()
        assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",9,11,0') == b"\r\nERROR\r\n"
        failed = daemon.wait_event("connect_failed")
        assert "CAP_NET_BIND_SERVICE" in failed[-1]["reason"]
    finally:
        assert daemon.stop() == 0


_PEER = textwrap.dedent(
    """
    import socket, struct, sys
    mode, group, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("", port))
    if mode == "multicast":
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + b"\\0\\0\\0\\0")
    s.settimeout(10)
    print("ready", flush=True)
    data, addr = s.recvfrom(2000)
    reply = b"ack:" + data
    s.sendto(reply, (group, addr[1]) if mode == "multicast" else ("255.255.255.255", addr[1]))
    print(addr[0], data.decode(), flush=True)
    """
)


@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
@pytest.mark.parametrize("mode, remote", [("broadcast", "255.255.255.255"), ("multicast", "239.7.7.7")])
def test_broadcast_and_multicast_between_hosts(tmp_path, mode, remote):
    """A broadcast or multicast remote sends to and receives from the whole segment (two namespaces)."""
    with veth_pair() as net:
        daemon = Daemon(tmp_path, wrap=net.exec_a(), station="veth0").start()
        peer = subprocess.Popen([*net.exec_b(), sys.executable, "-c", _PEER, mode, remote, "5000"],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert peer.stdout.readline().strip() == "ready"
            host = daemon.host()
            host.boot()
            host.command(b"AT+CIPDINFO=1")
            assert host.ask(b'AT+CIPSTART="UDP","%s",5000,5001,0' % remote.encode()) == b"CONNECT\r\n\r\nOK\r\n"
            host.command(b"AT+CIPSEND=5", b">")
            host.write(b"hello")
            host.expect(b"SEND OK\r\n")
            assert peer.stdout.readline().split() == [net.a_ip, "hello"]
            assert host.expect(b"ack:hello") == b'\r\n+IPD,9,"%s",5000:ack:hello' % net.b_ip.encode()
        finally:
            peer.kill()
            peer.wait(5)
            assert daemon.stop() == 0


def test_cipsendex_and_cipsendl_to_a_udp_remote(mux_host):
    """AT+CIPSENDEX and AT+CIPSENDL take a remote host and port on a UDP link too."""
    home, other = udp_peer(), udp_peer()
    mux_host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d' % home.getsockname()[1])
    answer = mux_host.send_data(b'AT+CIPSENDEX=0,50,"127.0.0.1",%d' % other.getsockname()[1], b"ex\\0")
    assert answer == b"\r\nRecv 2 bytes\r\n\r\nSEND OK\r\n"
    assert other.recvfrom(100)[0] == b"ex"
    mux_host.send_data(b'AT+CIPSENDL=0,5,"127.0.0.1",%d' % other.getsockname()[1], b"longs")
    assert other.recvfrom(100)[0] == b"longs"
    home.close()
    other.close()


def test_cipsendl_on_udp_sends_one_datagram_per_transmit_block(mux_host):
    """AT+CIPSENDL on a UDP link hands the stack one <transmit size> block per datagram,
    as ESP-AT does: 3000 bytes written at once with blocks of 1000 are three datagrams
    of 1000, not one of 3000 (blocks that came together were joined into one)."""
    peer = udp_peer()
    mux_host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d' % peer.getsockname()[1])
    mux_host.command(b"AT+CIPSENDLCFG=1024,1000")
    payload = bytes(range(250)) * 12
    mux_host.write(b"AT+CIPSENDL=0,3000\r\n")
    mux_host.expect(b">")
    mux_host.write(payload)
    mux_host.expect(b"SEND OK\r\n")
    got = [peer.recvfrom(65536)[0] for _ in range(3)]
    assert [len(d) for d in got] == [1000, 1000, 1000] and b"".join(got) == payload
    peer.close()


def test_passive_udp_drops_beyond_the_window(mux_host):
    """Passive mode keeps UDP data up to the receive window; what does not fit is lost, as the spec says."""
    peer, local = _passive_link(mux_host, 4)
    for i in range(20):
        peer.sendto(bytes([65 + i]) * 1000, ("127.0.0.1", local))
    mux_host.expect(b"\r\n+IPD,4,")
    wait_udp_read(local)  # every datagram kept or dropped: reads below make room for none of them
    answer = mux_host.ask(b"AT+CIPRECVLEN?")
    unread = int(re.search(rb"\+CIPRECVLEN:0,0,0,0,(\d+)", answer).group(1))
    assert 1000 <= unread <= 5760
    lengths = []
    for _ in range(25):
        answer = mux_host.ask(b"AT+CIPRECVDATA=4,2000")
        if answer.endswith(b"\r\nERROR\r\n"):
            break
        lengths.append(int(re.search(rb"\+CIPRECVDATA:(\d+),", answer).group(1)))
    assert 1 <= len(lengths) <= 6 and set(lengths) == {1000}  # whole datagrams; the rest were dropped
    peer.close()


def test_a_udp_flood_into_a_stalled_uart_waits_without_spinning(daemon, host):
    """Active mode never drops: with the UART stalled the ring fills and the
    worker stops reading; while it waits for room (half a ring, so any
    datagram fits) it must sleep, not retry in a loop."""
    import os

    import psutil

    peer = udp_peer()
    local = _free_udp_port()
    answer = host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,%d,0' % (peer.getsockname()[1], local))
    assert answer == b"CONNECT\r\n\r\nOK\r\n"
    # The host reads nothing from here on: pty, output queue and ring fill up.
    datagram = os.urandom(1400)
    for _ in range(400):  # ~560 KB: more than the pty, the output queue and the ring hold
        peer.sendto(datagram, ("127.0.0.1", local))
        time.sleep(0.0005)
    time.sleep(1.0)  # the flood backs up (socket, ring, UART output full) before the CPU is measured
    tree = [psutil.Process(daemon.proc.pid)] + psutil.Process(daemon.proc.pid).children(recursive=True)
    before = {p.pid: sum(p.cpu_times()[:2]) for p in tree}
    time.sleep(2.0)  # the CPU is measured over this
    used = sum(sum(p.cpu_times()[:2]) - before[p.pid] for p in tree)
    assert used < 0.5, f"the stalled daemon used {used:.2f} s of CPU in 2 s"
    # The host reads again: what was kept comes out as whole datagrams, then
    # the session answers as before.
    kept = host.read_quiet(quiet=0.5, timeout=30.0)
    frames = re.findall(rb"\+IPD,(\d+):", kept)
    assert frames and all(int(n) == len(datagram) for n in frames)
    assert kept.count(datagram) == len(frames)
    assert host.ask(b"AT") == b"\r\nOK\r\n"
    peer.close()


def test_passive_udp_keeps_a_datagram_larger_than_the_window(mux_host):
    """A datagram larger than the receive window, with nothing else unread, is
    kept whole and readable (dropped, no read could ever have returned it)."""
    peer, local = _passive_link(mux_host, 2)
    datagram = bytes(range(256)) * 32  # 8192 bytes > the 5760-byte window
    peer.sendto(datagram, ("127.0.0.1", local))
    assert mux_host.expect(b"\r\n+IPD,2,8192\r\n") == b"\r\n+IPD,2,8192\r\n"
    port = peer.getsockname()[1]
    answer = mux_host.ask(b"AT+CIPRECVDATA=2,10000")
    assert answer == b'+CIPRECVDATA:8192,"127.0.0.1",%d,' % port + datagram + b"\r\nOK\r\n"
    peer.close()


def test_passive_udp_skips_an_empty_datagram(mux_host):
    """An empty datagram is not a read of its own: after it, the notice and the
    read are the next datagram's (a read of 0 bytes came first)."""
    peer, local = _passive_link(mux_host, 1)
    peer.sendto(b"", ("127.0.0.1", local))
    peer.sendto(b"abc", ("127.0.0.1", local))
    assert mux_host.expect(b"\r\n+IPD,1,3\r\n") == b"\r\n+IPD,1,3\r\n"
    port = peer.getsockname()[1]
    assert mux_host.ask(b"AT+CIPRECVDATA=1,10") == b'+CIPRECVDATA:3,"127.0.0.1",%d,abc\r\nOK\r\n' % port
    peer.close()
