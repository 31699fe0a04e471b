"""A small authoritative DNS server for tests, written with dnspython's message module.

It answers A and AAAA queries for the names it is given, NXDOMAIN for any
other name (NOERROR with no answer when the name has only the other type),
and records every question it saw.  ``silent=True`` makes a server that
reads queries and never answers.  It listens on UDP port 53 of a loopback
address such as 127.0.0.153 (the tests run as root); ``serving`` skips the
test with the reason when that port cannot be bound.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
from typing import Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

__all__ = ["DnsServer", "serving"]


@contextlib.contextmanager
def serving(address: str, records: dict[str, list[str]] | None = None,
            silent: bool = False) -> Iterator["DnsServer"]:
    """A DnsServer for the with-block; the test is skipped if it cannot bind."""
    server = DnsServer.start(address, records, silent)
    if isinstance(server, str):
        pytest.skip(server)
    try:
        yield server
    finally:
        server.close()


class DnsServer:
    def __init__(self, sock: socket.socket, records: dict[str, list[str]], silent: bool) -> None:
        self.sock = sock
        self.address = sock.getsockname()[0]
        self.records = {name.lower().rstrip("."): list(addresses) for name, addresses in records.items()}
        self.silent = silent
        self.queries: list[tuple[str, str]] = []  # (name, "A" / "AAAA")
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, address: str, records: dict[str, list[str]] | None = None,
              silent: bool = False) -> "DnsServer | str":
        """A running server on ``address`` port 53, or the reason there is none."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((address, 53))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # another test's server: a clash to fix, not a skip
                raise AssertionError(f"{address}:53 is taken: each test needs its own address ({exc})") from None
            return f"cannot bind {address}:53 for the test DNS server: {exc}"
        sock.settimeout(0.1)
        return cls(sock, records or {}, silent)

    def names_asked(self) -> list[str]:
        return [name for name, _ in self.queries]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                query = dns.message.from_wire(packet)
            except Exception:  # noqa: BLE001 - a test server drops what it cannot parse
                continue
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
            if self.silent:
                continue
            self.sock.sendto(self._answer(query, name, question).to_wire(), peer)

    def _answer(self, query: dns.message.Message, name: str, question) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        matching = [a for a in self.records[name] if ipaddress.ip_address(a).version == version]
        if matching:
            response.answer.append(dns.rrset.from_text_list(
                question.name, 60, dns.rdataclass.IN, question.rdtype, matching))
        return response
