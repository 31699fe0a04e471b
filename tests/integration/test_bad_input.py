"""Bad input from the MCU gets a clear answer and loses nothing: ERROR, then AT works."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from bridged.config import load_config
from tests import forkserver
from tests.harness import Daemon


@pytest.fixture
def host(shared_host):
    """The module's tests that need only a booted host share one daemon (conftest.shared_host)."""
    return shared_host


@pytest.mark.parametrize(
    "line",
    [
        b"AT+NOSUCH",
        b"AT+CIPMUX=x",  # not a number
        b"AT+CIPMUX=1 ",  # a trailing space makes the number unparsable
        b'AT+CIPMUX="1"',  # a string where a number belongs
        b"AT+CIPMUX=1,2,3",  # too many parameters
        b"AT+CWHOSTNAME=abc",  # a number-like token where a string belongs
        b'AT+CWJAP="unterminated,"pwd',
        b'AT+CWJAP="ssid"x,"pwd"',  # bytes after a closing quote
        b"AT+CIPMUX",  # a form the command does not have
        b"AT+",
        b"at",  # lower case
        b"hello",
        b"ATE2",
        b"AT+CIPMUX=",
    ],
)
def test_malformed_lines_answer_error(host, line):
    """Each malformed command answers exactly ERROR, and the next AT answers OK."""
    assert host.ask(line) == b"\r\nERROR\r\n"
    assert host.command(b"AT") == b"\r\nOK\r\n"


def test_long_line_is_refused_once_then_resync(host):
    """A 4 KB line answers one ERROR; the session resynchronises at its line end."""
    host.write(b"AT+" + b"A" * 4096 + b"\r\n")
    assert host.expect(b"\r\nERROR\r\n") == b"\r\nERROR\r\n"
    assert host.command(b"AT") == b"\r\nOK\r\n"
    assert host.read_quiet(0.2) == b""


def test_binary_garbage(host):
    """NUL and 0xFF bytes in a line: ERROR, nothing else; then AT is fine."""
    assert host.ask(b"\x00\xff\xfe AT\x00+GMR\xff") == b"\r\nERROR\r\n"
    host.write(bytes(range(256)) * 4 + b"\r\n")
    out = host.expect(b"\r\nERROR\r\n")
    assert out.endswith(b"\r\nERROR\r\n")
    host.read_quiet(0.2)
    assert host.command(b"AT") == b"\r\nOK\r\n"


def test_commands_in_one_byte_writes(host):
    """A command trickling in one byte per write is understood."""
    for byte in b"AT+CIPMUX?\r\n":
        host.write(bytes([byte]))
    assert host.expect(b"\r\nOK\r\n") == b"+CIPMUX:0\r\n\r\nOK\r\n"


def test_many_commands_in_one_write(host):
    """Several commands in one write are each answered, in order."""
    host.write(b"AT\r\nAT+CIPMUX=1\r\nAT+CIPMUX?\r\nAT+BAD\r\nAT+CIPDINFO?\r\n")
    out = host.expect(b"+CIPDINFO:false\r\nOK\r\n")
    assert out == b"\r\nOK\r\n\r\nOK\r\n+CIPMUX:1\r\n\r\nOK\r\n\r\nERROR\r\n+CIPDINFO:false\r\nOK\r\n"


def test_lone_cr_or_lf_does_not_end_a_line(host):
    """ESP-AT needs \\r\\n: 'AT\\n' alone gets no answer until \\r\\n arrives."""
    host.write(b"AT\n")
    assert host.read_quiet(0.2) == b""
    host.write(b"\r\n")  # the line is now 'AT\\n\\r\\n': not a valid command
    assert host.expect(b"\r\nERROR\r\n") == b"\r\nERROR\r\n"
    assert host.command(b"AT") == b"\r\nOK\r\n"


def test_input_while_busy_gets_busy(make_daemon):
    """While a command waits on the network, input is refused with busy p..., then the command completes."""
    d = make_daemon("connect_delay_ms = 400\n")
    h = d.host()
    h.expect(b"\r\nready\r\n")
    h.command(b"ATE0")
    h.write(b'AT+CWJAP="bridged","pwd"\r\n')
    h.read_quiet(0.1, timeout=0.2)
    h.write(b"AT\r\n")
    assert h.expect(b"\r\nOK\r\n") == b"\r\nbusy p...\r\nWIFI CONNECTED\r\nWIFI GOT IP\r\n\r\nOK\r\n"
    assert h.command(b"AT") == b"\r\nOK\r\n"


def test_force_restart_while_busy(make_daemon):
    """AT+RST while a command runs forces a restart, as ESP-AT does."""
    d = make_daemon("connect_delay_ms = 1000\n")
    h = d.host()
    h.expect(b"\r\nready\r\n")
    h.command(b"ATE0")
    h.write(b'AT+CWJAP="bridged","pwd"\r\n')
    h.read_quiet(0.1, timeout=0.2)
    h.write(b"AT+RST\r\n")
    assert h.expect(b"\r\nready\r\n") == b"\r\nWill force to restart!!!\r\n\r\nready\r\n"
    assert h.command(b"AT") == b"AT\r\n\r\nOK\r\n"
    assert h.read_quiet(1.5) == b""  # the abandoned join (1 s) prints nothing


def _run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return forkserver.run(["run", "--state-dir", str(tmp_path / "s"), *args], timeout=20)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    """A config mistake: exit 2 and one line naming the file, the key and what is allowed."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[uart]\nparity = "odd2"\n')
    result = _run_cli(tmp_path, "--config", str(cfg), "--pty", str(tmp_path / "t"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(cfg) in lines[0] and "uart.parity" in lines[0] and "none, odd, even" in lines[0]


def test_cli_bad_args(tmp_path):
    """Bad arguments exit 2 without a traceback (a missing device is exit 1: tests/integration/test_startup.py)."""
    result = _run_cli(tmp_path, "--baud", "fast")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = _run_cli(tmp_path, "--baud", "12")
    assert result.returncode == 2 and "uart.baud" in result.stderr
    result = _run_cli(tmp_path, "--profile", "nosuchprofile")
    assert result.returncode == 2 and "nosuchprofile" in result.stderr


def test_cli_check_prints_the_effective_config_or_the_mistake(tmp_path):
    """`bridged check` loads the layers as `run` would and prints every key as
    TOML that loads back to the same configuration; secrets are never printed;
    a mistake exits 2 with the same one line as `run`; nothing is served."""
    cfg = tmp_path / "site.toml"
    cfg.write_text('profile = "fast"\n[wifi]\npassword = "hunter2hunter2"\nssid = "shop \\"floor\\""\n'
                   '[ota]\ntoken = "t0ken"\n')
    result = forkserver.run(["check", "--config", str(cfg), "--baud", "921600"], timeout=20)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "t0ken" not in result.stdout
    assert "# password: set (secret, not shown)" in result.stdout
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    again = load_config(printed)
    expected = load_config(cfg, overrides={"uart.baud": 921600})
    for section in ("uart", "links", "log", "state", "firmware"):
        assert getattr(again, section) == getattr(expected, section), section
    # Secrets come back empty; everything else as loaded.
    assert again.wifi == dataclasses.replace(expected.wifi, password="")
    assert again.ota == dataclasses.replace(expected.ota, token="")
    assert again.wifi.ssid == 'shop "floor"' and again.uart.baud == 921600
    assert again.uart.flow_control == "rtscts"  # the fast profile's

    cfg.write_text('[links]\nchunk = 0\n')
    result = forkserver.run(["check", "--config", str(cfg)], timeout=20)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"bridged: {cfg}: links.chunk: 0 is not allowed; "
                                                  "allowed: an integer from 1 to 65536"]
