"""Priority lanes in the outbox (issue 7: "under load high-priority messages overtake low
ones, and low ones are not starved forever").

Each destination has one send stream per lane in use (the policy's ``priority``: high,
normal, low). At most ``send_window`` messages are on their way to a destination; the rest
wait in the outbox, and when it may send again the lane whose turn it is goes first.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aio import eventually, run
from certs import RawPeer
from test_outbox import Pair, seen_by

import meshmq
from meshmq._delivery import Outbox, lane_key, split_lane_key
from meshmq._transport import Link
from meshmq._wire import SEALED, Limits, Subscription, decode_data, decode_envelope, receipt_frame

HIGH, NORMAL, LOW = 0, 1, 2


def _outbox(**cfg: Any) -> tuple[Outbox, Link, list[Link]]:
    """An in-memory outbox (no store, no sockets) with one destination link; the list
    collects the wake-ups it asks for."""
    woken: list[Link] = []
    config = meshmq.Config(**{"max_batch_messages": 4, **cfg})
    outbox = Outbox("me", config, None, wake=woken.append, dead_letter=lambda *a: None,
                    counters=collections.Counter())
    link = Link("tcp://127.0.0.1:1", None)
    link.node = "peer"
    return outbox, link, woken


def _sent(outbox: Outbox, link: Link, now: float) -> list[tuple[int, list[bytes]]]:
    """(lane, entries) of every frame the outbox has for the link now, taking turns as the
    transport does: asking again until it has nothing."""
    out = []
    while frames := outbox.frames(link, now):
        for frame in frames:
            _, _, _, _, entries, _, lane = decode_data(frame, Limits())
            out.append((lane, entries))
    return out


def test_lane_keys_keep_the_normal_lane_as_the_node_id_and_name_the_others() -> None:
    assert lane_key("ab12", NORMAL) == "ab12"  # what stores held before lanes existed
    assert [lane_key("ab12", n) for n in (HIGH, LOW)] == ["ab12/high", "ab12/low"]
    for n in (HIGH, NORMAL, LOW):
        assert split_lane_key(lane_key("ab12", n)) == ("ab12", n)
    with pytest.raises(ValueError):
        split_lane_key("ab12/urgent")


def test_the_highest_lane_sends_first_and_a_passed_over_lane_gets_its_turn() -> None:
    """Virtual time, no sockets: 40 low, 40 normal and 40 high messages wait; frames (4
    messages each) come high first, yet a lane passed over lane_starve_after (3) times in a
    row gets the next frame (when two starve together, one of them waits one frame more),
    and every lane stays in order."""
    outbox, link, _ = _outbox(lane_starve_after=3)
    for number, name in ((LOW, b"low"), (NORMAL, b"normal"), (HIGH, b"high")):
        lane = outbox.lane("peer", "svc", link, number)
        for i in range(40):
            outbox.put(lane, name + b"-%02d" % i, 8, 0.0, 0.0)
    frames = _sent(outbox, link, 0.0)
    lanes = [lane for lane, _ in frames]
    assert len(frames) == 30 and sorted(lanes) == [HIGH] * 10 + [NORMAL] * 10 + [LOW] * 10
    assert lanes[:5] == [HIGH, HIGH, HIGH, LOW, NORMAL]  # both passed over 3 times: the lower one first
    last_high = max(i for i, n in enumerate(lanes) if n == HIGH)
    for number in (NORMAL, LOW):
        turns = [i for i, n in enumerate(lanes) if n == number and i <= last_high]
        waits = [b - a - 1 for a, b in zip([-1] + turns, turns)]
        assert turns and max(waits) <= 3 + 1, (number, lanes)  # passed over at most 4 times in a row
    # Overtaking: the last high frame leaves long before the last low one.
    assert max(i for i, n in enumerate(lanes) if n == HIGH) < max(i for i, n in enumerate(lanes) if n == LOW)
    for number, name in ((LOW, b"low"), (NORMAL, b"normal"), (HIGH, b"high")):
        got = [e for n, entries in frames if n == number for e in entries]
        assert got == [name + b"-%02d" % i for i in range(40)]  # each lane in order, nothing twice


def test_the_window_holds_new_messages_until_receipts_report_them_arrived() -> None:
    unbounded, link, _ = _outbox(send_window=6)  # no priority in the policy: no window
    lane = unbounded.lane("peer", "svc", link, NORMAL)
    for i in range(10):
        unbounded.put(lane, b"normal-%d" % i, 8, 0.0, 0.0)
    assert [len(e) for _, e in _sent(unbounded, link, 0.0)] == [4, 4, 2]

    outbox, link, woken = _outbox(send_window=6)
    outbox.windowed = True  # as when the policy gives some topic a priority
    lane = outbox.lane("peer", "svc", link, LOW)
    for i in range(10):
        outbox.put(lane, b"low-%d" % i, 8, 0.0, 0.0)
    assert [len(e) for _, e in _sent(outbox, link, 0.0)] == [4, 2]  # six on their way, no more
    high = outbox.lane("peer", "svc", link, HIGH)
    outbox.put(high, b"urgent", 8, 0.0, 0.0)
    assert _sent(outbox, link, 0.0) == []  # the window is full for every lane
    woken.clear()
    outbox.on_receipt("peer", LOW, lane.stream.epoch, 3, 3, 0.01)  # three arrived (and were handled)
    assert woken == [link]  # the window opened: the link is woken to send what waits
    assert _sent(outbox, link, 0.01) == [(HIGH, [b"urgent"]), (LOW, [b"low-6", b"low-7"])]
    assert outbox.count == 8 and outbox.dests["peer"].in_flight == 6
    assert outbox.counters["send_window_full"] >= 1 and outbox.counters["messages_sent_high"] == 1


def test_a_high_priority_message_overtakes_a_backlog_of_low_ones_on_the_wire(mesh: str, tmp_path: Path) -> None:
    """A real agent sending to a raw peer that acknowledges only when told: 100 bulk (low)
    messages fill the window of 16 and wait; an alert (high) published after them leaves
    in the very next frame once the window opens, and the bulk ones follow, all of them."""
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n[[rule]]\nname = "alerts"\ntopic = "alerts.>"\npriority = "high"\n'
                      '[[rule]]\nname = "bulk"\ntopic = "bulk.>"\npriority = "low"\n')

    async def main() -> None:
        from meshmq._seal import Signer, open_data

        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory", discovery=False, policy_file=policy,
                                      send_window=16, retransmit_initial=30.0, retransmit_max=30.0).start()
        raw = RawPeer(mesh, pub.endpoints[0], "sink")
        record = dataclasses.replace(raw.record, subscriptions=(Subscription("alerts.*"), Subscription("bulk.*")),
                                     incarnation=2, sig=None)
        record = dataclasses.replace(record, sig=raw.keys.sign(record.signing_bytes()))
        shared = Signer(raw.keys).shared_key(pub._keys.public)
        arrived: list[tuple[int, str]] = []  # (lane, topic) in arrival order
        ends: dict[int, tuple[int, int]] = {}  # lane -> (epoch, last number)

        def drain() -> None:
            while raw.pull.poll(0):
                frame = raw.pull.recv()
                if frame[1] != SEALED:
                    continue
                epoch, first, _, entries, _, lane = open_data(frame, Limits(), pub.node_id, shared, raw.node)
                arrived.extend((lane, decode_envelope(e, Limits()).topic) for e in entries)
                ends[lane] = (epoch, first + len(entries) - 1)

        def ack_all() -> None:
            for lane, (epoch, last) in ends.items():
                raw.send(receipt_frame(raw.node, epoch, last, last, lane))

        async def until(what: str, done: Any) -> None:
            await eventually(lambda: drain() or done(), what=what)

        try:
            raw.introduce(record, want_reply=True)
            await eventually(lambda: pub._receivers("bulk.x") == 1, what="the raw peer routed")
            for i in range(100):
                await pub.publish("bulk.x", i)
            await until("the window's worth", lambda: len(arrived) == 16)
            assert pub._outbox.windowed  # type: ignore[union-attr]  # the policy has priorities
            dest = pub._outbox.dests[raw.node]  # type: ignore[union-attr]
            assert dest.in_flight == 16 and pub.stats()["outbox_messages"] == 100  # 84 wait in the outbox
            await pub.publish("alerts.fire", "now")
            assert dest.lanes[HIGH].stream.sent_upto == 0  # the window is full: it waits too
            ack_all()
            await until("the alert", lambda: any(lane == HIGH for lane, _ in arrived))
            assert arrived[16] == (HIGH, "alerts.fire")  # first through the reopened window
            while len(arrived) < 101:
                ack_all()
                await until("more bulk", lambda n=len(arrived): len(arrived) > n)
            assert arrived.count((LOW, "bulk.x")) == 100
            ack_all()
            await eventually(lambda: pub.stats()["outbox_messages"] == 0, what="everything acknowledged")
        finally:
            raw.close()
            await pub.stop()

    run(main(), timeout=60)


def test_lanes_survive_a_restart_and_the_high_lane_drains_first(mesh: str, tmp_path: Path) -> None:
    """A durable subscriber is down while urgent, normal and bulk orders wait for it in three
    lanes; the publisher restarts (the lanes come back from its store); when the subscriber
    returns it gets every message once, each topic in order, the urgent ones first."""
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n[[rule]]\nname = "urgent"\ntopic = "orders.urgent"\npriority = "high"\n'
                      '[[rule]]\nname = "bulk"\ntopic = "orders.bulk"\npriority = "low"\n')

    async def main() -> None:
        pair = Pair(mesh, policy_file=policy)
        got: list[tuple[str, int]] = []
        sub = await pair.start("sub")
        sub.subscribe("orders.*", lambda m: got.append((m.topic, m.data)), queue="billing")  # durable
        sub_node = sub.node_id
        pub = await pair.start("pub")
        await pub.wait_for_subscribers("orders.bulk", timeout=10)
        await sub.stop()
        await eventually(lambda: not seen_by(pub, sub_node), what="the subscriber gone from routing")
        for i in range(20):
            await pub.publish("orders.bulk", i)
            await pub.publish("orders.placed", i)
            if i % 4 == 0:
                await pub.publish("orders.urgent", i)
        assert sorted(pub._outbox.dests[sub_node].lanes) == [HIGH, NORMAL, LOW]  # type: ignore[union-attr]
        await pub.stop()
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "meshmq", "outbox", "--service", "pub",
                                                       "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert sorted((r["node"], r["lane"], r["messages"]) for r in json.loads(out.stdout)) == [
            (sub_node, "high", 5), (sub_node, "low", 20), (sub_node, "normal", 20)]

        pub = await pair.start("pub")
        assert pub.stats()["outbox_messages"] == 45
        assert sorted(pub._outbox.dests[sub_node].lanes) == [HIGH, NORMAL, LOW]  # type: ignore[union-attr]
        sub = await pair.start("sub")
        sub.subscribe("orders.*", lambda m: got.append((m.topic, m.data)), queue="billing")
        await eventually(lambda: len(got) >= 45, what="everything delivered after the restart")
        await eventually(lambda: pub.stats()["outbox_messages"] == 0, what="everything acknowledged")
        assert got[:5] == [("orders.urgent", i) for i in (0, 4, 8, 12, 16)]
        for topic, count in (("orders.placed", 20), ("orders.bulk", 20)):
            assert [n for t, n in got if t == topic] == list(range(count))
        assert len(got) == 45
        await sub.stop()
        await pub.stop()

    run(main(), timeout=60)


def test_a_pushed_policy_moves_a_topic_to_its_lane_at_run_time(mesh: str) -> None:
    """Priorities change with the policy in force: a topic published on the normal lane goes
    on the high lane once a policy saying so is pushed, and the window comes with it."""
    import time

    from meshmq._security import Authority

    authority = Authority.development()  # the one these agents trust (the test's MESHMQ_HOME)
    urgent = '[[rule]]\nname = "urgent"\ntopic = "jobs.urgent"\npriority = "high"\n'

    async def main() -> None:
        got: list[int] = []
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="memory").start()
        sub.subscribe("jobs.*", lambda m: got.append(m.data))
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory").start()
        try:
            await pub.wait_for_subscribers("jobs.urgent", timeout=10)
            await pub.publish("jobs.urgent", 1)
            await eventually(lambda: got == [1], what="the first message")
            dest = pub._outbox.dests[sub.node_id]  # type: ignore[union-attr]
            assert sorted(dest.lanes) == [NORMAL] and not pub._outbox.windowed  # type: ignore[union-attr]
            assert pub.push_policy(authority.sign_policy(mesh=mesh, version=1, text=f"version = 1\n{urgent}",
                                                         at=time.time()))
            await pub.publish("jobs.urgent", 2)
            await eventually(lambda: got == [1, 2], what="the second message")
            assert sorted(dest.lanes) == [HIGH, NORMAL] and pub._outbox.windowed  # type: ignore[union-attr]
            assert pub.stats()["messages_sent_high"] == 1
            # The receipt follows the handler by up to RECEIPT_DELAY: wait for it, on the high lane.
            await eventually(lambda: dest.lanes[HIGH].stream.acked == 1, what="the high lane acknowledged")
        finally:
            await pub.stop()
            await sub.stop()

    run(main(), timeout=60)
