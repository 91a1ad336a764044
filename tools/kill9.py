"""Durable delivery under SIGKILL: count every message id.

Producers publish to one subscriber through their outboxes (durability fsync)
while this script kills a process with SIGKILL every few seconds and starts it
again with the same store (the next kill comes a few seconds after the restarted
process got going, so kills never outpace restarts on a slow machine). Every id whose ``publish`` returned must reach the
subscriber's application exactly once, and per producer in publication order.

    python tools/kill9.py --kill producers            # 4 producers, 100,000 messages
    python tools/kill9.py --kill subscriber
    python tools/kill9.py --scenario outage           # consumer down 30 s, producer restarted once

Each process writes what it did to a log of its own with one ``os.write`` per
record, so what it wrote survives its SIGKILL:

- a producer: one line per message whose ``publish`` returned (``id life n``);
- the subscriber (the application): one line per message it processed
  (``id producer life n redelivered``).

The subscriber processes a message once: one flagged ``redelivered`` whose id it
has already recorded is skipped (an idempotent consumer; meshmq flags every
message that could have been handed over before a crash, so the application
checks only those). The report counts those skips, and every duplicate that
reached processing (must be 0), lost ids (must be 0) and order violations (must
be 0). Traffic stays on 127.0.0.1 (fixed ports, seeds, no mDNS); every process is
one this script started and is ended by its PID, and each ends by itself at the
run's deadline or when this script is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOPIC = "kill.p{}"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def node_keys(data_dir: Path, names: list[str]) -> dict[str, str]:
    """Each process's node key, made beforehand beside its store-to-be, so that every one can
    name the others as seeds (an endpoint with its key) before they ever ran."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from meshmq._security import b64, instance_keys

    return {n: b64(instance_keys(data_dir, n).public) for n in names}


def agent_config(a: dict[str, Any], name: str) -> dict[str, Any]:
    ports, keys = a["ports"], a["keys"]
    return {"mesh": a["mesh"], "discovery": False, "durability": "fsync", "bind": f"tcp://127.0.0.1:{ports[name]}",
            "seeds": [f"tcp://127.0.0.1:{p}#{keys[n]}" for n, p in ports.items() if n != name],
            "probe_interval": 0.2, "probe_timeout": 0.1, "suspicion_mult": 2.0, "stop_timeout": 1.0}


def append(fd: int, lines: list[str]) -> None:
    if lines:
        os.write(fd, ("\n".join(lines) + "\n").encode())


# --- the processes ---------------------------------------------------------------------


def going(stop: asyncio.Event, a: dict[str, Any]) -> bool:
    """Not told to stop (SIGTERM), before the run's deadline, and the controller alive (if it
    died, this process was reparented): a child never outlives its run."""
    return not stop.is_set() and time.time() < a["until"] and os.getppid() == a["parent"]


async def until_stopped(stop: asyncio.Event, a: dict[str, Any]) -> None:
    while going(stop, a):
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


def mark_ready(a: dict[str, Any], name: str) -> None:
    """One line per life that got going (agent started, subscriber known): the controller
    waits for it before it schedules the next kill, so kills cannot outpace restarts."""
    with open(Path(a["dir"]) / f"{name}.ready", "a") as f:
        f.write("ready\n")


def role_producer(a: dict[str, Any]) -> None:
    import meshmq

    index, total, rate, window = a["index"], a["count"], a["rate"], a["window"]
    log_path = Path(a["dir"]) / f"producer{index}.log"
    lives = 1
    confirmed = 0
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            if line.startswith("life "):
                lives = int(line.split()[1]) + 1
            elif line and line != "done" and not line.startswith("#"):
                confirmed = max(confirmed, int(line.split()[2]))
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    append(fd, [f"life {lives}"])

    async def main() -> None:
        agent = meshmq.AsyncAgent(f"producer{index}", **agent_config(a, f"producer{index}"))
        await agent.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            # Every life: a life killed before it stored the subscriber's record would leave the
            # next one publishing to no one (a publish with no subscriber known goes nowhere).
            await agent.wait_for_subscribers(TOPIC.format(index), timeout=30)
            mark_ready(a, f"producer{index}")
            n = confirmed
            life = lives
            started = time.monotonic()
            sent_this_life = 0
            while n < total and going(stop, a):
                batch = list(range(n + 1, min(total, n + window) + 1))
                try:
                    ids = await asyncio.gather(*(agent.publish(TOPIC.format(index),
                                                               {"p": index, "life": life, "n": i}) for i in batch))
                except meshmq.OutboxFull as exc:
                    # Back-pressure: the batch is not confirmed (some of it may be kept); publish it
                    # again as a new "life", so that order is still checked as (life, n).
                    life += 1
                    append(fd, [f"# backpressure {exc}", f"life {life}"])
                    await asyncio.sleep(1.0)
                    continue
                append(fd, [f"{mid} {life} {i}" for mid, i in zip(ids, batch)])
                n = batch[-1]
                sent_this_life += len(batch)
                ahead = sent_this_life / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)  # the pace asked for, so the kills land mid-stream
            deadline = time.monotonic() + 120
            while agent.stats()["outbox_messages"] and time.monotonic() < deadline and going(stop, a):
                await asyncio.sleep(0.05)  # bounded: until the subscriber acknowledged everything
            if n >= total and not agent.stats()["outbox_messages"]:
                append(fd, ["done"])
            await until_stopped(stop, a)
            counted = {k: v for k, v in sorted(agent.stats().items()) if v}
            print(f"producer{index} life {lives} stats: {json.dumps(counted)}", file=sys.stderr, flush=True)
        finally:
            await agent.stop()

    asyncio.run(main())


def role_subscriber(a: dict[str, Any]) -> None:
    import meshmq

    log_path = Path(a["dir"]) / "subscriber.log"
    seen: set[str] = set()
    if log_path.exists():
        seen = {line.split()[0] for line in log_path.read_text().splitlines() if line and not line.startswith("#")}
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    append(fd, ["# life"])
    skipped = 0

    async def main() -> None:
        agent = meshmq.AsyncAgent("subscriber", **agent_config(a, "subscriber"))

        def handle(msg: meshmq.Message) -> None:
            nonlocal skipped
            if msg.redelivered and msg.id in seen:
                skipped += 1
                append(fd, [f"# skipped {msg.id}"])
                return
            d = msg.data
            append(fd, [f"{msg.id} {d['p']} {d['life']} {d['n']} {int(msg.redelivered)}"])
            seen.add(msg.id)

        agent.subscribe("kill.>", handle, durable=True)
        await agent.start()
        mark_ready(a, "subscriber")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await until_stopped(stop, a)
        finally:
            # What the agent counted (drops, rejections, resends), for whoever reads a failed run.
            counted = {k: v for k, v in sorted(agent.stats().items()) if v}
            print(f"subscriber stats: {json.dumps(counted)}", file=sys.stderr, flush=True)
            await agent.stop()

    asyncio.run(main())


# --- the controller --------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, role: str, args: dict[str, Any]) -> None:
        self.name, self.role, self.args = name, role, args
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        err = open(Path(self.args["dir"]) / f"{self.name}.stderr", "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", self.role, "--args", json.dumps(self.args)],
                                     stdout=subprocess.DEVNULL, stderr=err)
        err.close()

    def lives_ready(self) -> int:
        path = Path(self.args["dir"]) / f"{self.name}.ready"
        return path.read_text().count("\n") if path.exists() else 0

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def read_producer(path: Path) -> tuple[dict[str, tuple[int, int]], bool]:
    confirmed: dict[str, tuple[int, int]] = {}
    done = False
    if path.exists():
        for line in path.read_text().splitlines():
            if line == "done":
                done = True
            elif line and not line.startswith(("life ", "#")):
                mid, life, n = line.split()
                confirmed[mid] = (int(life), int(n))
    return confirmed, done


def analyse(directory: Path, producers: int) -> dict[str, Any]:
    confirmed: dict[str, tuple[int, int, int]] = {}
    for p in range(producers):
        ids, _ = read_producer(directory / f"producer{p}.log")
        confirmed.update({mid: (p, life, n) for mid, (life, n) in ids.items()})
    delivered: collections.Counter[str] = collections.Counter()
    order: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    redelivered = skipped = lives = 0
    for line in (directory / "subscriber.log").read_text().splitlines():
        if line == "# life":
            lives += 1
            continue
        if line.startswith("# skipped"):
            skipped += 1
            continue
        mid, p, life, n, again = line.split()
        delivered[mid] += 1
        order[int(p)].append((int(life), int(n)))
        redelivered += int(again)
    violations = sum(1 for seq in order.values() for x, y in zip(seq, seq[1:]) if y <= x)
    return {
        "confirmed": len(confirmed), "delivered": len(delivered),
        "lost": len(set(confirmed) - set(delivered)),
        "duplicates": sum(c - 1 for c in delivered.values() if c > 1),
        "order_violations": violations,
        "in_doubt_delivered": len(set(delivered) - set(confirmed)),
        "redelivered_flagged": redelivered, "skipped_as_already_processed": skipped,
        "subscriber_lives": lives,
    }


def run_kills(o: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="meshmq-kill9-"))
    names = [f"producer{i}" for i in range(o.producers)] + ["subscriber"]
    os.environ["MESHMQ_DATA_DIR"] = str(directory / "data")
    os.environ.setdefault("MESHMQ_HOME", str(directory / "home"))  # the development authority they share
    args = {"mesh": f"kill{os.getpid()}", "dir": str(directory), "ports": dict(zip(names, free_ports(len(names)))),
            "keys": node_keys(directory / "data", names),
            "count": o.messages // o.producers, "rate": o.rate / o.producers, "window": o.window,
            "parent": os.getpid(), "until": time.time() + o.timeout + 60}
    sub = Proc("subscriber", "subscriber", args)
    producers = [Proc(f"producer{i}", "producer", {**args, "index": i}) for i in range(o.producers)]
    sub.start()
    for p in producers:
        p.start()
    started = time.monotonic()
    deadline = started + o.timeout
    victims = producers if o.kill == "producers" else [sub]
    turn = 0
    next_kill = started + o.every
    restarted: tuple[Proc, int] | None = None  # a victim whose new life has not got going yet
    try:
        while time.monotonic() < deadline:
            if all(read_producer(directory / f"{p.name}.log")[1] for p in producers):
                break
            if restarted is not None and restarted[0].lives_ready() > restarted[1]:
                restarted = None  # the next kill comes `every` seconds after a life got going
                next_kill = time.monotonic() + o.every
            if restarted is None and time.monotonic() >= next_kill and o.kill != "none":
                victim = victims[turn % len(victims)]
                turn += 1
                ready = victim.lives_ready()
                victim.kill()
                victim.start()
                restarted = (victim, ready)
            time.sleep(0.05)  # the controller's pace; the processes do not wait on it
        finished = time.monotonic() - started
    finally:
        for p in producers:
            p.stop()
        sub.stop()
    result = analyse(directory, o.producers)
    result.update(kills=sum(p.kills for p in [sub, *producers]), seconds=round(finished, 1),
                  all_done=all(read_producer(directory / f"{p.name}.log")[1] for p in producers),
                  directory=str(directory))
    return result


def run_outage(o: argparse.Namespace) -> dict[str, Any]:
    """The concept documents' scenario: the consumer is down for a while; the producer keeps
    publishing and is itself restarted once; the consumer returns and gets everything."""
    directory = Path(tempfile.mkdtemp(prefix="meshmq-outage-"))
    names = ["producer0", "subscriber"]
    os.environ["MESHMQ_DATA_DIR"] = str(directory / "data")
    os.environ.setdefault("MESHMQ_HOME", str(directory / "home"))
    args = {"mesh": f"outage{os.getpid()}", "dir": str(directory), "ports": dict(zip(names, free_ports(2))),
            "keys": node_keys(directory / "data", names), "count": o.messages, "rate": o.rate, "window": o.window,
            "parent": os.getpid(), "until": time.time() + o.down + o.timeout + 120}
    sub = Proc("subscriber", "subscriber", args)
    producer = Proc("producer0", "producer", {**args, "index": 0})
    sub.start()
    producer.start()
    log = directory / "subscriber.log"
    started = time.monotonic()
    try:
        while time.monotonic() - started < 30 and not (log.exists() and log.read_text().count("\n") > 100):
            time.sleep(0.05)  # until the consumer has some
        sub.stop()  # down
        down_at = time.monotonic()
        time.sleep(o.down / 2)  # the outage: the producer publishes meanwhile
        producer.kill()
        producer.start()  # restarted once while the consumer is down
        time.sleep(o.down / 2)
        published_while_down = len(read_producer(directory / "producer0.log")[0])
        sub.start()
        back_at = time.monotonic()
        deadline = back_at + o.timeout
        while time.monotonic() < deadline and not read_producer(directory / "producer0.log")[1]:
            time.sleep(0.05)
        caught_up = time.monotonic() - back_at
    finally:
        producer.stop()
        sub.stop()
    result = analyse(directory, 1)
    result.update(down_seconds=round(back_at - down_at, 1), confirmed_before_return=published_while_down,
                  seconds_to_catch_up=round(caught_up, 1),
                  all_done=read_producer(directory / "producer0.log")[1], directory=str(directory))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=("kills", "outage"), default="kills")
    parser.add_argument("--kill", choices=("producers", "subscriber", "none"), default="producers")
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--messages", type=int, default=100_000, help="in all (kills) or for the one producer (outage)")
    parser.add_argument("--rate", type=float, default=4000.0, help="messages/s in all, so that kills land mid-stream")
    parser.add_argument("--window", type=int, default=100, help="concurrent publishes per producer")
    parser.add_argument("--every", type=float, default=3.0, help="seconds from a restarted process getting going to the next kill")
    parser.add_argument("--down", type=float, default=30.0, help="outage: seconds the consumer is down")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the logs and stores (default: removed)")
    o = parser.parse_args()
    if o.role:
        {"producer": role_producer, "subscriber": role_subscriber}[o.role](json.loads(o.args))
        return 0
    result = run_kills(o) if o.scenario == "kills" else run_outage(o)
    if not o.keep:
        shutil.rmtree(result.pop("directory"), ignore_errors=True)
    if o.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key.ljust(width)}  {value}")
    ok = result["lost"] == 0 and result["duplicates"] == 0 and result["order_violations"] == 0 and result["all_done"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
