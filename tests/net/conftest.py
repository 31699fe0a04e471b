"""Fixtures the net tests share."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(RUNNERS))
def run(request):
    """Run a coroutine to completion (20 s at most) on a fresh loop of each kind,
    failing on a fired exception handler."""

    def runner(coro):
        fired = []

        async def main():
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: fired.append(ctx))
            return await asyncio.wait_for(coro, 20.0)

        result = RUNNERS[request.param](main())
        assert not fired, fired
        return result

    return runner
