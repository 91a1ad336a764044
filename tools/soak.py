#!/usr/bin/env python3
"""Does an agent's memory level off? Two agents in two processes exchange messages for
many rounds, and after each round (everything acknowledged) each reports its resident
memory (RSS) and open file descriptors.

Every round mixes what agents do all day: pub/sub with and without types, keys and
headers, bytes and encoded payloads; a queue group whose handler fails some messages
once (retried with backoff); request/reply. With ``--unique-topics`` every message has
a topic never seen before (a device id in the topic, say), which is what per-topic
caches and per-topic order tracking must survive.

    python tools/soak.py                            # 20 rounds of 20,000 messages
    python tools/soak.py --rounds 50 --unique-topics
    python tools/soak.py --check                    # exit 1 if memory grew past --max-growth-mb

Growth is measured from the end of round ``--warmup`` (caches, buffers and the
allocator's arenas are filled by then) to the last round. Agents are secure, with a
store in a temporary directory (durability ``os``: LMDB, no fsync; ``--durability``
changes it), on 127.0.0.1 with mDNS off. Every child has a hard time limit and is
ended by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from typing import Any

from _children import Child, add_role_options, emit, run_role  # tools/: the script's own directory is on sys.path

FAIL_EVERY = 10  # one queue-group message in this many fails once, and is retried


def _usage() -> dict[str, int]:
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_kb": rss, "fds": len(os.listdir("/proc/self/fd"))}


def _agent(name: str, a: dict[str, Any], **more: Any) -> Any:
    import meshmq

    return meshmq.AsyncAgent(name, mesh=a["mesh"], discovery=False, interfaces=["127.0.0.1"],
                             durability=a["durability"], data_dir=a["data_dir"], retry_backoff=0.01, **more)


def role_sub(a: dict[str, Any]) -> None:
    async def main() -> None:
        agent = _agent("soak-sub", a)
        counts = {"plain": 0, "queued": 0, "failed_once": 0}

        def plain(msg: Any) -> None:
            counts["plain"] += 1

        def queued(msg: Any) -> None:
            if msg.data["i"] // 10 % FAIL_EVERY == 0 and msg.attempts == 1:  # the publisher numbers them i // 10
                counts["failed_once"] += 1
                raise RuntimeError("fails once, on purpose")  # the agent retries it
            counts["queued"] += 1

        agent.subscribe("soak.>", plain)
        agent.subscribe("soakq.>", queued, queue="workers")
        agent.subscribe("soakrpc.ask", lambda m: m.reply({"n": m.data["n"] + 1}))
        await agent.start()
        emit(event="ready", endpoint=agent.endpoints[0])
        deadline = time.monotonic() + a["timeout"]
        while time.monotonic() < deadline:  # the parent ends this process, by its PID, long before
            emit(event="progress", **counts, **_usage())
            await asyncio.sleep(0.5)  # slow enough never to fill the pipe while the parent waits elsewhere

    asyncio.run(main())


def role_pub(a: dict[str, Any]) -> None:
    async def main() -> None:
        agent = await _agent("soak-pub", a, seeds=[a["endpoint"]]).start()
        for topic in ("soak.x", "soakq.x", "soakrpc.ask"):
            await agent.wait_for_subscribers(topic, timeout=20)
        emit(event="go")
        payload = os.urandom(200)
        n, unique = a["messages"], a["unique"]
        sent = queued = 0
        for r in range(a["rounds"]):
            t0 = time.monotonic()
            for base in range(0, n, 1000):
                calls = []
                for i in range(base, min(n, base + 1000)):
                    k = sent + i
                    topic = f"soak.dev{k}.temp" if unique else f"soak.t{i % 50}.u{k % 997}"
                    kw: dict[str, Any] = {}
                    if i % 3 == 0:
                        kw["type"] = f"Reading{i % 7}"
                    if i % 5 == 0:
                        kw["key"] = f"k{i % 11}"
                    if i % 4 == 0:
                        kw["headers"] = {"h": str(i % 13)}
                    calls.append(agent.publish(topic, payload if i % 2 else {"i": i, "s": "x" * 50}, **kw))
                    if i % 10 == 0:
                        calls.append(agent.publish(f"soakq.j{i % 17}", {"i": i}, key=f"q{i % 5}"))
                await asyncio.gather(*calls)
            sent += n
            queued += len(range(0, n, 10))
            for j in range(0, n // 100, 50):
                answers = await asyncio.gather(*(agent.request("soakrpc.ask", {"n": m}, timeout=10)
                                                for m in range(j, min(n // 100, j + 50))))
                assert [x.data["n"] for x in answers] == list(range(j + 1, min(n // 100, j + 50) + 1))
            deadline = time.monotonic() + 60
            while agent.outbox() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # polling the outbox, bounded: everything acknowledged
            emit(event="round", round=r, sent=sent, queued=queued, seconds=time.monotonic() - t0,
                 outbox=sum(e.messages for e in agent.outbox()), **_usage())
        # Stay until ended by PID: leaving now would close connections under the subscriber's last report.
        await asyncio.sleep(a["timeout"])

    asyncio.run(main())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--messages", type=int, default=20_000, help="pub/sub messages a round (plus a tenth as "
                   "many to the queue group and a hundredth as many requests)")
    p.add_argument("--unique-topics", action="store_true", help="every pub/sub message on a topic of its own")
    p.add_argument("--durability", choices=["fsync", "os", "memory"], default="os")
    p.add_argument("--warmup", type=int, default=3, help="rounds before growth is measured")
    p.add_argument("--max-growth-mb", type=float, default=8.0, help="with --check: the most RSS either "
                   "process may grow after the warm-up")
    p.add_argument("--check", action="store_true", help="exit 1 if memory or file descriptors grew past the limit")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="hard limit, s: no round may take longer, and the children end themselves after it")
    add_role_options(p)
    o = p.parse_args()
    if run_role(o, {"sub": role_sub, "pub": role_pub}):
        return 0
    if not 0 <= o.warmup < o.rounds:
        p.error(f"--warmup must be at least 0 and less than --rounds ({o.rounds}), got {o.warmup}")
    with tempfile.TemporaryDirectory(prefix="meshmq-soak-") as state:
        common = {"mesh": f"soak-{os.getpid()}", "durability": o.durability, "timeout": o.timeout}
        children: list[Child] = []
        try:
            sub = Child(__file__, "sub", {**common, "data_dir": os.path.join(state, "sub")})
            children.append(sub)
            endpoint = sub.expect("ready", 30)["endpoint"]
            pub = Child(__file__, "pub", {**common, "data_dir": os.path.join(state, "pub"), "endpoint": endpoint,
                                          "rounds": o.rounds, "messages": o.messages, "unique": o.unique_topics})
            children.append(pub)
            pub.expect("go", 40)
            rows = []
            print(" round   messages   s   pub RSS MB  fds   sub RSS MB  fds   outbox", flush=True)
            for _ in range(o.rounds):
                row = pub.expect("round", o.timeout)
                mine = {"plain": row["sent"], "queued": row["queued"]}
                deadline = time.monotonic() + 60
                while True:  # the subscriber's reports come every 0.5 s; take the first that has it all
                    seen = sub.expect("progress", 10)
                    if all(seen[k] >= v for k, v in mine.items()) or time.monotonic() > deadline:
                        break
                missing = {k: v - seen[k] for k, v in mine.items() if seen[k] < v}
                rows.append((row, seen))
                print(f"{row['round'] + 1:6d} {row['sent']:10,d} {row['seconds']:4.1f} {row['rss_kb'] / 1024:10.1f} "
                      f"{row['fds']:4d} {seen['rss_kb'] / 1024:12.1f} {seen['fds']:4d} {row['outbox']:8d}"
                      + (f"   MISSING {missing}" if missing else ""), flush=True)
                if missing:
                    print("soak: messages did not arrive; stopping", file=sys.stderr)
                    return 1
        finally:
            for child in children:
                child.end()
    base, last = rows[o.warmup - 1] if o.warmup else rows[0], rows[-1]
    sides = ("publisher", "subscriber")
    growth = {side: (last[i]["rss_kb"] - base[i]["rss_kb"]) / 1024 for i, side in enumerate(sides)}
    fds = {side: last[i]["fds"] - base[i]["fds"] for i, side in enumerate(sides)}
    failed_once = last[1]["failed_once"]
    print(f"after round {o.warmup or 1}: RSS grew {growth['publisher']:+.1f} MB (publisher), "
          f"{growth['subscriber']:+.1f} MB (subscriber); file descriptors {fds['publisher']:+d}, "
          f"{fds['subscriber']:+d}; {failed_once:,d} queue-group messages failed once and were retried")
    ok = all(g <= o.max_growth_mb for g in growth.values()) and all(d <= 0 for d in fds.values())
    return 1 if o.check and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
