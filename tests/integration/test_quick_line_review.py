"""A hostile review of the quick send line (bridged.uart.direct._quick_line) and Output.reply_now:
scripts the short way must answer byte for byte as the general way (the AT transcript on keeps
every line there): session settings and peer data between sends, links closing and changing
type, output fault offsets, a line that comes while a write to the port is still pending."""

from __future__ import annotations

import socket
import time

from tests.harness import udp_peer
from tests.integration.test_faults_at import fault_cli
from tests.integration.test_quick_line import LINE, _both, _step

WHOLE = LINE + b"\r\n"
PROMPT = b"\r\nOK\r\n\r\n>"
DONE = b"\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"


def _settings(host, conn) -> list[bytes]:
    """ATE1, AT+SYSLOG=1, AT+SYSMSG=7, AT+CIPDINFO=1 between remembered lines; the peer's data
    before the line, between the prompt and the payload, and right after SEND OK."""
    seen = []
    for setting in (b"ATE1", b"AT+SYSLOG=1", b"AT+SYSMSG=7", b"AT+CIPDINFO=1", b"ATE0"):
        seen.append(_step(host, setting + b"\r\n"))
        conn.sendall(b"pre.")
        time.sleep(0.03)
        seen.append(_step(host, WHOLE))
        conn.sendall(b"mid.")
        time.sleep(0.03)
        seen.append(_step(host, b"data"))
        conn.sendall(b"post")
        seen.append(host.read_quiet(0.15))
        seen.append(_step(host, WHOLE + b"x"))  # glued: not the short way, the general one
        seen.append(_step(host, b"yyy"))
    port = b"%d" % conn.getsockname()[1]  # AT+CIPDINFO=1 shows the peer's: each daemon's own
    return [answer.replace(port, b"PORT") for answer in seen]


def test_session_settings_and_peer_data_between_lines(make_daemon):
    seen, peer = _both(make_daemon, _settings)
    assert seen[1].endswith(WHOLE + b"\r\nOK\r\n\r\n>")  # ATE1: the line echoed before its prompt
    assert peer.count(b"data") == 5 and peer.count(b"xyyy") == 5


def _links(host, conn) -> list[bytes]:
    """CIPMUX=1, two links; the peer closes one between sends; it opens again as UDP."""
    server = socket.create_server(("127.0.0.1", 0))
    udp = udp_peer()
    seen = [host.ask(b"AT+CIPCLOSE")]
    conn.close()
    seen.append(host.ask(b"AT+CIPMUX=1"))
    conns = []
    for link in (0, 1):
        seen.append(host.ask(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link, server.getsockname()[1])))
        conns.append(server.accept()[0])
    for round_ in range(3):
        for link in (0, 1):
            seen.append(_step(host, b"AT+CIPSEND=%d,4\r\n" % link))
            seen.append(_step(host, b"r%d-%d" % (round_, link)))
    conns[1].close()
    seen.append(host.expect(b"1,CLOSED\r\n"))
    seen.append(_step(host, b"AT+CIPSEND=1,4\r\n"))  # remembered, link gone: ERROR
    seen.append(_step(host, b"AT+CIPSEND=0,4\r\n"))  # the other link: still the short way
    seen.append(_step(host, b"zz00"))
    with udp:
        seen.append(host.ask(b'AT+CIPSTART=1,"UDP","127.0.0.1",%d' % udp.getsockname()[1]))
        seen.append(_step(host, b"AT+CIPSEND=1,4\r\n"))  # now UDP: the registry's prompt
        seen.append(_step(host, b"udp!"))
        udp.settimeout(2)
        seen.append(udp.recv(100))
    got = b""
    conns[0].settimeout(0.3)
    try:
        while piece := conns[0].recv(100):
            got += piece
    except socket.timeout:
        pass
    seen.append(got)
    for c in conns:
        c.close()
    server.close()
    return seen


def test_links_closing_and_changing_type_between_lines(make_daemon):
    seen, _ = _both(make_daemon, _links)
    assert seen[-8:-5] == [b"\r\nERROR\r\n", b"\r\nOK\r\n\r\n>", b"\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"]
    assert seen[-1] == b"r0-0r1-0r2-0zz00" and seen[-2] == b"udp!"


def _offsets(daemon_holder):
    def script(host, conn) -> list[bytes]:
        daemon = daemon_holder[-1]
        assert fault_cli(daemon, "uart_drop", "count=1").returncode == 0
        seen = [_step(host, b"AT\r\n")]
        for i in range(3):
            seen.append(_step(host, WHOLE))
            seen.append(_step(host, b"o%03d" % i))
        assert fault_cli(daemon, "uart_corrupt", "count=1").returncode == 0
        seen.append(_step(host, WHOLE))
        seen.append(_step(host, b"last"))
        hits = [e for e in daemon.events("fault_injected") if e.get("fault") == "uart_corrupt"]
        seen.append(str([e.get("offset") for e in hits]).encode())
        return seen
    return script


def test_output_fault_offsets_count_what_went_out_at_once(make_daemon):
    """uart_drop on demand, then quick sends (their prompts and Recv+SEND OK written at once),
    then uart_corrupt: its offset counts every byte since the first demand, as the general way's."""
    made = []

    def make(config):
        made.append(make_daemon("[faults]\nseed = 3\n" + config))
        return made[-1]

    seen, _ = _both(make, _offsets(made))
    assert seen[-1] != b"[]"


def _items(stream: bytes) -> tuple[list[bytes], bytes]:
    """The host's stream as whole items: +IPD frames taken out (their payloads joined), the rest
    split into prompts and results; a byte no item explains fails."""
    rest, ipd, i = [], b"", 0
    while i < len(stream):
        if stream.startswith(b"\r\n+IPD,", i):
            head_end = stream.index(b":", i)
            n = int(stream[i + 7:head_end])
            ipd += stream[head_end + 1:head_end + 1 + n]
            i = head_end + 1 + n
            continue
        for item in (PROMPT, DONE):
            if stream.startswith(item, i):
                rest.append(item)
                i += len(item)
                break
        else:
            raise AssertionError(f"unexplained bytes at {i}: {stream[i:i + 60]!r}")
    return rest, ipd


def _unread(host, conn) -> list[bytes]:
    """The peer's data fills the pty while the host does not read (the output has a write
    pending, not yet backlogged); the host writes a remembered line, then reads it all."""
    seen = []
    for i in range(3):
        conn.sendall(b"%d" % i * 60000)
        time.sleep(0.3)  # the pty full, the rest waiting in the output and the ring
        host.write(WHOLE)
        time.sleep(0.1)
        stream = host.read_quiet(0.3)
        items, data = _items(stream)
        seen.append(b"".join(items))
        seen.append(data)
        seen.append(_step(host, b"u%03d" % i))
    return seen


def test_a_line_behind_a_pending_write(make_daemon):
    """Output.reply_now queues a prompt behind a write the full port left pending: written at once,
    it would take the pending write's place (bytes of the +IPD lost, the prompt inside it)."""
    seen, peer = _both(make_daemon, _unread)
    assert seen[0] == PROMPT and seen[1] == b"0" * 60000 and seen[2] == DONE
    assert peer.endswith(b"u000u001u002")
