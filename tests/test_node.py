"""Membership, failure detection and gossip of the Node core, in virtual time on an in-memory network."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meshmq._node import MAX_HEALTH, Connect, Disconnect, Node, PeerDown, PeerUp, Send, Timing
from meshmq._records import claim
from meshmq._wire import (
    ACK, ALIVE, DEAD, HELLO, LEFT, MAX_SYNC_ENTRIES, PING, PING_REQ, SUSPECT, SYNC, SYNC_OPEN, Ack, Entry, Hello, Limits, NodeRecord, Ping,
    Subscription, Sync, bye_frame, data_frame, decode_frame, hello_frame, receipt_frame,
)
from meshmq.testing import FakeClock, LinkError, MemoryNetwork, make_node

A, B, C, D = "inproc://a", "inproc://b", "inproc://c", "inproc://d"


@pytest.fixture
def net() -> MemoryNetwork:
    return MemoryNetwork()


def check_invariants(net: MemoryNetwork) -> None:
    """The Node invariants, and agreement between each node's links and what the shell connected."""
    for ep, node in net.nodes.items():
        assert set(node.peers) == set(node.routes.records), ep
        assert set(node.links) == net.links[ep], ep
        assert all(count > 0 for count in node.links.values()), ep
        for peer in node.peers.values():
            assert peer.endpoint in node.links, (ep, peer.endpoint)
            assert node.routes.records[peer.record.node] == peer.record
            assert peer.entry.status in (ALIVE, SUSPECT)
            assert node.by_endpoint[peer.endpoint] == peer.entry.node
        assert len(node.by_endpoint) == len(node.peers)
        from meshmq._records import table_hash
        assert node.digest_hash == table_hash(node.entries()), ep


def frames_sent(net: MemoryNetwork, src: str, dst: str | None = None, kind: int | None = None) -> list[object]:
    """Decoded frames the node at ``src`` sent (to ``dst``, of ``kind``)."""
    return [decode_frame(a.frame, Limits()) for a in net.actions(src, Send)
            if isinstance(a, Send) and (dst is None or a.endpoint == dst) and (kind is None or a.frame[1] == kind)]


def mesh_of(net: MemoryNetwork, n: int, timing: Timing | None = None, **kwargs: object) -> list[Node]:
    """n nodes n0..n{n-1}, each told only of n0 (a seed), run until they form a full mesh."""
    nodes = [net.add(make_node("n0", timing=timing, **kwargs))]  # type: ignore[arg-type]
    nodes += [net.add(make_node(f"n{i}", timing=timing, **kwargs), seeds=["inproc://n0"])  # type: ignore[arg-type]
              for i in range(1, n)]
    for _ in range(100):
        if all(len(x.peers) == n - 1 for x in nodes):
            return nodes
        net.run(0.1, step=0.05)
    raise AssertionError(f"no full mesh: {[len(x.peers) for x in nodes]}")


def run_until(net: MemoryNetwork, done: object, limit: float, step: float = 0.05) -> float:
    """Run the network until ``done()`` holds; return the virtual seconds it took (fail after ``limit``)."""
    start = net.clock.now()
    while not done():  # type: ignore[operator]
        assert net.clock.now() - start < limit, f"not done within {limit} virtual seconds"
        net.run(step, step=step)
    return net.clock.now() - start


# --- the helpers themselves ------------------------------------------------------------


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(10.0)
    assert clock.now() == clock() == 10.0
    assert clock.advance(0.25) == 10.25
    assert clock.now() == 10.25
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_run_lands_exactly_on_step_times(net: MemoryNetwork) -> None:
    net.run(1.0, step=0.1)
    assert net.clock.now() == 1.0
    net.run(0.3, step=0.25)
    assert net.clock.now() == 1.3


def test_sending_without_connect_breaks_the_shell_contract(net: MemoryNetwork) -> None:
    net.add(make_node("a"))
    with pytest.raises(LinkError):
        net.execute(A, [Send(B, b"frame")])
    lenient = MemoryNetwork(strict=False)
    lenient.add(make_node("a"))
    lenient.execute(A, [Send(B, b"frame")])
    assert lenient.dropped["unlinked"] == 1


def test_random_loss_drops_about_the_share_asked_for() -> None:
    lossy = MemoryNetwork(loss=0.25)
    mesh_of(lossy, 4)
    lossy.run(20.0)
    lost, total = lossy.dropped["lost"], sum(lossy.sent_frames.values())
    assert 0.2 < lost / total < 0.3
    with pytest.raises(ValueError, match="loss"):
        MemoryNetwork(loss=1.5)


# --- meeting peers ---------------------------------------------------------------------


def test_two_nodes_meet_through_a_seed_and_learn_subscriptions(net: MemoryNetwork) -> None:
    a = net.add(make_node("a", subscriptions=["orders.*"]))
    b = net.add(make_node("b", subscriptions=[("jobs.>", "workers")]), seeds=[A])
    # One exchange at t=0, no waiting: b greeted a, a connected back and replied.
    assert net.clock.now() == 0.0
    assert set(a.peers) == {"b"} and set(b.peers) == {"a"}
    assert b.routes.index.resolve("orders.placed").plain == ("a",)
    assert a.routes.index.destinations("jobs.resize", None) == {"b": ("workers",)}
    assert [type(x).__name__ for x in net.peer_changes(A)] == ["PeerUp"]
    hello_to_a, = frames_sent(net, B, A)
    assert isinstance(hello_to_a, Hello) and hello_to_a.want_reply
    reply = frames_sent(net, A, B)
    assert isinstance(reply[0], Hello) and not reply[0].want_reply
    assert isinstance(reply[1], Sync) and reply[1].phase == SYNC_OPEN  # the newcomer gets the table
    check_invariants(net)
    net.run(30.0)  # probes keep them together
    assert set(a.peers) == {"b"} and set(b.peers) == {"a"}
    assert a.counters["probes_answered"] >= 50 and a.counters["suspicions"] == 0
    check_invariants(net)


def test_a_newcomer_learns_the_whole_mesh_from_one_hello(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 30)
    late = net.add(make_node("late", subscriptions=["x.*"]), seeds=["inproc://n7"])
    assert set(late.peers) == {n.node_id for n in nodes}  # no gossip round needed: t did not move
    assert set(late.routes.records) == {n.node_id for n in nodes}
    run_until(net, lambda: all("late" in n.peers for n in nodes), limit=3.0)
    check_invariants(net)


def test_three_nodes_with_mdns_hints_form_a_full_mesh(net: MemoryNetwork) -> None:
    nodes = {
        A: net.add(make_node("a", subscriptions=["orders.*"])),
        B: net.add(make_node("b", subscriptions=[("jobs.*", "workers")])),
        C: net.add(make_node("c", subscriptions=[("jobs.*", "workers"), "orders.placed"])),
    }
    for ep in nodes:
        for other in nodes:
            if other != ep:
                net.discovered(ep, other)
    net.run(1.0)
    for ep, node in nodes.items():
        assert set(node.peers) == {"a", "b", "c"} - {node.node_id}, ep
    route = nodes[A].routes.index.resolve("orders.placed")
    assert route.plain == ("a", "c")
    assert nodes[A].routes.index.resolve("jobs.x").groups[0].members == ("b", "c")
    assert net.dropped == {}
    check_invariants(net)


def test_a_hint_about_a_known_node_or_ourselves_does_nothing(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    before = len(net.events)
    assert a.discovered(0.0, "b", (B,), "test") == []
    assert a.discovered(0.0, "a", (A,), "test") == []
    assert a.discovered(0.0, None, (A,), None) == []
    assert a.discovered(0.0, "z", (D,), "other-mesh") == []
    assert a.discovered(0.0, "z", (), "test") == []
    assert len(net.events) == before


def test_repeated_hints_are_rate_limited(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    first = a.discovered(0.0, None, (D,), None)
    assert first == [Connect(D), Send(D, hello_frame("test", a.me, True))]
    assert a.discovered(0.1, None, (D,), None) == []  # within probe_interval
    assert a.discovered(0.5, None, (D,), None) == [Send(D, hello_frame("test", a.me, True))]


def test_an_unanswered_hint_is_given_up_after_join_timeout(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.discovered(A, D)  # nobody there
    assert net.links[A] == {D} and D in a.pending
    net.run(2.875)
    assert D in a.pending
    net.run(0.125)  # exactly join_timeout after the hello
    assert D not in a.pending and not a.links and a.counters["greetings_unanswered"] == 1
    assert net.actions(A, Disconnect) == [Disconnect(D)]
    check_invariants(net)


def certified_node(node_id: str, refuse: tuple[str, ...] = ()) -> Node:
    """A node core as a secure agent runs it: signed records with a certificate, endpoints
    that name keys, and a ``vouch`` (here: refusing the records of the nodes in ``refuse``)."""
    endpoint = f"inproc://{node_id}#{(node_id + '-' * 43)[:43]}"
    record = NodeRecord(node_id, "svc", (endpoint,), (Subscription(f"{node_id}.>"),), 1, 0.0,
                        cert=b"certificate of " + node_id.encode())
    return Node("test", record, sign=lambda r: r, vouch=lambda r: "untrusted" if r.node in refuse else None,
                rng=random.Random(node_id))


def hellos(net: MemoryNetwork, src: str, dst: str) -> list[tuple[int, Hello]]:
    """(position among all sends, hello) of every HELLO the node at ``src`` sent to ``dst``."""
    out = []
    for i, event in enumerate(net.events):
        action = event.action
        if event.endpoint == src and isinstance(action, Send) and action.endpoint == dst and action.frame[1] == HELLO:
            hello = decode_frame(action.frame, Limits())
            assert isinstance(hello, Hello)
            out.append((i, hello))
    return out


def test_an_unproven_endpoint_is_greeted_with_a_card_and_gets_our_record_after_its_own(net: MemoryNetwork) -> None:
    """A seed has proved nothing: the newcomer greets it with a card (claim, certificate and
    endpoint, no record). The node there answers with its record; only then does the
    newcomer's record go. Both end up routing to each other as before."""
    n0 = net.add(certified_node("n0"))
    n1 = net.add(certified_node("n1"), seeds=[n0.endpoint])
    net.run(3.0)
    assert set(n0.peers) == {"n1"} and set(n1.peers) == {"n0"}
    assert n0.routes.index.resolve("n1.x").plain == ("n1",) and n1.routes.index.resolve("n0.x").plain == ("n0",)
    sent_by_n1 = hellos(net, n1.endpoint, n0.endpoint)
    first = sent_by_n1[0][1]
    assert first.entry.record is None and first.cert == n1.record.cert and first.endpoint == n1.endpoint
    n1_record_at = min(i for i, h in sent_by_n1 if h.entry.record is not None)
    n0_record_at = min(i for i, h in hellos(net, n0.endpoint, n1.endpoint) if h.entry.record is not None)
    assert n0_record_at < n1_record_at
    assert not n0.carded and not n1.carded
    check_invariants(net)


def test_a_greeted_node_whose_record_is_refused_never_gets_ours(net: MemoryNetwork) -> None:
    """The seed answers the card with a record our vouch refuses (another authority's, say):
    nothing it is sent carries our record, however often it is greeted, and it routes nowhere.
    (The shell drops the rest of what such a node sends; this core sees it all.)"""
    rogue = net.add(certified_node("rogue"))
    n0 = net.add(certified_node("n0", refuse=("rogue",)), seeds=[rogue.endpoint])
    net.run(10.0)
    to_rogue = frames_sent(net, n0.endpoint, rogue.endpoint)
    cards = [f for f in to_rogue if type(f) is Hello]
    assert len(cards) >= 2  # greeted again and again: a seed is never given up
    assert all(f.entry.record is None and f.cert is not None for f in cards), cards
    assert not [f for f in to_rogue if type(f) is Sync and any(e.record is not None for e in f.entries)]
    assert n0.counters["rejected_record_untrusted"] >= 1 and not n0.peers


def test_a_lost_peer_is_greeted_again_with_our_record(net: MemoryNetwork) -> None:
    """Its key was proved by the record we accepted: the greetings that look for it after it
    died (a restart, a healed partition) need no card."""
    n0 = net.add(certified_node("n0"))
    n1 = net.add(certified_node("n1"), seeds=[n0.endpoint])
    net.run(3.0)
    assert set(n0.peers) == {"n1"}
    seen = len(net.events)
    net.crash(n1.endpoint)
    net.run(30.0)
    assert not n0.peers and n1.endpoint in n0.lost
    again = [h for i, h in hellos(net, n0.endpoint, n1.endpoint) if i >= seen]
    assert again and all(h.entry.record == n0.record for h in again)


def test_a_stranger_that_probes_us_is_answered_and_greeted(net: MemoryNetwork) -> None:
    # c learnt of a through gossip before a learnt of c: a must still answer c's ping.
    a = net.add(make_node("a"))
    actions = a.receive(Ping("test", "c", C, 7, "a", 0.0), 0.0)
    assert actions == [Connect(C), Send(C, hello_frame("test", a.me, True)), Send(C, actions[2].frame)]  # type: ignore[union-attr]
    assert decode_frame(actions[2].frame, Limits()) == Ack("test", "a", 7, False)  # type: ignore[union-attr]


# --- records and anti-entropy ----------------------------------------------------------


def test_a_subscription_change_spreads_by_gossip(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 10)
    a = nodes[3]
    net.execute("inproc://n3", a.set_subscriptions((Subscription("orders.*"),), net.clock.now()))
    assert a.me.incarnation == 1 and a.record.incarnation == 1
    took = run_until(net, lambda: all(n.routes.index.resolve("orders.x").plain == ("n3",) for n in nodes), 2.0)
    assert took <= 1.0
    for n in nodes:
        if n is not a:
            assert n.routes.records["n3"].incarnation == 1
            ups = [x for x in net.peer_changes(n.endpoint) if isinstance(x, PeerUp) and x.record.node == "n3"]
            assert [u.record.incarnation for u in ups][-1] == 1
    check_invariants(net)


def test_only_changed_records_travel(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 12)
    net.run(10.0)  # everyone agrees: digests and hashes only from now on
    before = len(net.events)
    net.run(5.0)
    quiet = [decode_frame(e.action.frame, Limits()) for e in net.events[before:]
             if isinstance(e.action, Send) and e.action.frame[1] == SYNC]
    assert quiet and all(isinstance(f, Sync) for f in quiet)
    assert sum(1 for f in quiet for x in f.entries if x.record is not None) == 0  # type: ignore[attr-defined]
    # Equal hashes: an opened exchange gets no answer at all.
    assert all(f.phase == SYNC_OPEN for f in quiet)  # type: ignore[attr-defined]
    before = len(net.events)
    net.execute("inproc://n5", nodes[5].set_subscriptions((Subscription("x"),), net.clock.now()))
    net.run(3.0)
    records = [x.record for e in net.events[before:] if isinstance(e.action, Send) and e.action.frame[1] == SYNC
               for x in decode_frame(e.action.frame, Limits()).entries if x.record is not None]  # type: ignore[union-attr]
    assert {r.node for r in records} == {"n5"}  # only the changed record, and only its new version
    assert {r.incarnation for r in records} == {1}
    assert len(records) <= 3 * (len(nodes) - 1)  # each node fetched it about once, not every round


def test_a_lost_update_is_repaired_by_anti_entropy(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    b = net.add(make_node("b"), seeds=[A])
    net.cut(A, B)
    net.execute(A, a.set_subscriptions((Subscription("orders.*"),), net.clock.now()))  # the push is lost
    assert net.dropped["cut"] >= 1
    assert b.routes.records["a"].incarnation == 0
    net.heal(A, B)
    run_until(net, lambda: b.routes.records["a"].incarnation == 1, limit=1.0)
    assert b.routes.index.resolve("orders.x").plain == ("a",)


def test_digests_and_frames_stay_bounded_however_large_the_mesh(net: MemoryNetwork) -> None:
    import msgpack

    timing = Timing(gossip_entries=8, gossip_max_bytes=2048)
    nodes = mesh_of(net, 60, timing, subscriptions=[f"topic.{i}" for i in range(10)])
    net.run(1.0)
    mark = len(net.events)
    for n in nodes[:20]:  # many records change at once: answers must still respect the budget
        subs = (*n.record.subscriptions, Subscription("more.*"))
        net.execute(n.endpoint, n.set_subscriptions(subs, net.clock.now()))
    net.run(3.0)
    syncs = [decode_frame(e.action.frame, Limits()) for e in net.events[mark:]
             if isinstance(e.action, Send) and e.action.frame[1] == SYNC]
    assert len(syncs) > 100
    largest_record = max(len(msgpack.packb(n.me.to_wire(True))) for n in nodes)
    for f in syncs:
        assert isinstance(f, Sync)
        assert len(f.entries) <= MAX_SYNC_ENTRIES
        # Claims without records: our digest, and what we push back against the peer's digest.
        assert sum(1 for x in f.entries if x.record is None) <= 2 * 8
        record_bytes = sum(len(msgpack.packb(x.to_wire(True))) for x in f.entries if x.record is not None)
        assert record_bytes <= 2048 + largest_record
    assert all(len(n.peers) == 59 and n.routes.index.resolve("more.x").plain for n in nodes)


def test_rounds_reach_a_few_peers_not_everyone(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 40)
    hub = nodes[0]
    before = net.sent_frames[hub.endpoint]
    syncs_before = len(frames_sent(net, hub.endpoint, kind=SYNC))
    net.run(2.0)
    rounds = 2.0 / hub.timing.gossip_interval
    opened = len(frames_sent(net, hub.endpoint, kind=SYNC)) - syncs_before
    assert opened <= hub.timing.gossip_fanout * (rounds + 1) + 40  # + answers to others' rounds
    assert net.sent_frames[hub.endpoint] - before < 40 * rounds  # not O(N) per round


def test_stale_rumours_do_not_bring_back_a_node_that_left(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    c = net.add(make_node("c"), seeds=[A])
    net.run(2.0)
    old_claim = c.me
    net.stop(C)
    assert "c" not in a.peers and a.liveness("c", net.clock.now()) == "left"
    stale = Sync("test", "b", B, SYNC_OPEN, b"", 3, (old_claim,), ())
    a.receive(stale, net.clock.now())
    assert "c" not in a.peers  # the tombstone (left) outranks the old alive claim
    net.run(a.timing.tombstone_ttl + 10.0)
    assert "c" not in a.members  # the tombstone expired...
    a.receive(stale, net.clock.now())
    assert "c" not in a.peers and a.counters["stale_rumours"] == 1  # ...and a departed "left" still blocks it
    check_invariants(net)


# --- failure detection -----------------------------------------------------------------


def test_probes_go_round_robin_one_per_interval(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 5)
    a = nodes[0]
    start = len(frames_sent(net, a.endpoint, kind=PING))
    net.run(4 * a.timing.probe_interval * 2)  # two full rounds of the 4 peers
    pings = frames_sent(net, a.endpoint, kind=PING)[start:]
    assert len(pings) == 8
    targets = [p.target for p in pings]  # type: ignore[attr-defined]
    assert sorted(targets[:4]) == sorted(targets[4:]) == ["n1", "n2", "n3", "n4"]
    assert not frames_sent(net, a.endpoint, kind=PING_REQ)


def test_an_unreachable_peer_is_probed_indirectly_and_not_suspected(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 4)
    a, b = nodes[0], nodes[1]
    net.cut(a.endpoint, b.endpoint)  # a and b cannot talk, but both reach the others
    net.run(10.0)
    assert frames_sent(net, a.endpoint, kind=PING_REQ)
    assert any(isinstance(f, Ack) and not f.nack for f in frames_sent(net, nodes[2].endpoint, a.endpoint, ACK)
               + frames_sent(net, nodes[3].endpoint, a.endpoint, ACK))
    assert "n1" in a.peers and "n0" in b.peers
    assert a.counters["peers_dead"] == 0 and a.liveness("n1", net.clock.now()) == "alive"


def test_a_crashed_node_is_suspected_then_declared_dead_everywhere(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 8)
    net.run(1.0)
    victim = nodes[5]
    net.crash(victim.endpoint)
    crashed_at = net.clock.now()
    survivors = [n for n in nodes if n is not victim]
    run_until(net, lambda: any(n.liveness("n5", net.clock.now()) == "suspect" for n in survivors), 3.0)
    took = run_until(net, lambda: all("n5" not in n.peers for n in survivors), 20.0)
    low, _high = survivors[0].timing.suspicion_bounds(8)
    # Confirmed by everyone within a probe round or two, so the minimum suspicion applies.
    assert net.clock.now() - crashed_at <= low + 4 * survivors[0].timing.probe_interval + 1.0, took
    for n in survivors:
        assert n.departed["n5"].reason == "dead"
        assert n.routes.index.resolve("anything").empty or "n5" not in n.routes.records
        assert n.members["n5"].entry.status == DEAD
    check_invariants(net)


def test_a_lone_suspicion_is_refuted_by_the_live_node(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    b = net.add(make_node("b"), seeds=[A])
    net.run(1.0)
    net.cut(A, B)
    run_until(net, lambda: a.liveness("b", net.clock.now()) == "suspect", 3.0)
    net.heal(A, B)
    run_until(net, lambda: a.liveness("b", net.clock.now()) == "alive", 2.0)
    assert b.counters["refuted"] >= 1 and b.me.incarnation >= 1
    assert a.members["b"].entry.incarnation == b.me.incarnation
    net.run(20.0)
    assert a.counters["peers_dead"] == 0 and b.counters["peers_dead"] == 0
    check_invariants(net)


def test_a_stalled_node_is_suspected_but_not_evicted(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 5)
    slow = nodes[2]
    for _ in range(2):
        net.pause(slow.endpoint)  # frozen for 1.5 s (a long GC pause, a stopped process)
        net.run(1.5)
        net.resume(slow.endpoint)
        net.run(5.0)
    assert sum(n.counters["suspicions"] for n in nodes) > 0  # it was noticed...
    assert all(n.counters["peers_dead"] == 0 for n in nodes)  # ...and never evicted
    assert slow.counters["refuted"] >= 1
    assert all(n.liveness("n2", net.clock.now()) == "alive" for n in nodes if n is not slow)
    check_invariants(net)


def test_a_node_that_answers_late_all_the_time_is_not_evicted(net: MemoryNetwork) -> None:
    nodes = mesh_of(net, 5)
    slow = nodes[2]
    for _ in range(50):  # 20 s, frozen 80 % of the time: every answer comes late
        net.pause(slow.endpoint)
        net.run(0.3, step=0.05)
        net.resume(slow.endpoint)
        net.run(0.1, step=0.05)
    net.run(5.0)
    assert all(n.counters["peers_dead"] == 0 for n in nodes)
    assert all(len(n.peers) == 4 for n in nodes)


def test_no_false_deaths_under_ten_percent_loss() -> None:
    lossy = MemoryNetwork(loss=0.10)
    nodes = mesh_of(lossy, 10)
    lossy.run(300.0, step=0.05)  # five virtual minutes
    assert lossy.dropped["lost"] > 1000
    assert sum(n.counters["peers_dead"] for n in nodes) == 0
    assert all(len(n.peers) == 9 for n in nodes)
    assert sum(n.counters["suspicions"] for n in nodes) > 0  # loss did raise suspicions; all were refuted


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    t = Timing()
    low, high = t.suspicion_bounds(100)
    assert low == pytest.approx(3 * 2 * 0.5) and high == pytest.approx(6 * low)
    node = make_node("a")
    from meshmq._node import Member
    member = Member(Entry("b", 0.0, 0, SUSPECT), 0.0, 0.0)
    for i in range(99):
        node.peers[f"x{i}"] = member  # only the mesh size matters here
    timeouts = []
    for confirmers in ([], ["p"], ["p", "q"], ["p", "q", "r"], ["p", "q", "r", "s"]):
        member.confirmations = {"first", *confirmers}
        timeouts.append(node._suspicion_timeout(member))
    assert timeouts[0] == pytest.approx(high) and timeouts[3] == pytest.approx(low) == timeouts[4]
    assert timeouts == sorted(timeouts, reverse=True)


def test_data_frames_answer_a_probe(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    net.cut(A, B)
    net.run(a.timing.probe_interval)  # a's ping to b is lost
    assert a.probe is not None and a.probe.target == "b"
    frame = decode_frame(data_frame("b", 1, 1, []), a.limits)
    assert a.receive(frame, net.clock.now()) == []
    assert a.probe is None and a.peers["b"].last_seen == net.clock.now()


def test_a_dead_peers_endpoint_is_greeted_so_a_healed_partition_rejoins(net: MemoryNetwork) -> None:
    # Met through an mDNS hint, not seeds: when the cable is plugged back in, mDNS announces
    # nothing new, so only the nodes' memory of lost endpoints brings them together.
    a = net.add(make_node("a"))
    b = net.add(make_node("b"))
    net.discovered(A, B, "b")
    net.run(1.0)
    net.cut(A, B)
    run_until(net, lambda: not a.peers and not b.peers, 20.0)
    assert B in a.lost and A in b.lost
    net.heal(A, B)
    run_until(net, lambda: "b" in a.peers and "a" in b.peers, 2 * a.timing.join_timeout)
    assert not a.lost and not b.lost
    assert a.counters["refuted"] + b.counters["refuted"] >= 1  # each heard itself declared dead
    check_invariants(net)


def test_lost_endpoints_are_forgotten_after_the_rejoin_window(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"))
    net.discovered(A, B, "b")
    net.run(1.0)
    net.crash(B)  # gone for good
    run_until(net, lambda: not a.peers, 20.0)
    assert B in a.lost and B in a.links  # still greeted
    net.run(a.timing.rejoin_window + a.timing.join_timeout)
    assert not a.lost and B not in a.links and not a.pending
    check_invariants(net)


def test_bye_removes_at_once_and_is_not_greeted_again(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b", subscriptions=["orders.*"]), seeds=[A])
    net.run(0.25)
    net.stop(B)
    assert net.clock.now() == 0.25
    assert "b" not in a.peers and a.routes.index.resolve("orders.x").empty
    assert net.peer_changes(A)[-1] == PeerDown("b", "svc", B, "left")
    assert a.counters["peers_left"] == 1 and a.members["b"].entry.status == LEFT
    assert not a.links
    net.run(10.0)
    assert not a.peers and not a.lost and B not in a.links
    check_invariants(net)


def test_a_stopped_node_ignores_everything(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    bye = a.stop(0.0)
    assert bye == [Send(B, bye_frame("test", "a", 0.0, 0))]
    assert a.tick(100.0) == []
    assert a.receive(Ping("test", "b", B, 5, "a"), 1.0) == []
    assert a.discovered(1.0, None, (D,), None) == []


def test_a_receipt_reaching_the_membership_core_is_ignored(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    assert a.receive(decode_frame(receipt_frame("b", 1, 2, 3), a.limits), 0.0) == []


def test_bye_for_an_unknown_node_is_harmless(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    assert a.receive(decode_frame(bye_frame("test", "ghost", 1.0, 0), a.limits), 0.0) == []
    assert not a.peers


# --- trust boundaries ------------------------------------------------------------------


def test_a_node_from_another_mesh_is_ignored_and_counted(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    x = net.add(make_node("x", mesh="other"), seeds=[A])
    net.run(1.0)
    assert not a.peers and not x.peers
    assert a.counters["rejected_other_mesh"] >= 1
    assert a.receive(Ping("other", "x", "inproc://x", 1, "a"), 1.0) == []
    foreign = Sync("elsewhere", "z", "inproc://z", SYNC_OPEN, b"", 1, (Entry("y", 1.0, 0, ALIVE),), ())
    assert a.receive(foreign, 1.0) == [] and "y" not in a.members
    assert not net.actions(A, Send)  # a never answered
    check_invariants(net)


def test_a_record_with_an_invalid_pattern_is_rejected_and_counted(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    bad = NodeRecord("b", "svc", (B,), (Subscription("orders.>.placed"),), 1, 0.0)
    a.receive(Hello("test", claim(bad), True), 0.0)
    assert not a.peers and not a.routes.records
    assert a.counters["rejected_bad_record"] == 1
    too_deep = NodeRecord("c", "svc", (C,), (Subscription(".".join(["t"] * 33)),), 1, 0.0)
    a.receive(Sync("test", "d", D, SYNC_OPEN, b"", 1, (claim(too_deep),), ()), 0.0)
    assert a.counters["rejected_bad_record"] == 2 and "c" not in a.members


def test_our_own_hello_and_pings_for_another_node_are_ignored(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    assert a.receive(Hello("test", a.me, True), 0.0) == []
    assert a.receive(Ping("test", "z", "inproc://z", 1, "former-a"), 0.0) == []
    assert a.counters["pings_for_another_node"] == 1
    assert not a.peers


def test_a_rumour_with_an_incarnation_far_ahead_is_refused(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    b = net.add(make_node("b"), seeds=[A])
    jump = a.timing.max_incarnation_jump
    forged = Entry("b", b.me.started, jump + 5, DEAD)  # from c, about b: would make b unable to refute
    a.receive(Sync("test", "c", C, SYNC_OPEN, b"", 1, (forged,), ()), 0.0)
    assert "b" in a.peers and a.counters["rejected_incarnation_ahead"] == 1
    about_me = Entry("a", a.me.started, jump + 5, SUSPECT, None, "c")
    a.receive(Sync("test", "b", B, SYNC_OPEN, b"", 1, (about_me,), ()), 0.0)
    assert a.me.incarnation == 0 and a.counters["rejected_incarnation_ahead"] == 2
    # A claim about a life of ours that has not begun is refused too.
    a.receive(Sync("test", "b", B, SYNC_OPEN, b"", 1, (Entry("a", 99.0, 0, DEAD),), ()), 0.0)
    assert a.counters["rejected_future_self"] == 1 and a.me.status == ALIVE
    # Small steps ahead are normal (several refutations we missed) and accepted.
    a.receive(Sync("test", "c", C, SYNC_OPEN, b"", 1, (Entry("b", b.me.started, 3, SUSPECT, None, "c"),), ()), 0.0)
    assert a.liveness("b", 0.0) == "suspect"


def test_max_peers_bounds_the_table_against_a_flood_of_records(net: MemoryNetwork) -> None:
    a = net.add(make_node("a", max_peers=50))
    net.add(make_node("b"), seeds=[A])
    for burst in range(8):  # 8 x 256 made-up nodes
        flood = tuple(claim(NodeRecord(f"x{burst}-{i}", "svc", (f"inproc://x{burst}-{i}",), (), 0, 1.0))
                      for i in range(256))
        net.execute(A, a.receive(Sync("test", "b", B, SYNC_OPEN, b"", 1, flood, ()), 0.0))
    assert len(a.members) == 50
    assert a.counters["rejected_peer_limit"] == 8 * 256 - 49
    check_invariants(net)


def test_a_flood_of_strangers_cannot_open_sockets_without_bound(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    for i in range(1000):
        a.receive(Ping("test", f"x{i}", f"inproc://x{i}", 1, "a"), 0.0)
    assert len(a.pending) == a.max_pending == 256
    assert a.counters["rejected_pending_limit"] == 1000 - a.max_pending
    assert len(a.links) <= a.max_pending


def test_wants_are_answered_within_the_byte_budget(net: MemoryNetwork) -> None:
    timing = Timing(gossip_max_bytes=600)
    nodes = mesh_of(net, 12, timing, subscriptions=[f"topic.{i}" for i in range(5)])
    a = nodes[0]
    wants = tuple(n.node_id for n in nodes[1:])
    out = a.receive(Sync("test", "n1", "inproc://n1", SYNC_OPEN, b"", 1, (), wants), net.clock.now())
    answers = [decode_frame(x.frame, Limits()) for x in out if isinstance(x, Send)]
    records = [e for f in answers for e in f.entries if e.record is not None]  # type: ignore[union-attr]
    assert 0 < len(records) < len(wants) and a.counters["records_deferred"] > 0
    assert all(len(x.frame) < 600 + 400 for x in out if isinstance(x, Send))


def test_routing_honours_a_raised_topic_length_limit() -> None:
    a = make_node("a", limits=Limits(max_topic_length=512))
    long_pattern = "x" * 300  # valid under max_topic_length=512 (the agent accepts it)
    a.set_subscriptions((Subscription(long_pattern),), 0.0)
    assert a.routes.index.resolve(long_pattern).plain == ("a",)
    rec = NodeRecord("b", "svc", (B,), (Subscription(long_pattern),), 1, 0.0)
    a.receive(decode_frame(hello_frame("test", claim(rec), True), a.limits), 0.0)
    assert a.routes.index.resolve(long_pattern).plain == ("a", "b")


# --- seeds and restarts ----------------------------------------------------------------


def test_a_seed_that_is_down_is_greeted_again_and_joins_when_it_comes_up(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"), seeds=[B])
    assert net.dropped["unbound"] == 1  # nobody at the seed yet
    net.run(1.0)
    b = net.add(make_node("b"))  # comes up at t=1, knows nobody
    net.run(1.875)
    assert not a.peers and not b.peers  # a has not asked again yet
    net.run(0.125)  # t = 3.0: join_timeout after the first hello, a greets the seed again
    assert set(a.peers) == {"b"} and set(b.peers) == {"a"}
    hellos = [f for f in frames_sent(net, A, B) if isinstance(f, Hello)]
    assert len(hellos) == 2
    assert net.actions(A, Connect) == [Connect(B)]  # one link all along
    check_invariants(net)


def test_a_restarted_node_on_the_same_endpoint_replaces_its_former_self(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b1", endpoint=B, started=1.0, subscriptions=["old.*"]), seeds=[A])
    net.run(1.0)
    net.crash(B)  # no BYE
    net.add(make_node("b2", endpoint=B, started=2.0, subscriptions=["new.*"]), seeds=[A])
    assert set(a.peers) == {"b2"}
    assert a.routes.index.resolve("old.x").empty
    assert a.routes.index.resolve("new.x").plain == ("b2",)
    assert PeerDown("b1", "svc", B, "replaced") in net.peer_changes(A)
    assert a.counters["peers_replaced"] == 1
    assert a.members["b1"].entry.status == DEAD
    check_invariants(net)


def test_a_node_restarted_with_its_identity_on_a_new_endpoint_is_followed(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b", endpoint="inproc://b-1", started=1.0, subscriptions=["old.*"]), seeds=[A])
    net.run(1.0)
    net.crash("inproc://b-1")  # no goodbye; it comes back with the same node id (its store kept it)
    b = net.add(make_node("b", endpoint="inproc://b-2", started=2.0, subscriptions=["new.*"]), seeds=[A])
    assert a.peers["b"].endpoint == "inproc://b-2" and a.routes.records["b"].started == 2.0
    assert a.routes.index.resolve("new.x").plain == ("b",) and a.routes.index.resolve("old.x").empty
    assert Disconnect("inproc://b-1") in net.actions(A, Disconnect) and a.counters["peers_moved"] == 1
    net.run(10.0)
    assert "b" in a.peers and "a" in b.peers and a.counters["peers_dead"] == 0
    check_invariants(net)


def test_an_older_instance_does_not_replace_a_newer_one(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b2", endpoint=B, started=2.0), seeds=[A])
    stale = NodeRecord("b1", "svc", (B,), (), 1, 1.0)
    net.execute(A, a.receive(Hello("test", claim(stale), False), 0.0))
    assert "b2" in a.peers and "b1" not in a.peers
    assert a.members["b1"].entry.status == DEAD
    assert not [x for x in net.peer_changes(A) if isinstance(x, PeerDown) and x.node == "b2"]
    check_invariants(net)


def test_node_is_usable_without_the_network() -> None:
    # The core alone: inputs in, actions out (what the agent's shell does).
    a = make_node("a", subscriptions=["orders.*"])
    b = make_node("b")
    out = b.start(0.0, (A, B))  # its own endpoint is not a seed
    assert out == [Connect(A), Send(A, hello_frame("test", b.me, True))]
    replies = a.receive(decode_frame(out[1].frame, a.limits), 0.0)  # type: ignore[union-attr]
    assert replies[:2] == [Connect(B), PeerUp(b.record)]
    assert [type(x) for x in replies[2:]] == [Send, Send]  # our hello, then the table's digest
    final = []
    for reply in replies[2:]:
        final += b.receive(decode_frame(reply.frame, b.limits), 0.0)  # type: ignore[union-attr]
    assert final[0] == PeerUp(a.record)  # the pending greeting's link is reused, not reconnected
    assert b.routes.index.resolve("orders.placed").plain == ("a",)
    ping = next(x for x in a.tick(0.5) if isinstance(x, Send) and x.frame[1] == PING)
    assert decode_frame(ping.frame, a.limits) == Ping("test", "a", A, 1, "b", 0.0)


def test_a_malformed_mdns_hint_is_ignored_and_counted(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    actions = a.discovered(0.0, "x", ("tcp://[garbage",), "test")
    assert actions == [] and a.counters["rejected_bad_hint"] == 1 and not a.pending
    check_invariants(net)


def test_liveness_states_and_departed_peers_are_remembered(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    net.add(make_node("c"), seeds=[A])
    net.run(1.0)
    assert a.liveness("b", net.clock.now()) == "alive"
    net.crash(B)
    run_until(net, lambda: a.liveness("b", net.clock.now()) == "suspect", 3.0)
    run_until(net, lambda: a.liveness("b", net.clock.now()) == "dead", 20.0)
    assert a.departed["b"].reason == "dead" and a.departed["b"].service == "svc"
    net.stop(C)
    assert a.liveness("c", net.clock.now()) == "left"
    assert a.liveness("nobody", net.clock.now()) == "unknown"


def test_seeds_plus_gossip_build_the_full_mesh(net: MemoryNetwork) -> None:
    hub = "inproc://n0"
    nodes = [net.add(make_node("n0"))]
    nodes += [net.add(make_node(f"n{i}"), seeds=[hub]) for i in range(1, 12)]  # each knows only the hub
    net.run(1.0)
    assert all(len(n.peers) == len(nodes) - 1 for n in nodes), [len(n.peers) for n in nodes]
    check_invariants(net)


def test_a_node_alone_waits_a_whole_interval_between_ticks() -> None:
    """With no peer, a change must not leave the gossip deadline in the past: the agent's
    timer follows ``next_deadline``, and a stale deadline made it tick every millisecond."""
    timing = Timing()
    node = make_node("a", timing=timing)
    now = start = 5.0
    node.start(now)
    assert node.set_subscriptions((), now) == []
    ticks = 0
    while now < start + 2.0:
        now = node.next_deadline(now)
        node.tick(now, now)
        ticks += 1
    # One tick per gossip round and per probe round at most, and one to start.
    assert ticks <= 2.0 / timing.gossip_interval + 2.0 / timing.probe_interval + 1


@pytest.mark.parametrize("n", [10, 100])
def test_a_new_subscription_reaches_everyone_in_logarithmic_rounds(n: int) -> None:
    net = MemoryNetwork(record_events=False)
    nodes = mesh_of(net, n)
    net.run(2.0)
    interval = nodes[0].timing.gossip_interval
    net.execute("inproc://n1", nodes[1].set_subscriptions((Subscription("new.*"),), net.clock.now()))
    took = run_until(net, lambda: all(x.routes.index.resolve("new.x").plain == ("n1",) for x in nodes),
                     limit=10.0, step=interval)
    rounds = took / interval
    assert rounds <= 2 * math.ceil(math.log2(n)), rounds


# --- random scenarios ------------------------------------------------------------------

ENDPOINTS = (A, B, C, D)


class MeshScenario(RuleBasedStateMachine):
    """Partitions, crashes, restarts, pauses and subscription changes; the invariants always
    hold, and once the network heals every live node knows every other with its latest record."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MemoryNetwork()
        self.generation = 0
        for ep in ENDPOINTS:
            self._start(ep)

    def _start(self, ep: str) -> None:
        self.generation += 1
        name = f"{ep[-1]}{self.generation}"
        self.net.add(make_node(name, endpoint=ep, started=float(self.generation)),
                     seeds=[e for e in ENDPOINTS if e != ep])

    @rule(seconds=st.sampled_from([0.125, 0.5, 1.0, 2.5, 3.25]))
    def run(self, seconds: float) -> None:
        self.net.run(seconds)

    @rule(a=st.sampled_from(ENDPOINTS), b=st.sampled_from(ENDPOINTS))
    def cut(self, a: str, b: str) -> None:
        if a != b:
            self.net.cut(a, b)

    @rule(a=st.sampled_from(ENDPOINTS), b=st.sampled_from(ENDPOINTS))
    def heal(self, a: str, b: str) -> None:
        self.net.heal(a, b)

    @rule(ep=st.sampled_from(ENDPOINTS), graceful=st.booleans())
    def restart(self, ep: str, graceful: bool) -> None:
        if ep in self.net.nodes:
            self.net.resume(ep)
            if graceful:
                self.net.stop(ep)
            else:
                self.net.crash(ep)
        self._start(ep)

    @precondition(lambda self: len(self.net.nodes) > 1)
    @rule(ep=st.sampled_from(ENDPOINTS))
    def crash(self, ep: str) -> None:
        if ep in self.net.nodes:
            self.net.resume(ep)
            self.net.crash(ep)

    @rule(ep=st.sampled_from(ENDPOINTS))
    def pause(self, ep: str) -> None:
        if ep in self.net.nodes:
            self.net.pause(ep)

    @rule(ep=st.sampled_from(ENDPOINTS))
    def resume(self, ep: str) -> None:
        self.net.resume(ep)

    @rule(ep=st.sampled_from(ENDPOINTS), pattern=st.sampled_from(["orders.*", "jobs.>", "x"]))
    def subscribe(self, ep: str, pattern: str) -> None:
        node = self.net.nodes.get(ep)
        if node is not None and ep not in self.net.paused:
            subs = (*node.record.subscriptions, Subscription(pattern))
            self.net.execute(ep, node.set_subscriptions(subs, self.net.clock.now()))

    @rule(ep=st.sampled_from(ENDPOINTS), other=st.sampled_from((*ENDPOINTS, "inproc://nobody")))
    def hint(self, ep: str, other: str) -> None:
        if ep in self.net.nodes and ep not in self.net.paused:
            self.net.discovered(ep, other)

    @invariant()
    def invariants_hold(self) -> None:
        check_invariants(self.net)

    def teardown(self) -> None:
        for a in ENDPOINTS:
            for b in ENDPOINTS:
                self.net.heal(a, b)
            self.net.resume(a)
        # Every peer is probed within a round of probes, each stretched at most by local health;
        # suspicions end (death or refutation) within the longest suspicion; dead nodes' endpoints
        # and seeds are greeted every join_timeout; then gossip repairs what is left.
        t = Timing()
        probe_round = (len(ENDPOINTS) + 1) * t.probe_interval * (MAX_HEALTH + 1)
        self.net.run(probe_round + t.suspicion_bounds(len(ENDPOINTS))[1] + 2 * t.join_timeout + 5.0)
        check_invariants(self.net)
        live = {node.node_id: node for node in self.net.nodes.values()}
        for node in live.values():
            assert set(node.peers) == set(live) - {node.node_id}, node.node_id
            for peer_id, peer in node.peers.items():
                assert peer.record == live[peer_id].record


TestMeshScenario = MeshScenario.TestCase
TestMeshScenario.settings = settings(max_examples=60, stateful_step_count=30)


def test_an_indirect_probe_answer_is_not_sent_to_a_requester_dropped_meanwhile(net: MemoryNetwork) -> None:
    """Found by MeshScenario: a helper relays a probe for a requester, drops the requester (its
    link closed) before the target answers, and must then not send on that closed link."""
    from meshmq._wire import ack_frame, ping_req_frame

    r = net.add(make_node("r", endpoint=A))
    h = net.add(make_node("h", endpoint=B), seeds=[A])
    net.add(make_node("t", endpoint=C), seeds=[B])
    net.run(2.0)
    assert {"r", "t"} <= set(h.peers)
    now = net.clock.now()
    # r asks h to probe t; h pings t and keeps a relay pointing back at r.
    h.receive(decode_frame(ping_req_frame("test", "r", A, 77, "t", C), h.limits), now)
    [(relay_seq, relay)] = list(h.relays.items())
    assert relay.endpoint == A
    # r says goodbye: h drops it and closes the link to it.
    net.execute(B, h.receive(decode_frame(bye_frame("test", "r", r.record.started, r.me.incarnation), h.limits), now))
    assert A not in h.links
    # t's answer arrives: nothing may go to r (the strict network would raise LinkError).
    actions = h.receive(decode_frame(ack_frame("test", "t", relay_seq), h.limits), now)
    assert not [a for a in actions if isinstance(a, Send) and a.endpoint == A]
    net.execute(B, actions)
    assert h.counters["relay_answers_unlinked"] == 1


def test_routes_follow_the_merge_when_a_node_equivocates() -> None:
    """Two different records of one version (only a buggy or forging owner makes them): the
    merge picks one by its bytes on every node, and the routing table takes the same one.
    Found by tools/fuzz_decoder.py (gossip): the table kept the first it heard."""
    from meshmq._records import newer_record

    a = make_node("a")
    one = NodeRecord("b", "svc", ("inproc://b",), (Subscription("x.*"),), 1, 1.0)
    two = NodeRecord("b", "svc", ("inproc://b",), (Subscription("y.*"),), 1, 1.0)
    winner = newer_record(one, two)
    for first, second in ((one, two), (two, one)):
        a = make_node("a")
        a.receive(Hello("test", claim(first), False), 0.0)
        a.receive(Hello("test", claim(second), False), 0.1)
        assert a.peers["b"].record == winner
        assert a.routes.records["b"] == winner


def test_a_revoked_node_leaves_routing_and_third_party_gossip_does_not_bring_it_back(net: MemoryNetwork) -> None:
    """The shell revokes n3 at n0 first: n3 leaves n0's routing at once (PeerDown ``revoked``)
    and stays out although n1 and n2, which do not know yet, keep gossiping about it. Once all
    know (and the shell drops n3's frames), nobody holds it; a record with a renewed
    certificate that the shell vouches for lifts the bar."""
    nodes = mesh_of(net, 4)
    n0, n1, n2, n3 = nodes

    def vouch(record: NodeRecord) -> str | None:
        return "revoked" if record.node == "n3" and record.cert != b"renewed" else None

    n0.vouch = vouch
    actions = n0.revoke("n3", net.clock.now())
    net.execute(n0.endpoint, actions)
    assert [(a.node, a.reason) for a in actions if isinstance(a, PeerDown)] == [("n3", "revoked")]
    assert "n3" not in n0.members and "n3" not in n0.peers and n0.counters["peers_revoked"] == 1
    assert "n3" in n0.barred and n0.revoke("n0", net.clock.now()) == []  # never ourselves
    check_invariants(net)
    net.execute(n3.endpoint, n3.set_subscriptions((Subscription("secrets.*"),), net.clock.now()))
    net.run(2.0, step=0.05)  # n1 and n2 still hold n3, and gossip about it
    assert "n3" not in n0.peers and n0.routes.index.resolve("secrets.x").plain == ()
    assert n0.counters["rejected_revoked_claims"] + n0.counters["rejected_record_revoked"] > 0
    for node in (n1, n2):
        node.vouch = vouch
        net.execute(node.endpoint, node.revoke("n3", net.clock.now()))
    net.isolate(n3.endpoint)  # the shell drops its frames and no longer sends to it
    net.run(2.0, step=0.05)
    for node in (n0, n1, n2):
        assert "n3" not in node.members and node.routes.index.resolve("secrets.x").plain == ()
    check_invariants(net)
    for node in (n0, n1, n2):
        net.heal(n3.endpoint, node.endpoint)
    net.execute(n3.endpoint, n3.set_certificate(b"renewed", net.clock.now()))
    net.execute(n3.endpoint, n3.discovered(net.clock.now(), None, (n0.endpoint,), n3.mesh))
    run_until(net, lambda: all("n3" in node.peers for node in (n0, n1, n2)), 20.0)
    assert all("n3" not in node.barred for node in (n0, n1, n2))
    assert n0.routes.records["n3"].cert == b"renewed"
