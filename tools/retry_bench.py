#!/usr/bin/env python3
"""One bad key and everyone else: how long a subscription takes to hand over a burst of
messages when the messages of one order key fail, against the same burst with none failing.

    python tools/retry_bench.py                 # the table, at the default retry settings
    python tools/retry_bench.py --json          # machine-readable

One agent on its own (no discovery, memory durability) publishes ``--messages`` messages
to its own subscription, spread round-robin over ``--keys`` order keys (topics, or with
``--queue`` keys of one topic in a queue group). Three cases, each with a plain-function
and a coroutine handler, rotated over ``--repeat`` rounds so all of them see the same
machine:

- ``none fail``: the baseline;
- ``k0 flaky``: every ``--fail-every``-th message of key k0 raises on its first attempt;
- ``k0 poison``: the first message of k0 always raises, and is dead-lettered after
  ``max_attempts`` attempts.

Two clocks run from the first publish: until every message of the other keys was handled,
and until every message of k0 was handled (or, the poison, dead-lettered). A failed
message waits ``retry_backoff`` (doubling per attempt) before its next attempt, and the
later messages of its order key wait behind it, so k0 pays for its retries; the other
keys should not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time

import meshmq

CASES = ("none fail", "k0 flaky", "k0 poison")
KINDS = ("function", "coroutine")


class _Failure(Exception):
    """What the benchmark's handler raises."""


async def measure(case: str, kind: str, queue: str | None, a: argparse.Namespace) -> tuple[float, float]:
    """Seconds from the first publish until the other keys' messages were handled, and
    until k0's were handled or dead-lettered."""
    agent = meshmq.AsyncAgent("retry-bench", mesh=f"retry-bench-{time.time_ns()}", discovery=False,
                              durability="memory", interfaces=["127.0.0.1"], retry_backoff=a.retry_backoff,
                              max_attempts=a.max_attempts)
    await agent.start()
    try:
        loop = asyncio.get_running_loop()
        k0 = len(range(0, a.messages, a.keys))
        left = [a.messages - k0, k0]  # other keys, k0
        done = [loop.create_future(), loop.create_future()]

        def settled(bad: int) -> None:
            left[bad] -= 1
            if left[bad] == 0:
                done[bad].set_result(time.perf_counter())

        def work(msg: meshmq.Message) -> None:
            i = msg.data
            if i % a.keys == 0:
                nth = i // a.keys
                if case == "k0 poison" and nth == 0:
                    if msg.attempts == a.max_attempts:
                        settled(1)  # its last attempt: dead-lettered now
                    raise _Failure("poison")
                if case == "k0 flaky" and nth % a.fail_every == a.fail_every - 1 and msg.attempts == 1:
                    raise _Failure("once")
            settled(i % a.keys == 0)

        async def async_work(msg: meshmq.Message) -> None:
            work(msg)

        agent.subscribe("bench.*", work if kind == "function" else async_work, queue=queue)
        start = time.perf_counter()
        for i in range(a.messages):
            k = i % a.keys
            await agent.publish("bench.x" if queue else f"bench.k{k}", i, key=f"k{k}" if queue else None)
        others, bad = await asyncio.wait_for(asyncio.gather(*done), a.timeout)
        return others - start, bad - start
    finally:
        await agent.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per measurement (default 20000)")
    parser.add_argument("--keys", type=int, default=16, help="order keys they are spread over (default 16)")
    parser.add_argument("--fail-every", type=int, default=100, metavar="N",
                        help="in 'k0 flaky', every N-th message of k0 fails once (default 100)")
    parser.add_argument("--retry-backoff", type=float, default=meshmq.Config().retry_backoff,
                        help="seconds before a failed message's second attempt (default: Config's, %(default)s)")
    parser.add_argument("--max-attempts", type=int, default=meshmq.Config().max_attempts,
                        help="attempts before the poison message is dead-lettered (default: Config's, %(default)s)")
    parser.add_argument("--queue", action="store_true", help="a queue group, keys of one topic (default: topics)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over every case (default 3); medians shown")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one measurement may take (default 120)")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    a = parser.parse_args()
    for name in ("messages", "fail_every", "max_attempts", "repeat"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.keys < 2 or a.messages < a.keys:
        parser.error("--keys must be at least 2, and --messages at least --keys")
    if a.retry_backoff < 0 or a.timeout <= 0:
        parser.error("--retry-backoff must be 0 or more and --timeout more than 0")
    logging.getLogger("meshmq").setLevel(logging.CRITICAL)  # the failures are on purpose

    runs: dict[tuple[str, str], list[tuple[float, float]]] = {(c, k): [] for c in CASES for k in KINDS}
    queue = "bench" if a.queue else None
    for _ in range(a.repeat):
        for case in CASES:
            for kind in KINDS:
                runs[case, kind].append(asyncio.run(measure(case, kind, queue, a)))
    median = {key: tuple(statistics.median(r[i] for r in values) for i in (0, 1)) for key, values in runs.items()}
    if a.json:
        print(json.dumps({f"{c}/{k}": {"others": round(m[0], 4), "k0": round(m[1], 4)}
                          for (c, k), m in median.items()}))
        return 0
    keys = f"{a.keys} keys of a queue group" if a.queue else f"{a.keys} topics"
    print(f"{a.messages} messages over {keys}; retry_backoff {a.retry_backoff}s, max_attempts {a.max_attempts}, "
          f"k0 flaky: 1 in {a.fail_every} of k0 fails once; median of {a.repeat}")
    print(f"{'case':<12}{'handler':<11}{'other keys done':>24}{'k0 done':>12}")
    for case in CASES:
        for kind in KINDS:
            others, bad = median[case, kind]
            base = median["none fail", kind][0]
            print(f"{case:<12}{kind:<11}{others:>11.3f} s ({others / base:>5.2f}x){bad:>10.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
