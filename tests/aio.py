"""asyncio helpers for the agent tests: bounded runs and a set of started agents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import meshmq

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 30) -> T:
    """Run a test coroutine on a fresh loop, failing it after ``timeout`` seconds."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@asynccontextmanager
async def agents(mesh: str, *names: str, **cfg: Any) -> AsyncIterator[list[meshmq.AsyncAgent]]:
    """Started AsyncAgents of one mesh, stopped afterwards."""
    started = [await meshmq.AsyncAgent(n, mesh=mesh, **cfg).start() for n in names]
    try:
        yield started
    finally:
        for a in started:
            await a.stop()


async def collect(sub: meshmq.Subscription, n: int) -> list[meshmq.Message]:
    """The next ``n`` messages of an iterable subscription (fewer if it closes)."""
    out = []
    async for msg in sub:
        out.append(msg)
        if len(out) == n:
            break
    return out
