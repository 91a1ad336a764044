#!/usr/bin/env python3
"""Handlers that wait on I/O: how many messages a second one subscription handles with
``concurrency`` 1, 4, 16 and 64, when each call awaits ``--io-ms`` (a stand-in for a
database or HTTP call) and the messages are spread over ``--keys`` order keys.

    python tools/concurrency_bench.py            # the table
    python tools/concurrency_bench.py --json     # machine-readable

One agent on its own (no discovery, memory durability) publishes ``--messages`` messages
to its own subscription, round-robin over the keys (topics, or with ``--queue`` keys of one
topic in a queue group); the clock runs from the first publish to the last message
handled. Never two messages of one key are in the handler at once, so with K keys no more
than K calls overlap: the best a concurrency C can do is min(C, K) calls per ``--io-ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import meshmq

LEVELS = (1, 4, 16, 64)


async def measure(concurrency: int, a: argparse.Namespace) -> float:
    """Messages handled a second."""
    agent = meshmq.AsyncAgent("concurrency-bench", mesh=f"concurrency-bench-{time.time_ns()}", discovery=False,
                              durability="memory", interfaces=["127.0.0.1"])
    await agent.start()
    try:
        done = asyncio.get_running_loop().create_future()
        handled = 0
        overlap = 0
        most = 0

        async def work(msg: meshmq.Message) -> None:
            nonlocal handled, overlap, most
            overlap += 1
            most = max(most, overlap)
            await asyncio.sleep(a.io_ms / 1000)
            overlap -= 1
            handled += 1
            if handled == a.messages:
                done.set_result(time.perf_counter())

        agent.subscribe("bench.*", work, queue="bench" if a.queue else None, concurrency=concurrency)
        start = time.perf_counter()
        for i in range(a.messages):
            k = i % a.keys
            await agent.publish("bench.x" if a.queue else f"bench.k{k}", i, key=f"k{k}" if a.queue else None)
        end = await asyncio.wait_for(done, a.timeout)
        if most > min(concurrency, a.keys):
            raise SystemExit(f"{most} calls overlapped with concurrency {concurrency} over {a.keys} keys")
        return a.messages / (end - start)
    finally:
        await agent.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2_000, help="messages per measurement (default 2000)")
    parser.add_argument("--keys", type=int, default=32, help="order keys they are spread over (default 32)")
    parser.add_argument("--io-ms", type=float, default=5.0, help="milliseconds each call awaits (default 5)")
    parser.add_argument("--queue", action="store_true", help="a queue group, keys of one topic (default: topics)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over every level (default 3); medians shown")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one measurement may take (default 120)")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    a = parser.parse_args()
    for name in ("messages", "keys", "repeat"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.io_ms < 0 or a.timeout <= 0:
        parser.error("--io-ms must be 0 or more and --timeout more than 0")

    rates: dict[int, list[float]] = {c: [] for c in LEVELS}
    for _ in range(a.repeat):
        for c in LEVELS:
            rates[c].append(asyncio.run(measure(c, a)))
    median = {c: statistics.median(r) for c, r in rates.items()}
    if a.json:
        print(json.dumps({str(c): round(r) for c, r in median.items()}))
        return 0
    keys = f"{a.keys} keys of a queue group" if a.queue else f"{a.keys} topics"
    print(f"{a.messages} messages over {keys}, each call awaiting {a.io_ms:g} ms; median of {a.repeat}")
    print(f"{'concurrency':>11}{'msg/s':>10}{'x c=1':>8}{'best possible':>15}")
    for c in LEVELS:
        best = min(c, a.keys) * 1000 / a.io_ms if a.io_ms else float("inf")
        print(f"{c:>11}{median[c]:>10,.0f}{median[c] / median[1]:>8.1f}{best:>15,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
