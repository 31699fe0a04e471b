"""Firmware updates from the configured update server (AT+CIUPDATE, AT+CIPFWVER?).

Theory of operation.  ESP-AT fetches firmware from iot.espressif.cn with a
per-module token (esp-at-behavior.md 6.1, at_ota_cmd.c).  bridged talks the
same protocol to the server of ``[ota] server`` instead, so an admin can serve
updates from any web server.  The MCU only asks for an update; the admin's
configuration decides what may be installed (bridged.ota_policy, before anything is
requested, and again as the answers come):

0. the request: the partition is one of ``[ota] partitions``, the version (if
   given) is 1 to 64 of ``A-Z a-z 0-9 . _ + -`` and not older than the running
   one; the server is https (http only with ``insecure_http``); public keys load
1. resolve the server's host with the host's resolver, never with the MCU's
   AT+CIPDNS servers                               -> progress 1 (server found)
2. only when no version was asked for: connect     -> progress 2
   ``GET /v1/device/rom/?is_format_simple=true``, take ``"rom_version": "<v>"``
   (its syntax checked)                            -> progress 3, then as in 0
3. ``GET .../?action=download_rom&version=<v>&filename=<part>.bin.sig``: the
   detached signature (bridged.ota_image); 404 is "unsigned", refused unless
   ``allow_unsigned``
4. ``GET /v1/device/rom/?action=download_rom&version=<v>&filename=<part>.bin``:
   Content-Length required and at most ``max_size``; the body streams into
   ``<state dir>/ota/.<part>.bin.*.part`` (hashed on the way) and, only once
   every byte is on disk AND the signature verifies over {partition, version,
   size, sha256}, is renamed to ``<part>.bin``; then ``install_command``, when
   set, runs with that path (bridged.ota_install: no capabilities, no token);
   the version is recorded in ``<part>.version``     -> progress 4

"Running version" of a partition: the higher of the version its last update
recorded and, for ``ota``, ``[ota] current_version``; older ones are refused
unless ``allow_downgrade``.  Every request carries ``Authorization: token
<token>``; https trusts ``[ota] ca_file`` alone when set, else the system CA
store (never the client_ca.N of the MCU's SSL links).  Any failure (no address, refused
connection, TLS, HTTP status other than 2xx, a short or oversized body, a
refusal, the install command failing, the overall timer) raises
``OtaFailed`` (``OtaRefused`` for what the policy refuses), as do a
Content-Length that is not plain ASCII digits, any Transfer-Encoding and a disk
error; no temporary file survives it, and when the install command fails (or
the update is cancelled after the rename) the partition's previous image, if
any, is put back, else the new one removed.

``versions()`` is AT+CIPFWVER?: ``GET /v1/device/rom`` (10 s), every
``"version": "<v>"`` of the body in order.

Deviations from ESP-AT: the <ota mode> (0 HTTP, 1 HTTPS) does not pick the
transport, the server URL's scheme does; an image's first bytes are not
checked for an ESP32 magic (0xE9), since what bridged installs is the admin's
own format; redirects are not followed; images are signed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import ssl
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import structlog

from bridged import ota_image
from bridged.config import OtaConfig
from bridged.net import http
from bridged.net.resolver import ResolveError, resolve
from bridged.ota_install import InstallFailed, run_install
from bridged.atomic import Replacement, fsync_dir
from bridged.ota_policy import OtaFailed, OtaRefused, Policy

__all__ = ["OtaFailed", "OtaRefused", "Updater", "IMAGE_DIR"]

log = structlog.get_logger()

IMAGE_DIR = "ota"
VERSIONS_TIMEOUT = 10.0  # seconds for AT+CIPFWVER? (ESP-AT's)
_JSON_LIMIT = 65536  # bytes of a version answer we read
_CHUNK = 65536
# Substring matching as ESP-AT does (the JSON schema is not public); a value
# with a control character never matches, so no line break reaches the UART.
_ROM_VERSION = re.compile(rb'"rom_version"\s*:\s*"([^"\x00-\x1f\x7f]*)"')
_VERSION = re.compile(rb'"version"\s*:\s*"([^"\x00-\x1f\x7f]*)"')


def tls_context(ca_file: str) -> ssl.SSLContext:
    """``[ota] ca_file`` alone when set, else the system CA store; host names checked."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise OtaRefused(f"[ota] ca_file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None


class Updater:
    """One server, as ``[ota]`` configures it.

    Args:
        state_dir: images (and their version records) go to its ``ota/`` directory.

    The server is the admin's, not the MCU's: resolved by the host's resolver,
    IPv4 or IPv6, whatever AT+CIPDNS and AT+CIPV6 say.
    """

    def __init__(self, config: OtaConfig, state_dir: Path) -> None:
        self.config = config
        self.directory = state_dir / IMAGE_DIR
        self.where = http.target(config.server)
        self.headers = {"Authorization": f"token {config.token}"}
        self.policy = Policy(config, self.directory, self.where.tls)

    # -- AT+CIUPDATE ------------------------------------------------------------------

    async def update(self, version: str, partition: str, progress: Callable[[int], None]) -> Path:
        """Fetch, verify (and install) one image; returns its path.

        Args:
            version: the version to fetch, "" for the server's latest.
            partition: one of ``[ota] partitions``.
            progress: called with 1, 2, 3, 4 as ESP-AT prints +CIPUPDATE:<n>.

        Raises:
            OtaFailed: see the module docstring; also when ``[ota] timeout_ms`` passes.
        """
        keys = self.policy.check(version, partition)
        limit = self.config.timeout_ms / 1000
        try:
            async with asyncio.timeout(limit):
                return await self._update(version, partition, keys, progress)
        except TimeoutError:
            raise OtaFailed(f"the update took longer than {limit:g} s") from None

    async def _update(self, version: str, partition: str, keys: list, progress: Callable[[int], None]) -> Path:
        addresses = await self._resolve()
        progress(1)
        if not version:
            connection = await self._connect(addresses)
            progress(2)
            version = await self._latest(connection)
            log.info("ota_latest_version", version=version)
            progress(3)
            self.policy.check_version(version, partition)  # a well-formed version, maybe an old one
        signature = await self._signature(addresses, version, partition, keys)
        complete, manifest = await self._download(await self._connect(addresses), version, partition)
        try:
            self.policy.verify(manifest, signature, keys)
        except BaseException:
            complete.discard()
            raise
        image = await self._put_in_place(complete, manifest)
        await asyncio.to_thread(self.policy.record_version, partition, version)
        log.info("ota_image_saved", file=str(image), size=manifest.size, sha256=manifest.sha256)
        progress(4)
        return image

    async def _put_in_place(self, complete: Replacement, manifest: ota_image.Manifest) -> Path:
        """Rename the verified image into place and run install_command on it.

        A failed install (or AT+RST, the timer) must not cost the partition the
        image its last update left: that one is kept aside until we are done.
        """
        image = complete.target
        try:
            previous = _keep_aside(image)
        except OSError as exc:
            complete.discard()
            raise OtaFailed(f"image: cannot keep the previous {image}: {exc.strerror or exc}") from None
        try:
            try:
                complete.rename()  # here, not in the thread: a cancellation must find it done or not begun
                await asyncio.to_thread(fsync_dir, image.parent)
            except OSError as exc:
                raise OtaFailed(f"image: cannot rename it to {image}: {exc.strerror or exc}") from None
            if self.config.install_command:
                try:
                    await run_install(self.config.install_command, image, manifest.version,
                                      manifest.partition, manifest.sha256)
                except InstallFailed as exc:
                    raise OtaFailed(exc.why) from None
        except BaseException:
            complete.discard()
            if previous is not None:
                os.replace(previous, image)
            else:
                image.unlink(missing_ok=True)
            raise
        if previous is not None:
            previous.unlink(missing_ok=True)
        return image

    async def _resolve(self) -> list[str]:
        # No AT+CIPDNS servers: the MCU must not choose where the update comes from.
        try:
            return await resolve(self.where.host, socket.AF_UNSPEC, ())
        except ResolveError as exc:
            raise OtaFailed(f"update server: {exc}") from None

    async def _connect(self, addresses: list[str]) -> http.Connection:
        context = tls_context(self.config.ca_file) if self.where.tls else None
        try:
            return await http.connect(self.where, addresses, context)
        except http.HttpError as exc:
            raise OtaFailed(str(exc)) from None

    async def _get(self, connection: http.Connection, path: str) -> http.Response:
        """GET on an open connection, whatever the status."""
        try:
            return await connection.get(path, self.headers)
        except http.HttpError as exc:
            connection.close()
            raise OtaFailed(f"GET {path}: {exc}") from None

    async def _request(self, connection: http.Connection, path: str) -> http.Response:
        """GET on an open connection; a status outside 2xx fails (a redirect is not followed)."""
        response = await self._get(connection, path)
        if not 200 <= response.status < 300:
            await response.close()
            raise OtaFailed(f"GET {path}: HTTP status {response.status}")
        return response

    async def _latest(self, connection: http.Connection) -> str:
        path = "/v1/device/rom/?is_format_simple=true"
        response = await self._request(connection, path)
        try:
            body = await response.read_body(_JSON_LIMIT)
        except http.HttpError as exc:
            raise OtaFailed(f"GET {path}: {exc}") from None
        finally:
            await response.close()
        match = _ROM_VERSION.search(body)
        if match is None:
            raise OtaFailed(f'GET {path}: no "rom_version" in the answer')
        version = match.group(1).decode("latin-1")
        problem = ota_image.version_problem(version)
        if problem is not None:
            raise OtaRefused(f"GET {path}: rom_version: {problem}")
        return version

    @staticmethod
    def _download_path(version: str, filename: str) -> str:
        return (f"/v1/device/rom/?action=download_rom&version={quote(version, safe='')}"
                f"&filename={quote(filename, safe='')}")

    async def _signature(self, addresses: list[str], version: str, partition: str, keys: list) -> bytes | None:
        """The image's signature; None when unsigned images are allowed and there is none.

        With ``allow_unsigned`` and no public key nothing is asked; with both, a
        404 means unsigned and any signature there must still verify.
        """
        if not keys:
            return None
        path = self._download_path(version, f"{partition}.bin.sig")
        response = await self._get(await self._connect(addresses), path)
        try:
            if response.status == 404 and self.config.allow_unsigned:
                return None
            if response.status == 404:
                raise OtaRefused(f"image: no signature ({partition}.bin.sig: HTTP status 404)"
                                 " and [ota] allow_unsigned is false")
            if not 200 <= response.status < 300:
                raise OtaFailed(f"GET {path}: HTTP status {response.status}")
            body = await response.read_body(ota_image.SIGNATURE_MAX)
        except http.HttpError as exc:
            raise OtaFailed(f"GET {path}: {exc}") from None
        finally:
            await response.close()
        try:
            return ota_image.parse_signature(body)
        except ota_image.SignatureError as exc:
            raise OtaRefused(f"image: {partition}.bin.sig: {exc}") from None

    async def _download(self, connection: http.Connection, version: str,
                        partition: str) -> tuple[Replacement, ota_image.Manifest]:
        path = self._download_path(version, f"{partition}.bin")
        response = await self._request(connection, path)
        saved: Replacement | None = None
        try:
            try:
                length = response.content_length()
            except http.HttpError as exc:
                raise OtaFailed(f"image: {exc}") from None
            if length is None:
                raise OtaFailed("image: the server sent no Content-Length")
            if length == 0:
                raise OtaFailed("image: the server sent an empty image")
            if length > self.config.max_size:
                raise OtaFailed(f"image: {length} bytes is over [ota] max_size {self.config.max_size}")
            log.info("ota_download", version=version, partition=partition, size=length, peer=response.peer)
            saved, sha256 = await self._save(response, length, partition)
            await response.close()
            return saved, ota_image.Manifest(partition, version, length, sha256)
        except BaseException:
            response.abort()
            if saved is not None:  # cancelled while closing: the caller never learns of it
                saved.discard()
            raise
        finally:
            await response.close()

    async def _save(self, response: http.Response, length: int, partition: str) -> tuple[Replacement, str]:
        """Stream the body into a temporary file beside the partition's image, complete
        and on disk when returned, with its sha256 (hex).

        Raises:
            OtaFailed: the body is short, or the file cannot be written (disk
                full, read-only state directory); no temporary file is left.
        """
        directory = self.directory
        digest = hashlib.sha256()
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            # Left by a power loss or SIGKILL mid-download; only one update runs at a time.
            for stale in directory.glob(f".{partition}.bin.*.part"):
                stale.unlink(missing_ok=True)
            image = Replacement(directory / f"{partition}.bin", suffix=".part")
        except OSError as exc:
            raise OtaFailed(f"image: cannot write in {directory}: {exc.strerror or exc}") from None
        try:
            remaining = length
            while remaining:
                try:
                    chunk = await response.reader.read(min(_CHUNK, remaining))
                except (OSError, ssl.SSLError) as exc:
                    raise OtaFailed(f"image: {exc}") from None
                if not chunk:
                    raise OtaFailed(f"image: the body ended after {length - remaining} of {length} bytes")
                image.write(chunk)
                digest.update(chunk)
                remaining -= len(chunk)
            # On an SD card this may take a while: not on the front's loop.
            await asyncio.to_thread(image.finish)
        except OSError as exc:  # the network's are OtaFailed already: this is the disk
            image.discard()
            raise OtaFailed(f"image: cannot write {image.path}: {exc.strerror or exc}") from None
        except BaseException:
            image.discard()
            raise
        return image, digest.hexdigest()

    # -- AT+CIPFWVER? -------------------------------------------------------------------

    async def versions(self) -> list[str]:
        """Every ``"version": "<v>"`` of ``GET /v1/device/rom``, in order.

        Raises:
            OtaFailed: no connection, HTTP status >= 400, a bad body, or 10 s passed;
                OtaRefused: plain http without ``insecure_http``.
        """
        path = "/v1/device/rom"
        try:
            self.policy.check_server()
            async with asyncio.timeout(VERSIONS_TIMEOUT):
                response = await self._get(await self._connect(await self._resolve()), path)
                try:
                    if response.status >= 400:
                        raise OtaFailed(f"GET {path}: HTTP status {response.status}")
                    body = await response.read_body(_JSON_LIMIT)
                except http.HttpError as exc:
                    raise OtaFailed(f"GET {path}: {exc}") from None
                finally:
                    await response.close()
        except TimeoutError:
            raise OtaFailed(f"GET {path}: no answer within {VERSIONS_TIMEOUT:g} s") from None
        return [m.group(1).decode("latin-1") for m in _VERSION.finditer(body)]


def _keep_aside(image: Path) -> Path | None:
    """A second name for the current image (None when there is none), to restore it."""
    aside = image.with_name(f".{image.name}.previous")
    aside.unlink(missing_ok=True)
    try:
        os.link(image, aside)
    except FileNotFoundError:
        return None
    return aside
