"""mDNS advertising for AT+MDNS, on the emulated station's interface only.

Theory of operation: an ESP32 running ESP-AT answers mDNS on its Wi-Fi
station.  bridged's station is a host interface, so one ``AsyncZeroconf``
runs on the front's event loop, joined to the mDNS groups on that interface
alone (its IPv4 address, and its index for IPv6 when it has IPv6 addresses),
never on every interface of the host.  It publishes one service,
``<instance>.<service_type>.<proto>.local.`` (SRV to ``<hostname>.local.``
and TXT), and ``<hostname>.local.``'s A and AAAA records from the station's
addresses.

Following the station, as ESP-IDF's mdns follows its netif: AT+MDNS=1 keeps
a configuration (``enable``) and one task (``_follow``) owns the responder.
It looks at the station when the emulated Wi-Fi says it changed
(``station_changed``, called by bridged.commands.wifi's observer on AT+CWJAP,
AT+CWQAP, AT+CWMODE and auto-connect) and otherwise every few seconds, since
a DHCP renewal or a new IPv6 address sends no Wi-Fi event.  Whenever what
the responder depends on changes (connected or not, interface index, IPv4,
IPv6 addresses) the old responder says goodbye and a new one probes and
announces; while the station is not connected nothing answers but the
configuration stays.  AT+MDNS=0 (``disable``) and AT+RST (``stop_soon``)
forget the configuration.

A responder: opened -> probing, then announcing (in a task of its own, so
AT+MDNS=1 answers OK at once, as ESP-IDF's mdns does) -> withdrawn (goodbye
packets: TTL 0, three times, then its sockets close) in a stopping task that
a cancel does not cut short.  A new responder waits for the previous one's
goodbyes, so two never run at once.  A name taken by another responder on
the segment gets "-2", "-3" ... appended (the service keeps being
advertised, as ESP-IDF renames on a conflict); the rename is logged.
"""

from __future__ import annotations

import asyncio
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from zeroconf import BadTypeInNameException, IPVersion, ServiceInfo, service_type_name
from zeroconf.asyncio import AsyncZeroconf

from bridged.net.interfaces import InterfaceInfo
from bridged.tasks import Spawn

__all__ = ["Advertisement", "Advertiser", "StationLookup", "service_type", "check_instance"]

log = structlog.get_logger()

_STOP_TIMEOUT = 3.0  # s: goodbyes take about 0.25 s, closing the sockets less
# s between looks at the station's addresses while enabled: one getifaddrs() read
# of the host's interfaces, so a few seconds cost nothing measurable.
_POLL_INTERVAL = 2.0
# s at most between attempts to open sockets that failed to open (port 5353
# held by a program that does not share it): each failure doubles the wait,
# so zeroconf's own error log stays rare.
_RETRY_LIMIT = 60.0

# The station when the emulated Wi-Fi is connected, else None.
StationLookup = Callable[[], InterfaceInfo | None]


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


# Where a responder runs: a change of any part needs new sockets or new
# records, so the responder is replaced (goodbyes, then probing and announcing).
_Placement = tuple[str, int, str, tuple[str, ...], tuple[str, ...]]


def _placement(station: InterfaceInfo | None) -> _Placement | None:
    """What the responder depends on, or None when there is nothing to advertise on.

    Raises:
        OSError: the interface vanished since ``station`` was read.
    """
    if station is None or not station.connected:
        return None
    return (station.name, socket.if_nametoindex(station.name), station.ipv4,
            tuple(sorted(station.ipv6_gl)), tuple(sorted(station.ipv6_ll)))


class Advertiser:
    """The one mDNS responder of the front process, following the station."""

    def __init__(self, spawn: Spawn, poll_interval: float = _POLL_INTERVAL) -> None:
        self._spawn = spawn  # the front's TaskScope.spawn
        self._poll_interval = poll_interval
        self._ad: Advertisement | None = None  # AT+MDNS=1's configuration, until AT+MDNS=0 or a restart
        self._station: StationLookup | None = None
        self._following: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # The Wi-Fi reported a change since the last look.  While connected,
        # that is a rejoin (AT+CWJAP again): a real ESP32's link went down
        # and up, so its mdns probes and announces anew.
        self._wifi_event = False
        self._responder: _Responder | None = None
        self._placement: _Placement | None = None
        self._stopping: asyncio.Task | None = None
        self._failure = ""  # the last open error logged, so a poll does not repeat it

    @property
    def enabled(self) -> bool:
        """AT+MDNS=1 is in force (advertising or waiting for the station)."""
        return self._ad is not None

    @property
    def running(self) -> bool:
        """A responder answers on the station now."""
        return self._responder is not None

    async def enable(self, ad: Advertisement, station: StationLookup) -> None:
        """Advertise ``ad`` whenever ``station()`` gives a connected interface.

        Returns once the first look at the station is done: the responder is
        open (probing goes on in the background) or the station is not
        connected yet.

        Raises:
            RuntimeError: already enabled.
            OSError: the station is connected but the mDNS sockets could not
                be opened on it; the configuration is dropped.
        """
        if self._ad is not None:
            raise RuntimeError("mDNS is already enabled")
        self._ad, self._station, self._failure = ad, station, ""
        first = asyncio.get_running_loop().create_future()
        self._following = self._spawn(self._follow(first))
        await asyncio.shield(first)

    def station_changed(self) -> None:
        """The emulated Wi-Fi joined, left or changed mode: look again now."""
        self._wifi_event = True
        self._wake.set()

    async def disable(self) -> None:
        """AT+MDNS=0: forget the configuration, withdraw the service (goodbye packets)."""
        self.stop_soon()
        if self._stopping is not None:
            await asyncio.shield(self._stopping)

    def stop_soon(self) -> None:
        """Forget the configuration and begin withdrawing; for AT+RST and AT+RESTORE, which cannot wait."""
        self._ad = self._station = None
        following, self._following = self._following, None
        if following is not None:
            following.cancel()  # it waits on a poll or on goodbyes, which go on (shielded)
        self._withdraw()

    async def close(self) -> None:
        """Stop at process exit, within a bounded time."""
        following = self._following
        self.stop_soon()
        waits = [t for t in (following, self._stopping) if t is not None]
        if not waits:
            return
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                await asyncio.gather(*(asyncio.shield(t) for t in waits), return_exceptions=True)
        except TimeoutError:
            log.warning("mdns_stop_timeout")

    # -- following the station ------------------------------------------------------

    async def _follow(self, first: asyncio.Future) -> None:
        wait = self._poll_interval
        while True:
            self._wake.clear()
            try:
                await self._reconcile()
            except OSError as exc:
                if not first.done():
                    # AT+MDNS=1 itself answers ERROR: nothing stays configured.
                    self._ad = self._station = self._following = None
                    first.set_exception(exc)
                    return
                if str(exc) != self._failure:
                    log.error("mdns_open_failed", error=str(exc), retry_in=min(wait * 2, _RETRY_LIMIT))
                self._failure = str(exc)
                wait = min(wait * 2, _RETRY_LIMIT)
            except Exception as exc:  # noqa: BLE001 -- a bug here must not end advertising silently
                if repr(exc) != self._failure:
                    log.error("mdns_follow_failed", error=repr(exc))
                self._failure = repr(exc)
                wait = min(wait * 2, _RETRY_LIMIT)
            else:
                self._failure = ""
                wait = self._poll_interval
            if not first.done():
                first.set_result(None)
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass  # a poll: a DHCP renewal or a new IPv6 address sends no Wi-Fi event

    async def _reconcile(self) -> None:
        """Make the responder match the station: none, unchanged, or a new one."""
        rejoined, self._wifi_event = self._wifi_event, False
        station = self._station() if self._station is not None else None
        wanted = _placement(station)
        if wanted == self._placement and not (rejoined and wanted is not None):
            return
        if self._placement is not None:
            log.info("mdns_station_changed", was=self._placement, now=wanted, wifi_event=rejoined)
        self._withdraw()
        if self._stopping is not None:
            await asyncio.shield(self._stopping)  # the previous responder says goodbye first
        if wanted is None or self._ad is None:
            return
        self._open(self._ad, station)
        self._placement = wanted

    def _open(self, ad: Advertisement, station: InterfaceInfo) -> None:
        """Open a responder on ``station`` and begin probing; no await, so a cancel cannot orphan it.

        Raises:
            OSError: the mDNS sockets could not be opened, or zeroconf refused the records.
        """
        assert station.ipv4 is not None
        addresses = [station.ipv4, *station.ipv6_gl, *station.ipv6_ll]
        interfaces: list[str | int] = [station.ipv4]
        if station.ipv6_gl or station.ipv6_ll:
            interfaces.append(socket.if_nametoindex(station.name))
        version = IPVersion.All if len(interfaces) > 1 else IPVersion.V4Only
        try:
            info = ad.service_info(addresses)
            zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=version)
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError, ValueError: "no such interface"
            # zeroconf does not close the sockets it opened before the one
            # that failed; they live in its frames' locals, which the
            # traceback keeps (a reference cycle) until a garbage collection.
            # Clearing those frames closes them now.
            traceback.clear_frames(exc.__traceback__)
            failure = OSError(str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}")
        else:
            failure = None
        if failure is not None:
            raise failure  # outside the except: no __context__ keeping the old traceback
        responder = _Responder(zeroconf, info)
        responder.registering = self._spawn(self._register(responder))
        self._responder = responder
        log.info("mdns_started", host=ad.server, service=info.name, port=ad.port,
                 interface=station.name, addresses=addresses)

    def _withdraw(self) -> None:
        """Begin the goodbyes of the responder, if one runs."""
        responder, self._responder = self._responder, None
        self._placement = None
        if responder is None:
            return
        previous = self._stopping
        self._stopping = self._spawn(self._shutdown(responder, previous))

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
