"""How soon can a new agent deliver its first message to an existing mesh member?

An echo service runs in one process. Then, N times, a fresh process starts an
agent, publishes one message as soon as it knows the echo service, and waits
for the echo. Reported: agent.start() → message delivered to the echo service
(taken from the echo's receipt timestamp on the same clock) and → echo back.
mDNS on loopback only, with a fresh mesh name per run.

    python tools/join_latency.py --runs 10
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
import uuid

import meshmq


async def echo(mesh: str, lifetime: float) -> None:
    async with meshmq.AsyncAgent("echo", mesh=mesh) as agent:
        async def on_hello(msg: meshmq.Message) -> None:
            await agent.publish(f"join.ack.{msg.source}", {"received_at": time.time()})

        agent.subscribe("join.hello", on_hello)
        print("ready", flush=True)
        await asyncio.sleep(lifetime)  # ends by itself; the parent stops it earlier by PID


async def newcomer(mesh: str, name: str) -> None:
    agent = meshmq.AsyncAgent(name, mesh=mesh)
    acked = asyncio.get_running_loop().create_future()
    agent.subscribe(f"join.ack.{name}", lambda m: acked.done() or acked.set_result((time.time(), m.data)))
    t0 = time.time()
    await agent.start()
    await agent.wait_for_subscribers("join.hello", timeout=10)
    await agent.publish("join.hello", "hi")
    back_at, data = await asyncio.wait_for(acked, 10)
    await agent.stop()
    print(json.dumps({"delivered": data["received_at"] - t0, "echoed": back_at - t0}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--role", choices=["echo", "newcomer"], help=argparse.SUPPRESS)
    ap.add_argument("--mesh", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "echo":
        asyncio.run(echo(args.mesh, 120))
        return 0
    if args.role == "newcomer":
        asyncio.run(newcomer(args.mesh, args.name))
        return 0

    mesh = "join" + uuid.uuid4().hex[:10]
    # The agents' stores (fsync: the default) go in a directory of this run's own, removed afterwards.
    state = tempfile.TemporaryDirectory(prefix="meshmq-join-")
    os.environ["MESHMQ_DATA_DIR"] = state.name
    server = subprocess.Popen([sys.executable, __file__, "--role", "echo", "--mesh", mesh],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        delivered, echoed = [], []
        for i in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--role", "newcomer", "--mesh", mesh,
                                  "--name", f"new{i}"], capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            delivered.append(row["delivered"] * 1000)
            echoed.append(row["echoed"] * 1000)
        print(f"runs: {args.runs}  (agent.start() -> ...)")
        for label, xs in (("first message delivered", delivered), ("echo received back", echoed)):
            print(f"{label:25s} median {statistics.median(xs):7.1f} ms   max {max(xs):7.1f} ms")
        return 0 if max(delivered) < 1000 else 1
    finally:
        server.kill()  # our own child, by PID
        server.wait(timeout=10)
        state.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
