"""AT+CIUPDATE and AT+CIPFWVER? against a local update server speaking the
iot.espressif.cn protocol on 127.0.0.1, https with a test CA (``[ota] ca_file``)
and images signed with a test key (``[ota] public_key``): progress, restarts,
failures, the version list, the disk.  What a hostile or broken server gets is in
test_ota_server.py, install_command in test_ota_install_command.py, the policy
(signatures, versions, partitions, the resolver) in test_ota_policy.py."""

from __future__ import annotations

import time

import pytest

from tests.harness import Daemon, EchoServer
from tests.otaserver import (  # noqa: F401 - ota_files, server, shared_daemons and start are fixtures
    FAILED_DOWNLOAD,
    IMAGE,
    LATEST,
    PROGRESS,
    TOKEN,
    Shared,
    UpdateServer,
    image_dir,
    leftovers,
    ota_files,
    ota_section,
    server,
    shared_daemons,
    start,
    why,
)


def download(version: str, filename: str) -> str:
    return f"/v1/device/rom/?action=download_rom&version={version}&filename={filename}"


@pytest.fixture(scope="module")
def refusing(shared_daemons, ota_files):
    """One https daemon and server kept for the cases that fail (see Shared)."""
    server = UpdateServer(ota_files.key, ota_files.server_context())
    daemon, host = shared_daemons.start(server.url)
    yield Shared(daemon, host, server)
    server.close()


@pytest.fixture
def fresh(refusing):
    yield refusing.begin()
    refusing.end()


# -- blocking ------------------------------------------------------------------------------


def test_blocking_update_restarts_with_ready_and_closed_links(start, server):
    """AT+CIUPDATE: progress 1-4 then OK, the image saved whole, then the session restarts:
    links closed (the peer sees FIN), ready, the stored network joined again."""
    daemon, host = start(server.url)
    echo = EchoServer()
    try:
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo.port) == b"CONNECT\r\n\r\nOK\r\n"
        assert host.command(b"AT+CIUPDATE", timeout=20) == PROGRESS + b"\r\nOK\r\n"
        assert host.expect(b"\r\nready\r\n") == b"\r\nready\r\n"  # no CLOSED: a reboot says nothing
        assert echo.closed_by_peer.wait(5), "the link was not closed by the restart"
    finally:
        echo.close()
    host.expect(b"WIFI GOT IP\r\n")
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"  # echo is on again: a fresh session
    host.command(b"ATE0")
    assert host.ask(b"AT+CIPSTATUS") == b"STATUS:2\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:0\r\n\r\nOK\r\n"  # state is RAM: 0 after a restart
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE
    assert leftovers(daemon) == ["ota.bin", "ota.version"]
    assert (image_dir(daemon) / "ota.version").read_text() == f"{LATEST}\n"
    assert server.paths() == ["/v1/device/rom/?is_format_simple=true", download(LATEST, "ota.bin.sig"),
                              download(LATEST, "ota.bin")]
    assert all(h.get("Authorization") == f"token {TOKEN}" for _, h in server.requests)


def test_the_session_after_an_update_logs_no_update_command(start, server):
    """The restarted session's events (ready, the rejoin, a later AT+RST's boot) are not
    the update's: their log lines name no command."""
    daemon, host = start(server.url)
    assert host.command(b"AT+CIUPDATE", timeout=20) == PROGRESS + b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    host.expect(b"WIFI GOT IP\r\n")
    after = daemon.wait_event("ready", count=2)[-1]
    assert after.get("command") is None, after
    assert daemon.wait_event("wifi_joined", count=2)[-1].get("command") is None
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    booting = daemon.wait_event("booting", count=3)[-1]
    assert booting.get("command") is None, booting


def test_blocking_with_version_skips_the_lookup(start, server):
    """A version given: server found (1), then the download (4); no 2 and 3, as in at_ota_cmd.c."""
    daemon, host = start(server.url)
    assert host.command(b'AT+CIUPDATE=0,"v9.9.9.9"', timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:4\r\n\r\nOK\r\n")
    host.expect(b"\r\nready\r\n")
    assert (image_dir(daemon) / "ota.bin").read_bytes() == b"\xe9older"
    assert server.paths() == [download("v9.9.9.9", "ota.bin.sig"), download("v9.9.9.9", "ota.bin")]


def test_blocking_other_partition_does_not_restart(start, server):
    """Another partition is saved under its own name; OK and no restart (ESP-AT restarts only for ota)."""
    daemon, host = start(server.url)
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    assert host.read_quiet(0.3) == b""  # no ready
    assert (image_dir(daemon) / "client_ca.bin").read_bytes() == b"\xf1\xf1ca-bundle"
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:4\r\n\r\nOK\r\n"


@pytest.mark.parametrize(("mode", "reason"), [
    ("short", "the body ended after 100000 of 200000 bytes"),
    ("nolength", "the server sent no Content-Length"),
])
def test_blocking_bad_download_fails_and_keeps_nothing(fresh, mode, reason):
    """A short body or no Content-Length: the last progress line, ERROR, state -1, no file left."""
    fresh.server.mode = mode
    assert fresh.host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert reason in fresh.why()
    assert fresh.host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert leftovers(fresh.daemon) == []


def test_too_big_image_is_refused(start, server):
    """An image over [ota] max_size is refused before a byte is written."""
    daemon, host = start(server.url, "max_size = 199999\n")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "200000 bytes is over [ota] max_size 199999" in why(daemon)
    assert leftovers(daemon) == []


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status_fails(fresh, status):
    """HTTP 404/500 for the version lookup or the image: ERROR."""
    fresh.server.status["/v1/device/rom/"] = status
    assert fresh.host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n\r\nERROR\r\n"
    assert f"HTTP status {status}" in fresh.why()
    assert fresh.host.ask(b'AT+CIUPDATE=0,"v0.0.0.1"', timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert leftovers(fresh.daemon) == []


def test_unknown_version_is_404(fresh):
    """A version the server does not have (nor its signature): its 404 ends the update."""
    assert fresh.host.ask(b'AT+CIUPDATE=0,"v0.0.0.1"', timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "HTTP status 404" in fresh.why()
    assert leftovers(fresh.daemon) == []


def test_server_down_fails(start):
    """Nothing listens at the server's port: server found (1), the connection is refused, ERROR."""
    daemon, host = start("https://127.0.0.1:9")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "cannot connect to 127.0.0.1 port 9" in why(daemon)
    assert host.ask(b"AT+CIPFWVER?", timeout=20) == b"\r\nERROR\r\n"


def test_not_configured_answers_error(start):
    """No [ota] server: blocking AT+CIUPDATE and AT+CIPFWVER? answer ERROR and the log says why;
    the query still works."""
    daemon, host = start("")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no update server is configured" in why(daemon)
    assert host.ask(b'AT+CIUPDATE=1,"v1",,0') == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert len([e for e in daemon.events("command_error") if "no update server" in e["why"]]) == 3
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:0\r\n\r\nOK\r\n"


def test_not_configured_nonblocking_says_ok_then_minus_one(start):
    """No [ota] server, nonblocking: OK, then +CIPUPDATE:-1 on its own, as ESP-AT ends an
    update that cannot start; the log says why, the query shows -1, nothing restarts."""
    daemon, host = start("")
    assert host.ask(b'AT+CIUPDATE=1,"v1",,1') == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:-1\r\n") == b"+CIPUPDATE:-1\r\n"
    assert "no update server is configured" in daemon.wait_event("ota_failed")[-1]["why"]
    assert host.read_quiet(0.3) == b""  # no ready
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"  # not "already in OTA"
    assert host.expect(b"+CIPUPDATE:-1\r\n") == b"+CIPUPDATE:-1\r\n"
    assert not daemon.events("command_error")
    assert leftovers(daemon) == []


def test_not_joined_answers_error(start, server):
    """Without Wi-Fi (AT+CWQAP) there is no network to update from: blocking, ERROR;
    nonblocking, OK and +CIPUPDATE:-1."""
    daemon, host = start(server.url)
    host.ask(b"AT+CWQAP")
    host.expect(b"WIFI DISCONNECT\r\n")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no ip" in why(daemon)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:-1\r\n") == b"+CIPUPDATE:-1\r\n"
    assert "no ip" in daemon.wait_event("ota_failed")[-1]["why"]
    assert server.requests == []


@pytest.mark.parametrize("line", [
    b"AT+CIUPDATE=2",                       # mode 0 or 1
    b"AT+CIUPDATE=-1",
    b'AT+CIUPDATE="0"',                     # a number, not a string
    b"AT+CIUPDATE=0,1",                     # version is a string
    b'AT+CIUPDATE=0,"' + b"v" * 65 + b'"',  # version at most 64
    b'AT+CIUPDATE=0,,"' + b"p" * 65 + b'"',  # partition at most 64
    b'AT+CIUPDATE=0,,"../nvs"',             # partition names become file names
    b"AT+CIUPDATE=0,,,2",                   # nonblocking 0 or 1
    b"AT+CIUPDATE=0,,,1,0",                 # too many
    b"AT+CIUPDATE=",
    b"AT+CIUPDATE=?",
    b"AT+CIPFWVER",
    b"AT+CIPFWVER=1",
])
def test_bad_parameters_answer_error(fresh, line):
    """Bad parameters or a missing form: ERROR at once, nothing requested."""
    assert fresh.host.ask(line) == b"\r\nERROR\r\n"
    assert fresh.server.requests == []


def test_longest_version_and_partition_accepted(start, server):
    """64 bytes each are allowed (ESP_AT_VERSION_LEN_MAX, ESP_AT_PARTITION_NAME_LEN_MAX)."""
    version, partition = "v" * 64, "p" * 64
    daemon, host = start(server.url, partitions=("ota", partition))
    line = f'AT+CIUPDATE=0,"{version}","{partition}"'.encode()
    assert host.ask(line, timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"  # the server has no such image
    assert server.paths() == [download(version, f"{partition}.bin.sig")]


# -- nonblocking ---------------------------------------------------------------------------


def test_nonblocking_update(start, server):
    """OK at once, then progress 1-4 as unsolicited lines; no restart; commands work meanwhile."""
    daemon, host = start(server.url)
    out = host.ask(b"AT+CIUPDATE=0,,,1")
    assert out == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == PROGRESS
    assert host.read_quiet(0.3) == b""  # no ready: the MCU restarts by itself
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:4\r\n\r\nOK\r\n"
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE


def test_nonblocking_failure_ends_with_minus_one(fresh):
    """A failed nonblocking update: OK, the progress so far, then +CIPUPDATE:-1; no file left."""
    fresh.server.mode = "short"
    assert fresh.host.ask(b"AT+CIUPDATE=1,,,1") == b"\r\nOK\r\n"
    assert fresh.host.expect(b"+CIPUPDATE:-1\r\n", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n+CIPUPDATE:-1\r\n")
    assert "the body ended after" in fresh.event("ota_failed")["why"]
    assert fresh.host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert leftovers(fresh.daemon) == []


def test_second_update_while_one_runs_is_refused(start, server):
    """While a nonblocking update downloads: the query shows 3, any new update is ERROR,
    other commands answer; once the download ends, 4."""
    server.mode = "stall"
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert server.stalled.wait(10)
    assert host.expect(b"+CIPUPDATE:3\r\n", timeout=10).endswith(b"+CIPUPDATE:3\r\n")
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:3\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nERROR\r\n"
    assert "ALREADY IN OTA" in why(daemon)
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert list(image_dir(daemon).glob("ota.bin")) == []  # only the temporary file so far
    server.release.set()
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == b"+CIPUPDATE:4\r\n"
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE


def test_restart_abandons_a_running_update(start, server):
    """AT+RST during a nonblocking download cancels it: no file kept, no late progress line."""
    server.mode = "stall"
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert server.stalled.wait(10)
    host.expect(b"+CIPUPDATE:3\r\n", timeout=10)
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    host.expect(b"WIFI GOT IP\r\n")
    server.release.set()
    assert b"CIPUPDATE" not in host.read_quiet(0.5)
    assert leftovers(daemon) == []


def test_blocking_update_refuses_input_with_busy(start, server):
    """While a blocking update runs, input gets busy p... (the answer is unchanged)."""
    server.mode = "stall"
    daemon, host = start(server.url)
    host.write(b"AT+CIUPDATE\r\n")
    assert server.stalled.wait(10)
    host.expect(b"+CIPUPDATE:3\r\n", timeout=10)
    host.write(b"AT\r\n")
    assert host.expect(b"\r\nbusy p...\r\n", timeout=5) == b"\r\nbusy p...\r\n"
    server.release.set()
    assert host.expect(b"\r\nOK\r\n", timeout=20) == b"+CIPUPDATE:4\r\n\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")


def test_overall_timer_fails_the_update(start, server):
    """[ota] timeout_ms (ESP-AT: 3 minutes) ends a stalled download: ERROR, no file left."""
    server.mode = "stall"
    daemon, host = start(server.url, "timeout_ms = 1500\n")
    began = time.monotonic()
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert 1.4 < time.monotonic() - began < 8
    assert "longer than 1.5 s" in why(daemon)
    assert leftovers(daemon) == []


# -- AT+CIPFWVER? ---------------------------------------------------------------------------


def test_cipfwver_lists_the_server_versions(start, server):
    """One +CIPFWVER:"<v>" line per version, then OK; the token is sent."""
    daemon, host = start(server.url + "/")
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert server.requests == [("/v1/device/rom", server.requests[0][1])]
    assert server.requests[0][1]["Authorization"] == f"token {TOKEN}"


@pytest.mark.parametrize("status", [404, 500])
def test_cipfwver_http_error(fresh, status):
    """HTTP status >= 400: ERROR."""
    fresh.server.status["/v1/device/rom"] = status
    assert fresh.host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert f"HTTP status {status}" in fresh.why()


def test_server_path_prefix(start, server):
    """A base URL with a path: requests go below it."""
    daemon, host = start(server.url + "/esp")
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert server.requests[0][0] == "/esp/v1/device/rom"


def test_host_name_resolves(start, ota_files):
    """A host name in the base URL resolves through the host's resolver; the certificate names it."""
    named = UpdateServer(ota_files.key, ota_files.server_context("localhost"), url_host="localhost")
    try:
        daemon, host = start(named.url)
        assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
        assert named.requests[0][1]["Host"] == f"localhost:{named.port}"
    finally:
        named.close()


def test_unknown_host_name_fails(start):
    """A name with no address: ERROR before "server found"."""
    daemon, host = start("https://no-such-host.invalid:8080")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"\r\nERROR\r\n"
    assert "no-such-host.invalid" in why(daemon)


def test_ipv6_server(start, ota_files):
    """The admin's server may be IPv6 whatever AT+CIPV6 says (it is not the MCU's address);
    plain http and unsigned here, as [ota] insecure_http and allow_unsigned allow."""
    try:
        v6 = UpdateServer(ota_files.key, host="::1")
    except OSError:
        pytest.skip("no ::1 on this machine")
    try:
        daemon, host = start(v6.url, secure=False)
        assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
        assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == PROGRESS
        assert v6.requests[0][1]["Host"] == f"[::1]:{v6.port}"
    finally:
        v6.close()


def test_no_rom_version_fails(fresh):
    """A version answer without "rom_version": the lookup fails after 2."""
    fresh.server.status["/v1/device/rom/"] = 204
    assert fresh.host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n\r\nERROR\r\n"
    assert 'no "rom_version"' in fresh.why()


# -- the disk --------------------------------------------------------------------------------


def test_image_directory_not_writable_fails_cleanly(start, server):
    """<state dir>/ota cannot be made (here a file is in the way): ERROR and why, not a crash."""
    daemon, host = start(server.url)
    image_dir(daemon).write_bytes(b"in the way")
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9"', timeout=20) == FAILED_DOWNLOAD
    assert "cannot write in" in why(daemon)
    assert image_dir(daemon).read_bytes() == b"in the way"


def test_disk_full_fails_cleanly_and_keeps_the_previous_image(tmp_path, server, ota_files):
    """A write error mid-download (RLIMIT_FSIZE stands in for a full disk): ERROR and why,
    no temporary file, the previous image of that partition untouched."""
    daemon = Daemon(tmp_path, ota_section(ota_files, server.url), wrap=("prlimit", "--fsize=150000", "--"))
    (daemon.state_dir / "ota").mkdir(parents=True)
    (daemon.state_dir / "ota" / "ota.bin").write_bytes(b"good")
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
        assert host.expect(b"+CIPUPDATE:-1\r\n", timeout=20).endswith(b"+CIPUPDATE:3\r\n+CIPUPDATE:-1\r\n")
        assert "cannot write" in daemon.wait_event("ota_failed")[-1]["why"]
        assert leftovers(daemon) == ["ota.bin"]
        assert (image_dir(daemon) / "ota.bin").read_bytes() == b"good"
        assert daemon.events("ota_crashed") == []
    finally:
        host.close()
        assert daemon.stop() == 0
