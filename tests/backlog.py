"""A loopback server that is not keeping up: once its one-place accept queue is
full, further SYNs go unanswered and a connect to it waits (and is retried)."""

from __future__ import annotations

import select
import socket

__all__ = ["BacklogServer"]


class BacklogServer:
    """A listener with backlog 0 on 127.0.0.1; fill() queues connections of the test's own."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []

    def fill(self, count: int) -> None:
        """Starts `count` non-blocking connects that wait in (or for) the accept queue."""
        for _ in range(count):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def wait_filled(self, timeout: float = 5.0) -> None:
        """Until a filler is in the accept queue (its connect completed)."""
        _, connected, _ = select.select([], self.fillers, [], timeout)
        assert connected, "no filler got into the accept queue"

    def filler_ports(self) -> set[int]:
        return {f.getsockname()[1] for f in self.fillers}

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()
