"""Durable publish→ack throughput between two processes, against the non-durable path
and raw LMDB, measured in one run.

- **raw LMDB**: synced transactions of 100 put+delete cycles of 256-byte values
  (in this process): what the disk and LMDB allow at all.
- **meshmq, durability X**: a publisher process (``AsyncAgent``) publishes N
  256-byte messages to a subscriber process, from ``--concurrency`` coroutines that
  each ``await agent.publish(...)`` in a loop, so one loop turn's publishes share a
  commit. The clock runs from the first publish until the publisher's outbox is
  empty: every message committed at the publisher, delivered, handled, its position
  committed at the subscriber, and acknowledged. With ``fsync`` both sides fsync.

Modes run interleaved (``--runs`` rounds); compare them as ratios within one run.
Traffic stays on 127.0.0.1; every process is started here and ended by its PID.

    python tools/durable_bench.py
    python tools/durable_bench.py --messages 200000 --runs 3 --modes fsync memory
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPIC = "bench.durable"


def emit(**obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def role_sub(a: dict[str, Any]) -> None:
    import meshmq

    async def main() -> None:
        agent = meshmq.AsyncAgent("bench-sub", mesh=a["mesh"], discovery=False, durability=a["durability"],
                                  interfaces=["127.0.0.1"], subscription_queue_messages=100_000)
        count = 0

        def handle(msg: meshmq.Message) -> None:
            nonlocal count
            count += 1

        agent.subscribe(TOPIC, handle)
        await agent.start()
        emit(event="ready", endpoint=agent.endpoints[0])
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until told to quit
        emit(event="count", count=count)
        await agent.stop()

    asyncio.run(main())


def role_pub(a: dict[str, Any]) -> None:
    import meshmq

    n, concurrency = a["n"], a["concurrency"]
    data = os.urandom(a["size"])

    async def main() -> None:
        agent = meshmq.AsyncAgent("bench-pub", mesh=a["mesh"], discovery=False, durability=a["durability"],
                                  interfaces=["127.0.0.1"], seeds=[a["endpoint"]])
        await agent.start()
        await agent.wait_for_subscribers(TOPIC, timeout=20)
        publish = agent.publish

        async def worker(count: int) -> None:
            for _ in range(count):
                await publish(TOPIC, data)

        shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in shares if k))
        t1 = time.perf_counter()
        deadline = time.monotonic() + 120
        while agent.stats()["outbox_messages"] and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # bounded: until the subscriber acknowledged everything
        t2 = time.perf_counter()
        stats = agent.stats()
        emit(event="done", published=n, publish_seconds=t1 - t0, acked_seconds=t2 - t0,
             unacked=stats["outbox_messages"], commits=stats.get("store_commits", 0))
        await agent.stop()

    asyncio.run(main())


class Child:
    def __init__(self, role: str, args: dict[str, Any], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", role, "--args", json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def expect(self, event: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"child ended before {event!r} (exit {self.proc.wait(10)})")
            obj = json.loads(line)
            if obj.get("event") == event:
                return obj  # type: ignore[no-any-return]
        raise TimeoutError(event)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def measure_mesh(durability: str, o: argparse.Namespace, directory: Path) -> dict[str, Any]:
    env = {**os.environ, "MESHMQ_DATA_DIR": str(directory / f"data-{durability}-{time.monotonic_ns()}")}
    base = {"mesh": f"dbench{os.getpid()}{time.monotonic_ns() % 10**6}", "durability": durability}
    sub = Child("sub", base, env)
    try:
        ready = sub.expect("ready")
        pub = Child("pub", {**base, "endpoint": ready["endpoint"], "n": o.messages, "size": o.size,
                            "concurrency": o.concurrency}, env)
        try:
            done = pub.expect("done")
        finally:
            pub.close()
        assert sub.proc.stdin is not None
        sub.proc.stdin.write("quit\n")
        sub.proc.stdin.flush()
        counted = sub.expect("count")["count"]
    finally:
        sub.close()
    if done["unacked"] or counted != o.messages:
        raise RuntimeError(f"{durability}: {done['unacked']} unacknowledged, {counted} of {o.messages} received")
    return {"rate": o.messages / done["acked_seconds"], "publish_rate": o.messages / done["publish_seconds"],
            "per_commit": o.messages / max(1, done["commits"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=512, help="publishing coroutines in the publisher")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["raw", "fsync", "os", "memory"],
                    choices=["raw", "fsync", "os", "memory"])
    o = ap.parse_args()
    if o.role:
        {"sub": role_sub, "pub": role_pub}[o.role](json.loads(o.args))
        return 0
    from store_bench import raw_lmdb  # type: ignore[import-not-found]

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in o.modes}
    with tempfile.TemporaryDirectory(prefix="meshmq-durable-bench-") as tmp:
        for run in range(o.runs):
            for mode in o.modes:
                if mode == "raw":
                    rate = raw_lmdb(Path(tmp) / f"raw{run}", o.messages, 100, o.size, True)
                    results[mode].append({"rate": rate})
                else:
                    results[mode].append(measure_mesh(mode, o, Path(tmp)))
                r = results[mode][-1]
                detail = ("put+delete cycles, 100 per synced transaction" if mode == "raw"
                          else f"publish returns at {r['publish_rate']:,.0f}/s"
                          + (f", {r['per_commit']:.0f} messages per publisher commit" if mode != "memory" else ""))
                print(f"run {run + 1} {mode:>6}: {r['rate']:>10,.0f} msg/s  ({detail})", flush=True)
    print()
    print("| mode | median msg/s | runs |" + (" ratio to raw LMDB |" if "raw" in o.modes else ""))
    print("|---|---|---|" + ("---|" if "raw" in o.modes else ""))
    raw_median = statistics.median(r["rate"] for r in results["raw"]) if "raw" in o.modes else None
    for mode in o.modes:
        rates = [r["rate"] for r in results[mode]]
        med = statistics.median(rates)
        line = f"| {mode} | {med:,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} |"
        if raw_median:
            line += f" {med / raw_median:.2f} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
