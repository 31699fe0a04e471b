"""Reading a link worker's control socket in tests."""

import asyncio
import socket

from bridged.ipc.control import recv_message


async def recv_control(control: socket.socket, timeout: float = 5.0):
    """The worker's next control message; fails if none comes within `timeout` or the socket closes."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                got = recv_message(control)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            assert got is not None, "the worker closed its control socket"
            return got[0]


async def recv_until(control: socket.socket, kind: type | tuple[type, ...], seen: list | None = None) -> object:
    """The worker's next message of `kind`; those before it go to `seen` (if given)."""
    while not isinstance(msg := await recv_control(control), kind):
        if seen is not None:
            seen.append(msg)
    return msg
