"""AT+CIUPDATE and AT+CIPFWVER? against a local update server speaking the
iot.espressif.cn protocol on 127.0.0.1: https with a test CA (``[ota] ca_file``)
and images signed with a test key (``[ota] public_key``); raw servers answering
odd bytes over plain http with unsigned images (``insecure_http``,
``allow_unsigned``).  The policy itself (signatures, versions, partitions, the
resolver, capabilities) is tested in test_ota_policy.py."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import Daemon, EchoServer
from tests.otaserver import (  # noqa: F401 - ota_files, server, shared_daemons and start are fixtures
    IMAGE,
    LATEST,
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

PROGRESS = b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n+CIPUPDATE:4\r\n"


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
def test_blocking_bad_download_fails_and_keeps_nothing(start, server, mode, reason):
    """A short body or no Content-Length: the last progress line, ERROR, state -1, no file left."""
    server.mode = mode
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert reason in why(daemon)
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert leftovers(daemon) == []


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


def test_unknown_version_is_404(start, server):
    """A version the server does not have (nor its signature): its 404 ends the update."""
    daemon, host = start(server.url)
    assert host.ask(b'AT+CIUPDATE=0,"v0.0.0.1"', timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "HTTP status 404" in why(daemon)
    assert leftovers(daemon) == []


def test_server_down_fails(start):
    """Nothing listens at the server's port: server found (1), the connection is refused, ERROR."""
    daemon, host = start("https://127.0.0.1:9")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "cannot connect to 127.0.0.1 port 9" in why(daemon)
    assert host.ask(b"AT+CIPFWVER?", timeout=20) == b"\r\nERROR\r\n"


def test_not_configured_answers_error(start):
    """No [ota] server: both commands answer ERROR and the log says why; the query still works."""
    daemon, host = start("")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no update server is configured" in why(daemon)
    assert host.ask(b'AT+CIUPDATE=1,"v1",,1') == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert len([e for e in daemon.events("command_error") if "no update server" in e["why"]]) == 3
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:0\r\n\r\nOK\r\n"


def test_not_joined_answers_error(start, server):
    """Without Wi-Fi (AT+CWQAP) there is no network to update from."""
    daemon, host = start(server.url)
    host.ask(b"AT+CWQAP")
    host.expect(b"WIFI DISCONNECT\r\n")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no ip" in why(daemon)
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


def test_nonblocking_failure_ends_with_minus_one(start, server):
    """A failed nonblocking update: OK, the progress so far, then +CIPUPDATE:-1; no file left."""
    server.mode = "short"
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE=1,,,1") == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:-1\r\n", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n+CIPUPDATE:-1\r\n")
    assert "the body ended after" in daemon.wait_event("ota_failed")[-1]["why"]
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert leftovers(daemon) == []


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


# -- install_command -----------------------------------------------------------------------


def _installer(tmp_path: Path, status: int) -> str:
    script = tmp_path / f"install-{status}.sh"
    script.write_text(f'#!/bin/sh\ncp "$1" "{tmp_path}/installed.bin"\n'
                      f'echo "$BRIDGED_OTA_VERSION $BRIDGED_OTA_PARTITION $BRIDGED_OTA_SHA256"'
                      f' > "{tmp_path}/installed.txt"\n'
                      f'echo installing; exit {status}\n')
    return f'install_command = "/bin/sh {script}"\n'


def test_install_command_runs_before_the_restart(start, server, tmp_path):
    """The install command gets the image's path (and version, partition, sha256); then OK and ready."""
    daemon, host = start(server.url, _installer(tmp_path, 0))
    assert host.command(b"AT+CIUPDATE", timeout=20) == PROGRESS + b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert (tmp_path / "installed.bin").read_bytes() == IMAGE
    assert (tmp_path / "installed.txt").read_text() == f"{LATEST} ota {hashlib.sha256(IMAGE).hexdigest()}\n"
    assert daemon.wait_event("ota_installed")[-1]["output"] == "installing"


def test_install_command_failure_fails_the_update(start, server, tmp_path):
    """A non-zero exit: no +CIPUPDATE:4, ERROR, no restart, the image removed."""
    daemon, host = start(server.url, _installer(tmp_path, 3))
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "install_command exited with status 3: installing" in why(daemon)
    assert host.read_quiet(0.3) == b""
    assert leftovers(daemon) == []
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"


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


def test_no_rom_version_fails(start, server):
    """A version answer without "rom_version": the lookup fails after 2."""
    daemon, host = start(server.url)
    server.status["/v1/device/rom/"] = 204
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n\r\nERROR\r\n"
    assert 'no "rom_version"' in why(daemon)


# -- https -----------------------------------------------------------------------------------


def test_https_trusts_the_ca_file(start, server):
    """An https server whose CA is [ota] ca_file: version list and update work."""
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert host.command(b"AT+CIUPDATE=1", timeout=20) == PROGRESS + b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE


def test_https_does_not_trust_the_mcus_certificate_store(start, server, ota_files):
    """The CA only in bridged's client_ca.0 (which the MCU's SSL links use), no [ota] ca_file:
    the system store does not know it, so ERROR and nothing downloaded."""
    daemon, host = start(server.url, ca=ota_files.ca, ca_file="")
    assert host.ask(b"AT+CIUPDATE=1", timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in why(daemon)
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert server.requests == []
    assert leftovers(daemon) == []


# -- a hostile or broken update server -------------------------------------------------------


class RawServer:
    """Answers every request with ``answer`` (bytes, or a callable given the socket), then closes."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    more = conn.recv(4096)
                    if not more:
                        return
                    head += more
                self.requests.append(head)
                if callable(self.answer):
                    self.answer(conn, self.done)
                else:
                    conn.sendall(self.answer)
            except OSError:
                pass

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def raw_refusing(shared_daemons):
    """One plain http daemon kept for the broken answers, its RawServer's answer set per case."""
    server = RawServer(b"")
    daemon, host = shared_daemons.start(server.url, secure=False)
    yield Shared(daemon, host, server)
    server.close()


@pytest.fixture
def raw_fresh(raw_refusing):
    yield raw_refusing.begin()
    raw_refusing.end()


@pytest.fixture
def raw():
    servers: list[RawServer] = []

    def make(answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


FAILED_DOWNLOAD = b"+CIPUPDATE:1\r\n\r\nERROR\r\n"  # a version given: 1, then the download fails


@pytest.mark.parametrize(("answer", "reason"), [
    # str.isdigit() says yes to these, int() does not: the update crashed (an internal error)
    (b"HTTP/1.0 200 OK\r\nContent-Length: \xb2\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 \xb2\xb2\xb2 OK\r\nContent-Length: 1\r\n\r\nx", "not an HTTP status line"),
    # int() refuses more than 4300 digits
    (b"HTTP/1.0 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: -1\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "conflicting Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 50\r\n\r\nshort", "the body ended after 5 of 50 bytes"),
    # chunked despite HTTP/1.0: the framing would have become the image
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "Transfer-Encoding"),
    # a 1xx is not success: its body would have become the image
    (b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\nhello", "HTTP status 199"),
    (b"HTTP/1.0 302 Found\r\nLocation: http://127.0.0.2/\r\nContent-Length: 0\r\n\r\n", "HTTP status 302"),
    (b"HTTP/1.0 200 OK\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n", "headers longer than"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP status line"),
])
def test_broken_server_answers_fail_cleanly(raw_fresh, answer, reason):
    """Odd or lying answers to the download: ERROR, a reason in the log, no file, no internal error."""
    raw_fresh.server.answer = answer
    assert raw_fresh.host.ask(b'AT+CIUPDATE=0,"v1"', timeout=20) == FAILED_DOWNLOAD
    assert reason in raw_fresh.why()
    assert leftovers(raw_fresh.daemon) == []
    assert raw_fresh.host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"


def test_longer_body_than_content_length_keeps_only_the_declared_bytes(start, raw):
    """A body longer than its Content-Length: the declared bytes are the image."""
    server = raw(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello and more")
    daemon, host = start(server.url, secure=False, partitions=("ota", "part"))
    assert host.ask(b'AT+CIUPDATE=0,"v1","part"', timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:4\r\n\r\nOK\r\n"
    assert (image_dir(daemon) / "part.bin").read_bytes() == b"hello"


def test_slow_loris_body_is_ended_by_the_overall_timer(start, raw):
    """One byte a second of a large body: [ota] timeout_ms still ends the update."""
    def trickle(conn, done):
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not done.wait(0.5):
            conn.sendall(b"x")

    server = raw(trickle)
    daemon, host = start(server.url, "timeout_ms = 1500\n", secure=False)
    began = time.monotonic()
    assert host.ask(b'AT+CIUPDATE=0,"v1"', timeout=20) == FAILED_DOWNLOAD
    assert time.monotonic() - began < 8
    assert "longer than 1.5 s" in why(daemon)
    assert leftovers(daemon) == []


def test_cipfwver_odd_version_strings_never_reach_the_uart_raw(start, raw):
    """Quotes end a version, one with a control character or CR LF is skipped: no line break
    or fake OK reaches the MCU."""
    body = (b'{"productRoms": [{"version": "v1\\"x"}, {"version": "a\r\nOK\r\n"}, {"version": "b\x07"},'
            b' {"version": "v4.1.0.0"}]}')
    server = raw(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    daemon, host = start(server.url, secure=False)
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v1\\"\r\n+CIPFWVER:"v4.1.0.0"\r\n\r\nOK\r\n'


def test_cipfwver_many_versions_all_arrive(start, raw):
    """Thousands of versions (the body is capped at 64 KiB): every line, then OK."""
    body = b'{"productRoms": [' + b",".join(b'{"version": "v%d"}' % i for i in range(3000)) + b"]}"
    assert len(body) < 65536
    server = raw(b"HTTP/1.0 200 OK\r\n\r\n" + body)  # no Content-Length: to the close
    daemon, host = start(server.url, secure=False)
    out = host.ask(b"AT+CIPFWVER?", timeout=30)
    assert out == b"".join(b'+CIPFWVER:"v%d"\r\n' % i for i in range(3000)) + b"\r\nOK\r\n"


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


# -- install_command: what it gets, and that nothing of it outlives the update --------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _wait_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.02)
    return path.read_text()


def _hanging_installer(tmp_path: Path) -> str:
    """Starts a child and hangs; both pids go to pids.txt."""
    script = tmp_path / "hang.sh"
    script.write_text(f'#!/bin/sh\nsleep 300 &\necho "$$ $!" > "{tmp_path}/pids.txt"\nsleep 300\n')
    return f'install_command = "/bin/sh {script}"\n'


def test_install_command_gets_no_fd_of_ours_and_the_image_dir_as_cwd(start, server, tmp_path):
    """Only stdin, stdout and stderr reach the command (not the serial port, rings or the
    supervisor socket: uvloop ignores close_fds); its cwd is the image directory."""
    script = tmp_path / "fds.py"
    script.write_text(
        "import os, json\n"
        "fds = {}\n"
        "for n in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        fds[n] = os.readlink(f'/proc/self/fd/{n}')\n"
        "    except OSError:\n"
        "        pass  # the listing's own, closed by now\n"
        f"open({str(tmp_path / 'fds.json')!r}, 'w').write(json.dumps({{'fds': fds, 'cwd': os.getcwd()}}))\n")
    daemon, host = start(server.url, f'install_command = "{sys.executable} {script}"\n')
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    seen = json.loads((tmp_path / "fds.json").read_text())
    extra = {fd: target for fd, target in seen["fds"].items()
             if int(fd) > 2}
    assert extra == {}
    assert seen["cwd"] == str(image_dir(daemon))


def test_install_command_hanging_past_the_timer_is_killed_with_its_children(start, server, tmp_path):
    """The overall timer kills the command and what it started; ERROR, no image left."""
    daemon, host = start(server.url, "timeout_ms = 3000\n" + _hanging_installer(tmp_path))
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9"', timeout=20) == FAILED_DOWNLOAD
    assert "longer than 3 s" in why(daemon)
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []


def test_restart_kills_a_running_install_command(start, server, tmp_path):
    """AT+RST during a nonblocking update's install: the command and its child die, no image kept."""
    daemon, host = start(server.url, _hanging_installer(tmp_path))
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:1\r\n")
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []
    host.expect(b"WIFI GOT IP\r\n")
    host.command(b"ATE0")  # a fresh session echoes again
    # and a new update can start at once
    (tmp_path / "pids.txt").unlink()
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:1\r\n")
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:1\r\n\r\nOK\r\n"
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    assert _wait_gone(pids) == []


def test_stop_during_an_install_leaves_no_process_and_no_file(tmp_path, server, ota_files):
    """SIGTERM to bridged while install_command runs: the command and its child die, the
    image is removed, bridged exits 0."""
    daemon = Daemon(tmp_path, ota_section(ota_files, server.url) + _hanging_installer(tmp_path))
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
        host.expect(b"+CIPUPDATE:1\r\n")
        pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    finally:
        host.close()
        assert daemon.stop() == 0
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []


def test_stop_during_a_download_leaves_no_temporary_file(tmp_path, server, ota_files):
    """SIGTERM to bridged mid-download: no .part file left."""
    server.mode = "stall"
    daemon = Daemon(tmp_path, ota_section(ota_files, server.url))
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
        assert server.stalled.wait(10)
        host.expect(b"+CIPUPDATE:3\r\n", timeout=10)
        deadline = time.monotonic() + 10
        while len(leftovers(daemon)) != 1:  # the temporary file
            assert time.monotonic() < deadline, leftovers(daemon)
            time.sleep(0.02)
    finally:
        host.close()
        assert daemon.stop() == 0
    assert leftovers(daemon) == []


def test_install_failure_keeps_the_previous_image(start, server, tmp_path):
    """A failed install of a partition restores the image its last update left."""
    daemon, host = start(server.url, _installer(tmp_path, 3))
    image_dir(daemon).mkdir()
    (image_dir(daemon) / "ota.bin").write_bytes(b"good")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert (tmp_path / "installed.bin").read_bytes() == IMAGE  # it ran on the new image, then failed
    assert (image_dir(daemon) / "ota.bin").read_bytes() == b"good"
    assert leftovers(daemon) == ["ota.bin"]


def test_install_command_leaving_a_job_behind_does_not_hang_the_update(start, server, tmp_path):
    """A command that schedules something in the background (holding its stdout) and exits 0:
    the update succeeds at once, the job is left alone."""
    script = tmp_path / "later.sh"
    script.write_text(f'#!/bin/sh\nsleep 30 &\necho "$!" > "{tmp_path}/job.txt"\necho scheduled\n')
    daemon, host = start(server.url, f'timeout_ms = 10000\ninstall_command = "/bin/sh {script}"\n')
    began = time.monotonic()
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    assert time.monotonic() - began < 5
    job = int(_wait_file(tmp_path / "job.txt"))
    try:
        assert _alive(job)
        assert daemon.wait_event("ota_installed")[-1]["output"] == "scheduled"
    finally:
        os.kill(job, 9)


def test_missing_install_program_fails_cleanly(start, server):
    daemon, host = start(server.url, 'install_command = "/nonexistent/installer --now"\n')
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "install_command '/nonexistent/installer'" in why(daemon)
    assert leftovers(daemon) == []


# -- TLS verifies the host name ------------------------------------------------------------


def test_https_host_name_must_match_the_certificate(start, server):
    """A trusted CA is not enough: the certificate names 127.0.0.1, not localhost (the log says so)."""
    daemon, host = start(server.url.replace("127.0.0.1", "localhost"))
    assert host.ask(b"AT+CIPFWVER?", timeout=20) == b"\r\nERROR\r\n"
    assert "CERTIFICATE_VERIFY_FAILED: Hostname mismatch" in why(daemon)
    assert server.requests == []
