"""A real shared-memory ring for unit tests, unlinked afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from bridged.ipc.rings import Ring

__all__ = ["new_ring"]


@contextmanager
def new_ring(capacity: int = 4096) -> Iterator[Ring]:
    ring = Ring.create(capacity)
    try:
        yield ring
    finally:
        ring.close()
        ring.unlink()
