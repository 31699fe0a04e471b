"""A real shared-memory ring (an anonymous memfd) for unit tests, closed afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from bridged.ipc.rings import Ring

__all__ = ["new_ring"]


@contextmanager
def new_ring(capacity: int = 4096, label: str = "ring") -> Iterator[Ring]:
    ring = Ring.create(capacity, label)
    try:
        yield ring
    finally:
        ring.close()
