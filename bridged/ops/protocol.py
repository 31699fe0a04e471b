"""The control socket: where it is, how a request and its reply are framed.

Theory of operation.  An AF_UNIX SOCK_STREAM socket; each message either
way is a 4-byte big-endian length, then that many bytes of UTF-8 JSON, an
object.  A request names its operation in ``cmd`` (``{"cmd": "status"}``);
the reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "<why>"}``.
A client may send several requests on one connection, one at a time
(``bridged status --watch`` does).  Limits: a request of more than
`MAX_REQUEST` bytes is refused unread (and the connection closed: its bytes
cannot be skipped safely); a reply is at most `MAX_REPLY`.

Where it is (`daemon_path`): ``bridged run --control PATH``; else
``$RUNTIME_DIRECTORY/control.sock`` (systemd's RuntimeDirectory=, the unit's
/run/bridged/<instance>); else ``<state dir>/control.sock``.  The supervisor
binds it before any child exists (mode 0660, the service's user and group)
and the front serves it (`bridged.ops.server`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "FILENAME",
    "MAX_REPLY",
    "MAX_REQUEST",
    "ProtocolError",
    "SUN_PATH_MAX",
    "daemon_path",
    "decode",
    "encode",
    "instance_path",
    "request",
    "sun_address",
]

FILENAME = "control.sock"
MAX_REQUEST = 64 * 1024
MAX_REPLY = 4 * 1024 * 1024
HEADER = struct.Struct(">I")
RUN_DIR = Path("/run/bridged")


class ProtocolError(ValueError):
    """A frame that is not a well-formed message; str() says why, for the error reply."""


def encode(obj: dict[str, Any]) -> bytes:
    """One frame: the length, then the JSON."""
    body = json.dumps(obj, separators=(",", ":"), default=str).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """A frame's JSON object.

    Raises:
        ProtocolError: not UTF-8 JSON, or not an object.
    """
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a request must be a JSON object")
    return obj


def daemon_path(option: str | None, state_dir: Path) -> Path:
    """Where ``bridged run`` puts its control socket (see the module's docstring)."""
    if option:
        return Path(os.path.abspath(option))
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / FILENAME
    return state_dir / FILENAME


SUN_PATH_MAX = 107  # sockaddr_un's 108 bytes, less the terminating NUL


@contextlib.contextmanager
def sun_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits a sockaddr_un, for the bind() or
    connect() made inside the ``with``.

    A path of more than `SUN_PATH_MAX` bytes (a by-id instance's
    /run/bridged/<escaped name>/ is often one) goes through a descriptor of
    its folder: ``/proc/self/fd/N/control.sock``, which the kernel resolves
    to the same file; daemon and client both use it, so either address
    reaches the socket.

    Raises:
        OSError: the folder cannot be opened.
    """
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def instance_path(name: str) -> Path:
    """The control socket of the systemd instance ``bridged@NAME``."""
    return RUN_DIR / name / FILENAME


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the daemon closed the connection")
        data += chunk
    return bytes(data)


def request(sock: socket.socket, obj: dict[str, Any]) -> dict[str, Any]:
    """Send one request on a connected (blocking, timed) socket; return the reply.

    Raises:
        OSError: the connection failed or timed out.
        ProtocolError: the reply is not a message.
    """
    sock.sendall(encode(obj))
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if size > MAX_REPLY:
        raise ProtocolError(f"a reply of {size} bytes, over the limit")
    return decode(_recv_exact(sock, size))
