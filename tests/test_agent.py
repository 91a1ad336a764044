"""The agent's public API with real ZeroMQ and mDNS on loopback, in one process."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aio import agents, collect, eventually, run
from certs import RawPeer

import meshmq
from meshmq._wire import DATA, HELLO, PROTOCOL_VERSION, SYNC

pytestmark = pytest.mark.integration


def test_wildcards_route_only_matching_topics(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "pub", "sub") as (pub, sub):
            star = sub.subscribe("orders.*.placed")
            tail = sub.subscribe("orders.>")
            exact = sub.subscribe("orders.eu.placed")
            await pub.wait_for_subscribers("orders.eu.placed", timeout=10)
            for topic in ["orders.eu.placed", "orders.us.placed", "orders.eu.placed.late", "orders", "billing.x"]:
                await pub.publish(topic, topic)
            await pub.publish("orders.end", "end")
            assert [m.data for m in await collect(star, 2)] == ["orders.eu.placed", "orders.us.placed"]
            assert [m.data for m in await collect(exact, 1)] == ["orders.eu.placed"]
            assert [m.data for m in await collect(tail, 4)] == [
                "orders.eu.placed", "orders.us.placed", "orders.eu.placed.late", "end"]

    run(main())


def test_message_fields_and_local_delivery(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo") as (agent,):
            sub = agent.subscribe("local.>")
            mid = await agent.publish("local.test", {"orderId": "ORD-1", "n": [1, 2.5, None, True]},
                                      type="OrderPlaced", key="ORD-1", headers={"traceparent": "00-ab"},
                                      schema_version=2)
            raw_id = await agent.publish("local.raw", b"\x00\xffbytes")
            first, second = await collect(sub, 2)
            assert first.id == mid and len(mid) == 32
            assert (first.topic, first.type, first.source, first.node) == ("local.test", "OrderPlaced", "solo",
                                                                            agent.node_id)
            assert first.data == {"orderId": "ORD-1", "n": [1, 2.5, None, True]}
            assert first.key == "ORD-1" and first.headers == {"traceparent": "00-ab"}
            assert first.schema_version == 2 and first.timestamp > 1.7e9
            assert second.id == raw_id and second.data == b"\x00\xffbytes" and second.raw == b"\x00\xffbytes"

    run(main())


def test_the_plain_publish_path_sends_what_the_general_path_sends(mesh: str) -> None:
    """publish has a hot path for plain bytes to a topic with one remote subscriber; a
    message it sends must be indistinguishable from one the general path sends."""
    async def main() -> None:
        async with agents(mesh, "pub", "sub", durability="memory") as (pub, sub):
            inbox = sub.subscribe("plain.x")
            await pub.wait_for_subscribers("plain.x", timeout=10)
            await pub.publish("plain.x", b"first")  # the general path: it learns the route
            general_mid = await pub.publish("plain.x", b"same", headers={})  # options: general
            taken: list[str] = []
            plain = pub._publish_plain

            def spy(topic: str, data: object) -> str | None:
                mid = plain(topic, data)
                taken.append("plain" if mid is not None else "general")
                return mid

            pub._publish_plain = spy  # type: ignore[method-assign]
            plain_mid = await pub.publish("plain.x", b"same")
            pub.publish_nowait("plain.x", b"nowait")
            assert taken == ["plain", "plain"]
            _, general, plain_msg, nowait = await collect(inbox, 4)
            assert (general.id, plain_msg.id) == (general_mid, plain_mid)
            fields = ("topic", "type", "source", "node", "schema_version", "headers", "key", "raw", "data",
                      "redelivered", "expires_at")
            assert [getattr(plain_msg, f) for f in fields] == [getattr(general, f) for f in fields]
            assert nowait.data == b"nowait" and plain_msg.timestamp >= general.timestamp
            assert pub.stats()["published"] == 4

    run(main())


def test_coroutine_handler_sees_messages_in_order(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "pub", "sub") as (pub, sub):
            seen: list[int] = []
            done = asyncio.Event()

            @sub.subscribe("work.items")
            async def handle(msg: meshmq.Message) -> None:
                await asyncio.sleep(0)  # yield mid-handler: order must still hold
                seen.append(msg.data)
                if len(seen) == 500:
                    done.set()

            await pub.wait_for_subscribers("work.items", timeout=10)
            for i in range(500):
                await pub.publish("work.items", i)
            await asyncio.wait_for(done.wait(), 10)
            assert seen == list(range(500))

    run(main())


def test_dispatch_by_type_counts_unknown_types(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "orders", "inventory") as (orders, inventory):
            created: list[str] = []
            done = asyncio.Event()

            @inventory.on("OrderCreated")
            def on_created(msg: meshmq.Message) -> None:
                created.append(msg.data["orderId"])

            @inventory.on("OrderUpdated")
            async def on_updated(msg: meshmq.Message) -> None:
                done.set()

            inventory.subscribe("orders.>", inventory.dispatch)
            await orders.wait_for_subscribers("orders.events", timeout=10)
            await orders.publish("orders.events", {"orderId": "A"}, type="OrderCreated")
            await orders.publish("orders.events", {"orderId": "A"}, type="OrderShipped")  # no handler
            await orders.publish("orders.events", {"orderId": "B"}, type="OrderCreated")
            await orders.publish("orders.events", {"orderId": "A"}, type="OrderUpdated")
            await asyncio.wait_for(done.wait(), 10)
            assert created == ["A", "B"]
            assert inventory.stats()["unhandled_type"] == 1

    run(main())


def test_queue_group_delivers_each_message_to_exactly_one_member(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "pub", "w1", "w2", "w3", "audit") as (pub, *workers, audit):
            per_worker: dict[str, list[Any]] = {w.service: [] for w in workers}
            for w in workers:
                w.subscribe("jobs.>", lambda m, name=w.service: per_worker[name].append(m.data), queue="workers")
            audit_sub = audit.subscribe("jobs.>")  # a plain subscriber gets its own copy of everything
            await pub.wait_for_subscribers("jobs.run", count=2, timeout=10)  # one group + audit
            while len({n for n in pub._index.resolve("jobs.run").groups[0].members}) < 3:
                await pub._routes_changed(5)
            n = 600
            for i in range(n):
                await pub.publish("jobs.run", {"i": i})
            for i in range(30):
                await pub.publish("jobs.keyed", {"k": i % 3, "i": i}, key=f"k{i % 3}")
            await collect(audit_sub, n + 30)  # everything has arrived somewhere by now
            # Handler calls trail the audit copy.
            await eventually(lambda: sum(len(v) for v in per_worker.values()) == n + 30, what="every job handled")
            unkeyed = sorted(d["i"] for v in per_worker.values() for d in v if "k" not in d)
            assert unkeyed == list(range(n))  # exactly once across the group
            shares = [len([d for d in v if "k" not in d]) for v in per_worker.values()]
            assert all(abs(share - n / 3) <= n / 10 for share in shares), shares  # balanced
            owners = {k: {name for name, v in per_worker.items() for d in v if d.get("k") == k} for k in range(3)}
            assert all(len(o) == 1 for o in owners.values())  # one key, one member

    run(main())


def test_queue_group_balances_by_outstanding_work_not_in_turn(mesh: str) -> None:
    """A member that works slowly gets fewer messages; round robin would give both half."""
    async def main() -> None:
        async with agents(mesh, "pub", "slow", "fast") as (pub, slow, fast):
            got: dict[str, int] = {"slow": 0, "fast": 0}

            async def slow_worker(msg: meshmq.Message) -> None:
                # The work itself: 20 messages/s at most, so that even when a busy machine stretches
                # the publishing below to a few seconds, its fair share by work stays well under n / 3.
                await asyncio.sleep(0.05)
                got["slow"] += 1

            def fast_worker(msg: meshmq.Message) -> None:
                got["fast"] += 1

            slow.subscribe("jobs.*", slow_worker, queue="workers")
            fast.subscribe("jobs.*", fast_worker, queue="workers")
            def members() -> int:
                groups = pub._index.resolve("jobs.x").groups
                return len(groups[0].members) if groups else 0

            while members() < 2:
                await pub._routes_changed(5)
            n = 300
            for i in range(n):  # 300 messages over about 1 s: fifteen times what the slow one can do
                await pub.publish("jobs.x", i)
                await asyncio.sleep(0.003)  # pacing the load, not waiting for anything
            await eventually(lambda: got["slow"] + got["fast"] == n, what="every message handled")
            assert got["slow"] < n / 3, got  # in turn it would have had n / 2
            # The last reports of finished work follow within work_report_interval.
            await eventually(lambda: pub._outstanding(slow.node_id) == pub._outstanding(fast.node_id) == 0,
                             what="no outstanding work")

    run(main())


def test_closed_subscription_is_withdrawn_from_the_mesh(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "pub", "sub") as (pub, sub):
            s = sub.subscribe("temp.*")
            await pub.wait_for_subscribers("temp.x", timeout=10)
            s.close()
            s.close()  # idempotent
            for _ in range(100):
                if pub._receivers("temp.x") == 0:
                    break
                await pub._routes_changed(0.1)
            assert pub._receivers("temp.x") == 0
            assert await collect(s, 1) == []  # iteration ends on a closed subscription

    run(main())


def test_malformed_frames_are_counted_and_survived(mesh: str, caplog: pytest.LogCaptureFixture) -> None:
    v = PROTOCOL_VERSION

    async def main() -> None:
        async with agents(mesh, "target", "pub") as (target, pub):
            sub = target.subscribe("ok.>")
            raw = RawPeer(mesh, target.endpoints[0])
            junk = [b"", bytes((v,)), bytes((v, SYNC)) + b"\xc1", bytes((v, HELLO)) + b"\x93\x01\x02\x03",
                    bytes((v, 0x63, 0x90)), bytes((v, HELLO)) + b"\x94\xa1n\x01\x01\x91\xc4\x03abc"]
            # Frames of nodes of other meshmq releases: not malformed, and said so apart.
            other_versions = [bytes((v + 2, HELLO)) + b"garbage", bytes((v - 1, DATA)) + b"\x90"]
            for frame in junk + other_versions:
                raw.send(frame)
            raw.close()
            await pub.wait_for_subscribers("ok.go", timeout=10)
            await pub.publish("ok.go", "still alive")
            (msg,) = await collect(sub, 1)
            assert msg.data == "still alive"

            def rejected() -> int:
                stats = target.stats()
                return stats.get("frames_rejected", 0) + stats.get("messages_rejected", 0)

            # The junk travels on its own connection.
            await eventually(lambda: rejected() >= len(junk) and target.stats().get("frames_other_version", 0) >= 2,
                             what="the junk rejected")
            assert rejected() == len(junk)
            assert target.stats()["frames_other_version"] == len(other_versions)

    run(main())
    said = [r.getMessage() for r in caplog.records if "protocol version" in r.getMessage()]
    assert any(f"protocol version {v + 2}; this agent speaks {v}" in m for m in said), said
    assert any(f"protocol version {v - 1}; this agent speaks {v}" in m for m in said), said


def test_slow_iterator_pauses_the_network_instead_of_dropping(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "pub", subscription_queue_messages=50) as (pub,), \
                agents(mesh, "sub", subscription_queue_messages=50) as (sub,):
            it = sub.subscribe("bulk.x")
            await pub.wait_for_subscribers("bulk.x", timeout=10)
            n = 3000
            for i in range(n):
                await pub.publish("bulk.x", i)
            got = [m.data for m in await collect(it, n)]
            assert got == list(range(n))
            assert sub.stats()["receive_paused"] >= 1

    run(main())


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda a: a.publish("orders.*", 1), meshmq.TopicError, "wildcards"),
        (lambda a: a.publish("orders..x", 1), meshmq.TopicError, "empty"),
        (lambda a: a.publish("", 1), meshmq.TopicError, "empty"),
        (lambda a: a.publish(42, 1), meshmq.TopicError, "str"),
        (lambda a: a.publish("a b", 1), meshmq.TopicError, "whitespace"),
        (lambda a: a.publish("x." * 200 + "x", 1), meshmq.TopicError, "limit"),
        (lambda a: a.publish("ok", object()), meshmq.PayloadError, "serialized"),
        (lambda a: a.publish("ok", b"x" * 2_000_000), meshmq.PayloadError, "max_payload_bytes"),
        (lambda a: a.publish("ok", 1, headers={"a": 1}), meshmq.PayloadError, "str"),
        (lambda a: a.publish("ok", 1, headers=["a"]), meshmq.PayloadError, "dict"),
        (lambda a: a.publish("ok", 1, type=""), meshmq.UsageError, "type"),
        (lambda a: a.publish("ok", 1, key=5), meshmq.UsageError, "key"),
        (lambda a: a.subscribe("a.>.b"), meshmq.TopicError, "last"),
        (lambda a: a.subscribe("a.b*"), meshmq.TopicError, "wildcard"),
        (lambda a: a.subscribe("a", 42), meshmq.UsageError, "callable"),
        (lambda a: a.subscribe("a", queue="bad group"), meshmq.UsageError, "queue group"),
    ],
)
def test_bad_input_raises_a_named_meshmq_error_and_sends_nothing(
        mesh: str, call: Callable[[Any], Any], error: type[Exception], words: str) -> None:
    with meshmq.Agent("checker", mesh=mesh) as agent:
        before = agent.stats().get("published", 0)
        with pytest.raises(error, match=words) as info:
            call(agent)
        assert isinstance(info.value, meshmq.MeshError)
        assert agent.stats().get("published", 0) == before
        assert len(agent.subscriptions) == 0


def test_lifecycle_errors() -> None:
    agent = meshmq.Agent("lifecycle", mesh="t" + uuid.uuid4().hex[:12])
    with pytest.raises(meshmq.AgentClosed, match="not started"):
        agent.publish("a.b", 1)
    agent.start()
    with pytest.raises(meshmq.AgentClosed, match="already started"):
        agent.start()
    agent.stop()
    agent.stop()  # idempotent
    with pytest.raises(meshmq.AgentClosed):
        agent.publish("a.b", 1)
    with pytest.raises(meshmq.UsageError, match="service name"):
        meshmq.Agent("bad name!")
    with pytest.raises(meshmq.ConfigError, match="probe_interval"):
        meshmq.Agent("x", probe_interval="soon")


@pytest.mark.parametrize("durability", ["fsync", "memory"])  # memory: publish returns without waiting
def test_blocking_agent_publishes_from_many_threads_without_loss(mesh: str, durability: str) -> None:
    with meshmq.Agent("sub", mesh=mesh) as sub_agent, meshmq.Agent("pub", mesh=mesh, durability=durability) as pub:
        sub = sub_agent.subscribe("threads.>")
        pub.wait_for_subscribers("threads.x", timeout=10)
        n, threads = 5000 if durability == "memory" else 2000, 4

        def produce(t: int) -> None:
            for i in range(n):
                pub.publish(f"threads.t{t}", {"t": t, "i": i})

        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
        got = [sub.get(timeout=10) for _ in range(n * threads)]
        per_thread: dict[int, list[int]] = {}
        for m in got:
            assert m is not None
            per_thread.setdefault(m.data["t"], []).append(m.data["i"])
        assert per_thread == {t: list(range(n)) for t in range(threads)}  # in order per sender thread


def test_a_stopped_peer_leaves_routing_at_once(mesh: str) -> None:
    # probes are slow here, so only the BYE frame can explain a quick departure
    slow = dict(mesh=mesh, probe_interval=5.0, suspicion_mult=10.0)

    async def main() -> None:
        async with agents(mesh, "stays", **{k: v for k, v in slow.items() if k != "mesh"}) as (stays,):
            leaving = await meshmq.AsyncAgent("leaving", **slow).start()
            leaving.subscribe("bye.topic")
            await stays.wait_for_subscribers("bye.topic", timeout=10)
            await leaving.stop()
            for _ in range(100):
                if not stays.peers():
                    break
                await stays._routes_changed(0.1)
            assert stays.peers() == [] and stays._receivers("bye.topic") == 0
            assert stays.stats()["peers_left"] == 1

    run(main())


def test_a_record_with_a_malformed_endpoint_is_rejected_without_harm(mesh: str) -> None:
    import time

    from meshmq._wire import NodeRecord

    async def main() -> None:
        async with agents(mesh, "victim", "friend") as (victim, friend):
            raw = RawPeer(mesh, victim.endpoints[0])
            bogus = NodeRecord("evil", "evil", ("tcp://[not-an-endpoint",), (), 1, time.time())
            raw.introduce(bogus, want_reply=True)
            raw.close()
            # The frame travels on its own connection.
            await eventually(lambda: victim.stats().get("frames_rejected", 0), what="the frame rejected")
            assert victim.stats()["frames_rejected"] == 1
            assert [p.service for p in victim.peers()] in (["friend"], [])  # never "evil"
            sub = victim.subscribe("still.ok")
            await friend.wait_for_subscribers("still.ok", timeout=10)
            await friend.publish("still.ok", 1)
            assert [m.data for m in await collect(sub, 1)] == [1]

    run(main())


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda a: a.wait_for_subscribers("x", count="2", timeout=0.1), "count"),
        (lambda a: a.wait_for_subscribers("x", count=0, timeout=0.1), "count"),
        (lambda a: a.wait_for_subscribers("x", timeout="soon"), "timeout"),
        (lambda a: a.wait_settled(timeout=-1), "timeout"),
        (lambda a: a.request("x", 1, timeout=True), "timeout"),
        (lambda a: a.routes(5), "str"),
    ],
)
def test_waits_and_queries_check_their_arguments(mesh: str, call: Callable[[Any], Any], words: str) -> None:
    with meshmq.Agent("checker", mesh=mesh) as agent:
        with pytest.raises(meshmq.UsageError, match=words):
            call(agent)


def test_subscription_get_checks_its_timeout(mesh: str) -> None:
    with meshmq.Agent("getter", mesh=mesh) as agent:
        sub = agent.subscribe("get.x")
        with pytest.raises(meshmq.UsageError, match="timeout"):
            sub.get(timeout="soon")  # type: ignore[arg-type]
        assert sub.get(timeout=0) is None  # nothing waiting: an immediate answer
