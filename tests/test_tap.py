"""Taps (issue 6, and issue 5's tap right): a tap sees exactly what is published on its
patterns, with delivery events, payloads only where its certificate allows; a node
without the tap right sees nothing; a tap that falls behind is told what it missed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aio import eventually, run

import meshmq
from meshmq._mirror import Tap
from meshmq._security import Authority
from meshmq._tap import DEAD_LETTERED, FAILED, LOST, MESSAGE, MirrorQueue, TapEvent, envelope_head
from meshmq._wire import encode_envelope


async def _events(tap: Tap, done: Any, timeout: float = 10.0) -> list[TapEvent]:
    """Events from ``tap`` until ``done(events)`` holds (bounded)."""
    seen: list[TapEvent] = []

    async def read() -> None:
        async for event in tap:
            seen.append(event)
            if done(seen):
                return

    await asyncio.wait_for(read(), timeout)
    return seen


def test_a_tap_sees_exactly_the_messages_published_on_its_patterns(mesh: str) -> None:
    async def main() -> None:
        watcher = await meshmq.AsyncAgent("watcher", mesh=mesh, durability="memory").start()
        tap = watcher.tap("orders.>")
        orders = await meshmq.AsyncAgent("orders", mesh=mesh, durability="memory").start()
        billing = await meshmq.AsyncAgent("billing", mesh=mesh, durability="memory").start()
        billing.subscribe("orders.*", lambda m: None)
        try:
            await orders.wait_for_subscribers("orders.placed", timeout=10)
            await eventually(lambda: orders._tapped, what="the publisher to know the tap")
            published = [await orders.publish("orders.placed", {"n": i}, type="OrderPlaced") for i in range(20)]
            other = [await orders.publish("payments.received", {"n": i}) for i in range(5)]
            messages = await _events(tap, lambda seen: sum(e.kind == MESSAGE for e in seen) >= 20)
            got = [e for e in messages if e.kind == MESSAGE]
            assert [e.ids[0] for e in got] == published
            assert not set(other) & {i for e in messages for i in e.ids}
            first = got[0]
            assert (first.topic, first.type, first.source, first.service) == ("orders.placed", "OrderPlaced",
                                                                             "orders", "orders")
            assert first.destinations == ("billing",) and first.data == {"n": 0} and first.size == len(first.raw)
            # The journey: every message is acknowledged by billing in the end.
            # Each message comes before what happened to it.
            shown_at = {e.ids[0]: n for n, e in enumerate(messages) if e.kind == MESSAGE}
            for n, event in enumerate(messages):
                if event.kind != MESSAGE:
                    assert all(shown_at[i] < n for i in event.ids), (event, n)
            acked: set[str] = {i for e in messages if e.kind == "acked" for i in e.ids}
            more: list[TapEvent] = []
            if not set(published) <= acked:
                more = await _events(tap, lambda seen: acked | {i for e in seen if e.kind == "acked" for i in e.ids}
                                     >= set(published))
            acked |= {i for e in more if e.kind == "acked" for i in e.ids}
            assert set(published) <= acked
            assert all(e.peer_service == "billing" for e in messages + more if e.kind == "acked")
        finally:
            for agent in (orders, billing, watcher):
                await agent.stop()

    run(main(), timeout=60)


def test_a_tap_started_after_the_publisher_sees_it_too(mesh: str) -> None:
    async def main() -> None:
        orders = await meshmq.AsyncAgent("orders", mesh=mesh, durability="memory").start()
        watcher = await meshmq.AsyncAgent("watcher", mesh=mesh, durability="memory").start()
        try:
            await eventually(lambda: any(p.service == "watcher" for p in orders.peers()), what="the peers met")
            tap = watcher.tap()
            await eventually(lambda: orders._tapped, what="the tap in the publisher's routing table")
            mid = await orders.publish("anything.at.all", b"x")  # no subscriber: still published, still seen
            seen = await _events(tap, lambda seen: any(e.kind == MESSAGE for e in seen))
            [event] = [e for e in seen if e.kind == MESSAGE]
            assert event.ids == (mid,) and event.destinations == () and event.raw == b"x"
            tap.close()
            await eventually(lambda: not orders._tapped, what="the publisher to stop mirroring")
        finally:
            await orders.stop()
            await watcher.stop()

    run(main(), timeout=60)


def _certified(mesh: str, service: str, *, tap: bool, subscribe: tuple[str, ...], home: Path) -> dict[str, Any]:
    """Config overrides for an agent with a certificate of a fresh authority (keys made first)."""
    authority = Authority.create(home, "authority") if not (home / "authority.key").exists() else \
        Authority.load(home / "authority.key")
    from meshmq._security import armor, instance_keys

    keys = instance_keys(Path(os.environ["MESHMQ_DATA_DIR"]), service)
    now = time.time()
    cert = authority.issue(node_key=keys.public, service=service, mesh=mesh, publish=(">",), subscribe=subscribe,
                           tap=tap, not_before=now - 60, not_after=now + 3600)
    path = home / f"{service}.cert"
    path.write_text(armor(cert))
    return {"authority": authority.text, "certificate": path}


def test_the_tap_right_and_payloads_only_where_the_tap_may_subscribe(mesh: str, tmp_path: Path) -> None:
    """A tap reads payloads only of topics its certificate allows it to subscribe to; a node
    without the tap right cannot tap, and a record claiming taps without it is refused."""
    auditor = _certified(mesh, "auditor", tap=True, subscribe=("orders.>",), home=tmp_path)
    nosy = _certified(mesh, "nosy", tap=False, subscribe=(">",), home=tmp_path)
    shop = _certified(mesh, "shop", tap=False, subscribe=(">",), home=tmp_path)

    async def main() -> None:
        shop_agent = await meshmq.AsyncAgent("shop", mesh=mesh, durability="os", **shop).start()
        audit = await meshmq.AsyncAgent("auditor", mesh=mesh, durability="os", **auditor).start()
        snoop = await meshmq.AsyncAgent("nosy", mesh=mesh, durability="os", **nosy).start()
        try:
            with pytest.raises(meshmq.NotPermitted, match="tap right"):
                snoop.tap()
            tap = audit.tap(">")
            await eventually(lambda: shop_agent._tapped, what="the shop to know the auditor's tap")
            readable = await shop_agent.publish("orders.placed", {"total": 10})
            secret = await shop_agent.publish("payments.card", {"pan": "4111"})
            got = await _events(tap, lambda seen: sum(e.kind == MESSAGE for e in seen) >= 2)
            by_id = {e.ids[0]: e for e in got if e.kind == MESSAGE}
            assert by_id[readable].data == {"total": 10}
            assert by_id[secret].raw is None and by_id[secret].data is None  # the header only
            assert by_id[secret].topic == "payments.card" and by_id[secret].size == len(
                meshmq._wire.encode_payload({"pan": "4111"}, meshmq._wire.Limits())[1])  # type: ignore[attr-defined]

            # nosy forges a record that says it taps: it is refused, and nothing is mirrored to it.
            record = snoop._node.me.record  # type: ignore[union-attr]
            forged = dataclasses.replace(record, taps=(">",), incarnation=record.incarnation + 1, sig=None)
            forged = dataclasses.replace(forged, sig=snoop._keys.sign(forged.signing_bytes()))
            assert shop_agent._vouch(forged) == "not_permitted"
            assert snoop.node_id not in shop_agent._mirror.routes  # type: ignore[union-attr]
        finally:
            for agent in (shop_agent, audit, snoop):
                await agent.stop()

    run(main(), timeout=60)


def test_a_failing_handler_shows_up_as_failed_then_dead_lettered(mesh: str) -> None:
    async def main() -> None:
        watcher = await meshmq.AsyncAgent("watcher", mesh=mesh, durability="memory").start()
        tap = watcher.tap("jobs.>")
        worker = await meshmq.AsyncAgent("worker", mesh=mesh, durability="os", max_attempts=2,
                                         retry_backoff=0.01).start()

        def refuse(msg: meshmq.Message) -> None:
            raise ValueError("no")

        worker.subscribe("jobs.*", refuse)
        boss = await meshmq.AsyncAgent("boss", mesh=mesh, durability="memory").start()
        try:
            await boss.wait_for_subscribers("jobs.x", timeout=10)
            await eventually(lambda: worker._tapped and boss._tapped, what="both to know the tap")
            mid = await boss.publish("jobs.x", b"job")
            got = await _events(tap, lambda seen: any(e.kind == DEAD_LETTERED for e in seen))
            [failed, dead] = [e for e in got if e.kind in (FAILED, DEAD_LETTERED)]  # in that order
            assert failed.kind == FAILED and failed.ids == (mid,) and failed.service == "worker"
            assert (failed.detail or "").startswith("attempt 1 of 2 handler failed: ValueError: no; next in 0.0")
            assert dead.ids == (mid,) and dead.service == "worker" and "ValueError" in (dead.detail or "")
        finally:
            for agent in (boss, worker, watcher):
                await agent.stop()

    run(main(), timeout=60)


def test_a_tap_that_falls_behind_is_told_how_much_it_missed(mesh: str) -> None:
    """The reader of a tap does not read: beyond its buffer, events are dropped and a
    ``lost`` event counts them; the publisher is not slowed (it never waits for taps)."""

    async def main() -> None:
        watcher = await meshmq.AsyncAgent("watcher", mesh=mesh, durability="memory", tap_buffer_messages=50).start()
        tap = watcher.tap("flood.>", events=False)
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory").start()
        try:
            await eventually(lambda: pub._tapped, what="the publisher to know the tap")
            for i in range(300):
                await pub.publish("flood.x", i)
            await eventually(lambda: watcher.counters["tap_events"] >= 300, what="the mirror to arrive")
            got = await _events(tap, lambda seen: any(e.kind == LOST for e in seen))
            shown = [e for e in got if e.kind == MESSAGE]
            [lost] = [e for e in got if e.kind == LOST]
            assert len(shown) == 50 and lost.count == 250  # the buffer's worth, then what did not fit
            assert [e.data for e in shown] == list(range(50))
            mid = await pub.publish("flood.x", "last")  # the reader caught up: shown again
            [last] = await _events(tap, lambda seen: any(e.ids == (mid,) for e in seen))
            assert last.data == "last"
        finally:
            await pub.stop()
            await watcher.stop()

    run(main(), timeout=60)


# --- pure parts -----------------------------------------------------------------------------


def test_the_mirror_queue_keeps_the_newest_and_counts_the_rest() -> None:
    q = MirrorQueue(3)
    for i in range(5):
        q.push([i])
    items, lost = q.take(10)
    assert items == [[2], [3], [4]] and lost == 2
    assert q.take(10) == ([], 0)


def test_envelope_head_reads_topic_and_id_without_decoding() -> None:
    mid = os.urandom(16)
    for topic in ("a", "orders.placed", "t" * 200):
        env = encode_envelope(mid, time.time(), topic, None, "s", "n", 1, None, None, 0, b"")
        assert envelope_head(env) == (topic, mid)
    assert envelope_head(b"\x93\x01\x02\x03") is None


def test_tap_events_round_trip_through_json() -> None:
    events = [
        TapEvent(MESSAGE, 1.5, "n1", "orders", ids=("ab" * 16,), topic="orders.placed", type="OrderPlaced",
                 source="orders", destinations=("billing",), size=3, headers={"h": "v"}, raw=b"\x81\xa1k\x01",
                 format=1),
        TapEvent("acked", 2.0, "n1", "orders", ids=("cd" * 16,), peer="n2", peer_service="billing", topic="x"),
        TapEvent(LOST, 3.0, "n1", "orders", count=7, detail="fell behind"),
    ]
    for event in events:
        line = json.dumps(event.to_json())
        assert TapEvent.from_json(json.loads(line)) == event
    assert events[0].to_json()["data"] == {"k": 1}
    for bad in ({}, {"kind": "nope", "at": 1, "node": "n", "service": "s"},
                {"kind": "acked", "at": "x", "node": "n", "service": "s"},
                {"kind": "acked", "at": 1, "node": "n", "service": "s", "ids": "x"}):
        with pytest.raises(ValueError):
            TapEvent.from_json(bad)


# --- meshmq tap and meshmq replay -----------------------------------------------------------

def _cli() -> Any:
    """tests/test_cli.py's helpers for running meshmq in its own process."""
    import importlib

    return importlib.import_module("test_cli")


def test_meshmq_tap_json_records_and_replays(mesh: str, tmp_path: Path) -> None:
    """`meshmq tap --json --record` in its own process: the ids it prints are the ids
    published; the recording replays to the same lines; --to-mesh publishes them again."""
    cli = _cli()
    record = tmp_path / "seen.tap"
    tap = cli.Spawned([sys.executable, "-m", "meshmq", "tap", "shop.>", "--json", "--count", "6",
                       "--duration", "60", "--record", str(record), "--mesh", mesh], cli.cli_env(tmp_path))
    try:
        tap.wait_for(lambda: any("tapping" in line for line in tap.stderr), 30, "the tap did not start")

        async def main() -> list[str]:
            agent = await meshmq.AsyncAgent("shop", mesh=mesh, durability="memory").start()
            try:
                await eventually(lambda: agent._tapped, timeout=20, what="the shop to know the tap")
                ids = [await agent.publish("shop.sold", {"n": i}, type="Sold") for i in range(5)]
                await agent.publish("other.thing", b"not tapped")
                ids.append(await agent.publish("shop.closed", b"bye"))
                return ids
            finally:
                await agent.stop()

        ids = run(main(), timeout=60)
        assert tap.finish(60) == 0, tap.stderr
    finally:
        tap.end()
    lines = [json.loads(line) for line in tap.stdout]
    assert [line["ids"][0] for line in lines] == ids
    assert lines[0]["topic"] == "shop.sold" and lines[0]["data"] == {"n": 0} and lines[0]["type"] == "Sold"
    assert lines[-1]["raw_hex"] == b"bye".hex()

    replayed = cli.run_cli(tmp_path, "replay", str(record), "--json", "--mesh", mesh)
    assert replayed.returncode == 0, replayed.stderr
    assert [json.loads(line) for line in replayed.stdout.splitlines()] == lines
    table = cli.run_cli(tmp_path, "replay", str(record), "--type", "Sold", "--headers-only", "--no-color")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 5
    assert "shop.sold" in table.stdout and "Sold" in table.stdout and '{"n": 0}' not in table.stdout

    async def listen() -> list[Any]:
        got: list[Any] = []
        sink = await meshmq.AsyncAgent("sink", mesh=mesh, durability="memory").start()
        sink.subscribe("shop.*", lambda m: got.append(m.data))
        try:
            again = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshmq", "replay", str(record), "--to-mesh", "--mesh", mesh,
                env=cli.cli_env(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(again.communicate(), 60)
            assert again.returncode == 0, err
            await eventually(lambda: len(got) == 6, what="the replayed messages")
        finally:
            await sink.stop()
        return got

    assert run(listen(), timeout=90) == [{"n": i} for i in range(5)] + [b"bye"]


def test_meshmq_tap_and_replay_refuse_bad_input(tmp_path: Path) -> None:
    cli = _cli()
    bad = cli.run_cli(tmp_path, "tap", "--events", "sent,bogus", "--duration", "1")
    assert bad.returncode == 2 and "unknown kind bogus" in bad.stderr
    pattern = cli.run_cli(tmp_path, "tap", "orders.>.x", "--duration", "1")
    assert pattern.returncode == 2 and "orders.>.x" in pattern.stderr
    missing = cli.run_cli(tmp_path, "replay", str(tmp_path / "nope.tap"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    (tmp_path / "junk.tap").write_text("hello\n")
    junk = cli.run_cli(tmp_path, "replay", str(tmp_path / "junk.tap"))
    assert junk.returncode == 2 and "not a recording of meshmq tap" in junk.stderr
    good = '{"format": "meshmq-tap-record/1", "patterns": [">"], "mesh": "m", "started": 1}\n'
    (tmp_path / "broken.tap").write_text(good + '{"kind": "acked", "at": 1, "node": "n", "service": "s"}\n{oops\n')
    broken = cli.run_cli(tmp_path, "replay", str(tmp_path / "broken.tap"))
    assert broken.returncode == 2 and "line 3" in broken.stderr
    (tmp_path / "taken.tap").write_text("")
    taken = cli.run_cli(tmp_path, "tap", "--record", str(tmp_path / "taken.tap"), "--duration", "1")
    assert taken.returncode == 2 and "never overwritten" in taken.stderr


def test_the_blocking_agent_taps_too_and_bad_event_kinds_are_refused(mesh: str) -> None:
    from aio import wait_until

    with meshmq.Agent("watcher", mesh=mesh, durability="memory") as watcher, \
            meshmq.Agent("pub", mesh=mesh, durability="memory") as pub:
        with pytest.raises(meshmq.UsageError, match="unknown tap event kind bogus"):
            watcher.tap(events=["acked", "bogus"])
        tap = watcher.tap("news.*", events=False)
        wait_until(lambda: pub._agent._tapped, what="the publisher to know the tap")
        mid = pub.publish("news.today", "hello")
        event = tap.get(timeout=10)
        assert event is not None and event.ids == (mid,) and event.data == "hello"
        tap.close()
        assert tap.get(timeout=1) is None and tap.closed


def test_control_events_show_a_node_joining_and_dying(mesh: str) -> None:
    """`--events control`: what the tap's own agent sees of the mesh; a node killed without
    goodbye (its transport closed under it) is declared dead."""

    async def main() -> None:
        watcher = await meshmq.AsyncAgent("watcher", mesh=mesh, durability="memory", probe_interval=0.2,
                                          probe_timeout=0.1, suspicion_mult=2.0).start()
        tap = watcher.tap(events=["joined", "suspected", "dead", "left", "routes"])
        worker = await meshmq.AsyncAgent("worker", mesh=mesh, durability="memory").start()
        worker.subscribe("jobs.*", lambda m: None)
        try:
            joined = await _events(tap, lambda seen: any(e.kind == "joined" and e.peer == worker.node_id
                                                         for e in seen))
            assert any(e.peer_service == "worker" for e in joined if e.kind == "joined")
            worker._transport.async_close(0)  # type: ignore[union-attr]  # gone without a word
            worker._state = "stopped"
            dead = await _events(tap, lambda seen: any(e.kind == "dead" for e in seen), timeout=20)
            [gone] = [e for e in dead if e.kind == "dead"]
            assert gone.peer == worker.node_id and gone.service == "watcher"
            kinds = [e.kind for e in dead if e.peer == worker.node_id]
            assert "suspected" in kinds and kinds.index("suspected") < kinds.index("dead")  # suspected first
            assert any(e.kind == "routes" for e in joined + dead)
        finally:
            await watcher.stop()

    run(main(), timeout=60)


def test_agents_report_their_figures_to_a_tap_that_asks(mesh: str) -> None:
    async def main() -> None:
        watcher = await meshmq.AsyncAgent("watcher", mesh=mesh, durability="memory").start()
        tap = watcher.tap(events=["stats"])
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="memory", tap_stats_interval=0.2).start()
        sub.subscribe("s.*", lambda m: None)
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory", tap_stats_interval=0.2).start()
        try:
            await pub.wait_for_subscribers("s.x", timeout=10)
            await eventually(lambda: pub._tapped and sub._tapped, what="both to know the tap")
            for i in range(10):
                await pub.publish("s.x", i)
            got = await _events(tap, lambda seen: any(
                e.service == "sub" and (e.stats or {}).get("received") == 10 and "latency_p50" in (e.stats or {})
                for e in seen) and any(e.service == "pub" and (e.stats or {}).get("published") == 10 for e in seen))
            assert {e.kind for e in got} <= {"stats", MESSAGE}  # messages always; of events, only stats
            report = next(e for e in got if e.service == "sub" and (e.stats or {}).get("received") == 10)
            assert 0 < report.stats["latency_p50"] <= report.stats["latency_p99"]  # type: ignore[index]
        finally:
            for agent in (pub, sub, watcher):
                await agent.stop()

    run(main(), timeout=60)


def test_top_view_counts_topics_and_keeps_each_agents_figures() -> None:
    from meshmq._tapcli import TopView, render_picture

    view = TopView(100.0)
    for _ in range(4):
        view.add(TapEvent(MESSAGE, 100.5, "n1", "orders", ids=("a" * 32,), topic="orders.placed"))
    view.add(TapEvent("stats", 100.0, "n1", "orders", stats={"published": 10.0, "outbox_messages": 3.0}))
    view.add(TapEvent("stats", 102.0, "n1", "orders", stats={"published": 30.0, "latency_p50": 0.002}))
    view.add(TapEvent(LOST, 102.0, "n1", "orders", count=5))
    picture = view.picture(102.0)
    assert picture["topics"] == [{"topic": "orders.placed", "rate": 2.0, "total": 4}]
    [agent] = picture["agents"]
    assert agent["pub_rate"] == 10.0 and agent["latency_p50"] == 0.002 and picture["lost"] == 5
    text = render_picture(picture, "shop")
    assert "orders.placed" in text and "5 items not shown" in text and "2.0" in text
    assert view.picture(104.0)["topics"][0]["rate"] == 0.0  # nothing since the last picture


def test_meshmq_top_shows_topics_and_agents(mesh: str, tmp_path: Path) -> None:
    cli = _cli()
    top = cli.Spawned([sys.executable, "-m", "meshmq", "top", "--json", "--count", "3", "--interval", "1.5",
                       "--mesh", mesh], cli.cli_env(tmp_path))
    try:
        async def main() -> None:
            pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory", tap_stats_interval=0.3).start()
            try:
                deadline = time.monotonic() + 40
                while top.proc.poll() is None and time.monotonic() < deadline:  # bounded: until top is done
                    await pub.publish("load.x", b"x")
                    await asyncio.sleep(0.02)
            finally:
                await pub.stop()

        run(main(), timeout=60)
        assert top.finish(30) == 0, top.stderr
    finally:
        top.end()
    pictures = [json.loads(line) for line in top.stdout]
    assert len(pictures) == 3
    assert any(t["topic"] == "load.x" and t["total"] > 0 for p in pictures for t in p["topics"])
    assert any(a["service"] == "pub" and a["outbox_messages"] is not None for p in pictures for a in p["agents"])


def test_several_taps_each_see_their_own_patterns_and_outbox_warnings_reach_them(mesh: str) -> None:
    async def main() -> None:
        one = await meshmq.AsyncAgent("one", mesh=mesh, durability="memory").start()
        two = await meshmq.AsyncAgent("two", mesh=mesh, durability="memory").start()
        orders_tap = one.tap("orders.>", events=False)
        warnings_tap = two.tap("jobs.>", events=["outbox-warning"])
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="os").start()
        sub.subscribe("jobs.*", lambda m: None, queue="workers")
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="os", peer_queue_messages=20).start()
        try:
            await pub.wait_for_subscribers("jobs.x", timeout=10)
            await eventually(lambda: len(pub._mirror.routes) == 2, what="both taps known")  # type: ignore[union-attr]
            await sub.stop()  # durable: its messages wait in pub's outbox
            await eventually(lambda: not any(p.service == "sub" for p in pub.peers()), what="the subscriber gone")
            order = await pub.publish("orders.placed", b"o")
            jobs = [await pub.publish("jobs.x", b"%d" % i) for i in range(12)]  # 60 % of its share
            seen_orders = await _events(orders_tap, lambda seen: any(e.kind == MESSAGE for e in seen))
            assert [e.ids[0] for e in seen_orders if e.kind == MESSAGE] == [order]
            got = await _events(warnings_tap, lambda seen: any(e.kind == "outbox-warning" for e in seen)
                                and sum(e.kind == MESSAGE for e in seen) == 12)
            assert [e.ids[0] for e in got if e.kind == MESSAGE] == jobs
            [warning] = [e for e in got if e.kind == "outbox-warning"]
            assert warning.service == "pub" and warning.peer == sub.node_id and "% full" in (warning.detail or "")
        finally:
            for agent in (pub, sub, one, two):  # stop() is idempotent
                await agent.stop()

    run(main(), timeout=60)


def test_journeys_map_runs_of_a_stream_back_to_the_messages() -> None:
    from meshmq._tap import Journeys

    j = Journeys(limit=100)
    old_life = ["ff" * 8 + f"{i:016x}" for i in (7, 8)]  # kept in the outbox across a restart
    new_life = ["00" * 8 + f"{i:016x}" for i in (1, 2, 3)]  # a new prefix sorts lower: order is by position
    for mid in old_life + new_life:
        j.published("pub", mid, "orders.placed" if mid != new_life[1] else "orders.cancelled", ["sub", "other"])
    assert j.between("pub", "sub", old_life[1], new_life[1], forget=False) == {
        "orders.placed": [old_life[1], new_life[0]], "orders.cancelled": [new_life[1]]}
    assert j.between("pub", "sub", new_life[0], new_life[0], forget=True) == {"orders.placed": [new_life[0]]}
    assert j.between("pub", "sub", old_life[0], new_life[2], forget=False) == {  # what is left after the ack
        "orders.cancelled": [new_life[1]], "orders.placed": [new_life[2]]}
    assert j.between("pub", "sub", "a" * 32, "b" * 32, forget=True) == {}  # unknown run: nothing, nothing forgotten
    assert j.size == 10 - 3
    j.forget("pub")
    assert j.size == 0


def test_journeys_follow_each_priority_lane_apart() -> None:
    """Messages to one destination in two lanes interleave when published, but each lane is a
    stream of its own: an acknowledged run of the low lane names only low-lane messages and
    forgets none of the high lane's, whose own run maps later."""
    from meshmq._tap import Journeys

    j = Journeys(limit=100)
    ids = [f"{i:032x}" for i in range(6)]
    for i, mid in enumerate(ids):  # low, high, low, high, low, high
        j.published("pub", mid, "bulk.x" if i % 2 == 0 else "alerts.x", ["sub"], lane=2 if i % 2 == 0 else 0)
    assert j.between("pub", "sub", ids[0], ids[4], forget=True, lane=2) == {"bulk.x": [ids[0], ids[2], ids[4]]}
    assert j.between("pub", "sub", ids[1], ids[5], forget=True, lane=0) == {"alerts.x": [ids[1], ids[3], ids[5]]}
    assert j.size == 0
