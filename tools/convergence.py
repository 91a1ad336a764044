"""How fast does the mesh agree? N agent processes on loopback, found by mDNS.

1. Start N agents (one process each) and wait until every one knows the other N-1.
2. One agent subscribes to a new topic: measure until every other agent routes to it.
3. Another agent is killed with SIGKILL: measure until every survivor has declared it dead.

Times are wall-clock stamps taken by each agent on the same host. Everything stays on
127.0.0.1 and ends by itself (hard deadlines; the children are killed by PID).

    python tools/convergence.py --nodes 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

TOPIC = "convergence.new"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def node(mesh: str, name: str, lifetime: float) -> None:
    import meshmq

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: commands.put_nowait(sys.stdin.readline().strip()))
    # durability "memory": this measures membership, and leaves no state behind.
    async with meshmq.AsyncAgent(name, mesh=mesh, durability="memory") as agent:
        emit(event="ready", node=agent.node_id)
        known: set[str] = set()
        routed = False
        deadline = time.monotonic() + lifetime
        while time.monotonic() < deadline:
            peers = {p.service for p in agent.peers()}
            now = time.time()
            for gone in known - peers:
                emit(event="gone", peer=gone, at=now)
            if peers != known:
                emit(event="peers", count=len(peers), at=now)
            known = peers
            if not routed and agent.routes(TOPIC):
                routed = True
                emit(event="routed", at=now)
            try:
                command = await asyncio.wait_for(commands.get(), 0.005)
            except asyncio.TimeoutError:
                continue
            if command == "subscribe":
                emit(event="subscribing", at=time.time())
                agent.subscribe(TOPIC, lambda m: None)
            elif command in ("quit", ""):
                return


class Fleet:
    def __init__(self, n: int, mesh: str, lifetime: float) -> None:
        self.procs = [
            subprocess.Popen([sys.executable, __file__, "--role", "node", "--mesh", mesh, "--name", f"n{i:02d}",
                              "--lifetime", str(lifetime)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for i in range(n)
        ]
        self.buffers = [""] * n

    def events(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        """Lines that arrive within ``timeout`` seconds, from any child."""
        fds = {p.stdout.fileno(): i for i, p in enumerate(self.procs) if p.poll() is None and p.stdout}
        out: list[tuple[int, dict[str, Any]]] = []
        ready, _, _ = select.select(list(fds), [], [], timeout)
        for fd in ready:
            i = fds[fd]
            chunk = os.read(fd, 65536).decode()
            self.buffers[i] += chunk
            while "\n" in self.buffers[i]:
                line, self.buffers[i] = self.buffers[i].split("\n", 1)
                if line.startswith("{"):
                    out.append((i, json.loads(line)))
        return out

    def wait_for(self, what: str, until: Any, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        seen: list[tuple[int, dict[str, Any]]] = []
        while not until(seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit(f"convergence: timed out waiting for {what}")
            seen += self.events(min(remaining, 0.5))
        return seen

    def send(self, i: int, command: str) -> None:
        assert self.procs[i].stdin is not None
        self.procs[i].stdin.write(command + "\n")
        self.procs[i].stdin.flush()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # our own children, by PID
        for p in self.procs:
            p.wait(timeout=10)


def measure(n: int) -> dict[str, float]:
    fleet = Fleet(n, "conv" + uuid.uuid4().hex[:8], lifetime=120)
    try:
        start = time.monotonic()
        counts = [0] * n

        def all_met(seen: list[tuple[int, dict[str, Any]]]) -> bool:
            for i, e in seen[-200:]:
                if e["event"] == "peers":
                    counts[i] = e["count"]
            return all(c == n - 1 for c in counts)

        fleet.wait_for(f"all {n} agents to meet", all_met, timeout=90)
        met = time.monotonic() - start

        fleet.send(0, "subscribe")
        seen = fleet.wait_for("the subscription to reach everyone",
                              lambda s: sum(1 for _, e in s if e["event"] == "routed") >= n - 1, timeout=30)
        t0 = next(e["at"] for _, e in seen if e["event"] == "subscribing")
        routed = max(e["at"] for _, e in seen if e["event"] == "routed") - t0

        victim = n - 1
        killed_at = time.time()
        os.kill(fleet.procs[victim].pid, signal.SIGKILL)
        seen = fleet.wait_for("every survivor to declare the killed agent dead",
                              lambda s: len({i for i, e in s if e["event"] == "gone" and e["peer"] == f"n{victim:02d}"})
                              >= n - 1, timeout=30)
        dead = max(e["at"] for _, e in seen if e["event"] == "gone") - killed_at
        return {"nodes": n, "all_met_s": met, "subscription_everywhere_s": routed, "death_everywhere_s": dead}
    finally:
        fleet.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--mesh", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--lifetime", type=float, default=120, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "node":
        asyncio.run(node(args.mesh, args.name, args.lifetime))
        return 0
    if not 3 <= args.nodes <= 60:
        ap.error("--nodes must be 3 to 60 on one machine")
    results = [measure(args.nodes) for _ in range(args.runs)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'run':>3}  {'nodes':>5}  {'all met':>8}  {'new subscription everywhere':>28}  "
              f"{'SIGKILLed node dead everywhere':>31}")
        for i, r in enumerate(results, 1):
            print(f"{i:>3}  {r['nodes']:>5}  {r['all_met_s']:>7.2f}s  {r['subscription_everywhere_s']:>27.3f}s  "
                  f"{r['death_everywhere_s']:>30.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
