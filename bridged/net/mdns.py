"""mDNS advertising for AT+MDNS, on the emulated station's interface only.

Theory of operation: an ESP32 running ESP-AT answers mDNS on its Wi-Fi
station.  bridged's station is a host interface, so one ``AsyncZeroconf``
runs on the front's event loop, joined to the mDNS groups on that interface
alone (its IPv4 address, and its index for IPv6 when it has IPv6 addresses),
never on every interface of the host.  It publishes one service,
``<instance>.<service_type>.<proto>.local.`` (SRV to ``<hostname>.local.``
and TXT), and ``<hostname>.local.``'s A and AAAA records from the station's
addresses.

States: stopped -> ``start`` -> advertising (probing, then announcing, in a
task of its own so AT+MDNS=1 answers OK at once, as ESP-IDF's mdns does) ->
``stop`` / ``stop_soon`` -> stopping (goodbye packets: TTL 0, three times)
-> stopped.  A new ``start`` first waits for a stop still in flight, so two
responders never run at once.  A name taken by another responder on the
segment gets "-2", "-3" ... appended (the service keeps being advertised, as
ESP-IDF renames on a conflict); the rename is logged.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import structlog
from zeroconf import BadTypeInNameException, IPVersion, ServiceInfo, service_type_name
from zeroconf.asyncio import AsyncZeroconf

from bridged.net.interfaces import InterfaceInfo

__all__ = ["Advertisement", "Advertiser", "service_type", "check_instance"]

log = structlog.get_logger()

_STOP_TIMEOUT = 3.0  # s: goodbyes take about 0.25 s, closing the sockets less


def service_type(service: str, proto: str) -> str:
    """The fully qualified DNS-SD type, ``_iot._tcp.local.``.

    ESP-AT's example passes "_iot"; a type given without its leading
    underscore ("iot") gets one, since DNS-SD names carry it.

    Raises:
        ValueError: not a valid RFC 6335 service name, or proto not _tcp/_udp.
    """
    service = service if service.startswith("_") else "_" + service
    proto = proto if proto.startswith("_") else "_" + proto
    if proto not in ("_tcp", "_udp"):
        raise ValueError(f"protocol {proto!r}: _tcp or _udp")
    type_name = f"{service}.{proto}.local."
    try:
        service_type_name(type_name, strict=True)
    except BadTypeInNameException as exc:
        raise ValueError(f"service type {service!r}: {exc}") from None
    return type_name


def check_instance(instance: str, type_name: str) -> None:
    """Refuse an instance name zeroconf would refuse when registering.

    Raises:
        ValueError: control characters, or a name that reads as a subtype.
    """
    # zeroconf's public check of a full name; a trailing "_sub" label would
    # make the instance read as a subtype, which it also refuses.
    try:
        parsed = service_type_name(f"{instance}.{type_name}", strict=True)
    except BadTypeInNameException as exc:
        raise ValueError(f"instance name {instance!r}: {exc}") from None
    if parsed != type_name or instance == "_sub" or instance.endswith("._sub"):
        raise ValueError(f"instance name {instance!r}: reads as a subtype of {type_name}")


@dataclass(frozen=True, slots=True)
class Advertisement:
    """What AT+MDNS=1 asks to publish, already checked."""

    hostname: str  # one DNS label, without ".local"
    type_name: str  # from service_type()
    port: int
    instance: str
    txt: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def server(self) -> str:
        return f"{self.hostname}.local."

    def service_info(self, addresses: list[str]) -> ServiceInfo:
        properties: dict[bytes, bytes] = {}
        for key, value in self.txt:
            properties.setdefault(key, value)  # RFC 6763 6.4: the first of a repeated key counts
        return ServiceInfo(
            self.type_name,
            f"{self.instance}.{self.type_name}",
            port=self.port,
            properties=properties,
            server=self.server,
            parsed_addresses=addresses,
        )


@dataclass
class _Responder:
    zeroconf: AsyncZeroconf
    info: ServiceInfo
    registering: asyncio.Task | None = None
    registered: bool = False  # in zeroconf's registry: goodbyes are due on stop


class Advertiser:
    """The one mDNS responder of the front process."""

    def __init__(self) -> None:
        self._responder: _Responder | None = None
        self._stopping: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._responder is not None

    async def start(self, ad: Advertisement, station: InterfaceInfo) -> None:
        """Advertise ``ad`` on ``station`` (which must have an IPv4 address).

        Raises:
            OSError: the mDNS sockets could not be opened on the interface.
            ValueError: a name zeroconf refuses.
        """
        if self._responder is not None:
            raise RuntimeError("mDNS is already advertising")
        if self._stopping is not None:
            await asyncio.shield(self._stopping)  # the previous responder says goodbye first
        assert station.ipv4 is not None
        addresses = [station.ipv4, *station.ipv6_gl, *station.ipv6_ll]
        interfaces: list[str | int] = [station.ipv4]
        if station.ipv6_gl or station.ipv6_ll:
            interfaces.append(socket.if_nametoindex(station.name))
        info = ad.service_info(addresses)
        version = IPVersion.All if len(interfaces) > 1 else IPVersion.V4Only
        try:
            zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=version)
        except (RuntimeError, ValueError) as exc:  # zeroconf's words for "no such interface"
            raise OSError(str(exc)) from exc
        responder = _Responder(zeroconf, info)
        responder.registering = asyncio.get_running_loop().create_task(self._register(responder))
        self._responder = responder
        log.info("mdns_started", host=ad.server, service=info.name, port=ad.port,
                 interface=station.name, addresses=addresses)

    async def _register(self, responder: _Responder) -> None:
        info = responder.info
        wanted = info.name
        try:
            announcing = await responder.zeroconf.async_register_service(info, allow_name_change=True)
            responder.registered = True
            if info.name != wanted:
                log.warning("mdns_renamed", wanted=wanted, name=info.name)
            await announcing
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the responder stays up for AT+MDNS=0; the log says why nothing answers
            log.error("mdns_register_failed", service=info.name, error=repr(exc))
        else:
            log.info("mdns_announced", service=info.name)

    async def stop(self) -> None:
        """Withdraw the service (goodbye packets) and close the sockets.

        A restart that cancels the waiting command does not cut the goodbyes
        short: they run in a task of their own.
        """
        self.stop_soon()
        if self._stopping is not None:
            await asyncio.shield(self._stopping)

    def stop_soon(self) -> None:
        """Begin stopping; for AT+RST and AT+RESTORE, which cannot wait."""
        responder, self._responder = self._responder, None
        if responder is None:
            return
        previous = self._stopping
        self._stopping = asyncio.get_running_loop().create_task(self._shutdown(responder, previous))

    async def close(self) -> None:
        """Stop at process exit, within a bounded time."""
        self.stop_soon()
        if self._stopping is None:
            return
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                await asyncio.shield(self._stopping)
        except TimeoutError:
            log.warning("mdns_stop_timeout")

    async def _shutdown(self, responder: _Responder, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await previous
        task = responder.registering
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                if responder.registered:
                    goodbyes = await responder.zeroconf.async_unregister_service(responder.info)
                    await goodbyes
                await responder.zeroconf.async_close()
        except Exception as exc:  # noqa: BLE001
            # Stopping must always end (AT+RST, shutdown): sockets already
            # gone with their interface, or a zeroconf error, leave nothing
            # more to send; the next start opens new ones.
            log.warning("mdns_stop_failed", error=repr(exc))
        log.info("mdns_stopped", service=responder.info.name)
        if self._stopping is asyncio.current_task():
            self._stopping = None
