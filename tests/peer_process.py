"""A meshmq agent in its own OS process, driven by the integration tests.

Usage: python peer_process.py ROLE MESH [ARGS...]. It prints JSON lines on
stdout: {"event": "ready", ...} once subscribed, then a result line. Every loop
is bounded by a deadline so the process always ends by itself.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
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


async def acker(mesh: str, pattern: str, step: int, deadline_s: float) -> None:
    """Subscribe; each time another ``step`` messages are handled and a receipt was sent after
    that (the publisher holds an ack of all of them), say "acked"; idle until the deadline."""
    deadline = time.monotonic() + deadline_s
    handled: asyncio.Queue[int] = asyncio.Queue()
    receipt_sent = asyncio.Event()
    seen = 0

    def on_message(msg: meshmq.Message) -> None:
        nonlocal seen
        seen += 1
        if seen % step == 0:
            receipt_sent.clear()  # only a receipt sent from now on covers this message
            handled.put_nowait(seen)

    async with meshmq.AsyncAgent("acker", mesh=mesh) as agent:
        inbox = agent._inbox
        assert inbox is not None
        send = inbox.send

        def send_and_tell(node: str, frame: bytes) -> None:  # the inbox's way out for receipts
            send(node, frame)
            receipt_sent.set()

        inbox.send = send_and_tell
        agent.subscribe(pattern, on_message)
        emit(event="ready", node=agent.node_id)
        try:
            while True:
                upto = await asyncio.wait_for(handled.get(), deadline - time.monotonic())
                await asyncio.wait_for(receipt_sent.wait(), deadline - time.monotonic())
                emit(event="acked", received=upto)
        except asyncio.TimeoutError:
            pass


async def member(mesh: str, name: str, ip: str, seeds: str, discovery: str, lifetime: float) -> None:
    """A lab host's agent: reports the services it routes to whenever they change, prints the
    messages on lab.<name>, publishes on command ("pub TOPIC TEXT" on stdin) and reports its
    counters ("stats")."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + lifetime
    agent = meshmq.AsyncAgent(
        name, mesh=mesh, interfaces=[ip], probe_interval=0.2, probe_timeout=0.08, suspicion_mult=2.0,
        seeds=[s for s in seeds.split(",") if s], discovery=discovery == "1",
    )
    agent.subscribe(f"lab.{name}", lambda m: emit(event="msg", topic=m.topic, data=m.data, source=m.source))
    async with agent:
        emit(event="ready", node=agent.node_id, endpoint=agent.endpoints[0])
        commands: asyncio.Queue[str] = asyncio.Queue()

        def read_commands() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, line.strip())

        threading.Thread(target=read_commands, daemon=True).start()
        last: list[str] = []
        while time.monotonic() < deadline:
            services = sorted(p.service for p in agent.peers())
            if services != last:
                last = services
                emit(event="peers", peers=services)
            try:
                command = await asyncio.wait_for(commands.get(), 0.05)
            except asyncio.TimeoutError:
                continue
            verb, _, rest = command.partition(" ")
            if verb == "stats":
                emit(event="stats", **agent.stats())
            elif verb == "pub":
                topic, _, text = rest.partition(" ")
                await agent.wait_for_subscribers(topic, timeout=10)
                await agent.publish(topic, text)
                emit(event="published", topic=topic)


def main() -> None:
    role, mesh, *args = sys.argv[1:]
    if role == "exchange":
        asyncio.run(exchange(mesh, int(args[0]), float(args[1])))
    elif role == "member":
        asyncio.run(member(mesh, *args[:4], float(args[4])))
    elif role == "sink":
        asyncio.run(sink(mesh, args[0], float(args[1])))
    elif role == "acker":
        asyncio.run(acker(mesh, args[0], int(args[1]), float(args[2])))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
