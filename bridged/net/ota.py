"""Firmware updates from the configured update server (AT+CIUPDATE, AT+CIPFWVER?).

Theory of operation.  ESP-AT fetches firmware from iot.espressif.cn with a
per-module token (esp-at-behavior.md 6.1, at_ota_cmd.c).  bridged talks the
same protocol to the server of ``[ota] server`` instead, so an admin can serve
updates from any web server:

1. resolve the server's host                       -> progress 1 (server found)
2. only when no version was asked for: connect     -> progress 2
   ``GET /v1/device/rom/?is_format_simple=true``, take ``"rom_version": "<v>"``
                                                   -> progress 3
3. ``GET /v1/device/rom/?action=download_rom&version=<v>&filename=<part>.bin``:
   Content-Length required and at most ``max_size``; the body streams into
   ``<state dir>/ota/.<part>.bin.*.part`` and is renamed to ``<part>.bin``
   only once every byte is there and on disk; then ``install_command``, when
   set, runs with that path                         -> progress 4

Every request carries ``Authorization: token <token>``.  Any failure (no
address, refused connection, TLS, HTTP status other than 2xx, a short or
oversized body, the install command failing, the overall timer) raises
``OtaFailed``, as do a Content-Length that is not plain ASCII digits, any
Transfer-Encoding and a disk error; no temporary file survives it, and when
the install command fails (or the update is cancelled after the rename) the
partition's previous image, if any, is put back, else the new one removed.
install_command runs in a session of its own with the image directory as
cwd and no fd of bridged's; a failure, the timer, AT+RST or a stop kill that
session.

``versions()`` is AT+CIPFWVER?: ``GET /v1/device/rom`` (10 s), every
``"version": "<v>"`` of the body in order.

Deviations from ESP-AT: the <ota mode> (0 HTTP, 1 HTTPS) does not pick the
transport, the server URL's scheme does; an image's first bytes are not
checked for an ESP32 magic (0xE9), since what bridged installs is the admin's
own format; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import quote

import structlog

from bridged.config import OtaConfig
from bridged.net import http
from bridged.net.resolver import ResolveError, resolve
from bridged.pki import MAX_INDEX, PkiStore

__all__ = ["OtaFailed", "Updater", "IMAGE_DIR"]

log = structlog.get_logger()

IMAGE_DIR = "ota"
VERSIONS_TIMEOUT = 10.0  # seconds for AT+CIPFWVER? (ESP-AT's)
_JSON_LIMIT = 65536  # bytes of a version answer we read
_CHUNK = 65536
_VERSION_MAX = 64  # ESP_AT_VERSION_LEN_MAX
_OUTPUT_KEPT = 500  # bytes of install_command's output kept for the log
_INSTALL_POLL = 0.05  # seconds between checks whether install_command exited
# Substring matching as ESP-AT does (the JSON schema is not public); a value
# with a control character never matches, so no line break reaches the UART.
_ROM_VERSION = re.compile(rb'"rom_version"\s*:\s*"([^"\x00-\x1f\x7f]*)"')
_VERSION = re.compile(rb'"version"\s*:\s*"([^"\x00-\x1f\x7f]*)"')


class OtaFailed(Exception):
    """The update (or the version list) failed; ``why`` is for the log."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def tls_context(state_dir: Path) -> ssl.SSLContext:
    """The system CA store plus every client_ca.N of bridged's certificate store."""
    context = ssl.create_default_context()
    store = PkiStore(state_dir)
    for index in range(MAX_INDEX + 1):
        path = store.path("client_ca", index)
        if path is None:
            continue
        try:
            context.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            log.warning("ota_ca_skipped", file=str(path), error=str(exc))
    return context


class Updater:
    """One server, as ``[ota]`` configures it.

    Args:
        state_dir: images go to its ``ota/`` directory; https trusts its client_ca.N too.
        dns_servers: AT+CIPDNS manual servers, else empty (the host's resolver).

    The server is the admin's, not the MCU's: IPv4 or IPv6, whatever AT+CIPV6 says.
    """

    def __init__(self, config: OtaConfig, state_dir: Path, dns_servers: Sequence[str] = ()) -> None:
        self.config = config
        self.state_dir = state_dir
        self.dns_servers = tuple(dns_servers)
        self.where = http.target(config.server)
        self.headers = {"Authorization": f"token {config.token}"}

    # -- AT+CIUPDATE ------------------------------------------------------------------

    async def update(self, version: str, partition: str, progress: Callable[[int], None]) -> Path:
        """Fetch (and install) one image; returns its path.

        Args:
            version: the version to fetch, "" for the server's latest.
            partition: "ota" (the firmware) or another partition name.
            progress: called with 1, 2, 3, 4 as ESP-AT prints +CIPUPDATE:<n>.

        Raises:
            OtaFailed: see the module docstring; also when ``[ota] timeout_ms`` passes.
        """
        limit = self.config.timeout_ms / 1000
        try:
            async with asyncio.timeout(limit):
                return await self._update(version, partition, progress)
        except TimeoutError:
            raise OtaFailed(f"the update took longer than {limit:g} s") from None

    async def _update(self, version: str, partition: str, progress: Callable[[int], None]) -> Path:
        addresses = await self._resolve()
        progress(1)
        if not version:
            connection = await self._connect(addresses)
            progress(2)
            version = await self._latest(connection)
            log.info("ota_latest_version", version=version)
            progress(3)
        complete = await self._download(await self._connect(addresses), version, partition)
        image = complete.parent / f"{partition}.bin"
        # A failed install (or AT+RST, the timer) must not cost the image the
        # last update of this partition left: keep it aside until we are done.
        try:
            previous = _keep_aside(image)
        except OSError as exc:
            complete.unlink(missing_ok=True)
            raise OtaFailed(f"image: cannot keep the previous {image}: {exc.strerror or exc}") from None
        try:
            try:
                os.replace(complete, image)
                await asyncio.to_thread(_fsync_dir, image.parent)
            except OSError as exc:
                raise OtaFailed(f"image: cannot rename it to {image}: {exc.strerror or exc}") from None
            if self.config.install_command:
                await self._install(image, version, partition)
        except BaseException:
            Path(complete).unlink(missing_ok=True)
            if previous is not None:
                os.replace(previous, image)
            else:
                image.unlink(missing_ok=True)
            raise
        if previous is not None:
            previous.unlink(missing_ok=True)
        log.info("ota_image_saved", file=str(image), size=image.stat().st_size)
        progress(4)
        return image

    async def _resolve(self) -> list[str]:
        try:
            return await resolve(self.where.host, socket.AF_UNSPEC, self.dns_servers)
        except ResolveError as exc:
            raise OtaFailed(f"update server: {exc}") from None

    async def _connect(self, addresses: list[str]) -> http.Connection:
        context = tls_context(self.state_dir) if self.where.tls else None
        try:
            return await http.connect(self.where, addresses, context)
        except http.HttpError as exc:
            raise OtaFailed(str(exc)) from None

    async def _request(self, connection: http.Connection, path: str) -> http.Response:
        """GET on an open connection; a status of 300 or more fails."""
        try:
            response = await connection.get(path, self.headers)
        except http.HttpError as exc:
            connection.close()
            raise OtaFailed(f"GET {path}: {exc}") from None
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
        if not 0 < len(version) <= _VERSION_MAX or not version.isprintable():
            raise OtaFailed(f"GET {path}: rom_version {version[:80]!r} is not 1 to 64 printable characters")
        return version

    async def _download(self, connection: http.Connection, version: str, partition: str) -> Path:
        path = (f"/v1/device/rom/?action=download_rom&version={quote(version, safe='')}"
                f"&filename={quote(partition, safe='')}.bin")
        response = await self._request(connection, path)
        saved: Path | None = None
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
            saved = await self._save(response, length, partition)
            await response.close()
            return saved
        except BaseException:
            if saved is not None:  # cancelled while closing: the caller never learns its name
                saved.unlink(missing_ok=True)
            raise
        finally:
            await response.close()

    async def _save(self, response: http.Response, length: int, partition: str) -> Path:
        """Stream the body into a temporary file, complete and on disk when returned.

        Raises:
            OtaFailed: the body is short, or the file cannot be written (disk
                full, read-only state directory); no temporary file is left.
        """
        directory = self.state_dir / IMAGE_DIR
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            # Left by a power loss or SIGKILL mid-download; only one update runs at a time.
            for stale in directory.glob(f".{partition}.bin.*.part"):
                stale.unlink(missing_ok=True)
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{partition}.bin.", suffix=".part")
        except OSError as exc:
            raise OtaFailed(f"image: cannot write in {directory}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                remaining = length
                while remaining:
                    try:
                        chunk = await response.reader.read(min(_CHUNK, remaining))
                    except (OSError, ssl.SSLError) as exc:
                        raise OtaFailed(f"image: {exc}") from None
                    if not chunk:
                        raise OtaFailed(f"image: the body ended after {length - remaining} of {length} bytes")
                    out.write(chunk)
                    remaining -= len(chunk)
                out.flush()
                # On an SD card this may take a while: not on the front's loop.
                await asyncio.to_thread(os.fsync, out.fileno())
        except OSError as exc:  # the network's are OtaFailed already: this is the disk
            Path(temporary).unlink(missing_ok=True)
            raise OtaFailed(f"image: cannot write {temporary}: {exc.strerror or exc}") from None
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return Path(temporary)

    async def _install(self, image: Path, version: str, partition: str) -> None:
        """Run install_command; it fails the update unless it exits 0.

        The command gets its own session (so the timer, AT+RST or a stop kill
        everything it started), the image directory as cwd, no fd of ours
        but stdin (/dev/null), stdout and stderr (uvloop's subprocess ignores
        close_fds, hence subprocess.Popen), and only the last _OUTPUT_KEPT
        bytes of its output are kept.  We wait for its exit, not for the end
        of its output: a job it leaves behind (a scheduled restart) may keep
        the pipe open.
        """
        argv = [*shlex.split(self.config.install_command), str(image)]
        env = dict(os.environ, BRIDGED_OTA_VERSION=version, BRIDGED_OTA_PARTITION=partition)
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=image.parent, env=env, close_fds=True, start_new_session=True)
        except OSError as exc:
            raise OtaFailed(f"install_command {argv[0]!r}: {exc.strerror or exc}") from None
        output = _Tail(process.stdout)
        try:
            while process.poll() is None:
                await asyncio.sleep(_INSTALL_POLL)
        except BaseException:  # cancelled (AT+RST, the timer, a stop): nothing of it may outlive us
            _kill_session(process)
            raise
        finally:
            tail = output.close()
        if process.returncode != 0:
            _kill_session(process)  # what a failed install left running must not act later
            raise OtaFailed(f"install_command exited with status {process.returncode}: {tail}")
        log.info("ota_installed", command=argv[0], output=tail)

    # -- AT+CIPFWVER? -------------------------------------------------------------------

    async def versions(self) -> list[str]:
        """Every ``"version": "<v>"`` of ``GET /v1/device/rom``, in order.

        Raises:
            OtaFailed: no connection, HTTP status >= 400, a bad body, or 10 s passed.
        """
        path = "/v1/device/rom"
        try:
            async with asyncio.timeout(VERSIONS_TIMEOUT):
                connection = await self._connect(await self._resolve())
                try:
                    response = await connection.get(path, self.headers)
                except http.HttpError as exc:
                    connection.close()
                    raise OtaFailed(f"GET {path}: {exc}") from None
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


class _Tail:
    """The last _OUTPUT_KEPT bytes a pipe delivers, read on the running loop."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.kept = b""
        self.loop = asyncio.get_running_loop()
        os.set_blocking(pipe.fileno(), False)
        self.loop.add_reader(pipe.fileno(), self._read)

    def _read(self) -> bool:
        try:
            data = os.read(self.pipe.fileno(), _CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.pipe.fileno())
            return False
        self.kept = (self.kept + data)[-_OUTPUT_KEPT:]
        return True

    def close(self) -> str:
        """Stop reading (after what is already there); the kept text."""
        self.loop.remove_reader(self.pipe.fileno())
        for _ in range(64):  # what the command wrote just before it exited
            if not self._read():
                break
        self.pipe.close()
        return self.kept.decode("utf-8", "replace").strip()


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the command's session (its children too) and reap the command."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing of it is left
    process.wait()  # at once: SIGKILL, or it had exited


def _keep_aside(image: Path) -> Path | None:
    """A second name for the current image (None when there is none), to restore it."""
    aside = image.with_name(f".{image.name}.previous")
    aside.unlink(missing_ok=True)
    try:
        os.link(image, aside)
    except FileNotFoundError:
        return None
    return aside


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
