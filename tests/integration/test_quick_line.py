"""A repeated send line answered at once (bridged.uart.direct._quick_line) against hostile
MCUs: it takes the short way only where the general way answers the same, byte for byte.

Each script runs against a daemon that takes the short way and one with the AT transcript
on (which keeps every line on the general way: the parser and the dispatch); the MCU and the
peer must see the same bytes from both."""

from __future__ import annotations

import socket
import time

LINE = b"AT+CIPSEND=4"
RING = "[links]\nring_size = 4096\n"  # an 8 KiB send never fits: the parser's data phase


def _open(host, server: socket.socket) -> socket.socket:
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1]) == b"CONNECT\r\n\r\nOK\r\n"
    conn, _ = server.accept()
    for payload in (b"one.", b"two."):  # the second one the short way: the line is remembered
        assert host.send_data(LINE, payload) == b"\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"
    return conn


def _drain(conn: socket.socket, quiet: float = 0.3) -> bytes:
    if conn.fileno() < 0:
        return b""  # the script closed it
    conn.settimeout(quiet)
    got = b""
    while True:
        try:
            piece = conn.recv(65536)
        except socket.timeout:
            return got
        if not piece:
            return got
        got += piece


def _step(host, *writes: bytes, gap: float = 0.03) -> bytes:
    """Write each piece (``gap`` s apart: separate reads), then all the daemon said."""
    for i, data in enumerate(writes):
        if i:
            time.sleep(gap)
        host.write(data)
    return host.read_quiet(0.15)


def _script(host) -> list[bytes]:
    whole = LINE + b"\r\n"
    seen = []
    for cut in range(1, len(whole)):  # the line split over two reads at every position
        seen.append(_step(host, whole[:cut], whole[cut:]))
        seen.append(_step(host, b"c%03d" % cut))
    seen.append(_step(host, whole + b"glue"))  # its payload in the same read
    seen.append(_step(host, whole + b"AT\r\nAT\r\n"))  # commands glued behind it: payload, then busy
    seen.append(_step(host, b"AT", whole))  # behind the start of a line: not a send line
    seen.append(_step(host, b"X" * 300))  # an over-long line ...
    seen.append(_step(host, whole))  # ... whose end this is: dropped, no prompt
    seen.append(_step(host, b"AT\r\n"))
    seen.append(_step(host, b"ATE1\r\n"))  # echo on: the line echoed before its prompt
    seen.append(_step(host, whole))
    seen.append(_step(host, b"dataAT\r\n"))  # a command glued behind the payload: busy
    seen.append(_step(host, b"ATE0\r\n"))
    for pos in range(2):  # +++ inside a payload read at once: payload
        seen.append(_step(host, whole))
        seen.append(_step(host, b"p" * pos + b"+++" + b"q" * (1 - pos)))
    seen.append(_step(host, whole))
    seen.append(_step(host, b"+++", gap=0.05))  # +++ alone, guard times around it: cancelled
    time.sleep(0.05)
    seen.append(_step(host, whole, b"++", b"+z", gap=0.05))  # '+' reads with bytes behind
    return seen


def _run(make_daemon, config: str, script) -> tuple[list[bytes], bytes]:
    daemon = make_daemon(config)
    host = daemon.host()
    host.boot()
    server = socket.create_server(("127.0.0.1", 0))
    try:
        conn = _open(host, server)
        seen = script(host, conn)
        return seen, _drain(conn)
    finally:
        server.close()
        host.close()


def _both(make_daemon, script, config: str = "") -> tuple[list[bytes], bytes]:
    quick = _run(make_daemon, config, script)
    general = _run(make_daemon, config + "[log]\ntranscript = true\n", script)
    for i, (a, b) in enumerate(zip(quick[0], general[0])):
        assert a == b, (i, a, b)
    assert len(quick[0]) == len(general[0])
    assert quick[1] == general[1]
    return quick


def test_hostile_lines_get_the_general_ways_answers(make_daemon):
    seen, peer = _both(make_daemon, lambda host, conn: _script(host))
    base = 2 * (len(LINE) + 1)  # after the split lines
    assert seen[:2] == [b"\r\nOK\r\n\r\n>", b"\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"]
    assert seen[base + 1] == b"\r\nOK\r\n\r\n>\r\nbusy p...\r\n\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"
    assert seen[base + 2] == b"\r\nERROR\r\n"  # "ATAT+CIPSEND=4": no prompt
    assert seen[base + 4:base + 6] == [b"", b"\r\nOK\r\n"]  # the over-long line's end: dropped
    assert seen[base + 7] == LINE + b"\r\n\r\nOK\r\n\r\n>"  # echoed, then the prompt
    assert seen[base + 8] == b"\r\nbusy p...\r\n\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"
    assert seen[-2:] == [b"\r\nSEND Canceled\r\n", b"\r\nOK\r\n\r\n>\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"]
    assert peer == b"one.two." + b"".join(b"c%03d" % cut for cut in range(1, base // 2 + 1)) \
        + b"glueAT\r\ndata+++qp+++" + b"+++z"


def _closing(host, conn) -> list[bytes]:
    """The peer goes after the prompt: SEND FAIL, and the remembered line is refused."""
    seen = [_step(host, LINE + b"\r\n")]
    conn.close()
    seen.append(host.expect(b"CLOSED\r\n"))
    seen.append(_step(host, b"late"))
    seen.append(_step(host, LINE + b"\r\n"))
    return seen


def test_the_link_closing_after_the_prompt(make_daemon):
    seen, _ = _both(make_daemon, _closing)
    assert seen[0] == b"\r\nOK\r\n\r\n>"
    assert seen[2].endswith(b"SEND FAIL\r\n")
    assert seen[3] == b"\r\nERROR\r\n"  # not the remembered prompt: the link is gone


def _big(host, conn) -> list[bytes]:
    """AT+CIPSEND=8192 on a 4 KiB ring, again and again: never read directly (no room for
    all of it), the parser's data phase after the short way's prompt."""
    seen = []
    for i in range(4):
        host.write(b"AT+CIPSEND=8192\r\n")
        seen.append(host.expect(b">"))
        host.write(bytes([65 + i]) * 8192)
        seen.append(host.expect(b"SEND OK\r\n", timeout=10))
    return seen


def test_a_send_bigger_than_its_ring(make_daemon):
    seen, peer = _both(make_daemon, _big, RING)
    assert seen[-1] == b"\r\nRecv 8192 bytes\r\n\r\nSEND OK\r\n"
    assert peer == b"one.two." + b"".join(bytes([65 + i]) * 8192 for i in range(4))
