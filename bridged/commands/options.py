"""Typed settings AT commands keep, and the form the persisted ones take in the store.

``SysMsg`` is AT+SYSMSG's bit field; ``TcpOptions`` one link's AT+CIPTCPOPT;
``SslClientConf`` one link's AT+CIPSSLCCONF.  Each is frozen: a command
replaces a link's value (``dataclasses.replace``), it never edits it.

The store (AT+SYSSTORE=1, bridged.store) holds plain JSON.  A link's options
are saved as an object with named fields (``{"so_linger": -1, ...}``), so
the file reads for what it is; versions before these types saved them as
positional lists (``[-1, 0, 0, 0]``), and those still load.  A stored value
of the wrong shape or out of range (a hand-edited file) is logged and the
link keeps its boot default: the ESP boots with what it can read.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import structlog

__all__ = ["SysMsg", "TcpOptions", "SslClientConf", "LINKS", "decode_stored", "encode_stored"]

log = structlog.get_logger()

LINKS = 5  # ESP-AT's link slots: the per-link settings are kept for all of them

_T = TypeVar("_T")


class SysMsg(enum.IntFlag):
    """AT+SYSMSG's bits (esp-at-behavior.md 1.9); AT+SYSMSG? prints the number."""

    QUIT_MESSAGE = 1  # "+QUITT" when +++ ends passthrough
    LINK_CONN = 2  # +LINK_CONN:... instead of CONNECT / <id>,CONNECT
    PASSTHROUGH_STATUS = 4  # CONNECT/CLOSED/WIFI ... also printed inside passthrough


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """One link's AT+CIPTCPOPT; keep_alive is shared with AT+CIPSTART's (the later wins)."""

    so_linger: int = -1  # s; -1: off
    tcp_nodelay: int = 0  # 1: Nagle off
    so_sndtimeo: int = 0  # ms a send may wait for room; 0: for ever
    keep_alive: int = 0  # s of idle before probes; 0: off

    # AT+CIPTCPOPT's parameter order and ranges (the store's values are checked against them).
    RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "so_linger": (-1, 65535), "tcp_nodelay": (0, 1), "so_sndtimeo": (0, 0x7FFFFFFF), "keep_alive": (0, 7200)}

    def fields(self) -> tuple[int, int, int, int]:
        """As AT+CIPTCPOPT? prints them."""
        return (self.so_linger, self.tcp_nodelay, self.so_sndtimeo, self.keep_alive)


@dataclass(frozen=True, slots=True)
class SslClientConf:
    """One link's AT+CIPSSLCCONF: 0 no auth, 1 client cert, 2 server cert, 3 both."""

    auth_mode: int = 0
    pki_number: int = 0  # the client certificate and key (bridged pki)
    ca_number: int = 0  # the CA that verifies the server

    RANGES: ClassVar[dict[str, tuple[int, int]]] = {"auth_mode": (0, 3), "pki_number": (0, 9), "ca_number": (0, 9)}

    def fields(self) -> tuple[int, int, int]:
        """As AT+CIPSSLCCONF? prints them."""
        return (self.auth_mode, self.pki_number, self.ca_number)


def _per_link(cls: Callable[..., _T], key: str, stored: Any) -> list[_T] | None:
    """A stored per-link list: each entry an object with named fields, or a positional list."""
    if not isinstance(stored, list):
        log.warning("store_value_ignored", key=key, reason="not a list of links")
        return None
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    ranges = cls.RANGES  # type: ignore[attr-defined]
    links = []
    for link_id in range(LINKS):
        entry = stored[link_id] if link_id < len(stored) else None
        if isinstance(entry, list) and len(entry) == len(names):  # the old positional form
            entry = dict(zip(names, entry))
        values = _checked(entry, names, ranges)
        if values is None:
            if entry is not None:
                log.warning("store_value_ignored", key=key, link_id=link_id,
                            reason=f"expected {{{', '.join(names)}}} with integers in range")
            links.append(cls())
        else:
            links.append(cls(**values))
    return links


def _checked(entry: Any, names: list[str], ranges: dict[str, tuple[int, int]]) -> dict[str, int] | None:
    if not isinstance(entry, dict) or set(entry) != set(names):
        return None
    for name, value in entry.items():
        low, high = ranges[name]
        if type(value) is not int or not low <= value <= high:
            return None
    return entry


def _sysmsg(stored: Any) -> SysMsg | None:
    if type(stored) is int and 0 <= stored <= 7:
        return SysMsg(stored)
    log.warning("store_value_ignored", key="sysmsg", reason="not an integer 0 to 7")
    return None


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "sysmsg": _sysmsg,
    "tcpopts": lambda stored: _per_link(TcpOptions, "tcpopts", stored),
    "sslconf": lambda stored: _per_link(SslClientConf, "sslconf", stored),
}


def decode_stored(key: str, stored: Any) -> Any:
    """The session's value for what the store holds under ``key``; None: keep the default."""
    decoder = _DECODERS.get(key)
    return stored if decoder is None else decoder(stored)


def encode_stored(value: Any) -> Any:
    """The store's form of a session value: options as objects with named fields."""
    if isinstance(value, SysMsg):
        return int(value)
    if isinstance(value, (list, tuple)) and value and dataclasses.is_dataclass(value[0]):
        return [dataclasses.asdict(item) for item in value]
    return value
