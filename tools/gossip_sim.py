"""How does membership scale? The real protocol core, in virtual time, on an in-memory network.

For each mesh size N:

1. Make N :class:`meshmq._node.Node` cores on a :class:`meshmq.testing.MemoryNetwork`.
   They start already agreeing (each is handed every other node's record once, as if
   it had joined long ago), because joining 1,000 nodes one by one only measures joins.
2. Run ``--warmup`` virtual seconds so probes and gossip reach their steady state, and
   measure the bytes each node sends per gossip round while nothing changes.
3. One node subscribes to a new topic. Advance one gossip round at a time until every
   node routes the topic to it: report the rounds and the bytes per node per round.
4. One node crashes (no goodbye). Report the virtual seconds until every other node has
   declared it dead, and the rounds that took.

Bytes are every control frame a node hands to the network (probes, acks, gossip), so
they include SWIM's probing as well as the gossip. Frames are delivered at once, in
order, with no loss, unless ``--loss`` is given. Nothing here opens a socket.

    python tools/gossip_sim.py                       # N = 10, 100, 1000
    python tools/gossip_sim.py --nodes 50 --loss 0.1
    python tools/gossip_sim.py --json                # one JSON object per size
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshmq._node import Node, Timing  # noqa: E402
from meshmq._records import claim  # noqa: E402
from meshmq._wire import SYNC_LAST, Subscription, Sync  # noqa: E402
from meshmq.testing import MemoryNetwork, make_node  # noqa: E402

TOPIC = "sim.new"


def build(n: int, loss: float, seed: int) -> tuple[MemoryNetwork, list[Node]]:
    """n nodes that already know each other (records handed over directly, not gossiped)."""
    net = MemoryNetwork(record_events=False, loss=loss, rng=random.Random(seed), max_deliveries=10_000_000)
    nodes = [net.add(make_node(f"n{i}", subscriptions=[f"own.n{i}"])) for i in range(n)]
    claims = [claim(node.record) for node in nodes]
    for node in nodes:
        others = tuple(c for c in claims if c.node != node.node_id)
        # A LAST-phase sync carrying records is merged and asks nothing back.
        hand_over = Sync(node.mesh, "bootstrap", "inproc://bootstrap", SYNC_LAST, b"", 0, others, ())
        net.execute(node.endpoint, node.receive(hand_over, net.clock.now()))
    for node in nodes:
        assert len(node.peers) == n - 1, (node.node_id, len(node.peers))
    return net, nodes


def measure(n: int, warmup: float, loss: float, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    net, nodes = build(n, loss, seed)
    interval = Timing().gossip_interval
    step = interval / 4
    net.run(warmup, step=step)

    before = sum(net.sent_bytes.values())
    quiet_rounds = 5
    net.run(quiet_rounds * interval, step=step)
    steady = (sum(net.sent_bytes.values()) - before) / n / quiet_rounds

    # 2. a new subscription
    changer = nodes[1]
    net.execute(changer.endpoint, changer.set_subscriptions(
        (*changer.record.subscriptions, Subscription(TOPIC)), net.clock.now()))
    target = changer.record.incarnation
    before = sum(net.sent_bytes.values())
    rounds = 0
    while not all(node is changer or _knows(node, changer.node_id, target) for node in nodes):
        rounds += 1
        if rounds > 200:
            raise RuntimeError(f"no agreement after 200 rounds at n={n}")
        net.run(interval, step=step)
    spread_bytes = (sum(net.sent_bytes.values()) - before) / n / rounds

    # 3. a crash
    victim = nodes[2]
    net.crash(victim.endpoint)
    crashed_at = net.clock.now()
    survivors = [node for node in nodes if node is not victim]
    while any(victim.node_id in node.peers for node in survivors):
        if net.clock.now() - crashed_at > 120:
            raise RuntimeError(f"crash not detected within 120 virtual seconds at n={n}")
        net.run(interval, step=step)
    dead_after = net.clock.now() - crashed_at
    false_deaths = sum(node.counters["peers_dead"] for node in survivors) - len(survivors)

    return {
        "nodes": n,
        "loss": loss,
        "rounds_to_agree": rounds,
        "log2_n": round(math.log2(n), 2),
        "bytes_per_node_per_round_spreading": round(spread_bytes),
        "bytes_per_node_per_round_steady": round(steady),
        "crash_detected_everywhere_s": round(dead_after, 2),
        "false_deaths": false_deaths,
        "gossip_interval_s": interval,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _knows(node: Node, other: str, incarnation: int) -> bool:
    record = node.routes.records.get(other)
    return record is not None and record.incarnation >= incarnation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000],
                        help="mesh sizes to simulate, 2 to 5000 (default: 10 100 1000)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="virtual seconds of steady state before measuring (default 3)")
    parser.add_argument("--loss", type=float, default=0.0, help="share of frames lost, 0 to 0.5 (default 0)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the network's randomness (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per size instead of a table")
    args = parser.parse_args(argv)
    if any(not 2 <= n <= 5000 for n in args.nodes):
        parser.error("--nodes: each size must be between 2 and 5000")
    if not 0 <= args.loss <= 0.5:
        parser.error("--loss must be between 0 and 0.5")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if not args.json:
        print("nodes  rounds to agree  (log2 N)  B/node/round spreading  B/node/round steady  "
              "crash known by all (s)")
    for n in args.nodes:
        result = measure(n, args.warmup, args.loss, args.seed)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{n:>5}  {result['rounds_to_agree']:>15}  {result['log2_n']:>8}  "
                  f"{result['bytes_per_node_per_round_spreading']:>22}  "
                  f"{result['bytes_per_node_per_round_steady']:>19}  "
                  f"{result['crash_detected_everywhere_s']:>22}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
