"""A meshmq agent in its own OS process, driven by the integration tests.

Usage: python peer_process.py ROLE MESH [ARGS...]. It prints JSON lines on
stdout: {"event": "ready", ...} once subscribed, then a result line. Every loop
is bounded by a deadline so the process always ends by itself.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import meshmq


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def exchange(mesh: str, count: int, deadline_s: float) -> None:
    """Receive ``count`` messages on test.to_child and send ``count`` on test.to_parent."""
    deadline = time.monotonic() + deadline_s
    received: list[int] = []
    done = asyncio.Event()

    def on_message(msg: meshmq.Message) -> None:
        received.append(msg.data["i"])
        if len(received) >= count:
            done.set()

    async with meshmq.AsyncAgent("child", mesh=mesh) as agent:
        agent.subscribe("test.to_child", on_message)
        await agent.wait_for_subscribers("test.to_parent", timeout=deadline - time.monotonic())
        emit(event="ready", node=agent.node_id)
        for i in range(count):
            await agent.publish("test.to_parent", {"i": i}, type="Counted")
        try:
            await asyncio.wait_for(done.wait(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            pass
        emit(event="result", received=len(received), unique=len(set(received)),
             in_order=received == sorted(received), first=received[:3])


async def sink(mesh: str, pattern: str, deadline_s: float) -> None:
    """Subscribe and count until killed or the deadline."""
    deadline = time.monotonic() + deadline_s
    seen = 0

    def on_message(msg: meshmq.Message) -> None:
        nonlocal seen
        seen += 1

    async with meshmq.AsyncAgent("sink", mesh=mesh) as agent:
        agent.subscribe(pattern, on_message)
        emit(event="ready", node=agent.node_id)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # idle until killed; the deadline guarantees an end
    emit(event="result", received=seen)


def main() -> None:
    role, mesh, *args = sys.argv[1:]
    if role == "exchange":
        asyncio.run(exchange(mesh, int(args[0]), float(args[1])))
    elif role == "sink":
        asyncio.run(sink(mesh, args[0], float(args[1])))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
