"""bridged.links.tcp against real loopback sockets: AT+CIPTCPOPT's options read back,
connects, the policy's check, refusals and the connect timeout."""

from __future__ import annotations

import asyncio
import select
import socket
from contextlib import ExitStack

import pytest

from bridged.ipc.messages import Connect, SetOptions
from bridged.links.tcp import apply_keep_alive, apply_options, open_tcp
from bridged.net.policy import DestinationRefused, Refusal
from tests.harness import free_port

pytestmark = pytest.mark.timeout(60)


def _listener(backlog: int = 8) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def _connect(port: int, **kw) -> Connect:
    return Connect(conn_id=1, link_type="TCP", host="127.0.0.1", port=port, **kw)


@pytest.mark.parametrize("options, expected", [
    (SetOptions(), {"so_linger": -1, "tcp_nodelay": 0, "keep_alive": 0}),
    (SetOptions(linger=0, nodelay=1, keep_alive=7), {"so_linger": 0, "tcp_nodelay": 1, "keep_alive": 7}),
    (SetOptions(linger=30, nodelay=0, keep_alive=7200), {"so_linger": 30, "tcp_nodelay": 0, "keep_alive": 7200}),
])
def test_options_are_set_and_read_back(options, expected):
    """What apply_options returns is what the kernel holds for the socket."""
    with socket.socket() as sock:
        assert apply_options(sock, options) == expected
        assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) == bool(options.nodelay)


def test_keep_alive_is_esp_ats_probe_scheme():
    """keep_alive=<s>: idle <s> s, then 3 probes 1 s apart; 0 turns keep-alive off again."""
    with socket.socket() as sock:
        apply_keep_alive(sock, 45)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert [sock.getsockopt(socket.IPPROTO_TCP, opt)
                for opt in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)] == [45, 1, 3]
        apply_keep_alive(sock, 0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_connects_non_blocking_from_the_local_ip_asked_for():
    """A connected, non-blocking socket to the listener, bound to AT+CIPSTART's local IP."""
    async def main() -> tuple[socket.socket, tuple]:
        with _listener() as server:
            sock, _ = await open_tcp(_connect(server.getsockname()[1], local_ip="127.0.0.1"), 5000)
            peer, _ = server.accept()
            with peer:
                return sock, peer.getpeername()

    sock, peer_sees = asyncio.run(main())
    with sock:
        assert not sock.getblocking()
        assert sock.getsockname() == peer_sees and peer_sees[0] == "127.0.0.1"


def test_the_policy_sees_each_address_and_its_refusal_is_the_error():
    """A refused address is never connected to: DestinationRefused names the rule."""
    seen: list[tuple[str, int]] = []

    def check(address: str, port: int) -> Refusal:
        seen.append((address, port))
        return Refusal(address, port, "deny '127.0.0.0/8'")

    async def main(port: int) -> None:
        await open_tcp(_connect(port), 5000, check)

    with _listener() as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        with pytest.raises(DestinationRefused, match="refused by \\[links\\] deny"):
            asyncio.run(main(port))
        assert seen == [("127.0.0.1", port)]
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_a_closed_port_is_refused():
    """Nothing listening: ConnectionRefusedError, as the MCU's ERROR needs."""
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(open_tcp(_connect(free_port()), 5000))


def test_the_connect_timeout_of_the_command_wins_over_the_default():
    """A listener whose backlog is full drops SYNs: the connect gives up after timeout_ms."""
    with ExitStack() as stack:
        server = stack.enter_context(_listener(0))
        port = server.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue; later SYNs are dropped
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        assert select.select([], fillers, [], 5)[1], "no filler got into the accept queue"

        async def main() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await open_tcp(_connect(port, timeout_ms=300), 60_000)
            return loop.time() - started

        took = asyncio.run(main())
    assert 0.25 <= took < 5
