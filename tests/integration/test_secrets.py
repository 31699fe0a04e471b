"""Secrets never reach a log: malformed AT lines carrying a password or a key,
a wrong Wi-Fi password, malformed secrets in the config (run, check, reload)."""

from __future__ import annotations

import signal

import pytest

from tests import forkserver
from tests.harness import Daemon, with_test_timing

_WIFI_KEY = "Wk7-right-SECRET"  # the configured Wi-Fi password
_SECRETS = ("Wk7", "SECRET", "9137735913")

# (line, the command its log event names): each answers ERROR.
_BAD_LINES = [
    (b'AT+CWJAP="bridged","Bad-SECRET-pw"', "+CWJAP"),  # the wrong password
    (b'AT+CWJAP="bridged","SECRET-pw",,,9137735913', "+CWJAP"),  # a number out of range
    (b'AT+CWJAP="bridged","SECRET-pw",,x9137735913', "+CWJAP"),  # not a number
    (b'AT+CWJAP="bridged",SECRET-unquoted', "+CWJAP"),
    (b'AT+CWJAP="bridged","SECRET-unterminated', "+CWJAP"),
    (b'AT+CWJAP="bridged","SECRET-pw"x', "+CWJAP"),  # bytes after a closing quote
    (b'AT+CWJAP="bridged","' + b"SECRET" * 20 + b'"', "+CWJAP"),  # too long
    (b'AT+CIPSSLCPSKHEX="SECRETnothex","hint"', "+CIPSSLCPSKHEX"),
    (b'AT+CIPSSLCPSKHEX=9137735913,"hint"', "+CIPSSLCPSKHEX"),
    (b'AT+CIPSSLCPSK="' + b"SECRET" * 10 + b'","hint"', "+CIPSSLCPSK"),  # over 32 bytes
    (b'AT+CIPSSLCPSK="SECRET-psk","hint",9137735913', "+CIPSSLCPSK"),  # too many parameters
    (b'AT+CWSAP="ap","SECRET-ap",5,3', "+CWSAP"),  # not emulated
]


def _assert_no_secret(text: str) -> None:
    for secret in _SECRETS:
        assert secret not in text, [line for line in text.splitlines() if secret in line]


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon(f'check_credentials = true\npassword = "{_WIFI_KEY}"\n')


def test_malformed_secret_carrying_lines_log_the_reason_not_the_secret(daemon):
    """Each bad CWJAP/CIPSSLCPSK(HEX)/CWSAP line is answered ERROR and logged with its command and why, never its parameters."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")
    for line, _ in _BAD_LINES:
        answer = host.ask(line)
        assert answer.endswith(b"\r\nERROR\r\n"), (line, answer)
    assert host.command(f'AT+CWJAP="bridged","{_WIFI_KEY}"'.encode()).endswith(b"WIFI GOT IP\r\n\r\nOK\r\n")
    host.command(b"AT")
    host.close()
    daemon.stop()
    _assert_no_secret(daemon.log_text())
    events = [e for e in daemon.events() if e.get("event") in ("command_error", "bad_line", "wifi_join_failed")]
    named = [e.get("command") for e in events if e["event"] != "wifi_join_failed"]
    assert named == [command for _, command in _BAD_LINES[1:]], events
    failed = daemon.events("wifi_join_failed")
    assert [e["why"] for e in failed] == ["wrong password"]
    assert all("value" not in e for e in events)


def test_an_ordinary_command_still_logs_the_value_it_refused(daemon):
    """AT+CIPMUX=x is logged with the value it refused: only secret-carrying commands hide theirs."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")
    assert host.ask(b"AT+CIPMUX=x7") == b"\r\nERROR\r\n"
    error = daemon.wait_event("command_error", command="+CIPMUX")[-1]
    assert error["value"] == "x7" and error["why"] == "parameter 1 is not a number"
    host.close()


def test_a_malformed_secret_in_the_config_is_never_shown(make_daemon, tmp_path):
    """run, check and a reload refuse a malformed password or token naming the key, never the value."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[ota]\ntoken = "SECRET-\u20ac-token"\n')
    for command in ("run", "check"):
        result = forkserver.run([command, "--config", str(bad), "--pty", str(tmp_path / "tty"),
                                 "--state-dir", str(tmp_path / "s")], timeout=30)
        assert result.returncode == 2, result
        assert "ota.token: the value given (secret, not shown) is not allowed" in result.stderr
        _assert_no_secret(result.stdout + result.stderr)
    daemon = make_daemon()
    daemon.expected_errors.add("reload_refused")
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    daemon.config_path.write_text(with_test_timing('[wifi]\nstation_interface = "lo"\npassword = "SECRET\\u0007"\n'))
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_event("reload_refused")[-1]
    assert "wifi.password: the value given (secret, not shown)" in refused["error"]
    daemon.config_path.write_text(with_test_timing(f'[wifi]\nstation_interface = "lo"\npassword = "{_WIFI_KEY}"\n'))
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("reloading")[-1]["changed"] == ["wifi.password"]
    host.expect(b"\r\nready\r\n")
    host.close()
    daemon.stop()
    _assert_no_secret(daemon.log_text())
