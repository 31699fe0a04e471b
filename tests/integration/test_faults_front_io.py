"""Front faults on Wi-Fi, DNS and the UART line over the pty: their effect, and the same
faults for the same seed (wifi_drop, wifi_join_fail, dns_fail, dns_slow, uart_*)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

from tests.backlog import BacklogServer
from tests.integration.test_faults_at import answer, event_gaps, fault_cli
from tests.together import one_at_a_time, together

HOSTS = '[dns]\nhosts = { "fault.test" = "127.0.0.1" }\n'


def test_wifi_drop_on_demand_closes_links_then_the_station_reconnects(daemon, echo_server):
    """`bridged fault wifi_drop duration_ms=300` mid-link: WIFI DISCONNECT, then 0,CLOSED; the
    station reconnects (AT+CWJAP's reconn_interval 1 s): WIFI CONNECTED, WIFI GOT IP."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port)
    echo_server.wait_connections(1)
    assert host.command(b"AT+CWRECONNCFG?") == b"+CWRECONNCFG:1,0\r\n\r\nOK\r\n"
    done = fault_cli(daemon, "wifi_drop", "duration_ms=300")
    assert done.returncode == 0 and "wifi_drop: fired" in done.stdout, done.stderr
    lost = host.expect(b"0,CLOSED\r\n")
    assert lost.index(b"WIFI DISCONNECT\r\n") < lost.index(b"0,CLOSED\r\n")
    assert host.command(b"AT+CWSTATE?").startswith(b"+CWSTATE:3,")  # reconnecting
    assert host.ask(b'AT+CIPSTART=1,"TCP","127.0.0.1",%d' % echo_server.port).endswith(b"ERROR\r\n")
    host.expect(b"WIFI CONNECTED\r\nWIFI GOT IP\r\n", timeout=5)
    assert host.command(b"AT+CWSTATE?").startswith(b'+CWSTATE:2,"bridged"')
    daemon.wait_event("fault_injected", fault="wifi_drop", duration_ms=300.0)


def test_wifi_drop_with_reconnection_off_stays_disconnected(daemon):
    """AT+CWRECONNCFG=0,0: after a drop the station stays disconnected (CWSTATE 4) until the MCU joins."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CWRECONNCFG=0,0")
    assert fault_cli(daemon, "wifi_drop", "duration_ms=0").returncode == 0
    host.expect(b"WIFI DISCONNECT\r\n")
    assert b"WIFI CONNECTED" not in host.read_quiet(1.5)
    assert host.command(b"AT+CWSTATE?").startswith(b"+CWSTATE:4,")
    assert host.command(b'AT+CWJAP="bridged","password"').endswith(b"WIFI CONNECTED\r\nWIFI GOT IP\r\n\r\nOK\r\n")


def test_a_join_while_the_ap_is_gone_fails_with_no_ap(daemon):
    """While a dropped AP is gone, AT+CWJAP fails +CWJAP:3 then ERROR."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CWRECONNCFG=0,0")
    assert fault_cli(daemon, "wifi_drop", "duration_ms=5000").returncode == 0
    host.expect(b"WIFI DISCONNECT\r\n")
    assert host.ask(b'AT+CWJAP="bridged","password"') == b"+CWJAP:3\r\n\r\nERROR\r\n"


def test_wifi_drops_come_at_the_times_the_seed_draws(make_daemon):
    """wifi_drop rate 1/s: the gaps between due drops are the same in two runs with one seed
    (seed 22 draws its first four between 1.07 and 2.62 s from the start)."""
    faults = "[faults]\nseed = 22\n[faults.wifi_drop]\nrate = 1\nduration_ms = 100\n"
    make = one_at_a_time(make_daemon)
    first, again = together(*(lambda: event_gaps(make, faults, "wifi_drop", 3.0)[:3] for _ in range(2)))
    assert len(first) == 3
    assert all(abs(a - b) <= 0.25 for a, b in zip(first, again)), (first, again)


def join_answers(make_daemon, faults: str, n: int) -> list[bytes]:
    d = make_daemon(faults)
    host = d.host()
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")
    out = [answer(host, b'AT+CWJAP="bridged","password"') for _ in range(n)]
    host.close()
    return out


def test_wifi_join_fail_fails_joins_with_its_code_reproducibly(make_daemon):
    """wifi_join_fail code 2 rate 0.5: failed joins answer +CWJAP:2 then ERROR; the same seed fails the same ones."""
    faults = "[faults]\nseed = 4\n[faults.wifi_join_fail]\nrate = 0.5\ncode = 2\n"
    make = one_at_a_time(make_daemon)
    first, again = together(*(lambda: join_answers(make, faults, 10) for _ in range(2)))
    failed = {i for i, a in enumerate(first) if a.endswith(b"+CWJAP:2\r\n\r\nERROR\r\n")}
    assert 1 <= len(failed) <= 9, first
    assert all(a.endswith(b"WIFI GOT IP\r\n\r\nOK\r\n") for i, a in enumerate(first) if i not in failed)
    assert {i for i, a in enumerate(again) if a.endswith(b"ERROR\r\n")} == failed


def lookups(make_daemon, faults: str, n: int) -> list[tuple[bytes, float]]:
    d = make_daemon(HOSTS + faults)
    host = d.host()
    host.boot()
    out = []
    for _ in range(n):
        started = time.monotonic()
        out.append((answer(host, b'AT+CIPDOMAIN="fault.test"'), time.monotonic() - started))
    host.close()
    return out


def test_dns_fail_fails_lookups_reproducibly(make_daemon):
    """dns_fail rate 0.5: AT+CIPDOMAIN of a name [dns] hosts knows fails (ERROR) for the same lookups per seed."""
    faults = "[faults]\nseed = 9\n[faults.dns_fail]\nrate = 0.5\n"
    make = one_at_a_time(make_daemon)
    first, again = ([a for a, _ in run] for run in together(*(lambda: lookups(make, faults, 12) for _ in range(2))))
    failed = {i for i, a in enumerate(first) if a == b"\r\nERROR\r\n"}
    assert 1 <= len(failed) <= 11, first
    assert all(a == b'+CIPDOMAIN:"127.0.0.1"\r\n\r\nOK\r\n' or a == b"+CIPDOMAIN:127.0.0.1\r\n\r\nOK\r\n"
               for i, a in enumerate(first) if i not in failed), first
    assert {i for i, a in enumerate(again) if a == b"\r\nERROR\r\n"} == failed


def test_dns_slow_delays_the_same_lookups_per_seed(make_daemon):
    """dns_slow ms 600 rate 0.5: the lookups answered 0.6 s late (still answered) are the same per seed."""
    faults = "[faults]\nseed = 9\n[faults.dns_slow]\nrate = 0.5\nms = 600\n"
    make = one_at_a_time(make_daemon)
    first, again = together(*(lambda: lookups(make, faults, 8) for _ in range(2)))
    assert all(a.endswith(b"\r\nOK\r\n") for a, _ in first)
    slow = {i for i, (_, took) in enumerate(first) if took >= 0.6}
    assert 1 <= len(slow) <= 7
    assert {i for i, (_, took) in enumerate(again) if took >= 0.6} == slow


# -- the UART line -------------------------------------------------------------------------------

GMR = b"AT+GMR\r\n" * 30


def line_bytes(make_daemon, faults: str, sent: bytes = GMR) -> bytes:
    """What the MCU reads after ready when it writes ``sent`` in one go (echo on)."""
    d = make_daemon(faults)
    host = d.host()
    host.expect(b"\r\nready\r\n")  # seeds 3 and 7 hit nothing in its 9 bytes
    host.write(sent)
    got = host.read_quiet(0.5)
    host.close()
    return got


def test_uart_corrupt_flips_one_bit_of_the_same_bytes_per_seed(make_daemon):
    """uart_corrupt rate 0.005: as long as the clean answer, some bytes differ in exactly one bit,
    the same bytes for the same seed, others for another seed."""
    faults = "[faults]\nseed = {}\n[faults.uart_corrupt]\nrate = 0.005\n"
    make = one_at_a_time(make_daemon)
    clean, got, again, other = together(*(lambda config=config: line_bytes(make, config)
                                          for config in ("", faults.format(3), faults.format(3), faults.format(7))))
    assert len(got) == len(clean)
    diffs = [i for i, (a, b) in enumerate(zip(clean, got)) if a != b]
    assert diffs and all(bin(clean[i] ^ got[i]).count("1") == 1 for i in diffs)
    assert again == got
    assert other != got


def test_uart_drop_loses_the_same_bytes_per_seed(make_daemon):
    """uart_drop rate 0.005: the MCU reads the clean answer less some bytes, the same ones per seed."""
    faults = "[faults]\nseed = 3\n[faults.uart_drop]\nrate = 0.005\n"
    make = one_at_a_time(make_daemon)
    clean, got, again = together(*(lambda config=config: line_bytes(make, config) for config in ("", faults, faults)))
    assert 0 < len(clean) - len(got) < 100
    it = iter(clean)
    assert all(b in it for b in got)  # a subsequence: bytes lost, none changed
    assert again == got


def test_uart_overrun_loses_runs_of_input_the_same_way_per_seed(make_daemon):
    """uart_overrun rate 0.01 bytes 4: of 100 pipelined AT commands some are lost or garbled
    (fewer OKs), and the answers are byte for byte the same for one seed."""
    faults = "[faults]\nseed = {}\n[faults.uart_overrun]\nrate = 0.01\nbytes = 4\n"
    sent = b"AT\r\n" * 100
    make = one_at_a_time(make_daemon)
    got, again, other = together(*(lambda seed=seed: line_bytes(make, faults.format(seed), sent) for seed in (3, 3, 7)))
    assert 50 < got.count(b"\r\nOK\r\n") < 100
    assert again == got
    assert other != got


def test_an_on_demand_output_fault_leaves_the_output_path_when_over(daemon):
    """uart_drop on demand (count=1) drops the next byte out (OK's leading CR); once over, the output
    hook is gone (status faults.uart_hooks, uart_output_fault_over) and OK comes whole again; a
    uart_corrupt then hooks it again and hits at its offset in the whole stream since the first."""
    from tests.integration.test_status import status_json

    host = daemon.host()
    host.boot()
    assert status_json(daemon)["faults"]["uart_hooks"] == {"input": False, "output": False}
    assert fault_cli(daemon, "uart_drop", "count=1").returncode == 0
    assert status_json(daemon)["faults"]["uart_hooks"] == {"input": False, "output": True}
    host.write(b"AT\r\n")
    assert host.read_exactly(5) == b"\nOK\r\n"
    daemon.wait_event("uart_output_fault_over")
    assert status_json(daemon)["faults"]["uart_hooks"] == {"input": False, "output": False}
    assert answer(host, b"AT") == b"\r\nOK\r\n"
    assert fault_cli(daemon, "uart_corrupt", "count=1").returncode == 0
    host.write(b"AT\r\n")
    assert host.read_exactly(6)[1:] == b"\nOK\r\n"  # its first byte, a bit flipped
    daemon.wait_event("uart_output_fault_over", count=2)
    (hit,) = [e for e in daemon.events("fault_injected") if e.get("fault") == "uart_corrupt"]
    assert hit["offset"] == 6 + 6  # two answers of six bytes went out since the first demand
    assert status_json(daemon)["faults"]["uart_hooks"] == {"input": False, "output": False}


def _corrupt_lines(d) -> list[dict]:
    return [e for e in d.events("fault_injected") if e.get("fault") == "uart_corrupt"]


def test_uart_faults_are_counted_and_logged_at_most_once_a_second(make_daemon):
    """uart_corrupt at every byte: status counts every hit; the log has a line or two with `hits`, not one per byte."""
    d = make_daemon("[faults]\nseed = 3\n")
    host = d.host()
    host.boot()
    assert fault_cli(d, "uart_corrupt", "count=500").returncode == 0
    host.write(GMR)
    host.read_quiet(0.5)
    from tests.integration.test_status import status_json

    assert status_json(d)["faults"]["counts"] == {"uart_corrupt": 500}
    d.wait_event("fault_injected", fault="uart_corrupt")
    deadline = time.monotonic() + 1.2  # the hits after the first one come in a batch within a second
    while sum(e["hits"] for e in _corrupt_lines(d)) < 500:
        assert time.monotonic() < deadline, _corrupt_lines(d)
        time.sleep(0.05)
    lines = _corrupt_lines(d)
    assert 1 <= len(lines) <= 3 and sum(e["hits"] for e in lines) == 500


def test_dns_fail_on_demand_fails_the_next_cipstart_by_name(make_daemon, echo_server):
    """`bridged fault dns_fail`: AT+CIPSTART to a name fails (ERROR, no connection), the next one connects."""
    d = make_daemon(HOSTS)
    host = d.host()
    host.boot()
    assert fault_cli(d, "dns_fail").returncode == 0
    start = b'AT+CIPSTART="TCP","fault.test",%d' % echo_server.port
    assert host.ask(start).endswith(b"\r\nERROR\r\n")
    assert host.ask(start).endswith(b"CONNECT\r\n\r\nOK\r\n")
    d.wait_event("fault_injected", fault="dns_fail", host="fault.test")


def test_a_send_cut_short_by_a_wifi_drop_fails_and_sends_nothing(daemon, sink_server):
    """A drop while AT+CIPSEND's payload is still coming: the rest of it gets SEND FAIL,
    never SEND OK, and none of it reaches the peer (the link was hung up first). A SEND OK
    here would be a record the firmware never sends again and the backend never sees."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % sink_server.port)
    sink_server.wait_connections(1)
    host.write(b"AT+CIPSEND=0,20\r\n")
    host.expect(b">")
    host.write(b"0123456789")
    assert fault_cli(daemon, "wifi_drop", "duration_ms=300").returncode == 0
    host.expect(b"0,CLOSED\r\n")
    host.write(b"abcdefghij")
    assert host.expect(b"SEND FAIL\r\n").endswith(b"Recv 20 bytes\r\n\r\nSEND FAIL\r\n")
    assert sink_server.closed_by_peer.wait(5)
    assert list(sink_server.counts.values()) == [0]


def test_a_restart_after_a_wifi_drop_says_nothing_of_the_old_link(make_daemon, sink_server):
    """AT+RST while a link a wifi_drop hung up is still being closed by its worker: the
    restart takes that link too, unheard, so no CLOSED of it follows ready (the restart
    skipped links already CLOSING, and their CLOSED came after ready)."""
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 60000\n")  # the stopped worker is not killed
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % sink_server.port)
    sink_server.wait_connections(1)
    pid = daemon.worker_pid(0)
    os.kill(pid, signal.SIGSTOP)  # its Close waits in the control socket
    try:
        assert host.send_data(b"AT+CIPSEND=0,5", b"hello").endswith(b"\r\nSEND OK\r\n")
        assert fault_cli(daemon, "wifi_drop", "duration_ms=0").returncode == 0
        host.expect(b"WIFI DISCONNECT\r\n")
        host.write(b"AT+RST\r\n")
        host.expect(b"\r\nready\r\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    after = host.read_quiet(1.0)
    assert b"CLOSED" not in after, after


def test_a_restart_cuts_short_the_flush_of_a_dropped_link(make_daemon, sink_server):
    """A link hung up by a wifi_drop hands its peer what had SEND OK, here for seconds
    (net_bandwidth 1000 B/s); AT+RST resets it at once, so right after ready its link id
    can be opened again (the worker ignored the restart's close until its flush gave up, 5 s)."""
    daemon = make_daemon("[faults]\nseed = 1\n[faults.net_bandwidth]\nbytes_per_s = 1000\n")
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    start = b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % sink_server.port
    host.command(start)
    sink_server.wait_connections(1)
    assert host.send_data(b"AT+CIPSEND=0,8000", bytes(8000)).endswith(b"\r\nSEND OK\r\n")
    assert fault_cli(daemon, "wifi_drop", "duration_ms=0").returncode == 0
    host.expect(b"WIFI DISCONNECT\r\n")
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    restarted = time.monotonic()
    host.ask(b"ATE0")
    # AT+CIPMUX=1 needs no link open, the connect a free link 0 (and the station back).
    while not ((answered := host.ask(b"AT+CIPMUX=1")).endswith(b"\r\nOK\r\n")
               and (answered := host.ask(start)).endswith(b"CONNECT\r\n\r\nOK\r\n")):
        assert time.monotonic() - restarted < 2.5, answered
        time.sleep(0.1)


def test_a_wifi_drop_while_cipstart_is_under_way_fails_it(make_daemon, echo_server):
    """The AP goes away while AT+CIPSTART waits (its lookup slowed by dns_slow): the connect
    fails with ERROR and leaves no link, as over no AP; it answered CONNECT and OK after
    WIFI DISCONNECT, a link over a station with no IP."""
    d = make_daemon(HOSTS)
    host = d.host()
    host.boot()
    host.command(b"AT+CWRECONNCFG=0,0")
    assert fault_cli(d, "dns_slow", "ms=3000").returncode == 0
    host.write(b'AT+CIPSTART="TCP","fault.test",%d\r\n' % echo_server.port)
    assert fault_cli(d, "wifi_drop", "duration_ms=10000").returncode == 0
    answer = host.expect(b"ERROR\r\n", timeout=8)
    assert answer == b"WIFI DISCONNECT\r\n\r\nERROR\r\n"
    assert host.command(b"AT+CIPSTATUS").startswith(b"STATUS:5\r\n")


def test_a_passthrough_reconnection_the_ap_leaves_does_not_resume(daemon):
    """A passthrough reconnection whose connect completes after the AP went away (its SYN
    waited on a full accept queue) fails with the drop: the connection is closed at once and
    nothing the MCU sends reaches the peer; passthrough went on over a station with no IP."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CWRECONNCFG=0,0")
    server = BacklogServer()
    try:
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.port) == b"CONNECT\r\n\r\nOK\r\n"
        first, _ = server.sock.accept()
        host.command(b"AT+CIPRECONNINTV=1")
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        server.fill(2)  # the accept queue full: the reconnection's SYN goes unanswered
        time.sleep(0.2)
        first.close()
        time.sleep(0.6)  # the link dropped; a reconnection waits for its SYN-ACK
        assert fault_cli(daemon, "wifi_drop", "duration_ms=20000").returncode == 0
        filler_ports = server.filler_ports()
        server.sock.settimeout(0.2)
        ours = None
        deadline = time.monotonic() + 8  # the SYN's retransmissions: 1 s, then 3 s after the first
        while ours is None and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn, peer = server.sock.accept()
                if peer[1] in filler_ports:
                    conn.close()
                else:
                    ours = conn
        assert ours is not None, "the reconnection never connected"
        host.write(b"during the drop")
        ours.settimeout(3)
        assert ours.recv(100) == b""
        ours.close()
    finally:
        server.close()


def test_a_server_client_arriving_during_a_wifi_drop_is_not_taken(daemon):
    """While a wifi_drop holds the station down no client can reach the server: one arriving then is
    reset with no CONNECT to the MCU; once the station is back clients are taken again."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host.command(b"AT+CIPSERVER=1,%d" % port)
    assert fault_cli(daemon, "wifi_drop", "duration_ms=1500").returncode == 0
    host.expect(b"WIFI DISCONNECT\r\n")
    with contextlib.suppress(ConnectionRefusedError, ConnectionResetError):
        with socket.create_connection(("127.0.0.1", port), timeout=3) as client:
            assert client.recv(1) == b""  # a reset raises; a taken client would time out
    assert b"CONNECT" not in host.read_quiet(0.3)
    host.expect(b"WIFI GOT IP\r\n", timeout=5)
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        assert host.expect(b"0,CONNECT\r\n") == b"0,CONNECT\r\n"


def test_a_wifi_drop_leaves_a_passive_links_unread_data_readable(daemon):
    """A wifi_drop takes a passive link (AT+CIPRECVTYPE=1) away as a peer close does: its unread
    data stays readable (AT+CIPRECVLEN?, AT+CIPRECVDATA) and CLOSED follows once it is drained."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CWRECONNCFG=0,0")
    server = socket.create_server(("127.0.0.1", 0))
    try:
        host.command(b"AT+CIPRECVTYPE=1")
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1]) == b"CONNECT\r\n\r\nOK\r\n"
        conn, _ = server.accept()
        conn.sendall(b"unread data")
        host.expect(b"\r\n+IPD,11\r\n")
        assert fault_cli(daemon, "wifi_drop", "duration_ms=5000").returncode == 0
        host.expect(b"WIFI DISCONNECT\r\n")
        assert host.read_quiet(0.5) == b""  # no CLOSED while data is unread
        assert host.command(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:11\r\n\r\nOK\r\n"
        host.write(b"AT+CIPRECVDATA=100\r\n")
        assert host.expect(b"\r\nOK\r\n") == b"+CIPRECVDATA:11,unread data\r\nOK\r\n"
        assert host.expect(b"CLOSED\r\n") == b"CLOSED\r\n"
        assert host.command(b"AT+CIPSTATUS").startswith(b"STATUS:5\r\n")  # no AP, no link
        conn.close()
    finally:
        server.close()
