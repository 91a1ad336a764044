#!/usr/bin/env python3
"""What a stalled tap costs producers: publisher -> subscriber throughput with no tap,
and with a tap that watches everything and then stops reading (its process frozen with
SIGSTOP, so its socket fills and stays full). Each in fresh processes on 127.0.0.1,
rotated over ``--repeat`` rounds so both see the same machine; the ratio of the
medians is the cost (issue 6's bar: a stalled tap reduces throughput by less than 10%).

    python tools/tap_bench.py                  # the table
    python tools/tap_bench.py --json           # machine-readable

Every child has a hard time limit and is ended by its PID (SIGKILL after SIGCONT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from typing import Any

from _children import Child, add_role_options, emit, run_role  # tools/: the script's own directory is on sys.path

TOPIC = "bench.tap"



def _agent(name: str, a: dict[str, Any], **more: Any) -> Any:
    import meshmq

    return meshmq.AsyncAgent(name, mesh=a["mesh"], discovery=False, interfaces=["127.0.0.1"], durability="memory",
                             seeds=a.get("seeds", []), **more)


def role_sub(a: dict[str, Any]) -> None:
    async def main() -> None:
        agent = await _agent("sub", a).start()
        state = {"n": 0, "t0": 0.0}
        done = asyncio.get_running_loop().create_future()

        def handle(msg: Any) -> None:
            if state["n"] == 0:
                state["t0"] = time.perf_counter()
            state["n"] += 1
            if state["n"] == a["n"] and not done.done():
                done.set_result(time.perf_counter())

        agent.subscribe(TOPIC, handle)
        emit(event="ready", endpoint=agent.endpoints[0])
        t1 = await asyncio.wait_for(done, a["timeout"])
        emit(event="done", rate=(a["n"] - 1) / (t1 - state["t0"]))
        await agent.stop()

    asyncio.run(main())


def role_tap(a: dict[str, Any]) -> None:
    async def main() -> None:
        agent = await _agent("tap", a).start()
        agent.tap(">", events=a["events"])  # never read: the reader stalls, then the parent freezes the process
        emit(event="ready", endpoint=agent.endpoints[0])
        await asyncio.sleep(a["timeout"])  # bounded; the parent ends it by its PID long before

    asyncio.run(main())


def role_pub(a: dict[str, Any]) -> None:
    async def main() -> None:
        agent = await _agent("pub", a).start()
        await agent.wait_for_subscribers(TOPIC, timeout=20)
        if a["tap"]:
            deadline = time.monotonic() + 20
            while not agent._tapped and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert agent._tapped, "the tap never reached the publisher's routing table"
        emit(event="go")
        payload = os.urandom(a["size"])
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a["n"]):
            await agent.publish(TOPIC, payload)
        # CPU of the whole publishing process (its Python and ZeroMQ's I/O thread) per message:
        # what a tap adds to a producer, and far less disturbed by a busy machine than a rate.
        emit(event="sent", rate=a["n"] / (time.perf_counter() - t0),
             cpu_us=(time.process_time() - c0) * 1e6 / a["n"], stats={
            k: v for k, v in agent.stats().items() if k.startswith("tap_")} | {
            k: v for k, v in agent._mirror.counters.items()})
        await asyncio.sleep(a["linger"])  # let the subscriber finish before saying goodbye
        await agent.stop()

    asyncio.run(main())


def measure(o: argparse.Namespace, with_tap: bool, r: int) -> dict[str, Any]:
    mesh = f"tapbench-{os.getpid()}-{r}-{int(with_tap)}"
    common = {"mesh": mesh, "n": o.messages, "size": o.size, "timeout": o.timeout}
    children: list[Child] = []
    try:
        sub = Child(__file__, "sub", common)
        children.append(sub)
        seeds = [sub.expect("ready", 30)["endpoint"]]
        tap = None
        if with_tap:
            tap = Child(__file__, "tap", {**common, "seeds": seeds, "events": o.events})
            children.append(tap)
            seeds.append(tap.expect("ready", 30)["endpoint"])
        pub = Child(__file__, "pub", {**common, "seeds": seeds, "tap": with_tap, "linger": 2.0})
        children.append(pub)
        pub.expect("go", 40)
        if tap is not None:
            os.kill(tap.proc.pid, signal.SIGSTOP)  # stalled: reads nothing from now on
        sent = pub.expect("sent", o.timeout)
        got = sub.expect("done", o.timeout)
        return {"rate": got["rate"], "send_rate": sent["rate"], "cpu_us": sent["cpu_us"], "stats": sent["stats"]}
    finally:
        for child in children:
            child.end()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="hard limit of one measurement, s")
    p.add_argument("--events", default="retried,expired,dead-lettered,rejected",
                   help="delivery events the tap asks for: 'all', 'none' or a comma list (default: meshmq tap's)")
    p.add_argument("--json", action="store_true")
    add_role_options(p)
    o = p.parse_args()
    if not o.role:
        kinds = ["sent", "acked", "retried", "expired", "dead-lettered", "rejected"]
        o.events = kinds if o.events == "all" else [] if o.events == "none" else o.events.split(",")
    if run_role(o, {"sub": role_sub, "tap": role_tap, "pub": role_pub}):
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"no_tap": [], "stalled_tap": []}
    for r in range(o.repeat):
        order = [False, True] if r % 2 == 0 else [True, False]
        for with_tap in order:
            res = measure(o, with_tap, r)
            runs["stalled_tap" if with_tap else "no_tap"].append(res)
            print(f"  round {r + 1}/{o.repeat} {'stalled tap' if with_tap else 'no tap':12s} "
                  f"{res['rate']:>10,.0f} msg/s received, {res['send_rate']:>10,.0f} published, "
                  f"publisher CPU {res['cpu_us']:5.2f} us/msg"
                  + (f"  mirror: {res['stats']}" if with_tap else ""), file=sys.stderr, flush=True)
    med = {k: statistics.median(x["rate"] for x in v) for k, v in runs.items()}
    cpu = {k: statistics.median(x["cpu_us"] for x in v) for k, v in runs.items()}
    ratio = med["stalled_tap"] / med["no_tap"]
    cpu_ratio = cpu["no_tap"] / cpu["stalled_tap"]  # the throughput the publisher's CPU allows
    result = {"messages": o.messages, "size": o.size, "repeat": o.repeat, "tap_events": o.events, "median_rate": med,
              "ratio": ratio, "reduction": 1 - ratio, "median_cpu_us": cpu, "cpu_ratio": cpu_ratio,
              "cpu_reduction": 1 - cpu_ratio, "bar": "reduction < 0.10", "ok": 1 - ratio < 0.10,
              "cpu_ok": 1 - cpu_ratio < 0.10, "runs": runs}
    if o.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{o.messages:,} messages of {o.size} B, {o.repeat} rounds, tap events {','.join(o.events) or 'none'}; "
              "medians:")
        print(f"  no tap       {med['no_tap']:>10,.0f} msg/s   publisher CPU {cpu['no_tap']:5.2f} us/msg")
        print(f"  stalled tap  {med['stalled_tap']:>10,.0f} msg/s   publisher CPU {cpu['stalled_tap']:5.2f} us/msg")
        print(f"  throughput ratio {ratio:.3f} (reduction {100 * (1 - ratio):.1f}%); by publisher CPU "
              f"{cpu_ratio:.3f} (reduction {100 * (1 - cpu_ratio):.1f}%); bar < 10%: "
              f"{'ok' if result['cpu_ok'] else 'MISSED'} by CPU, {'ok' if result['ok'] else 'MISSED'} by rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
