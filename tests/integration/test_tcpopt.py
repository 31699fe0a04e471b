"""AT+CIPTCPOPT: socket options read back from the worker's socket, and their effects."""

from __future__ import annotations

import json
import os
import socket
import time

from tests.harness import Daemon, Demux, Timeout


def _options_events(daemon: Daemon, link_id: int) -> list[dict]:
    return [e for e in daemon.events("socket_options") if e.get("link_id") == link_id]


def _booted(daemon: Daemon):
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    return host


def test_defaults_and_query(host):
    """Defaults are so_linger -1, tcp_nodelay 0, so_sndtimeo 0, keep_alive 0; omitted fields keep values."""
    assert host.ask(b"AT+CIPTCPOPT?") == b"+CIPTCPOPT:0,-1,0,0,0\r\n\r\nOK\r\n"
    host.command(b"AT+CIPTCPOPT=5,1,,30")
    host.command(b"AT+CIPTCPOPT=,,,")  # all omitted: nothing changes
    assert host.ask(b"AT+CIPTCPOPT?") == b"+CIPTCPOPT:0,5,1,0,30\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIPTCPOPT=-2,0,0") == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPTCPOPT=0,2,0") == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPTCPOPT=0,0,0,7201") == b"\r\nERROR\r\n"


def test_options_reach_the_socket(daemon: Daemon, echo_server):
    """Options set before and after AT+CIPSTART are applied and read back with getsockopt."""
    host = _booted(daemon)
    host.command(b"AT+CIPTCPOPT=1,0,1,,60")
    assert host.ask(b"AT+CIPTCPOPT?").split(b"\r\n")[1] == b"+CIPTCPOPT:1,0,1,0,60"
    host.ask(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d' % echo_server.port)
    event = daemon.wait_event("socket_options", link_id=1)[-1]
    assert (event["so_linger"], event["tcp_nodelay"], event["keep_alive"]) == (0, 1, 60)
    host.command(b"AT+CIPTCPOPT=1,-1,0,,")
    deadline = time.monotonic() + 5
    while (_options_events(daemon, 1)[-1]["so_linger"], _options_events(daemon, 1)[-1]["tcp_nodelay"]) != (-1, 0):
        assert time.monotonic() < deadline, _options_events(daemon, 1)
        time.sleep(0.02)


def test_a_store_written_by_an_older_version_loads(tmp_path, echo_server):
    """nvs.json as versions before the typed options wrote it (positional lists) loads: the queries show
    it, a link's socket gets it, and the next save keeps it with named fields."""
    daemon = Daemon(tmp_path)
    daemon.state_dir.mkdir(mode=0o700)
    old = {"tcpopts": [[-1, 0, 0, 0], [3, 1, 4000, 45], [-1, 0, 0, 0], [-1, 0, 0, 0], [-1, 0, 0, 0]],
           "sslconf": [[0, 0, 0], [0, 0, 0], [2, 0, 1], [0, 0, 0], [0, 0, 0]], "sysmsg": 2}
    (daemon.state_dir / "nvs.json").write_text(json.dumps({"version": 1, "values": old}))
    daemon.start()
    try:
        host = _booted(daemon)
        assert b"+CIPTCPOPT:1,3,1,4000,45\r\n" in host.ask(b"AT+CIPTCPOPT?")
        assert b"+CIPSSLCCONF:2,2,0,1\r\n" in host.ask(b"AT+CIPSSLCCONF?")
        assert host.ask(b"AT+SYSMSG?") == b"+SYSMSG:2\r\nOK\r\n"
        host.write(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d\r\n' % echo_server.port)
        assert host.expect(b"OK\r\n").startswith(b"+LINK_CONN:0,1,")  # SYSMSG bit 1 loaded
        event = daemon.wait_event("socket_options", link_id=1)[-1]
        assert (event["so_linger"], event["tcp_nodelay"], event["keep_alive"]) == (3, 1, 45)
        host.command(b"AT+CIPTCPOPT=4,,1,,")
        saved = json.loads((daemon.state_dir / "nvs.json").read_text())["values"]
        assert saved["tcpopts"][1] == {"so_linger": 3, "tcp_nodelay": 1, "so_sndtimeo": 4000, "keep_alive": 45}
        assert saved["tcpopts"][4]["tcp_nodelay"] == 1
        # Closed first: right after a reset a link the reset dropped may still count as open
        # until its worker has closed it, and AT+CIPMUX=1 would be refused (not this test's subject).
        host.command(b"AT+CIPCLOSE=1")
        host.write(b"AT+RST\r\n")
        host.expect(b"\r\nready\r\n")
        host.command(b"AT+CIPMUX=1")
        after_reset = host.ask(b"AT+CIPTCPOPT?")
        assert b"+CIPTCPOPT:1,3,1,4000,45\r\n" in after_reset and b"+CIPTCPOPT:4,-1,1,0,0\r\n" in after_reset
    finally:
        assert daemon.stop() == 0


def test_cipstart_keep_alive_is_shared(daemon: Daemon, echo_server):
    """keep_alive given to AT+CIPSTART shows in AT+CIPTCPOPT? for that link (the later wins)."""
    host = _booted(daemon)
    host.ask(b'AT+CIPSTART=2,"TCP","127.0.0.1",%d,90' % echo_server.port)
    assert b"+CIPTCPOPT:2,-1,0,0,90\r\n" in host.ask(b"AT+CIPTCPOPT?")
    assert daemon.wait_event("socket_options", link_id=2)[-1]["keep_alive"] == 90


def test_linger_zero_resets_on_close(daemon: Daemon):
    """so_linger 0: AT+CIPCLOSE resets the connection instead of a FIN."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        host = _booted(daemon)
        host.command(b"AT+CIPTCPOPT=0,0,0,0")
        host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1])
        conn, _ = server.accept()
        daemon.wait_event("socket_options", link_id=0)
        host.command(b"AT+CIPCLOSE=0")
        conn.settimeout(5)
        try:
            data = conn.recv(10)
        except ConnectionResetError:
            data = None
        assert data is None, "expected a reset, got an orderly close"
        conn.close()
    finally:
        server.close()


def test_sndtimeo_ends_a_stalled_send(daemon: Daemon):
    """so_sndtimeo: a send the peer cannot take ends with SEND FAIL within that time."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        host = _booted(daemon)
        host.command(b"AT+CIPTCPOPT=0,-1,0,300")
        host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1])
        conn, _ = server.accept()  # never reads
        demux = Demux(host)
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline
            host.write(b"AT+CIPSEND=0,8192\r\n")
            demux.expect(b">")
            host.write(os.urandom(8192))
            demux.expect(b"Recv 8192 bytes\r\n")
            started = time.monotonic()
            result = demux.expect(b"\r\nSEND ")
            result = demux.expect(b"\r\n")
            if result.startswith(b"FAIL"):
                break
        assert 0.25 <= time.monotonic() - started < 2
        assert host.command(b"AT") == b"\r\nOK\r\n"
        conn.close()
    finally:
        server.close()
