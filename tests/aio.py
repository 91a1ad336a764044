"""asyncio helpers for the agent tests: bounded runs and a set of started agents."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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


async def eventually(done: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll ``done()`` with a deadline, for states that change on the agent's own timers."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout}s"
        await asyncio.sleep(0.01)


def wait_until(done: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    """:func:`eventually` for blocking code."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout}s"
        time.sleep(0.01)
