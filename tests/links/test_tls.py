"""bridged.links.tls over real TLS on loopback: contexts per auth mode, SNI, the non-blocking
handshake, the name check as mbedTLS does it, and certificate dates checked at the device's
time (tls_time)."""

from __future__ import annotations

import asyncio
import calendar
import datetime
import ipaddress
import socket
import ssl

import pytest
from cryptography import x509

from bridged.ipc.messages import Connect
from bridged.links import tls
from bridged.pki import PkiStore
from tests.integration.test_tls import TlsServer, _issue

UTC = datetime.timezone.utc


def _at(year: int, month: int = 6) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0))


def _future_chain(tmp) -> tuple:
    """A CA "Future CA" valid 2030..2037 and a leaf for 127.0.0.1 valid 2036..2038: never valid at the host's time."""
    ca, ca_id = _issue(tmp, "ca", "Future CA", ca=True,
                       valid=(datetime.datetime(2030, 1, 1, tzinfo=UTC), datetime.datetime(2037, 1, 1, tzinfo=UTC)))
    leaf, _ = _issue(tmp, "leaf", "localhost", ca_id, sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")),),
                     valid=(datetime.datetime(2036, 1, 1, tzinfo=UTC), datetime.datetime(2038, 12, 31, tzinfo=UTC)))
    return ca, leaf


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The future chain's server, and a store that trusts its CA."""
    tmp = tmp_path_factory.mktemp("future")
    ca, leaf = _future_chain(tmp)
    store = PkiStore(tmp / "state")
    store.import_file("client_ca", 0, ca.cert)
    server = TlsServer(leaf)
    yield server, store
    server.close()


def _connect(chain, tls_time: int | None) -> ssl.SSLSocket:
    server, store = chain
    request = Connect(1, "SSL", "127.0.0.1", server.port, tls_auth=2, tls_time=tls_time)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock = tls.client_context(request, store).wrap_socket(raw, server_hostname=None)
    return sock


@pytest.mark.parametrize("year", [2036, 2035, 2039, 1970])
def test_handshake_leaves_the_dates_to_check_dates(chain, year):
    """With a device time OpenSSL ignores dates (the host's 20xx would refuse this chain); check_dates decides."""
    sock = _connect(chain, _at(year))
    try:
        if year == 2036:
            tls.check_dates(sock, _at(year))
        else:
            with pytest.raises(tls.TlsError, match="not at the device's time"):
                tls.check_dates(sock, _at(year))
    finally:
        sock.close()


def test_every_certificate_of_the_chain_is_checked(chain):
    """In mid-2037 the leaf is valid but its CA expired: refused, naming the CA."""
    sock = _connect(chain, _at(2037))
    try:
        with pytest.raises(tls.TlsError, match="Future CA"):
            tls.check_dates(sock, _at(2037))
    finally:
        sock.close()


def test_without_a_device_time_the_host_clock_decides(chain):
    """tls_time None ([sntp] source = "host"): OpenSSL checks the dates at the host's time and refuses."""
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(chain, None)


class _NoChainAccessor:
    """A TLS socket as seen on a Python whose ssl module gives no verified chain (no public or private accessor)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def getpeercert(self, binary_form: bool = False):
        return self._sock.getpeercert(binary_form)


class _EmptyChain(_NoChainAccessor):
    """... and one whose accessor finds no verified chain (OpenSSL gives none for a resumed session)."""

    def get_verified_chain(self) -> list:
        return []


class _NoneChain(_NoChainAccessor):
    """... and 3.11's private accessor, which answers None when OpenSSL has no verified chain."""

    class _sslobj:  # noqa: N801 - the attribute name ssl.SSLSocket has
        @staticmethod
        def get_verified_chain() -> None:
            return None


@pytest.mark.parametrize("view", [_NoChainAccessor, _EmptyChain, _NoneChain])
def test_no_verified_chain_fails_closed(chain, view):
    """Without the verified chain the dates cannot be checked: refused, never passed on the leaf alone or on nothing."""
    sock = _connect(chain, _at(2037))  # the leaf is valid then, its CA is not
    try:
        with pytest.raises(tls.TlsError, match="verified chain"):
            tls.check_dates(view(sock), _at(2037))
    finally:
        sock.close()


@pytest.fixture(scope="module")
def impostor(tmp_path_factory):
    """The same chain made again: a CA of the same name and dates as the trusted one, with another key."""
    _, leaf = _future_chain(tmp_path_factory.mktemp("impostor"))
    server = TlsServer(leaf)
    yield server
    server.close()


def test_the_rest_of_the_verification_stays_with_openssl(chain, impostor):
    """With a device time, only the dates move out of OpenSSL: a forged signature is still refused in the handshake."""
    _, store = chain
    with pytest.raises(ssl.SSLCertVerificationError, match="signature|issuer"):
        _connect((impostor, store), _at(2036))


def test_the_name_is_still_checked(chain):
    """A device time does not relax the name check: a certificate for 127.0.0.1 does not pass for another host."""
    sock = _connect(chain, _at(2036))
    try:
        tls.check_dates(sock, _at(2036))
        with pytest.raises(tls.TlsError, match="does not name"):
            tls.check_name(sock, "example.test")
    finally:
        sock.close()


def test_mode_0_ignores_the_device_time(chain):
    """Auth mode 0 verifies nothing, whatever the device time: no time flag, the handshake goes through."""
    server, store = chain
    request = Connect(1, "SSL", "127.0.0.1", server.port, tls_auth=0, tls_time=0)
    ctx = tls.client_context(request, store)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.verify_flags & 0x200000
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=None) as sock:
            assert sock.version()


# -- contexts, SNI, the handshake and the name ------------------------------------------------


@pytest.mark.parametrize("auth, missing", [(1, "client_cert.0"), (2, "client_ca.0"), (3, "client_cert.0")])
def test_a_mode_whose_files_are_missing_is_a_clear_error(tmp_path, auth, missing):
    """Auth modes 1-3 need the store's files: TlsError naming the one missing and how to import it."""
    request = Connect(1, "SSL", "127.0.0.1", 443, tls_auth=auth)
    with pytest.raises(tls.TlsError, match=f"no {missing} .*bridged pki import"):
        tls.client_context(request, PkiStore(tmp_path / "empty"))


def test_a_verifying_client_speaks_tls_1_2_only_and_requires_a_certificate(chain):
    """Mode 2: CERT_REQUIRED, hostname left to check_name, TLS 1.2 as ESP-AT's mbedTLS build."""
    _, store = chain
    ctx = tls.client_context(Connect(1, "SSL", "127.0.0.1", 443, tls_auth=2), store)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("host, sni, expected", [
    ("broker.example", "", "broker.example"),
    ("broker.example", "other.example", "other.example"),
    ("127.0.0.1", "", None),
    ("::1", "", None),
])
def test_sni_is_cipsslcsni_else_a_host_name_never_an_address(host, sni, expected):
    """AT+CIPSSLCSNI's name wins; else the host when it is a name; an address sends no SNI."""
    assert tls.sni_for(Connect(1, "SSL", host, 443, tls_sni=sni)) == expected


def test_the_non_blocking_handshake_completes_and_sends_the_sni(chain):
    """wrap_client + handshake on a non-blocking socket: TLS 1.2 up, the server saw the SNI."""
    server, store = chain
    request = Connect(1, "SSL", "127.0.0.1", server.port, tls_auth=0, tls_sni="device.example")

    async def main() -> str | None:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        raw.setblocking(False)
        with tls.wrap_client(raw, request, store) as sock:
            async with asyncio.timeout(10):
                await tls.handshake(sock)
            return sock.version()

    assert asyncio.run(main()) == "TLSv1.2"
    assert server.sni[-1] == "device.example"


def test_a_subject_alt_name_hides_the_common_name(chain):
    """As mbedTLS: the leaf's SAN (IP 127.0.0.1) is matched, its CN "localhost" is not."""
    sock = _connect(chain, _at(2036))
    try:
        tls.check_name(sock, "127.0.0.1")
        with pytest.raises(tls.TlsError, match="does not name 'localhost'"):
            tls.check_name(sock, "localhost")
    finally:
        sock.close()


@pytest.mark.parametrize("pattern, host, matches", [
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "A.Example.COM.", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("broker.example", "broker.example", True),
    ("broker.example", "broker.example.evil", False),
])
def test_wildcards_cover_one_label(pattern, host, matches):
    """A wildcard stands for exactly one leftmost label; case and a trailing dot do not matter."""
    assert tls._match(pattern, host) is matches
