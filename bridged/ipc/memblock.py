"""The shared memory block under a ring (``bridged.ipc.rings``).

The block is an anonymous ``memfd`` mapped shared: it never
has a name in /dev/shm, so nothing can attach to it by name, no resource
tracker is involved, and nothing is left behind however the processes end
(a SIGKILL included): the memory goes with the last mapping. Its size is
sealed (F_SEAL_SHRINK, F_SEAL_GROW): a process that reopens it through /proc
cannot shrink it under the others' mappings. Its label
(``bridged-<label>``) shows in /proc/<pid>/maps and /proc/<pid>/fd for
whoever debugs.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys

__all__ = ["create_block"]

# 3.13+ can map without keeping a duplicate of the fd open (trackfd=False);
# before, the mapping holds one fd per ring (close-on-exec), which no other
# process of our uid can reopen through /proc/<pid>/fd: every bridged
# process is non-dumpable (bridged.caps).
_MMAP_KW = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def create_block(size: int, label: str) -> mmap.mmap:
    """Map a fresh zero-filled shared block of ``size`` bytes, named nowhere, its size sealed."""
    fd = os.memfd_create(f"bridged-{label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # A block shrunk under a mapping is SIGBUS in every process touching
        # it; whoever reopens it through /proc must not be able to.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, **_MMAP_KW)
    finally:
        os.close(fd)
