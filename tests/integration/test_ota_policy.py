"""What [ota] allows, whatever the MCU (or the network) says: the update server is
resolved by the host's resolver only, https only, images signed over their
version and partition, no downgrade, configured partitions, safe version strings,
and an install_command with no capabilities and none of the service's
environment.  Every refusal is ERROR (or +CIPUPDATE:-1) for the MCU and an
``ota_refused`` warning with the reason in the log; the token never is."""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import pytest

from tests.dnsserver import serving
from tests.harness import Daemon
from tests.otaserver import (  # noqa: F401 - ota_files, server, shared_daemons and start are fixtures
    IMAGE,
    LATEST,
    PROGRESS,
    TOKEN,
    Shared,
    UpdateServer,
    image_dir,
    leftovers,
    ota_files,
    server,
    shared_daemons,
    signature_for,
    start,
    why,
)

AFTER_LOOKUP = b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n"  # refused once the version is known
FAKE_DNS = "127.0.0.211"  # the MCU's nameserver (tests/dnsserver.py, port 53)
ATTACKER = "127.0.0.212"


def refusal(daemon: Daemon) -> str:
    """The reason of the last ota_refused warning (each refusal logs one)."""
    return daemon.wait_event("ota_refused")[-1]["why"]


def _installer(tmp_path: Path) -> str:
    """An install_command that leaves a mark, installed(daemon), when it runs."""
    script = tmp_path / "install.sh"
    script.write_text('#!/bin/sh\necho ran > ../installed\n')  # its cwd: <state dir>/ota
    return f'install_command = "/bin/sh {script}"\n'


def installed(daemon: Daemon) -> Path:
    return daemon.state_dir / "installed"


def _other_image(image: bytes) -> bytes:
    """``image`` with its last byte flipped, never ``image`` itself (a fixed b"x" was, 1 run in 256)."""
    return image[:-1] + bytes([image[-1] ^ 0xFF])


@pytest.fixture(scope="module")
def refusing(shared_daemons, ota_files, tmp_path_factory):
    """One https daemon (with _installer) and server kept for the cases that are refused."""
    server = UpdateServer(ota_files.key, ota_files.server_context())
    daemon, host = shared_daemons.start(server.url, _installer(tmp_path_factory.mktemp("installer")))
    yield Shared(daemon, host, server)
    server.close()


@pytest.fixture
def fresh(refusing):
    # A case whose update wrongly succeeded left install_command's mark and a version record.
    installed(refusing.daemon).unlink(missing_ok=True)
    (image_dir(refusing.daemon) / "ota.version").unlink(missing_ok=True)
    yield refusing.begin()
    refusing.end()


class Listener:
    """A TCP port that records who connects, and closes at once."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.create_server((address, port))
        self.sock.settimeout(0.05)
        self.accepted: list[tuple] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(peer)
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


# -- the MCU cannot redirect the update ---------------------------------------------------


def test_mcu_dns_servers_never_resolve_the_update_server(start, ota_files):
    """AT+CIPDNS points at a nameserver that answers the update server's name (localhost) with
    an attacker's address: the MCU's own lookups follow it, but the update asks the host's
    resolver only; the fake nameserver gets no query and the attacker no connection."""
    real = UpdateServer(ota_files.key, ota_files.server_context("localhost"), url_host="localhost")
    try:
        attacker = Listener(ATTACKER, real.port)
    except OSError as exc:
        real.close()
        pytest.skip(f"cannot listen on {ATTACKER}:{real.port}: {exc}")
    try:
        with serving(FAKE_DNS, {"localhost": [ATTACKER]}) as dns:
            daemon, host = start(real.url)
            assert host.ask(b'AT+CIPDNS=1,"%s"' % FAKE_DNS.encode()) == b"\r\nOK\r\n"
            assert host.ask(b'AT+CIPDOMAIN="localhost"') == b'+CIPDOMAIN:"%s"\r\n\r\nOK\r\n' % ATTACKER.encode()
            dns.queries.clear()
            assert host.ask(b"AT+CIPFWVER?", timeout=20).endswith(b"\r\nOK\r\n")
            assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
            assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == PROGRESS
            assert dns.queries == []
        assert attacker.accepted == []
        assert all(h["Authorization"] == f"token {TOKEN}" for _, h in real.requests)
        assert len(real.requests) == 4  # versions, latest, signature, image
        assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE
    finally:
        attacker.close()
        real.close()


# -- https only -------------------------------------------------------------------------


def test_plain_http_is_refused_without_insecure_http(start, ota_files):
    """An http:// server: both commands answer ERROR at once, nothing (no token) is sent."""
    plain = UpdateServer(ota_files.key)
    try:
        daemon, host = start(plain.url)
        assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
        assert "plain http is refused" in refusal(daemon)
        assert host.ask(b'AT+CIUPDATE=0,"v4.1.2.0",,1') == b"\r\nERROR\r\n"
        assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
        assert "insecure_http" in why(daemon)
        assert plain.requests == []
    finally:
        plain.close()


def test_plain_http_with_insecure_http_still_needs_a_signature(start, ota_files):
    """insecure_http = true lets http through; the image must still be signed."""
    plain = UpdateServer(ota_files.key)
    try:
        daemon, host = start(plain.url, "insecure_http = true\n")
        assert host.ask(b'AT+CIUPDATE=0,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
        plain.signatures[(LATEST, "ota")] = None
        assert host.ask(b"AT+CIUPDATE", timeout=20) == AFTER_LOOKUP
        assert "no signature" in refusal(daemon)
    finally:
        plain.close()


# -- signatures ---------------------------------------------------------------------------


def test_signed_image_is_installed(start, server, tmp_path):
    """A signature by the configured key over this partition, version and image: installed."""
    daemon, host = start(server.url, _installer(tmp_path))
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == PROGRESS
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE
    assert installed(daemon).exists()
    assert daemon.wait_event("ota_signature_verified")[-1]["version"] == LATEST


def _refused_before_install(daemon, host) -> None:
    """The update fails after the lookup; the previous image stays, nothing was installed."""
    assert host.ask(b"AT+CIUPDATE", timeout=20) == AFTER_LOOKUP
    assert not installed(daemon).exists()
    assert (image_dir(daemon) / "ota.bin").read_bytes() == b"previous"
    assert leftovers(daemon) == ["ota.bin"]


def _previous_image(daemon: Daemon) -> None:
    image_dir(daemon).mkdir(exist_ok=True)
    (image_dir(daemon) / "ota.bin").write_bytes(b"previous")


def test_unsigned_image_is_refused(fresh):
    """No <partition>.bin.sig on the server (404): refused, the previous image kept."""
    fresh.server.signatures[(LATEST, "ota")] = None
    _previous_image(fresh.daemon)
    _refused_before_install(fresh.daemon, fresh.host)
    assert "no signature" in fresh.refusal()
    assert fresh.server.paths()[-1].endswith("filename=ota.bin.sig")  # the image itself not even fetched


def test_unsigned_image_is_installed_with_allow_unsigned(start, server, tmp_path):
    """allow_unsigned = true: an image without a signature is installed, with a warning."""
    server.signatures[(LATEST, "ota")] = None
    daemon, host = start(server.url, _installer(tmp_path) + "allow_unsigned = true\n")
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == PROGRESS
    assert daemon.wait_event("ota_unsigned_image")[-1]["level"] == "warning"
    assert installed(daemon).exists()


def test_allow_unsigned_still_refuses_a_bad_signature(start, server, tmp_path, ota_files):
    """A signature that is there must verify, even when unsigned images are allowed."""
    server.signatures[(LATEST, "ota")] = signature_for(ota_files.other, IMAGE, LATEST, "ota")
    daemon, host = start(server.url, _installer(tmp_path) + "allow_unsigned = true\n")
    _previous_image(daemon)
    _refused_before_install(daemon, host)
    assert "no public key verifies the signature" in refusal(daemon)


@pytest.mark.parametrize("case", ["other key", "other version", "other partition", "other image", "garbage"])
def test_wrong_signature_is_refused(fresh, ota_files, case):
    """Signed by a key not configured, or for another version, partition or image, or not a
    signature at all: refused before the rename and before install_command."""
    signature = {
        "other key": signature_for(ota_files.other, IMAGE, LATEST, "ota"),
        "other version": signature_for(ota_files.key, IMAGE, "v4.1.1.0", "ota"),
        "other partition": signature_for(ota_files.key, IMAGE, LATEST, "client_ca"),
        "other image": signature_for(ota_files.key, _other_image(IMAGE), LATEST, "ota"),
        "garbage": b"not a signature\n",
    }[case]
    fresh.server.signatures[(LATEST, "ota")] = signature
    _previous_image(fresh.daemon)
    _refused_before_install(fresh.daemon, fresh.host)
    assert ("not one line of base64" if case == "garbage" else "no public key verifies") in fresh.refusal()


def test_the_other_image_is_never_the_served_one():
    """The "other image" case's signed bytes differ from the served image whatever its random
    last byte (b"x" in place of it once equalled it: a good signature, the update accepted)."""
    for last in range(256):
        image = IMAGE[:-1] + bytes([last])
        assert _other_image(image) != image


def test_any_configured_key_verifies(start, server, ota_files):
    """Several public keys (a key rotation): a signature by any of them is good."""
    daemon, host = start(server.url, public_keys=(ota_files.other_public_key, ota_files.public_key))
    assert host.ask(b'AT+CIUPDATE=0,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"


@pytest.mark.parametrize(("keys", "reason"), [
    ((), "no [ota] public_key"),
    (("/nonexistent/ota.pub",), "/nonexistent/ota.pub: No such file"),
    (("/etc/hostname",), "not an Ed25519 public key"),
])
def test_no_usable_public_key_refuses_before_any_request(start, server, keys, reason):
    """No public key (and unsigned not allowed), or one that cannot be read: ERROR at once,
    blocking or not."""
    daemon, host = start(server.url, public_keys=keys)
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert reason in refusal(daemon)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nERROR\r\n"
    assert server.requests == []


# -- versions -----------------------------------------------------------------------------


def test_downgrade_below_current_version_is_refused(start, server, tmp_path):
    """[ota] current_version v4.1.2.0: asking for v4.0.0.0 is ERROR at once, nothing requested;
    the same version again is allowed."""
    daemon, host = start(server.url, 'current_version = "v4.1.2.0"\n')
    assert host.ask(b'AT+CIUPDATE=0,"v4.0.0.0"') == b"\r\nERROR\r\n"
    assert "older than the running v4.1.2.0" in refusal(daemon)
    assert server.requests == []
    assert host.ask(b'AT+CIUPDATE=0,"v4.1.2.0",,1') == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:4\r\n"


def test_downgrade_allowed_with_allow_downgrade(start, server):
    """allow_downgrade = true: the older signed version is installed."""
    daemon, host = start(server.url, 'current_version = "v4.1.2.0"\nallow_downgrade = true\n')
    assert host.ask(b'AT+CIUPDATE=0,"v4.0.0.0",,1') == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:4\r\n"
    assert (image_dir(daemon) / "ota.bin").read_bytes() == b"\xe9four-oh"


def test_an_update_raises_the_floor_and_restore_does_not_lower_it(start, server):
    """After installing v4.1.2.0, v4.0.0.0 is a downgrade, also after AT+RESTORE; v9.9.9.9 is fine."""
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:4\r\n", timeout=20)
    assert host.ask(b'AT+CIUPDATE=0,"v4.0.0.0",,1') == b"\r\nERROR\r\n"
    assert host.ask(b"AT+RESTORE") == b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")
    host.command(b'AT+CWJAP="bridged","password"')
    assert host.ask(b'AT+CIUPDATE=0,"v4.0.0.0",,1') == b"\r\nERROR\r\n"
    assert "older than the running v4.1.2.0" in refusal(daemon)
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:4\r\n", timeout=20)
    assert (image_dir(daemon) / "ota.version").read_text() == "v9.9.9.9\n"


def test_servers_latest_older_than_running_is_refused(start, server):
    """The server's "latest" is older than current_version: refused after 3, nothing downloaded."""
    daemon, host = start(server.url, 'current_version = "v5.0"\n')
    assert host.ask(b"AT+CIUPDATE", timeout=20) == AFTER_LOOKUP
    assert "a downgrade" in refusal(daemon)
    assert server.paths() == ["/v1/device/rom/?is_format_simple=true"]


@pytest.mark.parametrize("version", [
    b"v1\nx",                        # a line break reached the environment
    b"$(reboot)",                    # a shell reading it would run it
    b"../../etc/passwd",
    b"v1\x00x",                      # NUL crashed the command (embedded null byte)
    b"v" * 65,
    b"v1 x",
    b"v1\xe9",
])
def test_hostile_mcu_versions_are_refused(fresh, version):
    """A version the MCU sends with anything but A-Z a-z 0-9 . _ + -, or over 64 bytes:
    ERROR at once (blocking or not), nothing requested."""
    assert fresh.host.ask(b'AT+CIUPDATE=0,"' + version + b'",,1') == b"\r\nERROR\r\n"
    assert fresh.host.ask(b'AT+CIUPDATE=0,"' + version + b'"') == b"\r\nERROR\r\n"
    assert fresh.server.requests == []


@pytest.mark.parametrize("latest", ["$(reboot)", "../v5", "v" * 65, "v5;id"])
def test_hostile_server_versions_are_refused(fresh, latest):
    """The server's "latest" with a character a shell or path reads specially: refused after 2."""
    fresh.server.latest = latest
    assert fresh.host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n\r\nERROR\r\n"
    assert "rom_version" in fresh.refusal()
    assert len(fresh.server.requests) == 1


# -- partitions ---------------------------------------------------------------------------


def test_partition_not_in_the_list_is_refused(start, server):
    """The default [ota] partitions is ["ota"]: client_ca or any other is ERROR at once."""
    daemon, host = start(server.url, partitions=None)
    assert host.ask(b'AT+CIUPDATE=0,,"client_ca"') == b"\r\nERROR\r\n"
    assert "partition 'client_ca' is not in [ota] partitions (ota)" in refusal(daemon)
    assert host.ask(b'AT+CIUPDATE=0,"v4.1.2.0","nvs",1') == b"\r\nERROR\r\n"
    assert server.requests == []
    assert host.ask(b'AT+CIUPDATE=0,,"ota",1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:4\r\n", timeout=20)


# -- install_command ----------------------------------------------------------------------

AMBIENT = ("setpriv", "--inh-caps=+net_bind_service,+net_raw",
           "--ambient-caps=+net_bind_service,+net_raw", "--")


def _caps(status: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in status.splitlines())
            if k.startswith("Cap") or k == "NoNewPrivs"}


def test_install_command_has_no_capabilities_and_no_token(start, server, tmp_path):
    """bridged with the unit's ambient capabilities (and, here, the token in its environment):
    install_command runs with no capability at all, no_new_privs, and an environment without
    the token or anything else of the service's."""
    script = tmp_path / "probe.sh"
    script.write_text(f'#!/bin/sh\ncat /proc/self/status > "{tmp_path}/status"\n'
                      f'env > "{tmp_path}/env"\ncat /proc/$$/cmdline > "{tmp_path}/cmdline"\n')
    wrap = ("env", f"BRIDGED_SECRET_FROM_ENV={TOKEN}", *AMBIENT)
    daemon, host = start(server.url, f'install_command = "/bin/sh {script}"\n', wrap=wrap)
    own = _caps(Path(f"/proc/{daemon.proc.pid}/status").read_text())
    assert int(own["CapPrm"], 16) != 0  # the service has capabilities to lose (ambient until it starts)
    assert host.ask(b'AT+CIUPDATE=0,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    caps = _caps((tmp_path / "status").read_text())
    assert {k: caps[k] for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")} == {
        "CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapAmb": "0" * 16}
    assert caps["NoNewPrivs"] == "1"
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert TOKEN not in (tmp_path / "env").read_text()
    assert TOKEN not in (tmp_path / "cmdline").read_text()
    assert "BRIDGED_SECRET_FROM_ENV" not in env and "PYTHONUNBUFFERED" not in env
    assert env["BRIDGED_OTA_PARTITION"] == "client_ca" and env["BRIDGED_OTA_VERSION"] == LATEST


# -- secrets in logs ------------------------------------------------------------------------


def test_reload_refused_does_not_echo_a_malformed_token(start, server):
    """A reload with a token that is too long: reload_refused names the key, never the value."""
    daemon, host = start(server.url)
    daemon.expected_errors |= {"reload_refused"}
    secret = "S3CRET-" + "x" * 300
    daemon.config_path.write_text(daemon.config_path.read_text().replace(TOKEN, secret))
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_event("reload_refused")[-1]
    assert "ota.token" in refused["error"] and "secret, not shown" in refused["error"]
    assert "S3CRET" not in daemon.log_text()
