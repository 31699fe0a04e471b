"""Every byte bridged sends on the AT port is formatted here.

The exact bytes follow ESP-AT v4.x (see esp-at-behavior.md sections 1.2, 2.1,
2.3, 2.5, 2.8): result codes carry a leading and a trailing ``\\r\\n``; status
lines (``CONNECT``, ``CLOSED``, ``WIFI ...``) only a trailing one; query lines
end with ``\\r\\n`` except the few formats ESP-AT prints without it
(``info(..., eol=False)``).  Text is latin-1 so any byte the host sent in a
string comes back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "OK",
    "ERROR",
    "SEND_OK",
    "SEND_FAIL",
    "SEND_CANCELED",
    "SEND_CANCELLED",
    "PROMPT",
    "BOOT_PROMPT",
    "BUSY",
    "READY",
    "FORCE_RESTART",
    "QUITT",
    "TIME_UPDATED",
    "q",
    "info",
    "fields",
    "err_code",
    "recv_bytes",
    "connect",
    "closed",
    "link_conn",
    "IPD_HEAD_MAX",
    "ipd_active",
    "ipd_passive",
    "wifi",
    "ping_time",
    "PING_TIMEOUT",
    "ota_progress",
    "ota_state",
    "fw_version",
    "cipdomain",
    "is_final",
    "FINALS",
]

OK = b"\r\nOK\r\n"
ERROR = b"\r\nERROR\r\n"
SEND_OK = b"\r\nSEND OK\r\n"
SEND_FAIL = b"\r\nSEND FAIL\r\n"
SEND_CANCELED = b"\r\nSEND Canceled\r\n"  # CIPSEND/CIPSENDEX aborted by +++
SEND_CANCELLED = b"\r\nSEND CANCELLED\r\n"  # CIPSENDL aborted by +++
PROMPT = b"\r\nOK\r\n\r\n>"  # no space after '>' (v2+)
BOOT_PROMPT = b"\r\n>"  # entering passthrough at boot (AT+SAVETRANSLINK): no OK
BUSY = b"\r\nbusy p...\r\n"
READY = b"\r\nready\r\n"
FORCE_RESTART = b"\r\nWill force to restart!!!\r\n"
QUITT = b"\r\n+QUITT\r\n"
TIME_UPDATED = b"+TIME_UPDATED\r\n"  # the first SNTP answer after AT+CIPSNTPCFG (a status line: no leading CRLF)
PING_TIMEOUT = b"+PING:TIMEOUT\r\n"  # AT+PING: no reply, or the name did not resolve; ERROR follows

FINALS = (OK, ERROR, SEND_OK, SEND_FAIL, SEND_CANCELED, SEND_CANCELLED, PROMPT, BUSY)


def is_final(data: bytes) -> bool:
    """True for a final result code (ends a command or a send): ``data in FINALS``."""
    return data in FINALS


@dataclass(frozen=True, slots=True)
class q:  # noqa: N801 - reads like the quote it stands for: q("ssid")
    """A value printed in double quotes."""

    text: str


def _field(value: object) -> bytes:
    if isinstance(value, q):
        return b'"' + value.text.encode("latin-1", "replace") + b'"'
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, bytes):
        return value
    return str(value).encode("latin-1", "replace")


def fields(*values: object) -> bytes:
    """Values joined by commas, each formatted as ESP-AT prints it."""
    return b",".join(_field(v) for v in values)


def info(name: str, *values: object, eol: bool = True) -> bytes:
    """An information line: ``+NAME:f1,f2`` and, unless eol=False, ``\\r\\n``."""
    body = name.encode("ascii") + b":" + fields(*values)
    return body + b"\r\n" if eol else body


def err_code(code: int) -> bytes:
    """The line AT+SYSLOG=1 adds before ERROR and busy p..."""
    return b"ERR CODE:0x%08x\r\n" % code


def recv_bytes(n: int) -> bytes:
    return b"\r\nRecv %d bytes\r\n" % n


def _link_prefix(link_id: int | None) -> bytes:
    return b"" if link_id is None else b"%d," % link_id


def connect(link_id: int | None) -> bytes:
    """``CONNECT`` (CIPMUX=0, link_id None) or ``<id>,CONNECT``."""
    return _link_prefix(link_id) + b"CONNECT\r\n"


def closed(link_id: int | None) -> bytes:
    return _link_prefix(link_id) + b"CLOSED\r\n"


def link_conn(link_id: int, type_: str, server: bool, remote_ip: str, remote_port: int, local_port: int) -> bytes:
    """The +LINK_CONN line AT+SYSMSG bit 1 prints instead of CONNECT."""
    return info("+LINK_CONN", 0, link_id, q(type_), int(server), q(remote_ip), remote_port, local_port)


# The longest head ipd_active makes (link id, a 10-digit length, an IPv6 sender with its port):
# what the front counts per +IPD record against its output's room.
IPD_HEAD_MAX = len(b'\r\n+IPD,4,4294967295,"ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",65535:')
_IPD_HEADS: dict[int | None, bytes] = {}  # "\r\n+IPD,<id>," by link id: made once, not per +IPD


def ipd_active(link_id: int | None, length: int, remote: tuple[str, int] | None = None) -> bytes:
    """The header before +IPD payload bytes (active receive mode)."""
    head = _IPD_HEADS.get(link_id)
    if head is None:
        head = _IPD_HEADS.setdefault(link_id, b"\r\n+IPD," + _link_prefix(link_id))
    if remote is None:
        return head + b"%d:" % length
    return head + b'%d,"%s",%d:' % (length, remote[0].encode("ascii"), remote[1])


def ipd_passive(link_id: int | None, total: int) -> bytes:
    """The passive-mode notice: bytes are waiting for AT+CIPRECVDATA."""
    return b"\r\n+IPD," + _link_prefix(link_id) + b"%d\r\n" % total


def wifi(event: str) -> bytes:
    """``WIFI CONNECTED``, ``WIFI GOT IP``, ``WIFI DISCONNECT`` ..."""
    return b"WIFI " + event.encode("ascii") + b"\r\n"


def ping_time(ms: int) -> bytes:
    """AT+PING's answer: ``+PING:<time>``, whole milliseconds (OK follows)."""
    return info("+PING", ms)


def ota_progress(state: int) -> bytes:
    """AT+CIUPDATE's progress line ``+CIPUPDATE:<1..4>`` or ``+CIPUPDATE:-1``."""
    return b"+CIPUPDATE:%d\r\n" % state


def ota_state(state: int) -> bytes:
    """AT+CIUPDATE?: the source prints the command's own name, ``+CIUPDATE:``
    (the spec page shows +CIPUPDATE; esp-at-behavior.md 6.1)."""
    return info("+CIUPDATE", state)


def fw_version(version: str) -> bytes:
    """One AT+CIPFWVER? line: ``+CIPFWVER:"<version>"``."""
    return info("+CIPFWVER", q(version))


def cipdomain(address: str) -> bytes:
    """AT+CIPDOMAIN's answer: the address in quotes (v2+; NonOS 1.x printed it bare)."""
    return info("+CIPDOMAIN", q(address))
