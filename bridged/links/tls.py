"""TLS for SSL links, in the link worker so a handshake never stalls the
UART or another link.

ESP-AT's client settings (AT+CIPSSLCCONF and friends, esp-at-behavior.md 5):

  auth_mode  client presents client_cert.N/client_key.N   verifies the server with client_ca.N
  0          no                                             no (ESP-AT's default: insecure)
  1          yes                                            no
  2          no                                             yes
  3          yes                                            yes

When verifying, the certificate dates are checked against ``tls_time`` when
the request carries one (the device's SNTP clock): OpenSSL is told not to
check times (X509_V_FLAG_NO_CHECK_TIME) and ``check_dates`` does it after the
handshake, for every certificate of the verified chain (Python 3.13's
get_verified_chain, the same private accessor on 3.11 and 3.12); a
Python without it, or no verified chain, fails the link (closed, not open).

When verifying, the server's certificate must name AT+CIPSSLCCN's common
name, or else the host AT+CIPSTART named (in its subjectAltName when it has
one, else in its subject's CN, as mbedTLS: see ``check_name``).  SNI is AT+CIPSSLCSNI's name, or
the host when it is a name rather than an address.  Because Python's ssl
uses one ``server_hostname`` for both, the name check is done here after the
handshake.  TLS 1.2 only, as ESP-AT's mbedTLS build.  TLS-PSK (AT+CIPSSLCPSK)
needs Python 3.13's ``set_psk_client_callback``.

A server (AT+CIPSERVER "SSL") uses the store's server_cert.0/server_key.0, or
a self-signed certificate bridged generates once; with <CA enable> it
requires client certificates signed by server_ca.0.
"""

from __future__ import annotations

import _ssl
import asyncio
import ipaddress
import socket
import ssl
from datetime import datetime, timezone

import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from bridged.ipc.messages import Adopt, Connect
from bridged.pki import PkiStore, fingerprint

log = structlog.get_logger()

__all__ = ["TlsError", "client_context", "server_context", "handshake", "psk_supported", "check_dates"]

_NO_CHECK_TIME = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not in ssl.VerifyFlags)


class TlsError(OSError):
    """A TLS setting or handshake that cannot work; the reason is for the log."""


def psk_supported() -> bool:
    return hasattr(ssl.SSLContext, "set_psk_client_callback")


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _need(store: PkiStore, kind: str, index: int) -> str:
    path = store.path(kind, index)
    if path is None:
        raise TlsError(f"no {kind}.{index} in the certificate store (bridged pki import {kind} {index} FILE)")
    return str(path)


def client_context(request: Connect, store: PkiStore) -> ssl.SSLContext:
    """The SSLContext for one AT+CIPSTART "SSL" connection."""
    ctx = _base(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False  # checked after the handshake: SNI and name may differ
    auth = request.tls_auth
    if auth in (1, 3):
        ctx.load_cert_chain(_need(store, "client_cert", request.tls_pki), _need(store, "client_key", request.tls_pki))
    if auth in (2, 3):
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(_need(store, "client_ca", request.tls_ca))
        if request.tls_time is not None:
            ctx.verify_flags |= _NO_CHECK_TIME  # check_dates does it, at the device's time
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if request.tls_alpn:
        ctx.set_alpn_protocols(list(request.tls_alpn))
    if request.tls_psk:
        if not psk_supported():
            raise TlsError("TLS-PSK needs Python 3.13's ssl module")
        key = bytes.fromhex(request.tls_psk)
        identity = request.tls_psk_hint
        ctx.set_ciphers("PSK")
        ctx.set_psk_client_callback(lambda _server_hint: (identity, key))
    return ctx


def server_context(request: Adopt, store: PkiStore) -> ssl.SSLContext:
    """The SSLContext of AT+CIPSERVER's "SSL" server."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH)
    cert, key = store.path("server_cert", 0), store.path("server_key", 0)
    if cert is None or key is None:
        cert, key = store.self_signed_server()
        log.info("server_certificate_generated", path=str(cert), sha256=fingerprint(cert))
    ctx.load_cert_chain(str(cert), str(key))
    if request.ca_enable:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(_need(store, "server_ca", 0))
    return ctx


def sni_for(request: Connect) -> str | None:
    if request.tls_sni:
        return request.tls_sni
    try:
        ipaddress.ip_address(request.host)
    except ValueError:
        return request.host
    return None


async def handshake(sock: ssl.SSLSocket) -> None:
    """Drive a non-blocking handshake to its end (the caller bounds the time)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await _wait(loop, sock.fileno(), loop.add_reader, loop.remove_reader)
        except ssl.SSLWantWriteError:
            await _wait(loop, sock.fileno(), loop.add_writer, loop.remove_writer)


async def _wait(loop, fd: int, add, remove) -> None:
    ready = loop.create_future()
    add(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        remove(fd)


def check_name(sock: ssl.SSLSocket, expected: str) -> None:
    """The verified peer certificate must name ``expected``.

    As mbedTLS's x509_crt_verify_name: a certificate with a subjectAltName
    extension is matched on its SAN entries only (DNS names; IP addresses for
    an address), even when none of them is a DNS name; the subject's common
    name counts only when there is no such extension at all.  (Python's own
    check differs: OpenSSL falls back to the CN when no DNS SAN is present.)

    Raises:
        TlsError: it does not.
    """
    cert = _peer_certificate(sock)
    try:
        wanted_ip = ipaddress.ip_address(expected)
    except ValueError:
        wanted_ip = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except ValueError as exc:  # a malformed extension: nothing it says can be trusted
        raise TlsError(f"cannot read the server certificate's extensions: {exc}") from None
    if san is not None:
        if wanted_ip is not None and wanted_ip in san.get_values_for_type(x509.IPAddress):
            return
        names = san.get_values_for_type(x509.DNSName)
        shown = names or [str(getattr(v, "value", v)) for v in san]
    else:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        shown = names
    if wanted_ip is None and any(_match(name, expected) for name in names):
        return
    raise TlsError(f"server certificate does not name {expected!r} (it names {shown or 'nothing'})")


def _peer_certificate(sock: ssl.SSLSocket) -> x509.Certificate:
    der = sock.getpeercert(binary_form=True)
    if der is None:
        raise TlsError("the server sent no certificate")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise TlsError(f"cannot read the server certificate: {exc}") from None


def check_dates(sock: ssl.SSLSocket, at: int | None) -> None:
    """Every certificate of the verified chain must be valid at Unix time ``at``.

    None: nothing to do (OpenSSL checked the dates against the host clock).

    Raises:
        TlsError: a certificate is not yet or no longer valid then.
    """
    if at is None:
        return
    for der in _verified_chain(sock):
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise TlsError(f"cannot read a certificate of the verified chain: {exc}") from None
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if not start.timestamp() <= at <= end.timestamp():
            when = datetime.fromtimestamp(at, timezone.utc).isoformat()
            raise TlsError(f"certificate {cert.subject.rfc4514_string()!r} is valid from {start.isoformat()} "
                           f"to {end.isoformat()}, not at the device's time {when}")


def _verified_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """DER certificates of the chain OpenSSL verified, leaf first.

    3.13's public accessor gives bytes, the private one of 3.11 and 3.12
    certificate objects (or None).  OpenSSL was told to skip the dates, so a
    chain that cannot be had is refused: the leaf alone (the peer may send
    any intermediates) or nothing at all would pass unchecked certificates.

    Raises:
        TlsError: no accessor on this Python, or no verified chain.
    """
    getter = getattr(sock, "get_verified_chain", None) or getattr(getattr(sock, "_sslobj", None),
                                                                  "get_verified_chain", None)
    if getter is None:
        raise TlsError("this Python's ssl module gives no verified chain: certificate dates cannot be checked")
    chain = getter()
    if not chain:
        raise TlsError("no verified chain after the handshake: certificate dates cannot be checked")
    return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]


def _match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def wrap_client(sock: socket.socket, request: Connect, store: PkiStore) -> ssl.SSLSocket:
    ctx = client_context(request, store)
    return ctx.wrap_socket(sock, server_hostname=sni_for(request), do_handshake_on_connect=False)


def wrap_server(sock: socket.socket, request: Adopt, store: PkiStore) -> ssl.SSLSocket:
    return server_context(request, store).wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
