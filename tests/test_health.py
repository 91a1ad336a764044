"""agent.health() and meshmq health: peers, outbox, reachability, dead letters, certificate."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from aio import eventually, run

import meshmq
from meshmq._health import FAIL, OK, WARN, WaitingFor, assess

NOW = 1_000_000.0


def _assess(**changes: object) -> meshmq.Health:
    args: dict[str, object] = dict(now=NOW, peers=3, suspects=0, waiting=[], max_messages=1000, max_bytes=10_000,
                                   max_age=60.0, dead_letter_times=[], dead_letter_window=300.0,
                                   cert_not_after=NOW + 30 * 86400, cert_warning=7 * 86400.0)
    args.update(changes)
    return assess(**args)  # type: ignore[arg-type]


def _status(health: meshmq.Health, name: str) -> str:
    return next(c.status for c in health.checks if c.name == name)


def test_a_quiet_agent_is_healthy() -> None:
    health = _assess()
    assert health.status == OK and health.ok and "3 up" in str(health)


def test_each_rule_of_the_verdict() -> None:
    full = [WaitingFor("n", "billing", 950, 100, True, NOW - 1)]
    assert _status(_assess(waiting=full), "outbox") == FAIL  # 95 % of max_messages
    half = [WaitingFor("n", "billing", 10, 6000, True, NOW - 1)]
    assert _status(_assess(waiting=half), "outbox") == WARN  # 60 % of max_bytes
    old = [WaitingFor("n", "billing", 1, 10, True, NOW - 61)]
    assert _status(_assess(waiting=old), "outbox") == WARN and "61.0s old" in str(_assess(waiting=old))
    down = [WaitingFor("n", "billing", 4, 10, False, NOW - 1)]
    assert _status(_assess(waiting=down), "reachable") == WARN and "billing" in str(_assess(waiting=down))
    assert _status(_assess(dead_letter_times=[NOW - 1000, NOW - 10]), "dead-letters") == WARN
    assert _status(_assess(dead_letter_times=[NOW - 1000]), "dead-letters") == OK
    assert _status(_assess(cert_not_after=NOW + 86400), "certificate") == WARN
    assert _status(_assess(cert_not_after=NOW - 1), "certificate") == FAIL
    assert _status(_assess(revoked=True), "certificate") == FAIL
    assert _assess(quarantined=2).status == WARN
    assert "subscriptions" not in str(_assess())  # meshmq health, from another process, cannot see them
    subs = [("orders.*", 0), ("jobs.>@workers", 60)]
    assert _status(_assess(backlogs=subs, backlog_limit=100), "subscriptions") == WARN
    assert "fullest jobs.>@workers: 60 of 100 pending (60%" in str(_assess(backlogs=subs, backlog_limit=100))
    assert _status(_assess(backlogs=subs, backlog_limit=1000), "subscriptions") == OK
    assert _status(_assess(backlogs=[("x", 95)], backlog_limit=100), "subscriptions") == FAIL
    assert _status(_assess(backlogs=[], backlog_limit=100), "subscriptions") == OK
    assert "event-loop" not in str(_assess())  # nor its event loop
    assert _status(_assess(stalls=0, last_stall=None, stall_window=300.0), "event-loop") == OK
    stalled = _assess(stalls=2, last_stall=(NOW - 20, 0.84), stall_window=300.0)
    assert _status(stalled, "event-loop") == WARN and "held for 0.84s 20s ago (2 time(s) in all)" in str(stalled)
    assert _status(_assess(stalls=2, last_stall=(NOW - 301, 0.84), stall_window=300.0), "event-loop") == OK
    assert _assess(waiting=full, revoked=True).to_json()["status"] == FAIL


def test_agent_health_sees_a_durable_subscriber_down_and_a_dead_letter(mesh: str) -> None:
    async def main() -> None:
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="os", max_attempts=1).start()

        def refuse(msg: meshmq.Message) -> None:
            raise ValueError("no")

        sub.subscribe("jobs.*", refuse, queue="workers")
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="os").start()
        try:
            await pub.wait_for_subscribers("jobs.x", timeout=10)
            assert pub.health().status == OK, str(pub.health())
            await pub.publish("jobs.x", b"fails")
            await eventually(lambda: len(sub.dead_letters()) == 1, what="the dead letter")
            assert sub.health().status == WARN and "1 new" in str(sub.health())
            await sub.stop()
            await eventually(lambda: not any(p.service == "sub" for p in pub.peers()), what="the subscriber gone")
            await pub.publish("jobs.x", b"waits")
            health = pub.health()
            assert _status(health, "reachable") == WARN and "sub" in str(health), str(health)
        finally:
            await pub.stop()
            await sub.stop()

    run(main(), timeout=60)


def test_meshmq_health_reads_an_agents_store_and_exits_for_scripts(mesh: str, tmp_path: Path) -> None:
    cli = importlib.import_module("test_cli")

    async def main() -> None:
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="os").start()
        sub.subscribe("jobs.*", lambda m: None, queue="workers")
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="os").start()
        await pub.wait_for_subscribers("jobs.x", timeout=10)
        await sub.stop()
        await eventually(lambda: not any(p.service == "sub" for p in pub.peers()), what="the subscriber gone")
        await pub.publish("jobs.x", b"waits")
        await pub.stop()

    run(main(), timeout=60)
    env = {**cli.cli_env(tmp_path), "MESHMQ_DATA_DIR": os.environ["MESHMQ_DATA_DIR"]}  # where pub's store is

    def health(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshmq", "health", "--service", "pub", "--mesh", mesh,
                               "--wait", "1", *extra], capture_output=True, text=True, timeout=60, env=env)

    plain = health()
    assert plain.returncode == 0, plain.stderr  # warnings only
    assert "pub: warn" in plain.stdout and "[warn] reachable" in plain.stdout and "sub" in plain.stdout
    strict = health("--strict")
    assert strict.returncode == 1
    as_json = json.loads(health("--json").stdout)
    assert as_json["status"] == "warn" and {c["name"] for c in as_json["checks"]} >= {"peers", "outbox", "reachable"}
    missing = subprocess.run([sys.executable, "-m", "meshmq", "health", "--service", "nope"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert missing.returncode == 2 and "no store of service 'nope'" in missing.stderr


def test_agent_health_sees_a_subscription_backing_up(mesh: str) -> None:
    """Six messages wait behind one nacked for a minute, with subscription_queue_messages=10:
    the subscription is 60 % full, a warning naming it."""
    async def main() -> None:
        async with meshmq.AsyncAgent("solo", mesh=mesh, discovery=False, durability="memory",
                                     subscription_queue_messages=10) as agent:
            sub = agent.subscribe("jobs.*", lambda m: m.nack(delay=60), queue="workers")
            assert _status(agent.health(), "subscriptions") == OK
            for i in range(6):
                await agent.publish("jobs.x", i, key="one-customer")
            await eventually(lambda: sub.pending == 6, what="six pending")
            health = agent.health()
            assert _status(health, "subscriptions") == WARN, str(health)
            assert "fullest jobs.*@workers: 6 of 10 pending (60%" in str(health)

    run(main())
