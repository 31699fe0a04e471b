"""AT+CIUPDATE and AT+CIPFWVER?: firmware updates from the configured server.

Forms and bytes follow the spec page and esp-at-behavior.md 6.1/6.2 (ESP-AT's
at_ota_cmd.c):

* ``AT+CIUPDATE`` = ``AT+CIUPDATE=0``: the latest ``ota`` image, blocking.
* ``AT+CIUPDATE=<mode>[,"<version>"][,"<partition>"][,<nonblocking>]``:
  version and partition at most 64 bytes each ("" = latest, "ota").
  Blocking: progress lines ``+CIPUPDATE:1..4`` as part of the answer, then
  ``OK`` (and, for ``ota``, the session restarts as after AT+RST: links
  closed, ``ready``) or, on failure, ``ERROR`` right after the last progress
  line.  Nonblocking: ``OK`` at once, the same lines later as unsolicited
  messages, a failure ends with ``+CIPUPDATE:-1``; no automatic restart.
  With a version given, ESP-AT skips the lookup: 1 is followed by 4.
* ``AT+CIUPDATE?``: ``+CIUPDATE:<state>`` (0 idle, 1..4, -1 failed).
* A new update while a nonblocking one runs: ERROR (ESP-AT's "ALREADY IN OTA").
* ``AT+CIPFWVER?``: one ``+CIPFWVER:"<v>"`` per version on the server, then OK.

Policy: the server is ``[ota] server`` (bridged.net.ota); without one, or
without an address (no AT+CWJAP), an update cannot start: blocking
AT+CIUPDATE and AT+CIPFWVER? answer ERROR, and nonblocking AT+CIUPDATE
answers OK and then ``+CIPUPDATE:-1``, as ESP-AT's does for any update that
fails once started; the log says why.  What
``[ota]`` does not allow (bridged.ota_policy: plain http, a partition not in
``partitions``, a malformed version or a downgrade, no public key) is ERROR
before anything is requested, with an ``ota_refused`` warning saying why; a
refusal later on (the server's version, the signature) ends the update as any
failure does, with the same warning.  The state lives in the session, so a
restart shows 0 again, as a reboot does.
"""

from __future__ import annotations

import asyncio
import re

import structlog

from bridged.at import format as fmt
from bridged.at.errors import ExecFail, ParamInvalid
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context, OtaProgress
from bridged.config import OTA_PARTITION
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import station_ip
from bridged.net.ota import OtaFailed, OtaRefused, Updater

__all__: list[str] = []

log = structlog.get_logger()

FIRMWARE = "ota"  # the partition whose update restarts the session
_SET_SPECS = (Int(0, 1), Str(64, ""), Str(64, ""), Int(0, 1, 0))
# A partition name becomes a file name (<state dir>/ota/<name>.bin).
_PARTITION = re.compile(OTA_PARTITION)


def _updater(ctx: Context) -> Updater:
    """The configured server, or ExecFail when there is none or no network."""
    config = ctx.config.ota
    if not config.server:
        raise ExecFail("no update server is configured ([ota] server in the config file)")
    if station_ip(ctx) is None:
        raise ExecFail("no ip: the station is not connected (AT+CWJAP first)")
    # The store's file sits in the state directory; images go next to it.
    return Updater(config, ctx.store.path.parent)


def _failed(what: str, exc: OtaFailed) -> str:
    """The reason for the log; a refusal is also a warning of its own."""
    if isinstance(exc, OtaRefused):
        log.warning("ota_refused", command=what, why=exc.why)
    return f"{what} failed: {exc.why}"


# -- AT+CIUPDATE ---------------------------------------------------------------------


@handles("+CIUPDATE", Kind.QUERY)
def ciupdate_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(fmt.ota_state(ctx.ota.state))


@handles("+CIUPDATE", Kind.EXECUTE)
def ciupdate_execute(ctx: Context, line: CommandLine):
    return _start(ctx, 0, "", FIRMWARE, nonblocking=False)


@handles("+CIUPDATE", Kind.SET)
def ciupdate_set(ctx: Context, line: CommandLine):
    mode, version, partition, nonblocking = bind(line.tokens, _SET_SPECS, min_count=1)
    partition = partition or FIRMWARE
    if not _PARTITION.fullmatch(partition):
        raise ParamInvalid(f"partition {partition!r}: letters, digits, _ . - only", 3)
    return _start(ctx, mode, version, partition, nonblocking=bool(nonblocking))


def _start(ctx: Context, mode: int, version: str, partition: str, nonblocking: bool):
    session = ctx.ota
    if session.running:
        raise ExecFail("ALREADY IN OTA: an update is still running")
    try:
        updater = _updater(ctx)
    except ExecFail as exc:
        if not nonblocking:
            raise
        # ESP-AT's nonblocking form says OK before it tries anything: a failure is -1.
        log.info("ota_failed", why=exc.why)
        session.state = -1
        return Reply(after=lambda: ctx.urc(fmt.ota_progress(-1)))
    try:
        updater.policy.check(version, partition)
    except OtaRefused as exc:
        raise ExecFail(_failed("AT+CIUPDATE", exc)) from None
    log.info("ota_started", mode=mode, version=version or "latest", partition=partition,
             nonblocking=nonblocking, server=ctx.config.ota.server)
    session.running = True
    if nonblocking:
        # OK first, then the progress lines as unsolicited messages.
        return Reply(after=lambda: ctx.in_background(_nonblocking(ctx, session, updater, version, partition)))
    return _blocking(ctx, session, updater, version, partition)


def _progress(ctx: Context, session: OtaProgress, state: int, write) -> None:
    session.state = state
    write(fmt.ota_progress(state))


async def _blocking(ctx: Context, session: OtaProgress, updater: Updater, version: str, partition: str) -> Reply:
    try:
        image = await updater.update(version, partition, lambda n: _progress(ctx, session, n, ctx.answer_part))
    except OtaFailed as exc:
        session.state = -1
        raise ExecFail(_failed("AT+CIUPDATE", exc)) from None
    finally:
        session.running = False
    log.info("ota_done", file=str(image), partition=partition)
    if partition == FIRMWARE:
        return Reply(then=ctx.silence_links, after=lambda: ctx.restart(False))  # ESP-AT: OK, then esp_restart()
    return Reply()


async def _nonblocking(ctx: Context, session: OtaProgress, updater: Updater, version: str, partition: str) -> None:
    try:
        image = await updater.update(version, partition, lambda n: _progress(ctx, session, n, ctx.urc))
    except OtaFailed as exc:
        log.info("ota_failed", why=_failed("AT+CIUPDATE", exc))
        _progress(ctx, session, -1, ctx.urc)
    except asyncio.CancelledError:
        raise
    except Exception:
        # Our bug: the MCU still learns that the update ended.
        log.exception("ota_crashed")
        _progress(ctx, session, -1, ctx.urc)
    else:
        log.info("ota_done", file=str(image), partition=partition)
    finally:
        session.running = False


# -- AT+CIPFWVER? ----------------------------------------------------------------------


@handles("+CIPFWVER", Kind.QUERY)
def cipfwver_query(ctx: Context, line: CommandLine):
    updater = _updater(ctx)

    async def ask() -> Reply:
        try:
            versions = await updater.versions()
        except OtaFailed as exc:
            raise ExecFail(_failed("AT+CIPFWVER?", exc)) from None
        log.info("ota_versions", count=len(versions))
        return Reply(b"".join(fmt.fw_version(v) for v in versions))

    return ask()
