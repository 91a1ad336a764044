#!/usr/bin/env python3
"""Priority lanes under load: how long an alert takes to arrive while a burst of bulk
messages backs up behind a subscriber slower than its publisher, with the policy giving
alerts priority "high" and bulk "low", and with a policy that gives no priorities. Each
in fresh processes on 127.0.0.1 (a subscriber, a publisher), rotated over ``--repeat``
rounds so both see the same machine; the figure is alert latency / bulk latency (p50).

    python tools/lanes_bench.py                # the table
    python tools/lanes_bench.py --json         # machine-readable

The subscriber's handler spins ``--work-us`` per message, so it handles fewer messages a
second than the publisher sends: the bulk messages queue up (in the subscriber's queue,
then the sockets, then the publisher's outbox, where the lanes act). Every child has a
hard time limit and is ended by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _children import Child, add_role_options, emit, run_role  # tools/: the script's own directory is on sys.path

PRIORITIES = 'version = 1\n[[rule]]\nname = "alerts"\ntopic = "alerts.>"\npriority = "high"\n' \
             '[[rule]]\nname = "bulk"\ntopic = "bulk.>"\npriority = "low"\n'
NONE = 'version = 1\n[[rule]]\nname = "alerts"\ntopic = "alerts.>"\nttl = 3600\n'



def _agent(name: str, a: dict[str, Any], **more: Any) -> Any:
    import meshmq

    return meshmq.AsyncAgent(name, mesh=a["mesh"], discovery=False, interfaces=["127.0.0.1"], durability="memory",
                             seeds=a.get("seeds", []), policy_file=a["policy"], **more)


def role_sub(a: dict[str, Any]) -> None:
    async def main() -> None:
        agent = await _agent("sub", a).start()
        latency: dict[str, list[float]] = {"alerts": [], "bulk": []}
        total = a["n"] + a["n"] // a["every"]
        done = asyncio.get_running_loop().create_future()
        spin = a["work_us"] / 1e6

        def handle(msg: Any) -> None:
            latency[msg.topic.split(".")[0]].append(time.time() - msg.data["at"])
            end = time.perf_counter() + spin
            while time.perf_counter() < end:
                pass
            if sum(map(len, latency.values())) == total and not done.done():
                done.set_result(None)

        agent.subscribe("alerts.*", handle)
        agent.subscribe("bulk.*", handle)
        emit(event="ready", endpoint=agent.endpoints[0])
        await asyncio.wait_for(done, a["timeout"])
        emit(event="done", latency={k: sorted(v) for k, v in latency.items()})
        await agent.stop()

    asyncio.run(main())


def role_pub(a: dict[str, Any]) -> None:
    async def main() -> None:
        agent = await _agent("pub", a).start()
        await agent.wait_for_subscribers("bulk.x", timeout=20)
        await agent.wait_for_subscribers("alerts.x", timeout=20)
        pad = "x" * a["size"]
        t0 = time.perf_counter()
        for i in range(a["n"]):
            await agent.publish("bulk.x", {"at": time.time(), "pad": pad})
            if i % a["every"] == a["every"] - 1:
                await agent.publish("alerts.x", {"at": time.time(), "pad": pad})
            if i % 64 == 0:
                await asyncio.sleep(0)  # let receipts in
        stats = agent.stats()
        emit(event="sent", rate=a["n"] / (time.perf_counter() - t0), stats={
            k: stats.get(k, 0) for k in ("messages_sent_high", "messages_sent_low", "send_window_full")})
        await asyncio.sleep(a["timeout"])  # bounded; the parent ends it by its PID once the subscriber is done

    asyncio.run(main())


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else float("nan")


def measure(o: argparse.Namespace, policy: Path, r: int, label: str) -> dict[str, Any]:
    common = {"mesh": f"lanesbench-{os.getpid()}-{r}-{label}", "n": o.messages, "every": o.every, "size": o.size,
              "work_us": o.work_us, "timeout": o.timeout, "policy": str(policy)}
    children: list[Child] = []
    try:
        sub = Child(__file__, "sub", common)
        children.append(sub)
        pub = Child(__file__, "pub", {**common, "seeds": [sub.expect("ready", 30)["endpoint"]]})
        children.append(pub)
        sent = pub.expect("sent", o.timeout)
        lat = sub.expect("done", o.timeout)["latency"]
        return {"alert_p50_ms": _pct(lat["alerts"], 0.5), "alert_p99_ms": _pct(lat["alerts"], 0.99),
                "bulk_p50_ms": _pct(lat["bulk"], 0.5), "bulk_p99_ms": _pct(lat["bulk"], 0.99),
                "alerts": len(lat["alerts"]), "bulk": len(lat["bulk"]), "send_rate": sent["rate"],
                "stats": sent["stats"]}
    finally:
        for child in children:
            child.end()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=60_000, help="bulk messages per run (default 60000)")
    p.add_argument("--every", type=int, default=500, help="one alert after every N bulk messages (default 500)")
    p.add_argument("--size", type=int, default=200, help="padding bytes per message (default 200)")
    p.add_argument("--work-us", type=float, default=40.0, help="subscriber's spin per message, us (default 40)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="hard limit of one measurement, s")
    p.add_argument("--json", action="store_true")
    add_role_options(p)
    o = p.parse_args()
    if run_role(o, {"sub": role_sub, "pub": role_pub}):
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"priorities": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"priorities": Path(tmp, "priorities.toml"), "none": Path(tmp, "none.toml")}
        files["priorities"].write_text(PRIORITIES)
        files["none"].write_text(NONE)
        for r in range(o.repeat):
            for label in (["priorities", "none"] if r % 2 == 0 else ["none", "priorities"]):
                res = measure(o, files[label], r, label)
                runs[label].append(res)
                print(f"  round {r + 1}/{o.repeat} {label:10s} alert p50 {res['alert_p50_ms']:8.1f} ms "
                      f"p99 {res['alert_p99_ms']:8.1f} | bulk p50 {res['bulk_p50_ms']:8.1f} ms "
                      f"p99 {res['bulk_p99_ms']:8.1f} | published {res['send_rate']:,.0f}/s {res['stats']}",
                      file=sys.stderr, flush=True)
    med = {label: {k: statistics.median(x[k] for x in v) for k in
                   ("alert_p50_ms", "alert_p99_ms", "bulk_p50_ms", "bulk_p99_ms")} for label, v in runs.items()}
    ratio = {label: m["alert_p50_ms"] / m["bulk_p50_ms"] for label, m in med.items()}
    result = {"messages": o.messages, "every": o.every, "work_us": o.work_us, "repeat": o.repeat,
              "median": med, "alert_over_bulk_p50": ratio, "runs": runs}
    if o.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{o.messages:,} bulk messages, an alert after every {o.every}, subscriber {o.work_us:g} us/message, "
              f"{o.repeat} rounds (medians)")
        for label, m in med.items():
            print(f"  {label:10s} alert p50 {m['alert_p50_ms']:8.1f} ms  p99 {m['alert_p99_ms']:8.1f} ms   "
                  f"bulk p50 {m['bulk_p50_ms']:8.1f} ms  p99 {m['bulk_p99_ms']:8.1f} ms   "
                  f"alert/bulk p50 {ratio[label]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
