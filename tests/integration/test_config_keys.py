"""Config keys that had no end-to-end test of their own: each test sets the key
to a value other than its default and checks, over the pty, that the MCU sees
the difference (a key that did nothing would fail it)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.harness import Host, Timeout, parse_events, with_test_timing


@pytest.fixture
def server():
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def _booted(daemon) -> Host:
    host = daemon.host()
    host.boot()
    return host


def _connect(host: Host, server) -> socket.socket:
    host.command(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    return conn


def test_wifi_ap_keys_are_what_cwlap_and_cwjap_show(make_daemon):
    """[wifi] ssid, bssid, channel, rssi and ecn are the AP AT+CWLAP lists and AT+CWJAP? reports."""
    # The harness writes [wifi] first (station_interface): these keys go into it.
    daemon = make_daemon('ssid = "lab-ap"\nbssid = "02:11:22:33:44:55"\n'
                         'channel = 11\nrssi = -70\necn = 4\n')
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")
    assert host.ask(b"AT+CWLAP") == b'+CWLAP:(4,"lab-ap",-70,"02:11:22:33:44:55",11,0,0,4,4,7,0)\r\n\r\nOK\r\n'
    assert host.ask(b'AT+CWJAP="bridged","pw"').endswith(b"\r\nERROR\r\n")  # the default SSID is no AP now
    assert host.ask(b'AT+CWJAP="lab-ap","pw"').endswith(b"WIFI GOT IP\r\n\r\nOK\r\n")
    assert host.ask(b"AT+CWJAP?") == b'+CWJAP:"lab-ap","02:11:22:33:44:55",11,-70,0,1,3,0,1\r\n\r\nOK\r\n'
    host.close()


def test_firmware_module_and_sdk_version_are_in_gmr(make_daemon):
    """[firmware] module and sdk_version are AT+GMR's SDK and Bin lines."""
    host = _booted(make_daemon('[firmware]\nmodule = "WROVER-E"\nsdk_version = "v9.9.9"\n'))
    answer = host.command(b"AT+GMR")
    assert b"\r\nSDK version:v9.9.9\r\n" in answer, answer
    assert re.search(rb"\r\nBin version:[^\r(]*\(WROVER-E\)\r\n", answer), answer
    host.close()


def test_cipsend_max_bounds_the_send_length(make_daemon, server):
    """[links] cipsend_max is the longest AT+CIPSEND / AT+CIPSENDEX: one byte more is ERROR with no prompt."""
    host = _booted(make_daemon("[links]\ncipsend_max = 100\n"))
    conn = _connect(host, server)
    assert host.ask(b"AT+CIPSEND=101") == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPSENDEX=101") == b"\r\nERROR\r\n"
    assert host.send_data(b"AT+CIPSEND=100", b"y" * 100).endswith(b"SEND OK\r\n")
    conn.settimeout(5)
    got = b""
    while len(got) < 100:
        got += conn.recv(100)
    assert got == b"y" * 100
    conn.close()
    host.close()


def test_chunk_bounds_each_ipd(make_daemon, server):
    """[links] chunk is the largest active-mode +IPD: 1000 bytes from the peer come as records of 100 at most."""
    host = _booted(make_daemon("[links]\nchunk = 100\n"))
    conn = _connect(host, server)
    conn.sendall(b"z" * 1000)
    sizes = []
    while sum(sizes) < 1000:
        _, data = host.read_ipd()
        assert data == b"z" * len(data)
        sizes.append(len(data))
    assert sum(sizes) == 1000 and max(sizes) <= 100, sizes
    conn.close()
    host.close()


def test_recv_window_bounds_what_passive_mode_holds(make_daemon, server):
    """[links] recv_window: in passive mode the link holds at most that many unread bytes (not the default 5760)."""
    host = _booted(make_daemon("[links]\nrecv_window = 1000\n"))
    host.command(b"AT+CIPRECVMODE=1")
    conn = _connect(host, server)
    conn.sendall(b"w" * 10000)  # fits in the socket buffers: sendall returns
    deadline = time.monotonic() + 10
    while True:
        answer = host.ask(b"AT+CIPRECVLEN?")
        unread = int(re.search(rb"\+CIPRECVLEN:(\d+)\r\n", answer).group(1))  # notices may precede it
        assert unread <= 1000, answer
        if unread == 1000:
            break
        if time.monotonic() > deadline:
            raise Timeout(f"the window never filled: {unread} unread")
        time.sleep(0.05)
    time.sleep(0.3)  # the peer's data keeps waiting: the window stays at 1000
    assert re.search(rb"\+CIPRECVLEN:1000\r\n", host.ask(b"AT+CIPRECVLEN?"))
    conn.close()
    host.close()


def test_ap_and_eth_interfaces_are_what_cifsr_shows(make_daemon):
    """[wifi] ap_interface and eth_interface map the soft-AP and Ethernet onto host
    interfaces: AT+CIFSR shows their addresses (unset: no AP address, no ETH lines), and
    AT+CIPSERVER's <netif> 2 and 3 listen there (unset: ERROR, test_personality)."""
    host = _booted(make_daemon())
    host.command(b"AT+CWMODE=3")
    plain = host.command(b"AT+CIFSR")
    assert b'+CIFSR:APIP,"0.0.0.0"\r\n' in plain and b"ETH" not in plain, plain
    host.close()
    # Into the harness's own [wifi] table.
    host = _booted(make_daemon('ap_interface = "lo"\neth_interface = "lo"\n'))
    host.command(b"AT+CWMODE=3")
    mapped = host.command(b"AT+CIFSR")
    assert b'+CIFSR:APIP,"127.0.0.1"\r\n' in mapped, mapped
    assert b'+CIFSR:ETHIP,"127.0.0.1"\r\n' in mapped, mapped
    host.command(b"AT+CIPMUX=1")
    for netif in (2, 3):  # AT+CIPSERVER on the soft-AP's, then the Ethernet's interface: lo's address
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()
        host.command(b'AT+CIPSERVER=1,%d,"TCP",0,%d' % (port, netif))
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            host.expect(b"0,CONNECT\r\n")
        host.expect(b"0,CLOSED\r\n")
        host.command(b"AT+CIPSERVER=0")
    host.close()


def test_log_format_console_writes_no_json(make_daemon):
    """[log] format = "console" writes readable lines even when stdout is no terminal (auto: JSON)."""
    daemon = make_daemon('[log]\nformat = "console"\n')
    host = _booted(daemon)
    host.close()
    text = daemon.log_text()
    assert text.strip(), "nothing logged"
    assert parse_events(text) == [], text[:2000]
    assert not re.search(r"^<\d>\{", text, re.M), text[:2000]


def test_uart_line_keys_are_the_settings_at_start(make_daemon):
    """[uart] baud, data_bits, stop_bits and parity are the line AT+UART_CUR? and AT+UART_DEF? show at start
    (ESP-AT numbers two stop bits 3 and even parity 2)."""
    host = _booted(make_daemon('[uart]\nbaud = 9600\ndata_bits = 7\nstop_bits = 2\nparity = "even"\n'))
    assert host.ask(b"AT+UART_CUR?") == b"+UART_CUR:9600,7,3,2,1\r\n\r\nOK\r\n"
    assert host.ask(b"AT+UART_DEF?") == b"+UART_DEF:9600,7,3,2,1\r\n\r\nOK\r\n"
    host.close()


def test_max_line_bounds_a_command_line(make_daemon):
    """[uart] max_line: a line longer than it is ERROR (the default 256 takes it)."""
    line = b'AT+CWHOSTNAME="' + b"h" * 30 + b'"'  # 47 bytes with CR LF
    host = _booted(make_daemon("[uart]\nmax_line = 32\n"))
    assert host.ask(line) == b"\r\nERROR\r\n"
    assert host.ask(b"AT") == b"\r\nOK\r\n"  # the session goes on
    host.close()
    host = _booted(make_daemon())
    assert host.ask(line) == b"\r\nOK\r\n"
    host.close()


def test_pty_link_and_state_dir_keys_without_options(tmp_path):
    """[uart] pty_link and [state] dir apply without --pty and --state-dir: the pty
    appears at the link, and AT+UART_DEF's setting is stored in that directory."""
    link, state = tmp_path / "ttyKEY", tmp_path / "kept"
    config = tmp_path / "bridged.toml"
    config.write_text(with_test_timing(f'[wifi]\nstation_interface = "lo"\n[uart]\npty_link = "{link}"\n'
                                       f'[state]\ndir = "{state}"\n'))
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "bridged", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while not link.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.02)
        host = Host(str(link))
        host.expect(b"\r\nready\r\n")
        host.command(b"AT+UART_DEF=57600,8,1,0,0")
        host.close()
        assert "57600" in (state / "nvs.json").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, (tmp_path / "log").read_text()[-3000:]


def test_watchdog_keys_apply_on_reload(make_daemon):
    """[watchdog] heartbeat_ms and missed_heartbeats apply on reload: under a patient
    watchdog a link worker stopped for 1.5 s is left alone; reloaded to 0.2 s x 3, the
    same stop gets the new worker killed (child_unresponsive)."""
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 500\nmissed_heartbeats = 20\n")
    daemon.expected_errors |= {"child_unresponsive", "child_died", "worker_died"}
    host = _booted(daemon)
    pid = daemon.worker_pid(1)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(1.5)  # three heartbeats missed of the 20 allowed
    os.kill(pid, signal.SIGCONT)
    assert not daemon.events("child_unresponsive")
    daemon.write_config("[watchdog]\nheartbeat_ms = 200\nmissed_heartbeats = 3\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("reloading")[-1]["changed"] == ["watchdog.heartbeat_ms", "watchdog.missed_heartbeats"]
    host.expect(b"\r\nready\r\n", timeout=10)
    deadline = time.monotonic() + 10
    while (new := daemon.worker_pid(1)) == pid:
        assert time.monotonic() < deadline, "no new link worker after the reload"
        time.sleep(0.05)
    os.kill(new, signal.SIGSTOP)
    try:
        # 0.6 s now; the old 10 s patience would outlast this wait.
        event = daemon.wait_event("child_unresponsive", role="link", link_id=1, timeout=5)[0]
        assert event["pid"] == new
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(new, signal.SIGCONT)
    host.close()
