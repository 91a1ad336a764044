"""Does membership hold up on a lossy network? N agents on one lab host that loses P % of packets.

Issue 3 asks that with 10 % packet loss no live node is declared dead over 5 minutes.
This tool checks it:

1. Make a lab of one host (tools/netns.py: a network namespace of its own, with its own
   loopback) and have it lose P % of the packets arriving on its loopback (an nftables
   rule in that namespace; each packet is drawn once, and its sender cannot tell).
2. Start N agent processes in that host. They bind tcp://127.0.0.1:<port> of its
   loopback, with mDNS off, and meet through static seeds (each is given every other
   agent's endpoint). Each subscribes to one topic and publishes one small message to
   it every --publish-every seconds, so data flows while membership runs.
3. Every --sample seconds each agent looks at its peers (``peers(departed=True)``) and
   reports each change of a peer's state (alive, suspect, dead, left, replaced).
4. After --duration seconds, report and stop.

No agent is ever killed, so every peer declared dead is a false death, and every
suspicion was refuted if the peer came back to alive. A state is seen only if it lasts
past one sample, so these counts are lower bounds: a peer declared dead and back within
one sample goes unseen. Each agent's own count of deaths (its "peers_dead" counter, read
every second) is reported beside them and counts for the verdict too.

Output: JSON lines on stdout. "start"; "death" (and "departure" for left/replaced) as
soon as one is seen; "progress" every --report-every seconds (per agent: peers seen
alive and suspect; deaths and suspicions so far; messages); "summary" at the end, with
every false death (observer, peer, seconds into the soak), the suspicions and how many
were refuted, the packets the rule dropped, the messages published and received, and
"ok". A one-line verdict goes to stderr.

Exit status: 0 when no peer was seen or counted dead (nor left, nor replaced) and at
the end every agent sees every other one (alive or suspect); 1 otherwise, or when an
agent process failed; 2 when the lab cannot be made here (needs root, iproute2 and
nftables, which are installed with apt-get if missing).

Everything stays on the lab host's own loopback; every wait has a deadline; the agents
end by themselves (and are killed by PID when the lab closes, even on Ctrl-C or
SIGTERM). After a SIGKILL of this tool, ``python tools/netns.py down`` removes the lab.

    python tools/loss_soak.py                                # 8 agents, 10 % loss, 300 s
    python tools/loss_soak.py --agents 4 --duration 20
    python tools/loss_soak.py --loss 20 --set gossip_interval=0.25 --set stop_timeout=1
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TOPIC = "soak.chatter"
STARTUP_S = 30.0
"""Longest wait for every agent process to bind and start."""
STOP_S = 10.0
"""Longest wait for the agents to stop by themselves at the end, before they are killed."""


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# --- one agent (a child process, inside the lab host) ----------------------------------------


async def agent_process(name: str, mesh: str, endpoint: str, seeds: list[str], settings: dict[str, str],
                        lifetime: float, sample: float, publish_every: float) -> None:
    """Run one agent until "quit" on stdin (or stdin closes, or ``lifetime`` passes), printing
    "ready", a "state" line whenever a peer's state changes, and "traffic" every second."""
    import meshmq

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: commands.put_nowait(sys.stdin.readline().strip()))
    deadline = time.monotonic() + lifetime
    received = 0

    def on_message(msg: meshmq.Message) -> None:
        nonlocal received
        if msg.source != name:
            received += 1

    # durability "os": the key made beforehand is the agent's identity (the store dir is removed after).
    overrides: dict[str, Any] = {"durability": "os", **settings, "mesh": mesh, "discovery": False,
                                 "seeds": tuple(seeds), "bind": endpoint}
    agent = meshmq.AsyncAgent(name, **overrides)
    async with agent:
        agent.subscribe(TOPIC, on_message)
        emit(event="ready", node=agent.node_id, endpoint=agent.endpoints[0])
        states: dict[str, tuple[str, str]] = {}  # peer node -> (service, state)
        published = failed = 0
        most = int(lifetime / publish_every) + 1
        next_publish = next_traffic = time.monotonic()

        def traffic() -> None:
            emit(event="traffic", published=published, publish_failed=failed, received=received,
                 peers_dead_counter=agent.stats().get("peers_dead", 0))

        while time.monotonic() < deadline:
            now = time.monotonic()
            current = {p.node: (p.service, p.state) for p in agent.peers(departed=True)}
            for node, (service, state) in current.items():
                if states.get(node, ("", "unknown"))[1] != state:
                    emit(event="state", peer=service, node=node, was=states.get(node, ("", "unknown"))[1],
                         now=state, at=now)
            for node in states.keys() - current.keys():  # a departure old enough to be forgotten
                emit(event="state", peer=states[node][0], node=node, was=states[node][1], now="forgotten", at=now)
            states = current
            if now >= next_publish and published + failed < most:
                next_publish += publish_every
                try:
                    await agent.publish(TOPIC, {"from": name, "n": published})
                    published += 1
                except meshmq.MeshError:
                    failed += 1
            if now >= next_traffic:
                next_traffic += 1.0
                traffic()
            try:
                command = await asyncio.wait_for(commands.get(), sample)
            except asyncio.TimeoutError:
                continue
            if command in ("quit", ""):
                break
        traffic()


# --- the soak (the parent, outside the lab) ---------------------------------------------------


@dataclasses.dataclass
class AgentView:
    """What the parent knows of one agent: its peers' states as it last reported them."""

    name: str
    proc: subprocess.Popen[bytes]
    node: str = ""
    states: dict[str, str] = dataclasses.field(default_factory=dict)  # peer service -> state
    traffic: dict[str, Any] = dataclasses.field(default_factory=dict)
    buffer: bytes = b""
    ended: bool = False

    def count(self, state: str) -> int:
        return sum(1 for s in self.states.values() if s == state)

    def sees(self) -> set[str]:
        return {peer for peer, s in self.states.items() if s in ("alive", "suspect")}


@dataclasses.dataclass
class Tally:
    """Everything that went wrong, or nearly, during the soak."""

    deaths: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    departures: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # left, replaced, forgotten
    suspicions: int = 0
    refuted: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)  # agent processes that broke


class Soak:
    def __init__(self, lab: Any, args: argparse.Namespace, settings: dict[str, str]) -> None:
        self.lab = lab
        self.args = args
        self.stopping = False  # set once the summary is taken: the agents' goodbyes are not departures
        self.host = lab.hosts[0]
        self.mesh = "soak" + uuid.uuid4().hex[:8]
        self.tally = Tally()
        self.started = time.monotonic()
        # Keys made beforehand beside each agent's store, so that every agent can name the others
        # as seeds (endpoint#key) before they run.
        self.data_dir = tempfile.mkdtemp(prefix="meshmq-soak-")
        os.environ["MESHMQ_DATA_DIR"] = self.data_dir
        os.environ.setdefault("MESHMQ_HOME", os.path.join(self.data_dir, "home"))
        from meshmq._security import b64, instance_keys

        names = [f"a{i:02d}" for i in range(args.agents)]
        keys = {n: b64(instance_keys(Path(self.data_dir), n).public) for n in names}
        endpoints = [f"tcp://127.0.0.1:{args.base_port + i}" for i in range(args.agents)]
        lifetime = STARTUP_S + args.duration + STOP_S
        self.agents: list[AgentView] = []
        for name, endpoint in zip(names, endpoints):
            argv = [sys.executable, os.path.abspath(__file__), "--role", "agent", "--name", name,
                    "--mesh", self.mesh, "--endpoint", endpoint,
                    "--seeds", ",".join(f"{e}#{keys[n]}" for n, e in zip(names, endpoints) if e != endpoint),
                    "--settings", json.dumps(settings), "--lifetime", str(lifetime),
                    "--sample", str(args.sample), "--publish-every", str(args.publish_every)]
            proc = lab.popen(self.host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.agents.append(AgentView(name, proc))

    def since_start(self, monotonic: float) -> float:
        return round(monotonic - self.started, 3)

    def read(self, timeout: float) -> None:
        """Take in the lines that arrive within ``timeout`` seconds, from any agent."""
        fds = {a.proc.stdout.fileno(): a for a in self.agents if not a.ended and a.proc.stdout is not None}
        if not fds:
            return
        ready, _, _ = select.select(list(fds), [], [], timeout)
        for fd in ready:
            agent = fds[fd]
            chunk = os.read(fd, 65536)
            if not chunk:
                agent.ended = True
                continue
            agent.buffer += chunk
            while b"\n" in agent.buffer:
                line, agent.buffer = agent.buffer.split(b"\n", 1)
                if line.startswith(b"{"):
                    self.take(agent, json.loads(line))

    def take(self, agent: AgentView, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            agent.node = event["node"]
        elif kind == "traffic":
            agent.traffic = {k: v for k, v in event.items() if k != "event"}
        elif kind == "state" and not self.stopping:  # while stopping, goodbyes are no news
            peer, was, now = event["peer"], event["was"], event["now"]
            agent.states[peer] = now
            seen = {"observer": agent.name, "peer": peer, "node": event["node"], "was": was,
                    "at_s": self.since_start(event["at"])}
            if now == "suspect":
                self.tally.suspicions += 1
            elif now == "alive" and was == "suspect":
                self.tally.refuted += 1
            elif now == "dead":
                self.tally.deaths.append(seen)
                emit(event="death", **seen)
            elif now not in ("alive", "suspect"):
                self.tally.departures.append({**seen, "now": now})
                emit(event="departure", **seen, now=now)

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_S
        while not all(a.node for a in self.agents):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or any(a.ended for a in self.agents):
                return False
            self.read(min(remaining, 0.5))
        return True

    def everyone_sees_everyone(self) -> bool:
        names = {a.name for a in self.agents}
        return all(a.sees() == names - {a.name} for a in self.agents)

    def run(self) -> float | None:
        """Soak for --duration seconds; return when everyone first saw everyone (None: never)."""
        met: float | None = None
        deadline = time.monotonic() + self.args.duration
        next_report = time.monotonic() + self.args.report_every
        while (remaining := deadline - time.monotonic()) > 0:
            self.read(min(remaining, 0.5))
            if met is None and self.everyone_sees_everyone():
                met = self.since_start(time.monotonic())
            for agent in self.agents:
                if agent.ended and agent.name not in self.tally.failures:
                    self.tally.failures.append(agent.name)
            if time.monotonic() >= next_report:
                next_report += self.args.report_every
                emit(event="progress", **self.progress())
        return met

    def progress(self) -> dict[str, Any]:
        return {
            "t_s": self.since_start(time.monotonic()),
            "agents": {a.name: {"alive": a.count("alive"), "suspect": a.count("suspect")} for a in self.agents},
            "deaths": len(self.tally.deaths),
            "suspicions": self.tally.suspicions,
            "refuted": self.tally.refuted,
            "published": sum(a.traffic.get("published", 0) for a in self.agents),
            "received": sum(a.traffic.get("received", 0) for a in self.agents),
        }

    def summary(self, met: float | None) -> dict[str, Any]:
        names = {a.name for a in self.agents}
        view = {a.name: {"alive": a.count("alive"), "suspect": a.count("suspect"),
                         "missing": sorted(names - {a.name} - a.sees())} for a in self.agents}
        published = sum(a.traffic.get("published", 0) for a in self.agents)
        counted = {a.name: a.traffic.get("peers_dead_counter", 0) for a in self.agents}
        return {
            "ok": (not self.tally.deaths and not sum(counted.values()) and not self.tally.departures
                   and not self.tally.failures and self.everyone_sees_everyone()),
            "agents": len(self.agents),
            "loss_percent": self.args.loss,
            "duration_s": self.args.duration,
            "everyone_met_at_s": met,
            "view_at_end": view,
            "false_deaths": self.tally.deaths,
            "other_departures": self.tally.departures,
            "suspicions": self.tally.suspicions,
            "refuted": self.tally.refuted,
            "deaths_counted_by_agents": sum(counted.values()),
            "peers_dead_counters": counted,
            "agent_failures": self.tally.failures,
            "packets_dropped": self.lab.dropped(self.host),
            "messages": {"published": published,
                         "publish_failed": sum(a.traffic.get("publish_failed", 0) for a in self.agents),
                         "received": sum(a.traffic.get("received", 0) for a in self.agents),
                         "at_most": published * (len(self.agents) - 1)},
        }

    def stop(self) -> None:
        """Ask every agent to stop, and wait (bounded) for them to report and exit."""
        self.stopping = True
        for agent in self.agents:
            if agent.proc.poll() is None and agent.proc.stdin is not None:
                try:
                    agent.proc.stdin.write(b"quit\n")
                    agent.proc.stdin.flush()
                except BrokenPipeError:
                    pass
        deadline = time.monotonic() + STOP_S
        while not all(a.ended for a in self.agents) and (remaining := deadline - time.monotonic()) > 0:
            self.read(min(remaining, 0.5))


def verdict(summary: dict[str, Any]) -> str:
    n = summary["agents"]
    head = (f"{n} agents, {summary['duration_s']:g} s at {summary['loss_percent']:g}% loss "
            f"({summary['packets_dropped']} packets dropped): ")
    facts = [f"{len(summary['false_deaths'])} false death(s) seen "
             f"({summary['deaths_counted_by_agents']} counted by the agents)",
             f"{summary['suspicions']} suspicion(s), {summary['refuted']} refuted"]
    if summary["other_departures"]:
        facts.append(f"{len(summary['other_departures'])} other departure(s)")
    if summary["agent_failures"]:
        facts.append(f"agent process(es) ended early: {', '.join(summary['agent_failures'])}")
    missing = {name: v["missing"] for name, v in summary["view_at_end"].items() if v["missing"]}
    facts.append(f"at the end some agents miss peers: {missing}" if missing
                 else f"at the end every agent sees the other {n - 1}")
    return ("OK: " if summary["ok"] else "FAILED: ") + head + "; ".join(facts)


def soak(args: argparse.Namespace, settings: dict[str, str]) -> int:
    import meshmq
    import netns  # tools/netns.py, beside this file

    try:
        netns.ensure_iproute2()
        netns.ensure_nft()
    except netns.LabUnavailable as exc:
        print(f"loss_soak: cannot make the lab here: {exc}", file=sys.stderr)
        return 2
    with netns.Lab(1) as lab:
        host = lab.hosts[0]
        lab.lose(host, args.loss, device="lo")
        experiment = Soak(lab, args, settings)
        try:
            emit(event="start", host=host.name, mesh=experiment.mesh, agents=args.agents, loss_percent=args.loss,
                 duration_s=args.duration, settings=settings, meshmq=os.path.dirname(meshmq.__file__))
            if not experiment.wait_ready():
                print(f"loss_soak: the agents did not all start within {STARTUP_S:g} s", file=sys.stderr)
                return 1
            met = experiment.run()
            summary = experiment.summary(met)  # before stopping: the agents' goodbyes would read as "left"
            emit(event="summary", **summary)
            experiment.stop()
        finally:
            shutil.rmtree(experiment.data_dir, ignore_errors=True)
    print(f"loss_soak: {verdict(summary)}", file=sys.stderr)
    return 0 if summary["ok"] else 1


def parse_settings(pairs: list[str], ap: argparse.ArgumentParser) -> dict[str, str]:
    import meshmq

    settings: dict[str, str] = {}
    for pair in pairs:
        field, equals, value = pair.partition("=")
        if not equals:
            ap.error(f"--set {pair!r}: expected FIELD=VALUE")
        settings[field] = value
    try:
        meshmq.Config().replace(**settings)
    except meshmq.ConfigError as exc:
        ap.error(f"--set: {exc}")
    for reserved in ("mesh", "discovery", "seeds", "bind"):
        if reserved in settings:
            ap.error(f"--set {reserved}: the soak sets it itself")
    return settings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=8, help="agent processes, 2 to 60 (default 8)")
    ap.add_argument("--loss", type=float, default=10.0,
                    help="percent of the packets on the lab host's loopback that are lost, 0 to 100 (default 10)")
    ap.add_argument("--duration", type=float, default=300.0,
                    help="seconds of soak, counted once every agent has started (default 300)")
    ap.add_argument("--report-every", type=float, default=10.0,
                    help="seconds between progress lines (default 10)")
    ap.add_argument("--publish-every", type=float, default=1.0,
                    help=f"seconds between the small messages each agent publishes to {TOPIC!r} (default 1)")
    ap.add_argument("--sample", type=float, default=0.05,
                    help="seconds between two looks of an agent at its peers' states (default 0.05)")
    ap.add_argument("--base-port", type=int, default=7400,
                    help="agent i binds tcp://127.0.0.1:<base-port + i> of the lab host (default 7400)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a meshmq.Config setting for every agent, e.g. gossip_interval=0.25; repeatable "
                         "(see 'python -m meshmq config'); mesh, discovery, seeds and bind are the soak's")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--mesh", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", default="", help=argparse.SUPPRESS)
    ap.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--lifetime", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "agent":
        asyncio.run(agent_process(args.name, args.mesh, args.endpoint, [s for s in args.seeds.split(",") if s],
                                  json.loads(args.settings), args.lifetime, args.sample, args.publish_every))
        return 0
    if not 2 <= args.agents <= 60:
        ap.error("--agents must be 2 to 60 on one host")
    if not 0 <= args.loss <= 100:
        ap.error("--loss must be 0 to 100")
    for flag in ("duration", "report_every", "publish_every", "sample"):
        if not getattr(args, flag) > 0:
            ap.error(f"--{flag.replace('_', '-')} must be greater than zero")
    if not 1024 <= args.base_port <= 65535 - args.agents:
        ap.error("--base-port must leave room for every agent between 1024 and 65535")
    settings = parse_settings(args.set, ap)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the lab's processes and namespaces are removed.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        return soak(args, settings)
    except KeyboardInterrupt:
        print("loss_soak: interrupted; the lab is removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
