"""A small HTTP GET client on asyncio streams, for the update server.

Only what AT+CIUPDATE and AT+CIPFWVER? need: one GET per connection, sent as
HTTP/1.0 (as ESP-AT's version request is), so a server never answers with
chunked encoding and the body ends at Content-Length or at the close.  No
redirects, no compression, no keep-alive.  The caller resolves the host
through ``bridged.net.resolver`` (AT+CIUPDATE reports "server found" between
the lookup and the connection); https verifies the server against the
context the caller gives.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

import bridged

__all__ = ["Target", "Connection", "Response", "HttpError", "connect", "target"]

_HEAD_LIMIT = 16384  # bytes of status line and headers
_USER_AGENT = f"bridged/{bridged.__version__}"
# ASCII digits only: str.isdigit() also takes "²", which int() then refuses,
# and int() refuses more than 4300 digits; 19 digits is beyond any image.
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")
_STATUS = re.compile(r"[0-9]{3}")
_CLOSE_TIMEOUT = 1.0  # seconds for a TLS server to answer our close_notify


class HttpError(OSError):
    """The server could not be reached, or its answer is not HTTP we accept."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: scheme, host, port and a path prefix (no trailing /)."""

    scheme: str
    host: str
    port: int
    prefix: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


def target(base_url: str) -> Target:
    """A checked base URL (``[ota] server``) as a Target."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Target(parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"))


@dataclass(slots=True)
class Response:
    """A status and headers read; the body is still on ``reader``."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str = ""
    _closed: bool = field(default=False, repr=False)

    def content_length(self) -> int | None:
        """Content-Length as a number, None when absent.

        Raises:
            HttpError: present but not a single non-negative number.
        """
        text = self.headers.get("content-length")
        if text is None:
            return None
        if not _CONTENT_LENGTH.fullmatch(text):
            raise HttpError(f"bad Content-Length {text[:40]!r}")
        return int(text)

    async def read_body(self, limit: int) -> bytes:
        """The whole body, up to ``limit`` bytes.

        Raises:
            HttpError: longer than ``limit``, or shorter than Content-Length.
        """
        length = self.content_length()
        if length is not None:
            if length > limit:
                raise HttpError(f"body of {length} bytes is over {limit}")
            try:
                return await self.reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise HttpError(f"body ended after {len(exc.partial)} of {length} bytes") from None
        body = await self.reader.read(limit + 1)
        while len(body) <= limit and (more := await self.reader.read(limit + 1 - len(body))):
            body += more
        if len(body) > limit:
            raise HttpError(f"body over {limit} bytes")
        return body

    async def close(self) -> None:
        """Close the connection; TLS waits at most _CLOSE_TIMEOUT for the server's close_notify
        (a stalled server would otherwise hold us for asyncio's 30 s), then drops it."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()
        except (OSError, ssl.SSLError):
            pass  # the server may already have reset it; we are done with it either way

    def abort(self) -> None:
        """Drop the connection at once: after a failure or a cancellation nothing more is said."""
        self._closed = True
        self.writer.transport.abort()


async def connect(where: Target, addresses: Sequence[str], tls: ssl.SSLContext | None = None,
                  timeout: float = 10.0) -> "Connection":
    """Open a connection to the first of ``addresses`` that answers.

    Args:
        addresses: from ``bridged.net.resolver.resolve(where.host, ...)``.
        tls: the context for https (server name: ``where.host``).

    Raises:
        HttpError: no address accepted the connection (or the TLS handshake).
    """
    reader, writer, peer = await _connect(where, addresses, tls, timeout)
    return Connection(where, reader, writer, peer)


@dataclass(slots=True)
class Connection:
    where: Target
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str

    async def get(self, path: str, headers: dict[str, str]) -> Response:
        """Send ``GET <prefix><path>`` and read the status line and headers.

        Args:
            path: path and query, starting with ``/``, already percent-encoded.
            headers: sent after Host, User-Agent, Accept and Connection.

        Raises:
            HttpError: the answer is not HTTP, or the connection failed.
        """
        request = [f"GET {self.where.prefix}{path} HTTP/1.0", f"Host: {self.where.host_header()}",
                   f"User-Agent: {_USER_AGENT}", "Accept: */*", "Connection: close"]
        request += [f"{name}: {value}" for name, value in headers.items()]
        try:
            self.writer.write(("\r\n".join(request) + "\r\n\r\n").encode("latin-1"))
            await self.writer.drain()
            status, fields = await _read_head(self.reader)
        except (ConnectionError, ssl.SSLError) as exc:
            self.writer.close()
            raise HttpError(f"request failed: {exc}") from None
        except BaseException:
            self.writer.close()
            raise
        return Response(status, fields, self.reader, self.writer, self.peer)

    def close(self) -> None:
        self.writer.close()


async def _connect(where: Target, addresses: list[str], tls: ssl.SSLContext | None,
                   timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    failures = []
    for address in addresses:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    address, where.port, ssl=tls if where.tls else None,
                    server_hostname=where.host if where.tls else None, limit=_HEAD_LIMIT)
        except TimeoutError:
            failures.append(f"{address}: no answer within {timeout:g} s")
        except ssl.SSLCertVerificationError as exc:
            # The reason alone (CERTIFICATE_VERIFY_FAILED) hides whether the name, the CA or a date is wrong.
            failures.append(f"{address}: TLS: {exc.reason}: {exc.verify_message}")
        except ssl.SSLError as exc:
            failures.append(f"{address}: TLS: {exc.reason or exc}")
        except OSError as exc:
            failures.append(f"{address}: {exc.strerror or exc}")
        else:
            return reader, writer, address
    raise HttpError(f"cannot connect to {where.host} port {where.port}: " + "; ".join(failures))


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise HttpError(f"connection closed after {len(exc.partial)} bytes, before the headers ended") from None
    except asyncio.LimitOverrunError:
        raise HttpError(f"headers longer than {_HEAD_LIMIT} bytes") from None
    except ssl.SSLError as exc:
        raise HttpError(f"TLS: {exc.reason or exc}") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _STATUS.fullmatch(parts[1]):
        raise HttpError(f"not an HTTP status line: {lines[0][:80]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"bad header line {line[:80]!r}")
        name = name.lower()
        value = value.strip()
        if name in fields and fields[name] != value:
            if name == "content-length":
                raise HttpError("conflicting Content-Length headers")
            value = f"{fields[name]}, {value}"
        fields[name] = value
    if "transfer-encoding" in fields:
        # We ask HTTP/1.0, so a chunked body is a broken server; reading it
        # as plain bytes would save the chunk framing as the image.
        raise HttpError(f"Transfer-Encoding {fields['transfer-encoding'][:40]!r} in an answer to HTTP/1.0")
    return int(parts[1]), fields
