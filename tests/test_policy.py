"""Policies as code, the parts built so far: the file and its checker, and the pure
machinery (token buckets, circuit breakers, priority lanes, routing expressions), in
virtual time."""

from __future__ import annotations

import os
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
from aio import eventually, run

import meshmq

from meshmq._expr import ExpressionError, parse
from meshmq._policy import (
    CLOSED, HALF_OPEN, OPEN, Breaker, CircuitBreaker, PolicyError, TokenBucket, lane, load, pick_lane,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "policies.md"


def _example() -> str:
    match = re.search(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert match is not None
    return match.group(1)


def test_the_documented_example_is_a_good_policy() -> None:
    policy = load(_example(), "docs/policies.md")
    orders, audit = policy.rules
    assert policy.version == 3 and orders.name == "orders" and audit.line == 20
    assert orders.rate is not None and (orders.rate.per_second, orders.rate.burst, orders.rate.on_excess) == (100, 200,
                                                                                                          "delay")
    assert policy.first("priority", "audit.login", "anyone") is audit
    assert policy.first("priority", "orders.placed", "someone-else") is None  # service must match too
    [route] = policy.routes("orders.placed", "orders")
    assert route.to == "orders.review" and route.when.matches({"data": {"totalAmount": 1500}})
    assert not route.when.matches({"data": {"totalAmount": 999}})


@pytest.mark.parametrize(("change", "where"), [
    (('per_second = 100', 'per_second = -1'), ":11: rule 'orders': rate.per_second must be a positive number"),
    (('on_excess = "delay"', 'on_excess = "drop"'), ":11: rule 'orders': rate.on_excess must be one of"),
    (('topic = "orders.>"', 'topic = "orders.>.x"'), ":9: rule 'orders': topic:"),
    (('> 1000', '>'), ":16: rule 'orders': route 1: when: unexpected end"),
    (('to = "orders.review"', 'to = "orders.*"'), ":16: rule 'orders': route 1: to:"),
    (('priority = "low"', 'priority = "urgent"'), ":23: rule 'audit': priority must be one of high, normal, low"),
    (('failures = 5', 'failures = 0'), ":15: rule 'orders': breaker.failures must be a whole number from 1"),
    (('version = 3', 'version = "3"'), ":1: version must be a whole number from 1"),
    (('name = "audit"', 'name = "orders"'), ":20: rule 'orders': another rule has this name"),
    (('ttl = 3600', 'ttl = 3600\ncolour = "red"'), ":7: rule 'orders': unknown key(s) colour"),
])
def test_each_mistake_is_named_with_its_line_and_rule(change: tuple[str, str], where: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load(_example().replace(*change, 1), "p.toml")
    assert str(caught.value).startswith("p.toml" + where), str(caught.value)


def test_meshmq_policy_check(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(_example())
    ok = subprocess.run([sys.executable, "-m", "meshmq", "policy", "check", str(good)], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "version 3, 2 rule(s), good" in ok.stdout and "line 7" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(_example().replace('priority = "low"', 'priority = "urgent"'))
    no = subprocess.run([sys.executable, "-m", "meshmq", "policy", "check", str(bad)], capture_output=True, text=True,
                        timeout=60)
    assert no.returncode == 2 and f"{bad}:23: rule 'audit': priority must be one of" in no.stderr
    missing = subprocess.run([sys.executable, "-m", "meshmq", "policy", "check", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# --- the machinery, in virtual time -------------------------------------------------------------


def test_a_rate_limit_is_exact_to_the_token() -> None:
    bucket = TokenBucket(per_second=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.take(0.0) == pytest.approx(0.1)  # the 4th waits exactly one token's time
    assert bucket.take(0.099) == pytest.approx(0.001)
    assert bucket.take(0.1) == 0.0  # and gets it then, not before
    assert bucket.take(0.1) == pytest.approx(0.1)
    assert bucket.take(100.0, 4) == pytest.approx(0.1)  # never more saved up than the burst
    assert bucket.take(100.0, 3) == 0.0


@hypothesis.given(st.lists(st.floats(0, 0.5), min_size=1, max_size=200), st.integers(1, 20),
                  st.floats(0.5, 1000))
def test_a_bucket_never_lets_more_through_than_its_rate_allows(gaps: list[float], burst: int, rate: float) -> None:
    bucket = TokenBucket(rate, burst, 0.0)
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        if bucket.take(now) == 0.0:
            taken += 1
    assert taken <= burst + rate * now + 1e-6


def test_circuit_breaker_states() -> None:
    breaker = CircuitBreaker(Breaker(failures=3, window=10.0, open_for=5.0, probes=1))
    assert breaker.state == CLOSED and breaker.allow(0.0)
    breaker.record(1.0, ok=False)
    breaker.record(2.0, ok=False)
    breaker.record(20.0, ok=False)  # the first two fell out of the 10-second window
    assert breaker.state == CLOSED
    breaker.record(21.0, ok=False)
    breaker.record(22.0, ok=False)
    assert breaker.state == OPEN and not breaker.allow(26.9)  # open for 5 s: messages wait
    assert breaker.allow(27.0) and breaker.state == HALF_OPEN  # one probe
    assert not breaker.allow(27.1)  # and only one
    breaker.record(27.5, ok=False)
    assert breaker.state == OPEN and not breaker.allow(32.4)  # open again, from the failed probe
    assert breaker.allow(32.5) and breaker.state == HALF_OPEN
    breaker.record(33.0, ok=True)
    assert breaker.state == CLOSED and breaker.allow(33.0)
    breaker.record(34.0, ok=True)  # successes never open it
    assert breaker.state == CLOSED


def test_priority_lanes_favour_high_and_never_starve_low() -> None:
    assert (lane("high"), lane("normal"), lane("low"), lane(None)) == (0, 1, 2, 1)
    served = [0, 0, 0]
    picks = [pick_lane([0, 1, 2], served, starve_after=3) for _ in range(12)]
    assert picks.count(0) > picks.count(1) > 0 and picks.count(2) > 0
    assert all(picks[i:i + 5].count(0) >= 2 for i in range(0, 8))  # high stays first most of the time
    assert pick_lane([], served) is None


def test_routing_expressions() -> None:
    message = {"data": {"totalAmount": 1500, "currency": "USD", "items": [1, 2]}, "type": "OrderPlaced",
               "headers": {"region": "eu"}, "topic": "orders.placed"}
    cases = {
        'data.totalAmount > 1000 and data.currency == "USD"': True,
        'type in ["OrderPlaced", "OrderAmended"]': True,
        'not (headers.region == "eu")': False,
        "data.missing > 3": False,  # a missing path is null; null does not compare
        "data.currency < 5": False,  # a string and a number do not compare
        "1 in data.items and topic == 'orders.placed'": True,
        "(data.totalAmount >= 1500) or false": True,
    }
    for text, expected in cases.items():
        assert parse(text).matches(message) is expected, text
    for bad, problem in {"data.x >": "unexpected end", "os.system == 1": "unknown name 'os'",
                         "data.x == == 1": "unexpected '=='", "[" * 40 + "]" * 40: "nested more than 32",
                         "x" * 1001: "longer than 1000"}.items():
        with pytest.raises(ExpressionError, match=problem):
            parse(bad)


@hypothesis.given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        expression = parse(text)
    except ExpressionError:
        return
    expression.matches({"data": {"a": 1}, "topic": "t"})  # and evaluating never raises


# --- enforced by an agent (Config.policy_file) --------------------------------------------------

def _policy_file(tmp_path: Path, rules: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text("version = 1\n" + rules)
    return path


def test_a_rate_limit_rejects_delays_or_dead_letters_as_its_rule_says(mesh: str, tmp_path: Path) -> None:
    policy = _policy_file(tmp_path, """
[[rule]]
name = "strict"
topic = "strict.*"
rate = { per_second = 5, burst = 2, on_excess = "reject" }

[[rule]]
name = "paced"
topic = "paced.*"
rate = { per_second = 20, burst = 1, on_excess = "delay" }

[[rule]]
name = "kept"
topic = "kept.*"
rate = { per_second = 0.1, burst = 1, on_excess = "dead-letter" }
""")

    async def main() -> None:
        agent = await meshmq.AsyncAgent("pub", mesh=mesh, durability="os", discovery=False,
                                        policy_file=policy).start()
        try:
            await agent.publish("strict.x", 1)
            await agent.publish("strict.x", 2)
            with pytest.raises(meshmq.RateLimited, match="policy rule 'strict'") as caught:
                await agent.publish("strict.x", 3)
            assert 0 < caught.value.retry_after <= 0.2
            start = time.monotonic()
            for i in range(5):
                await agent.publish("paced.x", i)
            assert time.monotonic() - start >= 4 / 20  # four waited for a token each
            with pytest.raises(meshmq.RateLimited):
                agent.publish_nowait("paced.x", 9)  # cannot wait there
            await agent.publish("kept.x", "first")
            dead = await agent.publish("kept.x", "second")  # over the rate: dead-lettered, not lost
            await eventually(lambda: len(agent.dead_letters()) == 1, what="the dead letter")
            [letter] = agent.dead_letters()
            assert letter.id.startswith(dead) and letter.reason == "rate-limited" and letter.message.data == "second"
            stats = agent.stats()
            assert stats["policy_rate_limited"] >= 6 and stats["dropped_by_policy"] == 1
        finally:
            await agent.stop()

    run(main())


def test_content_routes_ttl_and_retries_from_the_policy(mesh: str, tmp_path: Path) -> None:
    policy = _policy_file(tmp_path, """
[[rule]]
name = "orders"
topic = "orders.placed"
ttl = 60
retry = { max_attempts = 2, backoff = 0.01 }
route = [{ when = "data.totalAmount > 1000", to = "orders.review" }]
""")

    async def main() -> None:
        review = await meshmq.AsyncAgent("review", mesh=mesh, durability="memory").start()
        reviewed: list[str] = []
        review.subscribe("orders.review", lambda m: reviewed.append(m.data["orderId"]))
        shop = await meshmq.AsyncAgent("shop", mesh=mesh, durability="os", policy_file=policy).start()
        calls: list[str] = []

        def fail(msg: meshmq.Message) -> None:
            calls.append(msg.headers.get("meshmq-ttl", ""))
            raise ValueError("no")

        shop.subscribe("orders.placed", fail)
        try:
            await shop.wait_for_subscribers("orders.review", timeout=10)
            await shop.publish("orders.placed", {"orderId": "small", "totalAmount": 10})
            await shop.publish("orders.placed", {"orderId": "big", "totalAmount": 5000})
            await eventually(lambda: reviewed == ["big"], what="the big order routed to review")
            await eventually(lambda: len(shop.dead_letters()) == 2, what="both dead-lettered after 2 attempts")
            assert len(calls) == 4 and all(float(ttl) == 60.0 for ttl in calls)  # the rule's TTL and retries
            assert shop.stats()["policy_rerouted"] == 1
        finally:
            await shop.stop()
            await review.stop()

    run(main(), timeout=60)


def test_a_bad_policy_file_stops_the_start_naming_line_and_rule(mesh: str, tmp_path: Path) -> None:
    policy = _policy_file(tmp_path, '[[rule]]\nname = "x"\nttl = -1\n')

    async def main() -> None:
        with pytest.raises(meshmq.ConfigError, match=r"policy.toml:4: rule 'x': ttl must be a positive number"):
            await meshmq.AsyncAgent("x", mesh=mesh, durability="memory", policy_file=policy).start()
        with pytest.raises(meshmq.ConfigError, match="cannot read"):
            await meshmq.AsyncAgent("x", mesh=mesh, durability="memory", policy_file=tmp_path / "nope").start()

    run(main())


def test_the_blocking_agent_waits_for_tokens_in_its_own_thread(mesh: str, tmp_path: Path) -> None:
    policy = _policy_file(tmp_path, '[[rule]]\nname = "p"\ntopic = "p.*"\n'
                                    'rate = { per_second = 25, burst = 1, on_excess = "delay" }\n')
    with meshmq.Agent("pub", mesh=mesh, durability="memory", discovery=False, policy_file=policy) as agent:
        start = time.monotonic()
        for i in range(4):
            agent.publish("p.x", i)
        assert time.monotonic() - start >= 3 / 25
        assert agent.stats()["policy_rate_limited"] >= 3


# --- the mesh's policy: signed, pushed, gossiped, switched at run time --------------------------


def test_a_policy_pushed_to_one_agent_is_in_force_on_five_within_two_gossip_intervals(mesh: str) -> None:
    from meshmq._security import Authority

    authority = Authority.development()  # the one these agents trust (the test's MESHMQ_HOME)

    def document(version: int, rules: str) -> bytes:
        return authority.sign_policy(mesh=mesh, version=version, text=f"version = {version}\n{rules}",
                                     at=time.time())

    limited = '[[rule]]\nname = "limited"\ntopic = "limited.*"\nrate = { per_second = 0.5, burst = 1, on_excess = "reject" }\n'

    async def main() -> None:
        agents = [await meshmq.AsyncAgent(f"svc{i}", mesh=mesh, durability="memory").start() for i in range(5)]
        try:
            await eventually(lambda: all(len(a.peers()) == 4 for a in agents), what="all five met")
            interval = agents[0].config.gossip_interval
            start = time.monotonic()
            assert agents[0].push_policy(document(1, limited))
            await eventually(lambda: all(a.policy_version == 1 for a in agents), timeout=10, what="all on version 1")
            took = time.monotonic() - start
            assert took <= 2 * interval, f"{took:.3f}s for 5 agents, gossip interval {interval}s"
            await agents[3].publish("limited.x", 1)
            with pytest.raises(meshmq.RateLimited, match="'limited'"):
                await agents[3].publish("limited.x", 2)  # enforced by an agent it reached by gossip
            assert not agents[2].push_policy(document(1, limited))  # not newer: nothing to do
            assert agents[4].push_policy(document(2, ""))  # version 2: no rules; from any agent
            await eventually(lambda: all(a.policy_version == 2 for a in agents), timeout=10, what="all on version 2")
            await agents[3].publish("limited.x", 3)  # the switch is whole: the limit is gone
            with pytest.raises(meshmq.CertificateError, match="another authority|does not trust|signature"):
                agents[1].push_policy(Authority.create(Path(os.environ["MESHMQ_HOME"]) / "other").sign_policy(
                    mesh=mesh, version=9, text="version = 9\n", at=time.time()))
            with pytest.raises(meshmq.UsageError, match="ttl must be a positive number"):
                agents[1].push_policy(document(3, '[[rule]]\nname = "x"\nttl = -1\n'))
            assert all(a.policy_version == 2 for a in agents)  # refused ones changed nothing
        finally:
            for agent in agents:
                await agent.stop()

    run(main(), timeout=60)


def test_meshmq_policy_push_and_show(mesh: str, tmp_path: Path) -> None:
    import importlib

    cli = importlib.import_module("test_cli")
    policy = tmp_path / "policy.toml"
    policy.write_text(_example())
    with meshmq.Agent("orders", mesh=mesh, durability="memory") as one, \
            meshmq.Agent("billing", mesh=mesh, durability="memory") as two:
        pushed = subprocess.run([sys.executable, "-m", "meshmq", "policy", "push", str(policy), "--mesh", mesh,
                                 "--wait", "10"], capture_output=True, text=True, timeout=60, env=cli.cli_env(tmp_path))
        assert pushed.returncode == 0, pushed.stderr
        assert "policy version 3 is in force on all 2 agents found" in pushed.stderr
        assert one.policy_version == two.policy_version == 3
        shown = subprocess.run([sys.executable, "-m", "meshmq", "policy", "show", "--mesh", mesh, "--wait", "5"],
                               capture_output=True, text=True, timeout=60, env=cli.cli_env(tmp_path))
        assert shown.returncode == 0, shown.stderr
        assert "version 3, 2 rule(s)" in shown.stdout and "orders: orders.> from orders" in shown.stdout
        again = subprocess.run([sys.executable, "-m", "meshmq", "policy", "push", str(policy), "--mesh", mesh,
                                "--wait", "5"], capture_output=True, text=True, timeout=60, env=cli.cli_env(tmp_path))
        assert again.returncode == 2 and "has policy version 3 already" in again.stderr


def test_policy_actions_are_visible_to_a_tap(mesh: str, tmp_path: Path) -> None:
    policy = _policy_file(tmp_path, """
[[rule]]
name = "limited"
topic = "jobs.*"
rate = { per_second = 20, burst = 1, on_excess = "delay" }
route = [{ when = "data.big", to = "jobs.review" }]
""")

    async def main() -> None:
        watcher = await meshmq.AsyncAgent("watcher", mesh=mesh, durability="memory").start()
        tap = watcher.tap("jobs.>", events=["limited", "rerouted"])
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory", policy_file=policy).start()
        try:
            await eventually(lambda: pub._tapped, what="the publisher to know the tap")
            first = await pub.publish("jobs.x", {"big": True})
            second = await pub.publish("jobs.x", {"big": False})  # waits for a token
            seen: dict[str, set[str]] = {"limited": set(), "rerouted": set()}

            async def read() -> None:
                async for event in tap:
                    if event.kind in seen:
                        seen[event.kind].update(event.ids)
                    if first in seen["rerouted"] and second in seen["limited"]:
                        return

            await asyncio.wait_for(read(), 10)
            assert second not in seen["rerouted"]
        finally:
            await pub.stop()
            await watcher.stop()

    run(main())


def test_a_circuit_breaker_holds_messages_for_a_destination_that_does_not_answer(mesh: str,
                                                                                 tmp_path: Path) -> None:
    """A receiver that takes frames and never acknowledges: each retransmission is a failure;
    after 2 the breaker opens and the messages wait in the outbox (nothing is sent); once the
    receiver answers, the probe after open_for gets its receipt and the breaker closes."""
    import dataclasses

    from certs import RawPeer

    from meshmq._seal import Signer, open_data
    from meshmq._wire import SEALED, Limits, Subscription, receipt_frame

    policy = _policy_file(tmp_path, '[[rule]]\nname = "fragile"\n'
                                    'breaker = { failures = 2, window = 30, open_for = 3.0, probes = 1 }\n')

    async def main() -> None:
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory", discovery=False, policy_file=policy,
                                      retransmit_initial=0.05, retransmit_max=0.1).start()
        raw = RawPeer(mesh, pub.endpoints[0], "sink")
        record = dataclasses.replace(raw.record, subscriptions=(Subscription("jobs.*"),), incarnation=2, sig=None)
        record = dataclasses.replace(record, sig=raw.keys.sign(record.signing_bytes()))
        shared = Signer(raw.keys).shared_key(pub._keys.public)
        answering = False
        frames = 0
        tap = pub.tap(events=["breaker"])  # the publisher's own: breakers are reported where they are

        def drain() -> None:
            nonlocal frames
            while raw.pull.poll(0):
                frame = raw.pull.recv()
                if frame[1] != SEALED:  # only data frames matter here
                    continue
                frames += 1
                epoch, first, _, entries, _, _ = open_data(frame, Limits(), pub.node_id, shared, raw.node)
                if answering:
                    last = first + len(entries) - 1
                    raw.send(receipt_frame(raw.node, epoch, last, last))

        try:
            raw.introduce(record, want_reply=True)
            await eventually(lambda: pub._receivers("jobs.x") == 1, what="the raw peer routed")
            await pub.publish("jobs.x", b"one")

            await eventually(lambda: drain() or pub.stats().get("breaker_open", 0), what="the breaker open")
            # The frame whose retransmission opened the breaker may still be on its way: take
            # the count once the breaker has held back a few sends, then see it stay.
            await eventually(lambda: pub.stats().get("breaker_held", 0) >= 3, what="sends held back")
            drain()
            held, held_sends = frames, pub.stats()["breaker_held"]
            await eventually(lambda: pub.stats()["breaker_held"] >= held_sends + 3, what="more sends held back")
            drain()
            assert frames == held and pub.stats()["outbox_messages"] == 1  # nothing went; the message waits
            answering = True

            await eventually(lambda: drain() or pub.stats().get("breaker_closed", 0), what="the breaker closed")
            await eventually(lambda: pub.stats()["outbox_messages"] == 0, what="acknowledged through the probe")
            assert pub.stats()["breaker_probes"] >= 1
            changes: list[str] = []

            async def read() -> None:
                async for event in tap:
                    if event.kind != "breaker":
                        continue  # the tap shows the messages too
                    assert event.peer == raw.node
                    changes.append(event.detail.split(" for ")[0])
                    if changes[-1] == "half-open -> closed":
                        return

            await asyncio.wait_for(read(), 10)
            assert changes[:2] == ["closed -> open", "open -> half-open"], changes  # as `meshmq tap` shows them
        finally:
            raw.close()
            await pub.stop()

    run(main(), timeout=60)
