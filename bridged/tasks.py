"""One TaskGroup per process: every task a process keeps running is made in it.

Theory of operation.  A bare ``loop.create_task`` loses what its task
raises: nothing awaits it, so the error shows at best as "Task exception
was never retrieved" when it is collected, and the work it did (a boot, a
passthrough reconnect, the SNTP client) simply stops.  A process's
``TaskScope`` is entered once by its top-level run and owns an
``asyncio.TaskGroup``; ``spawn`` makes a task in it.  Then:

- a task that raises is logged at once (``task_failed``, with its
  traceback); the TaskGroup cancels the other tasks and the run itself, so
  the run's cleanup happens and the run ends with the error (an
  ExceptionGroup): the child exits non-zero (``bridged.spawn`` logs
  ``child_crashed``) and the supervisor restarts it, as for any crash;
- a stop cancels every task still alive and awaits them all (``cancel_all``,
  and leaving the scope does it again), so none is left pending when the
  loop closes, nor runs on after what it uses is closed;
- a task may still be cancelled on its own (a restart cancels a command's
  work), which the TaskGroup takes as an ordinary end.

While the process goes down after a failure, the TaskGroup takes no new
task; cleanup that must still run one (mDNS goodbyes) gets a plain task,
which the scope cancels and awaits on the way out all the same.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Callable, Coroutine, TypeVar

import structlog

__all__ = ["TaskScope", "Spawn"]

log = structlog.get_logger()

_T = TypeVar("_T")

#: How a component is given its process's ``TaskScope.spawn`` (or, in a unit test, ``asyncio.create_task``).
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class TaskScope:
    """A process's TaskGroup; see the module docstring."""

    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        self._open = False  # the group takes new tasks
        self._live: set[asyncio.Task[Any]] = set()
        self._strays: set[asyncio.Task[Any]] = set()  # made while the group took none

    async def __aenter__(self) -> "TaskScope":
        if self._group is not None:
            raise RuntimeError("a TaskScope is entered once")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._open = True
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> bool | None:
        assert self._group is not None
        self._open = False
        for task in list(self._live):
            task.cancel()
        try:
            return await self._group.__aexit__(kind, error, traceback)
        finally:
            strays = list(self._strays)
            for task in strays:
                task.cancel()
            await asyncio.gather(*strays, return_exceptions=True)

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait until each has ended: a stop's first
        step, before the run closes what they use (the port, the output)."""
        running = [*self._live, *self._strays]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)

    def spawn(self, work: Coroutine[Any, Any, _T], name: str | None = None) -> "asyncio.Task[_T]":
        """Run ``work`` as a task of the process.

        Raises:
            RuntimeError: the scope was never entered (a bug: ``work`` is closed).
        """
        name = name or getattr(work, "__qualname__", None) or repr(work)
        if self._group is None:
            work.close()
            raise RuntimeError("TaskScope.spawn before the process's run entered it")
        task: asyncio.Task[_T] | None = None
        if self._open:
            guarded = self._guard(work, name)
            try:
                task = self._group.create_task(guarded, name=name)
            except RuntimeError:  # the group began shutting down (its body raised) a moment ago
                guarded.close()
        if task is None:
            task = asyncio.get_running_loop().create_task(work, name=name)
            self._strays.add(task)
            task.add_done_callback(self._strays.discard)
            return task
        self._live.add(task)
        task.add_done_callback(self._live.discard)
        return task

    async def _guard(self, work: Coroutine[Any, Any, _T], name: str) -> _T:
        try:
            return await work
        except Exception:
            # The group goes down now: from here on new work is a stray (see spawn).
            self._open = False
            log.exception("task_failed", task=name)
            raise
