"""bridged.tasks: a process's one TaskGroup, without a daemon."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from structlog.testing import capture_logs

from bridged.tasks import TaskScope


async def _forever(ended: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        ended.append(name)


def test_a_task_that_raises_ends_the_run_with_its_error_logged():
    """The error is logged with its traceback, the other tasks and the run's body are cancelled,
    the body's cleanup still runs, and the run ends with the error (not swallowed)."""
    ended: list[str] = []

    async def broken() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("a bug")

    async def main() -> None:
        async with TaskScope() as tasks:
            tasks.spawn(_forever(ended, "sibling"))
            tasks.spawn(broken(), name="broken")
            try:
                await asyncio.sleep(5)
                ended.append("body finished")  # never: the failure cancels the body
            finally:
                ended.append("cleanup")

    with capture_logs() as logs:
        with pytest.raises(ExceptionGroup) as caught:
            uvloop.run(main())
    assert [type(e) for e in caught.value.exceptions] == [ValueError]
    assert sorted(ended) == ["cleanup", "sibling"]
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert len(failed) == 1 and failed[0]["task"] == "broken" and failed[0]["exc_info"] is True
    assert failed[0]["log_level"] == "error"


def test_leaving_cancels_and_awaits_every_task():
    """A stop (leaving the scope) cancels what still runs and awaits it: nothing is left pending."""
    ended: list[str] = []

    async def main() -> set[asyncio.Task]:
        async with TaskScope() as tasks:
            for name in ("sntp", "mdns", "replug"):
                tasks.spawn(_forever(ended, name))
            await asyncio.sleep(0)
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(main()) == set()
    assert sorted(ended) == ["mdns", "replug", "sntp"]


def test_a_task_cancelled_on_its_own_is_an_ordinary_end():
    """Cancelling one task (AT+RST cancels a command's work) leaves the others and the run going."""
    ended: list[str] = []

    async def main() -> str:
        async with TaskScope() as tasks:
            command = tasks.spawn(_forever(ended, "command"))
            other = tasks.spawn(asyncio.sleep(0.05, "done"))
            await asyncio.sleep(0)
            command.cancel()
            return await other

    assert asyncio.run(main()) == "done"
    assert ended == ["command"]


def test_cleanup_after_a_failure_may_still_start_work():
    """After a failure the TaskGroup takes no task; cleanup's own (mDNS goodbyes) still runs and is awaited."""
    done: list[str] = []

    async def goodbye() -> None:
        await asyncio.sleep(0.01)
        done.append("goodbye sent")

    async def broken() -> None:
        raise OSError("a bug")

    async def main() -> None:
        async with TaskScope() as tasks:
            tasks.spawn(broken())
            try:
                await asyncio.sleep(5)
            finally:
                await tasks.spawn(goodbye())

    with capture_logs():
        with pytest.raises(ExceptionGroup):
            asyncio.run(main())
    assert done == ["goodbye sent"]


def test_spawn_outside_the_run_is_refused():
    """A spawn before the process's run entered the scope is a bug: RuntimeError, and the work is closed."""
    async def work() -> None:
        pass

    coroutine = work()
    with pytest.raises(RuntimeError):
        TaskScope().spawn(coroutine)
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning


def test_cancel_all_ends_every_task_before_returning():
    """cancel_all() returns once each running task has run its cancellation (a stop's first step)."""
    ended: list[str] = []

    async def main() -> list[str]:
        async with TaskScope() as tasks:
            tasks.spawn(_forever(ended, "command"))
            tasks.spawn(_forever(ended, "reconnect"))
            await asyncio.sleep(0)
            await tasks.cancel_all()
            seen = sorted(ended)
            await tasks.cancel_all()  # nothing left: returns at once
        return seen

    assert asyncio.run(main()) == ["command", "reconnect"]
