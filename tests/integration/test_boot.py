"""The simulated boot after every restart ([firmware] boot_ms, boot_banner), as
host drivers meet it: silence after the OK, input dropped, then ready.

Times are lower bounds taken from the host's side (the send of the command
that restarts), so load can only make them pass by a wider margin.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import termios
import time
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from bridged.uart.banner import Framing, Reset, as_received, rom_banner
from tests.harness import Daemon, Host, notify_state

READY = b"\r\nready\r\n"
PROFILE = Path(__file__).resolve().parents[2] / "config" / "profiles" / "esp32.toml"
ESP32_BOOT_MS = tomllib.loads(PROFILE.read_text())["firmware"]["boot_ms"]


def _firmware(**keys) -> str:
    values = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in keys.items())
    return "[firmware]\n" + values


def _restart_like_lwesp(host: Host, command: bytes) -> tuple[float, bytes]:
    """Send ``command``, read up to its OK, then re-initialise the UART as lwESP does:
    everything not yet read is flushed.  Returns (seconds from the send to ready, what
    came before ready)."""
    sent = time.monotonic()
    host.write(command + b"\r\n")
    host.expect(b"\r\nOK\r\n")
    termios.tcflush(host.fd, termios.TCIOFLUSH)
    host.buf.clear()
    before = host.expect(READY)
    return time.monotonic() - sent, before[: -len(READY)]


def _event_time(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_a_host_that_flushes_after_the_ok_still_sees_ready(make_daemon):
    """lwESP flushes its input right after the OK to AT+RST and AT+RESTORE; with an
    ESP32's boot time ready comes later, alone, no earlier than boot_ms after the send."""
    daemon = make_daemon(_firmware(boot_ms=ESP32_BOOT_MS))
    host = daemon.host()
    host.expect(READY)
    host.command(b"ATE0")
    for command in (b"AT+RST", b"AT+RESTORE"):
        elapsed, before = _restart_like_lwesp(host, command)
        assert before == b"", command  # nothing precedes ready with boot_banner off
        assert elapsed >= ESP32_BOOT_MS / 1000, (command, elapsed)
        assert elapsed < ESP32_BOOT_MS / 1000 + 8, (command, elapsed)
        assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"  # a fresh session: echo on again
        host.command(b"ATE0")
    assert len(daemon.events("booting")) == 3


def test_input_during_the_boot_is_dropped_and_logged(make_daemon):
    """AT sent 10 ms after the OK to AT+RST gets no answer (the chip is not listening
    yet) and the drop is logged once with its size; AT after ready gets OK."""
    daemon = make_daemon(_firmware(boot_ms=ESP32_BOOT_MS))
    host = daemon.host()
    host.expect(READY)
    host.command(b"ATE0")
    host.command(b"AT+RST")
    time.sleep(0.01)  # the host's pace: 10 ms after OK, and again (the behaviour under test)
    host.write(b"AT\r\n")
    time.sleep(0.01)
    host.write(b"AT+GMR\r\n")
    assert host.expect(READY) == READY
    assert host.read_quiet(0.3) == b""  # neither was answered
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"
    dropped = daemon.wait_event("boot_input_dropped")
    assert [e["bytes"] for e in dropped] == [4 + 8]


def test_the_first_start_is_silent_for_boot_ms(make_daemon):
    """At start-up too: ready comes boot_ms after the boot began, and what the host
    sent before it is dropped, not answered."""
    started = time.monotonic()
    daemon = make_daemon(_firmware(boot_ms=ESP32_BOOT_MS))
    host = daemon.host()
    host.write(b"AT\r\n")
    assert host.expect(READY) == READY
    assert time.monotonic() - started >= ESP32_BOOT_MS / 1000
    assert host.read_quiet(0.3) == b""
    booting, ready = daemon.wait_event("booting")[0], daemon.wait_event("ready")[0]
    assert booting["reset"] == "power_on" and booting["boot_ms"] == ESP32_BOOT_MS
    assert _event_time(ready) - _event_time(booting) >= ESP32_BOOT_MS / 1000 - 0.002  # ms-resolution clocks
    assert daemon.wait_event("boot_input_dropped")[0]["bytes"] == 4


def test_forced_restart_boots_too(make_daemon):
    """AT+RST while a command runs: "Will force to restart!!!", the boot's silence, ready."""
    daemon = make_daemon('connect_delay_ms = 2000\n' + _firmware(boot_ms=300))
    host = daemon.host()
    host.expect(READY)
    host.command(b"ATE0")
    host.write(b'AT+CWJAP="bridged","pwd"\r\n')
    host.read_quiet(0.1, timeout=0.2)
    sent = time.monotonic()
    host.write(b"AT+RST\r\n")
    assert host.expect(READY) == b"\r\nWill force to restart!!!\r\n" + READY
    assert time.monotonic() - sent >= 0.3
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"


def test_the_boot_after_at_rst_logs_no_command(make_daemon):
    """The new session's boot, its ready and the lines after it name no command: none of
    them is the restarting command's (it ran in the old session)."""
    daemon = make_daemon(_firmware(boot_ms=50))
    host = daemon.host()
    host.expect(READY)
    host.write(b"AT+RST\r\n")
    host.expect(READY)
    booting, ready = daemon.wait_event("booting", count=2)[-1], daemon.wait_event("ready", count=2)[-1]
    assert booting.get("command") is None and ready.get("command") is None, (booting, ready)
    host.write(b"AT+CIPSTART=\"TCP\",\"127.0.0.1\",1\r\n")  # refused: a line logged under its own name
    host.expect(b"ERROR\r\n")
    after = [e for e in daemon.events() if _event_time(e) >= _event_time(ready)]
    assert {e.get("command") for e in after} <= {None, "+CIPSTART"}, after


def test_systemd_hears_ready_when_ready_is_written(tmp_path, notify_socket):
    """READY=1 waits for the first boot: it comes no earlier than boot_ms after the start."""
    started = time.monotonic()
    daemon = Daemon(tmp_path, _firmware(boot_ms=ESP32_BOOT_MS)).start()
    try:
        assert notify_state(notify_socket).startswith(b"READY=1")
        assert time.monotonic() - started >= ESP32_BOOT_MS / 1000
        host = daemon.host()
        assert host.expect(READY, timeout=1) == READY  # already written
        host.close()
        assert daemon.stop() == 0
    finally:
        daemon.stop()


def test_banner_at_another_speed_is_noise_before_ready(make_daemon):
    """boot_banner at 74880 baud read at the port's 115200 8N1: exactly what a UART
    receiver makes of it (not text), then ready; power-on first, software reset after AT+RST."""
    daemon = make_daemon(_firmware(boot_ms=100, boot_banner=True, boot_banner_baud=74880))
    host = daemon.host()
    before = host.expect(READY)[: -len(READY)]
    assert before == as_received(rom_banner(Reset.POWER_ON), 74880, Framing(115200))
    assert b"ets" not in before and len(before) > 100
    with pytest.raises(UnicodeDecodeError):
        before.decode("ascii")
    host.command(b"ATE0")
    host.command(b"AT+RST")
    before = host.expect(READY)[: -len(READY)]
    assert before == as_received(rom_banner(Reset.SOFTWARE), 74880, Framing(115200))
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"


def test_banner_at_the_same_speed_is_the_text(make_daemon):
    """At the ROM's speed the host reads the banner as text, as a real ESP32 on UART0 at
    115200 shows it; the host's speed is the one the chip comes back with (AT+UART_DEF)."""
    daemon = make_daemon(_firmware(boot_banner=True))
    host = daemon.host()
    assert host.expect(READY) == rom_banner(Reset.POWER_ON) + READY
    host.command(b"ATE0")
    host.command(b"AT+UART_DEF=74880,8,1,0,0")
    host.command(b"AT+RST")
    before = host.expect(READY)[: -len(READY)]
    assert before == as_received(rom_banner(Reset.SOFTWARE), 115200, Framing(74880))
    assert before != rom_banner(Reset.SOFTWARE)


@pytest.mark.parametrize("value, shown", [("-1", "-1"), ("10001", "10001"), ('"400"', "'400'")])
def test_boot_ms_out_of_range_is_a_config_error(tmp_path, value, shown):
    """A boot_ms outside 0..10000: exit 2, one line naming the file, the key and the range."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[firmware]\nboot_ms = {value}\n")
    result = subprocess.run(
        [sys.executable, "-m", "bridged", "run", "--config", str(cfg), "--pty", str(tmp_path / "t"),
         "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"{cfg}: firmware.boot_ms: {shown} is not allowed; allowed: an integer from 0 to 10000")


def test_a_client_accepted_just_before_the_restart_is_not_announced(make_daemon):
    """A server client whose worker confirms it only after AT+RST closed it quietly
    gets no <id>,CONNECT: nothing but ready comes out of the restart."""
    daemon = make_daemon(_firmware(boot_ms=300))
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    host.command(b"AT+CIPSERVER=1,%d" % port)
    worker = daemon.worker_pid(0)
    os.kill(worker, signal.SIGSTOP)  # the accepted socket waits in its control socket
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        daemon.wait_event("server_client_accepted")
        host.write(b"AT+RST\r\n")
        host.expect(b"\r\nOK\r\n")
        daemon.wait_event("booting", count=2)
    finally:
        os.kill(worker, signal.SIGCONT)  # it takes the client, says Connected, then closes it
    assert host.expect(READY) == READY
    assert host.read_quiet(0.5) == b"WIFI CONNECTED\r\nWIFI GOT IP\r\n"  # the stored AP, no link
    assert client.recv(16) == b""  # the restart closed it
    client.close()


def _fill_the_output(host: Host, echo_server) -> socket.socket:
    """Open a link and let its peer send until the host's unread input and the daemon's
    output queue are full (a host that does not read: CTS low on a real UART)."""
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    peer = echo_server.wait_connections(1)[0]
    peer.setblocking(False)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            peer.send(b"x" * 65536)
        except BlockingIOError:
            time.sleep(0.01)
    return peer


def _push(host: Host, seconds: float) -> int:
    """Write as fast as the port takes it for ``seconds``; returns the bytes written."""
    sent, chunk = 0, b"A" * 65536
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += os.write(host.fd, chunk)
        except BlockingIOError:
            time.sleep(0.001)
    return sent


def test_input_behind_a_restart_waiting_for_the_output_is_not_buffered(make_daemon, echo_server):
    """AT+RST whose OK waits behind output the host does not read: what the host sends
    meanwhile stays in the port (the host's writes stall) instead of piling up in the
    daemon; once the host reads, the restart goes on and that input is dropped by the boot."""
    daemon = make_daemon(_firmware(boot_ms=300))
    host = daemon.host()
    host.boot()
    _fill_the_output(host, echo_server)
    host.write(b"AT+RST\r\n")
    time.sleep(0.2)  # AT+RST is read, its OK queued behind the backlog: no event says so
    assert _push(host, 2.0) < 1 << 20  # a port's buffer, not the tens of MB a pty takes in 2 s
    host.expect(READY, timeout=20)
    assert host.read_quiet(0.3) == b"WIFI CONNECTED\r\nWIFI GOT IP\r\n"  # none of it was answered
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"
    assert daemon.events("boot_input_dropped")[-1]["bytes"] > 0


def test_a_forced_restart_does_not_wait_for_a_host_that_does_not_read(make_daemon, echo_server):
    """AT+RST while busy, with output queued the host does not read: as ESP-AT gives its
    UART 3 s at most before it restarts, the boot goes on by itself and the queue is lost;
    a host that reads again gets at most what its own port buffered, then ready."""
    daemon = make_daemon('connect_delay_ms = 2000\n' + _firmware(boot_ms=300))
    host = daemon.host()
    host.boot()
    _fill_the_output(host, echo_server)
    host.write(b'AT+CWJAP="bridged","password"\r\n')  # busy for 2 s
    time.sleep(0.2)  # the join is running when AT+RST comes: no event says it started
    host.write(b"AT+RST\r\n")
    restart = daemon.wait_event("restart")[-1]
    ready = daemon.wait_event("ready", count=2, timeout=3 + 0.3 + 5)[-1]  # the host still reads nothing
    assert 3.3 - 0.01 <= _event_time(ready) - _event_time(restart) < 3.3 + 4
    discarded = daemon.wait_event("restart_output_discarded")[-1]
    assert discarded["queued_bytes"] > 0
    before = host.expect(READY, timeout=5)
    assert b"Will force to restart!!!" not in before  # it was queued behind what was lost
    assert len(before) < discarded["queued_bytes"] + 65536  # only what the pty held
    assert host.expect(b"WIFI GOT IP\r\n", timeout=5) == b"WIFI CONNECTED\r\nWIFI GOT IP\r\n"
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"


def test_at_rst_during_the_boot_restarts_nothing_and_half_a_line_does_not_survive(make_daemon):
    """AT+RST sent again and again while the chip boots is not heard: one boot, one ready,
    on time; and the start of a line sent during the boot is lost, so its end after ready
    is a line of its own (ERROR), not the command."""
    daemon = make_daemon(_firmware(boot_ms=ESP32_BOOT_MS))
    host = daemon.host()
    host.expect(READY)
    host.command(b"ATE0")
    sent = time.monotonic()
    host.command(b"AT+RST")
    for _ in range(10):
        host.write(b"AT+RST\r\n")
        time.sleep(0.02)  # ten writes spread over the boot (the behaviour under test)
    host.write(b"AT+GM")
    assert host.expect(READY) == READY
    assert time.monotonic() - sent < ESP32_BOOT_MS / 1000 + 3
    host.write(b"R\r\n")
    assert host.expect(b"\r\nERROR\r\n") == b"R\r\n\r\nERROR\r\n"  # echo is on again
    assert host.read_quiet(ESP32_BOOT_MS / 1000 + 0.2) == b""  # no second ready
    assert len(daemon.events("booting")) == 2 and len(daemon.events("restart")) == 1
    assert daemon.events("boot_input_dropped")[-1]["bytes"] == 10 * 8 + 5


def test_at_rst_behind_a_payload_ends_the_data_phase(make_daemon, echo_server):
    """AT+RST in the bytes after an AT+CIPSEND payload forces a restart; after ready the
    parser is in command mode again: AT is a command, not payload."""
    daemon = make_daemon(_firmware(boot_ms=200))
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    host.command(b"AT+CIPSEND=10", final=b">")
    host.write(b"0123456789AT+RST\r\n")
    assert host.expect(READY).endswith(b"\r\nWill force to restart!!!\r\n" + READY)
    host.expect(b"WIFI GOT IP\r\n")
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"
    status = host.command(b"AT+CIPSTATUS")
    assert status.startswith(b"AT+CIPSTATUS\r\nSTATUS:") and b"+CIPSTATUS:" not in status  # no link left


def test_links_open_at_at_rst_close_quietly_and_their_peers_are_not_heard(make_daemon, echo_server):
    """A link open at AT+RST is closed with no CLOSED, and what its peer sent after the
    OK never reaches the MCU: ready is the next thing it reads."""
    daemon = make_daemon(_firmware(boot_ms=ESP32_BOOT_MS))
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    peer = echo_server.wait_connections(1)[0]
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nOK\r\n")
    for _ in range(20):
        try:
            peer.sendall(b"+IPD from the peer")
        except OSError:
            break  # closed by the restart
        time.sleep(0.01)
    assert host.expect(READY) == READY
    # Nothing of the peer's: the auto-connect lines follow ready, however late load makes them.
    assert host.expect(b"WIFI GOT IP\r\n") == b"WIFI CONNECTED\r\nWIFI GOT IP\r\n"
    assert host.read_quiet(0.3) == b""
    # Closed with the peer's bytes unread: a FIN or (usually) a reset, as the kernel decides.
    assert daemon.wait_event("link_closed", reason="closed by host")


def test_data_held_back_behind_at_rst_never_follows_its_ok(make_daemon, echo_server):
    """A peer's data that waits in the ring behind a backed-up UART when AT+RST is answered
    is dropped with the link: the MCU reads no +IPD between the OK and ready."""
    daemon = make_daemon(_firmware(boot_ms=50))
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    peer = echo_server.wait_connections(1)[0]
    peer.setblocking(False)
    sent = 0
    try:  # more than the pty, the front's queue and the ring hold: the rest waits in the ring
        while sent < 1 << 20:
            sent += peer.send(b"x" * 65536)
    except BlockingIOError:
        pass
    time.sleep(0.5)  # the host reads nothing: the output backs up, +IPD stays in the ring
    host.write(b"AT+RST\r\n")
    time.sleep(0.3)  # its OK is queued behind the +IPD already queued
    host.expect(b"\r\nOK\r\n", timeout=20)
    after_ok = host.expect(READY, timeout=20)
    assert b"+IPD" not in after_ok, after_ok[:200]
    assert daemon.wait_event("link_closed", reason="closed by host")


def test_a_stop_during_the_boot_exits_at_once(tmp_path):
    """SIGTERM while the first boot's silence runs (10 s): exit 0 within a second or two."""
    daemon = Daemon(tmp_path, _firmware(boot_ms=10000)).start()
    try:
        daemon.wait_event("booting")
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 3
        assert not daemon.events("ready")
    finally:
        daemon.stop()


@pytest.mark.parametrize("uart_def, framing", [
    (b"115200,7,1,2,0", Framing(115200, 7, 2)),  # 7E1: ten bits a frame, as 8N1: the text
    (b"115200,7,1,0,0", Framing(115200, 7, 0)),  # 7N1: nine, out of step: noise
])
def test_banner_is_received_with_the_data_bits_and_parity_of_uart_def(make_daemon, uart_def, framing):
    """The banner is decoded with AT+UART_DEF's data bits and parity, not only its speed."""
    daemon = make_daemon(_firmware(boot_banner=True))
    host = daemon.host()
    host.expect(READY)
    host.command(b"ATE0")
    host.command(b"AT+UART_DEF=" + uart_def)
    host.command(b"AT+RST")
    before = host.expect(READY)[: -len(READY)]
    assert before == as_received(rom_banner(Reset.SOFTWARE), 115200, framing)
    assert (before == rom_banner(Reset.SOFTWARE)) == (framing.parity != 0)


def test_after_at_rst_ready_finds_every_link_ended(make_daemon, echo_server):
    """A driver's AT+RST, then AT+CIPMUX=1 the instant ready arrives: no link of the old
    session may still be closing (its worker held up here for 0.5 s by SIGSTOP), so the
    boot waits for the workers before ready, as a real chip has none after its reboot."""
    daemon = make_daemon()  # boot_ms 0: ready would come before any worker had answered
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port)
    echo_server.wait_connections(1)
    worker = daemon.worker_pid(0)
    os.kill(worker, signal.SIGSTOP)
    try:
        host.write(b"AT+RST\r\n")
        host.expect(b"\r\nOK\r\n")
        time.sleep(0.5)  # the worker stays stopped this long: the Close waits in its socket
    finally:
        os.kill(worker, signal.SIGCONT)
    host.expect(READY)
    host.expect(b"WIFI GOT IP\r\n")  # the auto-connect's lines, then the driver's first command
    assert host.ask(b"AT+CIPMUX=1") == b"AT+CIPMUX=1\r\n\r\nOK\r\n"  # (echo is on again)
    assert host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port).endswith(b"0,CONNECT\r\n\r\nOK\r\n")


def test_the_supervisor_hears_ready_once_per_front(make_daemon):
    """FrontReady (READY=1, the count of failures before ready) goes to the supervisor at the
    front's first ready only, not after each AT+RST's boot; a front started again after a crash
    says it again (its own first ready)."""
    daemon = make_daemon()
    host = daemon.host()
    host.expect(READY)
    first = daemon.front_pid()
    for _ in range(2):
        host.command(b"AT+RST")
        host.expect(READY)
    daemon.wait_event("ready", count=3)
    time.sleep(0.5)  # the supervisor reads its channel at once: a second FrontReady would be in the log
    assert [e["pid"] for e in daemon.events("front_ready")] == [first]
    daemon.expected_errors |= {"child_died", "worker_died"}
    os.kill(first, signal.SIGKILL)
    host.expect(READY)
    heard = daemon.wait_event("front_ready", count=2)
    second = daemon.front_pid()
    assert second != first and [e["pid"] for e in heard] == [first, second]
