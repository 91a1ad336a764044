"""Membership and liveness of the Node core, in virtual time on an in-memory network."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meshmq._node import Connect, Disconnect, PeerDown, PeerUp, Send, Timing
from meshmq._wire import (
    GOSSIP, Gossip, Hello, Limits, NodeRecord, Ping, Subscription, bye_frame, data_frame, decode_frame, gossip_frame,
    hello_frame, ping_frame,
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


def frames_sent(net: MemoryNetwork, src: str, dst: str) -> list[object]:
    """Decoded frames the node at ``src`` sent to ``dst``."""
    sends = [a for a in net.actions(src, Send) if isinstance(a, Send) and a.endpoint == dst]
    return [decode_frame(a.frame, Limits()) for a in sends]


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
    reply, = frames_sent(net, A, B)
    assert isinstance(reply, Hello) and not reply.want_reply
    check_invariants(net)
    net.run(5.0)  # heartbeats keep them together
    assert set(a.peers) == {"b"} and set(b.peers) == {"a"}
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
    assert first == [Connect(D), Send(D, hello_frame("test", a.record, True))]
    assert a.discovered(0.1, None, (D,), None) == []  # within heartbeat_interval
    assert a.discovered(0.5, None, (D,), None) == [Send(D, hello_frame("test", a.record, True))]


def test_an_unanswered_hint_is_given_up_after_peer_timeout(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.discovered(A, D)  # nobody there
    assert net.links[A] == {D} and D in a.pending
    net.run(2.875)
    assert D in a.pending
    net.run(0.125)  # exactly peer_timeout after the hello
    assert D not in a.pending and not a.links
    assert net.actions(A, Disconnect) == [Disconnect(D)]
    check_invariants(net)


# --- records change --------------------------------------------------------------------


def test_a_subscription_change_propagates_at_once(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    b = net.add(make_node("b"), seeds=[A])
    c = net.add(make_node("c"), seeds=[A])
    assert b.routes.index.resolve("orders.x").empty
    net.execute(A, a.set_subscriptions((Subscription("orders.*"),), net.clock.now()))
    for node in (b, c):
        assert node.routes.index.resolve("orders.x").plain == ("a",)
        assert node.routes.records["a"].version == 2
    ups = [x for x in net.peer_changes(B) if isinstance(x, PeerUp)]
    assert [u.record.version for u in ups] == [1, 2]
    check_invariants(net)


def test_a_ping_with_a_newer_version_triggers_a_record_refresh(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    b = net.add(make_node("b"), seeds=[A])
    net.cut(A, B)
    net.execute(A, a.set_subscriptions((Subscription("orders.*"),), net.clock.now()))  # the push is lost
    assert net.dropped["cut"] == 1
    assert b.routes.records["a"].version == 1
    net.heal(A, B)
    net.run(0.5)  # the next heartbeat carries version 2
    assert b.routes.records["a"].version == 2
    assert b.routes.index.resolve("orders.x").plain == ("a",)
    # b asked for the record because of the ping: a hello wanting a reply, after the heal.
    pings = [f for f in frames_sent(net, A, B) if isinstance(f, Ping)]
    assert pings and pings[-1].version == 2
    assert any(isinstance(f, Hello) and f.want_reply for f in frames_sent(net, B, A)[1:])
    check_invariants(net)


def test_a_ping_with_the_same_version_asks_nothing(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    assert a.receive(Ping("test", "b", 1, B), 0.25) == []
    assert a.peers["b"].last_seen == 0.25


def test_data_frames_refresh_liveness(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    frame = decode_frame(data_frame("b", 1, 1, []), a.limits)
    assert a.receive(frame, 2.0) == []
    assert a.peers["b"].last_seen == 2.0


# --- failure detection -----------------------------------------------------------------


def test_a_silent_peer_is_dead_exactly_after_peer_timeout(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    b = net.add(make_node("b"), seeds=[A])
    net.run(1.0)
    net.cut(A, B)
    heard = a.peers["b"].last_seen
    deadline = heard + a.timing.peer_timeout
    assert heard == 1.0 and deadline == 4.0
    net.run(deadline - net.clock.now())  # ticks every 1/8 s up to and including t = 4.0
    assert net.clock.now() == 4.0
    assert "b" in a.peers  # silent for exactly peer_timeout: not yet
    net.clock.advance(1 / 1024)
    net.tick()
    assert "b" not in a.peers and "b" not in a.routes.records
    down = [x for x in net.peer_changes(A) if isinstance(x, PeerDown)]
    assert down == [PeerDown("b", "svc", B, "dead")]
    assert a.counters["peers_dead"] == 1
    assert "a" not in b.peers  # the same on the other side
    assert Disconnect(B) in net.actions(A, Disconnect)
    check_invariants(net)


def test_peers_met_by_mdns_find_each_other_again_when_a_partition_heals(net: MemoryNetwork) -> None:
    # Met through an mDNS hint, not seeds: when the cable is plugged back in, mDNS announces
    # nothing new, so only the nodes' own memory of lost endpoints can bring them together.
    a = net.add(make_node("a"))
    b = net.add(make_node("b"))
    net.discovered(A, B, "b")
    net.run(1.0)
    assert "b" in a.peers and "a" in b.peers
    net.cut(A, B)
    net.run(a.timing.peer_timeout + 1.0)
    assert not a.peers and not b.peers and a.lost == {B: pytest.approx(4.125)}
    net.heal(A, B)
    net.run(a.timing.peer_timeout + 1.0)  # both re-greet every peer_timeout
    assert "b" in a.peers and "a" in b.peers
    assert not a.lost and not b.lost
    check_invariants(net)


def test_lost_endpoints_are_forgotten_after_the_rejoin_window(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"))
    net.discovered(A, B, "b")
    net.run(1.0)
    net.crash(B)  # gone for good
    net.run(a.timing.peer_timeout + 1.0)
    assert B in a.lost and B in a.links  # still greeted
    net.run(a.timing.rejoin_window + a.timing.peer_timeout)
    assert not a.lost and B not in a.links and not a.pending
    check_invariants(net)


def test_a_node_that_left_with_bye_is_not_greeted_again(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"))
    net.discovered(A, B, "b")
    net.run(1.0)
    net.stop(B)
    net.run(10.0)
    assert not a.peers and not a.lost and B not in a.links
    check_invariants(net)


def test_a_peer_that_keeps_talking_never_dies(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    net.run(60.0)
    assert set(a.peers) == {"b"} and a.counters["peers_dead"] == 0


def test_bye_removes_at_once(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b", subscriptions=["orders.*"]), seeds=[A])
    net.run(0.25)
    net.stop(B)
    assert net.clock.now() == 0.25
    assert "b" not in a.peers and a.routes.index.resolve("orders.x").empty
    assert net.peer_changes(A)[-1] == PeerDown("b", "svc", B, "left")
    assert a.counters["peers_left"] == 1
    assert not a.links
    check_invariants(net)


def test_a_stopped_node_ignores_everything(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    bye = a.stop(0.0)
    assert bye == [Send(B, bye_frame("test", "a"))]
    assert a.tick(100.0) == []
    assert a.receive(Ping("test", "b", 5, B), 1.0) == []
    assert a.discovered(1.0, None, (D,), None) == []


def test_bye_for_an_unknown_node_is_harmless(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    assert a.receive(decode_frame(bye_frame("test", "ghost"), a.limits), 0.0) == []


# --- trust boundaries ------------------------------------------------------------------


def test_a_node_from_another_mesh_is_ignored_and_counted(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    x = net.add(make_node("x", mesh="other"), seeds=[A])
    net.run(1.0)
    assert not a.peers and not x.peers
    assert a.counters["rejected_other_mesh"] >= 1
    assert a.receive(Ping("other", "x", 1, "inproc://x"), 1.0) == []
    assert not net.actions(A, Send)  # a never answered
    check_invariants(net)


def test_a_record_with_an_invalid_pattern_is_rejected_and_counted(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    bad = NodeRecord("b", "svc", (B,), (Subscription("orders.>.placed"),), 1, 0.0)
    assert a.receive(Hello("test", bad, True), 0.0) == []
    assert not a.peers and not a.routes.records
    assert a.counters["rejected_bad_record"] == 1
    too_deep = NodeRecord("c", "svc", (C,), (Subscription(".".join(["t"] * 33)),), 1, 0.0)
    assert a.receive(Hello("test", too_deep, True), 0.0) == []
    assert a.counters["rejected_bad_record"] == 2


def test_our_own_hello_is_ignored(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    assert a.receive(Hello("test", a.record, True), 0.0) == []
    assert a.receive(Ping("test", "a", 1, A), 0.0) == []
    assert not a.peers


def test_max_peers_is_enforced(net: MemoryNetwork) -> None:
    a = net.add(make_node("a", max_peers=2))
    for name in "bcd":
        net.add(make_node(name), seeds=[A])
    net.run(1.0)
    assert set(a.peers) == {"b", "c"}
    assert a.counters["rejected_peer_limit"] >= 1
    assert "a" not in net.node(D).peers
    # Room frees up: d, still greeting its seed, gets in.
    net.stop(C)
    net.run(3.0)
    assert set(a.peers) == {"b", "d"}
    check_invariants(net)


def test_a_restarted_node_replaces_its_former_self_even_at_max_peers(net: MemoryNetwork) -> None:
    a = net.add(make_node("a", max_peers=1))
    net.add(make_node("b1", endpoint=B, started=1.0), seeds=[A])
    net.crash(B)
    net.add(make_node("b2", endpoint=B, started=2.0), seeds=[A])
    assert set(a.peers) == {"b2"}


@pytest.mark.parametrize("whose", ["a peer's", "our own"])
def test_routing_honours_a_raised_topic_length_limit(whose: str) -> None:
    a = make_node("a", limits=Limits(max_topic_length=512))
    long_pattern = "x" * 300  # valid under max_topic_length=512 (the agent accepts it)
    if whose == "our own":
        a.set_subscriptions((Subscription(long_pattern),), 0.0)
        assert a.routes.index.resolve(long_pattern).plain == ("a",)
    else:
        rec = NodeRecord("b", "svc", (B,), (Subscription(long_pattern),), 1, 0.0)
        a.receive(decode_frame(hello_frame("test", rec, True), a.limits), 0.0)
        assert a.routes.index.resolve(long_pattern).plain == ("b",)


# --- seeds and restarts ----------------------------------------------------------------


def test_a_seed_that_is_down_is_greeted_again_and_joins_when_it_comes_up(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"), seeds=[B])
    assert net.dropped["unbound"] == 1  # nobody at the seed yet
    net.run(1.0)
    b = net.add(make_node("b"))  # comes up at t=1, knows nobody
    net.run(1.875)
    assert not a.peers and not b.peers  # a has not asked again yet
    net.run(0.125)  # t = 3.0: peer_timeout after the first hello, a greets the seed again
    assert set(a.peers) == {"b"} and set(b.peers) == {"a"}
    hellos = [f for f in frames_sent(net, A, B) if isinstance(f, Hello)]
    assert len(hellos) == 2
    assert net.actions(A, Connect) == [Connect(B)]  # one link all along
    check_invariants(net)


def test_a_seed_is_found_again_after_it_dies(net: MemoryNetwork) -> None:
    net.add(make_node("b1", endpoint=B))
    a = net.add(make_node("a"), seeds=[B])
    assert set(a.peers) == {"b1"}
    net.run(0.5)
    net.crash(B)  # last heard at t = 0.5
    net.run(3.125)  # t = 3.625: declared dead, and the seed greeted again (nobody there)
    assert not a.peers and B in a.pending
    net.add(make_node("b2", endpoint=B, started=5.0))
    net.run(2.875)
    assert not a.peers
    net.run(0.125)  # t = 6.625: the next greeting finds b2
    assert set(a.peers) == {"b2"}
    check_invariants(net)


def test_a_restarted_node_on_the_same_endpoint_replaces_its_former_self(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b1", endpoint=B, started=1.0, subscriptions=["old.*"]), seeds=[A])
    net.run(1.0)
    net.crash(B)  # no BYE
    net.add(make_node("b2", endpoint=B, started=2.0, subscriptions=["new.*"]))  # no seeds either
    net.run(0.5)  # a's next ping reaches b2, which introduces itself
    assert net.clock.now() < 1.0 + a.timing.peer_timeout
    assert set(a.peers) == {"b2"}
    assert a.routes.index.resolve("old.x").empty
    assert a.routes.index.resolve("new.x").plain == ("b2",)
    assert PeerDown("b1", "svc", B, "replaced") in net.peer_changes(A)
    assert a.counters["peers_replaced"] == 1
    b2 = net.node(B)  # a's ping or a's gossip introduced a to the newcomer
    assert a.counters["ping_from_unknown"] == 0
    assert b2.counters["ping_from_unknown"] + b2.counters["gossip_introductions"] >= 1
    check_invariants(net)


def test_an_older_instance_does_not_replace_a_newer_one(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b2", endpoint=B, started=2.0), seeds=[A])
    stale = NodeRecord("b1", "svc", (B,), (), 1, 1.0)
    actions = a.receive(Hello("test", stale, False), 0.0)
    assert "b2" in a.peers
    assert not [x for x in actions if isinstance(x, PeerDown)]


# --- random scenarios ------------------------------------------------------------------

ENDPOINTS = (A, B, C, D)


class MeshScenario(RuleBasedStateMachine):
    """Partitions, crashes, restarts and subscription changes; the invariants always hold,
    and once the network heals every live node knows every other with its latest record."""

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
            if graceful:
                self.net.stop(ep)
            else:
                self.net.crash(ep)
        self._start(ep)

    @precondition(lambda self: len(self.net.nodes) > 1)
    @rule(ep=st.sampled_from(ENDPOINTS))
    def crash(self, ep: str) -> None:
        if ep in self.net.nodes:
            self.net.crash(ep)

    @rule(ep=st.sampled_from(ENDPOINTS), pattern=st.sampled_from(["orders.*", "jobs.>", "x"]))
    def subscribe(self, ep: str, pattern: str) -> None:
        node = self.net.nodes.get(ep)
        if node is not None:
            subs = (*node.record.subscriptions, Subscription(pattern))
            self.net.execute(ep, node.set_subscriptions(subs, self.net.clock.now()))

    @rule(ep=st.sampled_from(ENDPOINTS), other=st.sampled_from((*ENDPOINTS, "inproc://nobody")))
    def hint(self, ep: str, other: str) -> None:
        if ep in self.net.nodes:
            self.net.discovered(ep, other)

    @invariant()
    def invariants_hold(self) -> None:
        check_invariants(self.net)

    def teardown(self) -> None:
        for a in ENDPOINTS:
            for b in ENDPOINTS:
                self.net.heal(a, b)
        # Dead records leave within peer_timeout, seeds are greeted again every peer_timeout.
        self.net.run(2 * 3.0 + 1.0)
        check_invariants(self.net)
        live = {node.node_id: node for node in self.net.nodes.values()}
        for node in live.values():
            assert set(node.peers) == set(live) - {node.node_id}, node.node_id
            for peer_id, peer in node.peers.items():
                assert peer.record == live[peer_id].record


TestMeshScenario = MeshScenario.TestCase
TestMeshScenario.settings = settings(max_examples=80, stateful_step_count=30)


def test_node_is_usable_without_the_network() -> None:
    # The core alone: inputs in, actions out (what the agent's shell does).
    a = make_node("a", subscriptions=["orders.*"])
    b = make_node("b")
    out = b.start(0.0, (A, B))  # its own endpoint is not a seed
    assert out == [Connect(A), Send(A, hello_frame("test", b.record, True))]
    replies = a.receive(decode_frame(out[1].frame, a.limits), 0.0)  # type: ignore[union-attr]
    assert replies[:2] == [Connect(B), PeerUp(b.record)]
    assert isinstance(replies[2], Send) and replies[2].endpoint == B
    final = b.receive(decode_frame(replies[2].frame, b.limits), 0.0)
    assert final == [PeerUp(a.record)]  # the pending greeting's link is reused, not reconnected
    assert b.routes.index.resolve("orders.placed").plain == ("a",)
    ping, gossip = a.tick(0.5)
    assert ping == Send(B, ping_frame("test", "a", 1, A, 0.0))
    assert isinstance(gossip, Send) and gossip.endpoint == B
    assert decode_frame(gossip.frame, a.limits) == Gossip("test", "a", (("a", A, 1), ("b", B, 1)))


def test_a_malformed_mdns_hint_is_ignored_and_counted(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    actions = a.discovered(0.0, "x", ("tcp://[garbage",), "test")
    assert actions == [] and a.counters["rejected_bad_hint"] == 1 and not a.pending
    check_invariants(net)


def test_liveness_goes_alive_suspect_dead_and_departed_peers_are_remembered(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    b = net.add(make_node("b"), seeds=[A])
    net.add(make_node("c"), seeds=[A])
    net.run(1.0)
    assert a.liveness("b", net.clock.now()) == "alive"
    net.cut(A, B)
    half = a.timing.peer_timeout / 2
    net.run(half)  # silent for exactly half of peer_timeout: still alive
    assert a.liveness("b", net.clock.now()) == "alive"
    net.run(0.25)
    assert a.liveness("b", net.clock.now()) == "suspect"
    net.run(half)
    assert a.liveness("b", net.clock.now()) == "dead"
    assert a.departed["b"].reason == "dead" and a.departed["b"].service == "svc"
    net.stop(C)
    net.flush()
    assert a.liveness("c", net.clock.now()) == "left"
    assert a.liveness("nobody", net.clock.now()) == "unknown"
    net.heal(A, B)
    net.run(a.timing.peer_timeout + 1.0)
    assert "b" in a.peers and "b" not in a.departed and b.peers


# --- membership gossip -----------------------------------------------------------------


def test_seeds_plus_gossip_build_the_full_mesh(net: MemoryNetwork) -> None:
    hub = "inproc://n0"
    nodes = [net.add(make_node("n0"))]
    nodes += [net.add(make_node(f"n{i}"), seeds=[hub]) for i in range(1, 12)]  # each knows only the hub
    net.run(3.0)
    assert all(len(n.peers) == len(nodes) - 1 for n in nodes), [len(n.peers) for n in nodes]
    assert sum(n.counters["gossip_introductions"] for n in nodes) > 0
    check_invariants(net)


def test_without_gossip_seeds_alone_make_only_a_star() -> None:
    # The control for the test above: the same mesh, with nobody told anything (fanout 0).
    net = MemoryNetwork()
    quiet = Timing(gossip_fanout=0)
    net.add(make_node("n0", timing=quiet))
    nodes = [net.add(make_node(f"n{i}", timing=quiet), seeds=["inproc://n0"]) for i in range(1, 12)]
    net.run(3.0)
    assert all(set(n.peers) == {"n0"} for n in nodes)


def test_gossip_frames_stay_bounded_however_large_the_mesh(net: MemoryNetwork) -> None:
    hub = "inproc://n0"
    nodes = [net.add(make_node("n0"))] + [net.add(make_node(f"n{i}"), seeds=[hub]) for i in range(1, 80)]
    net.run(4.0)
    assert all(len(n.peers) == 79 for n in nodes)
    gossip = [decode_frame(a.frame, Limits()) for a in net.actions(hub, Send)
              if isinstance(a, Send) and a.frame[1] == GOSSIP]
    assert gossip and max(len(g.entries) for g in gossip) == nodes[0].timing.gossip_entries
    per_round = nodes[0].timing.gossip_fanout
    rounds = net.clock.now() / nodes[0].timing.gossip_interval
    assert len(gossip) <= per_round * (rounds + 1)  # a few peers per round, not everyone


def test_stale_gossip_does_not_bring_back_a_node_that_left(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    net.add(make_node("c"), seeds=[A])
    net.run(2.0)
    net.stop(C)
    net.flush()
    assert "c" not in a.peers and a.liveness("c", net.clock.now()) == "left"
    stale = decode_frame(gossip_frame("test", "b", [("c", C, 1)]), Limits())
    assert a.receive(stale, net.clock.now()) == []  # no greeting for a node that said goodbye


def test_a_flood_of_gossip_cannot_open_sockets_without_bound(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    net.add(make_node("b"), seeds=[A])
    net.run(0.5)
    for burst in range(4):  # 4 x 256 strangers, far more than a may greet at once
        entries = [(f"x{burst}-{i}", f"inproc://x{burst}-{i}", 1) for i in range(256)]
        flood = decode_frame(gossip_frame("test", "b", entries), Limits())
        a.receive(flood, net.clock.now())
    assert len(a.pending) == a.max_pending == 256
    assert a.counters["rejected_pending_limit"] == 4 * 256 - a.max_pending
    assert len(a.links) <= a.max_pending + len(a.peers)


def test_gossip_from_another_mesh_is_ignored_and_counted(net: MemoryNetwork) -> None:
    a = net.add(make_node("a"))
    foreign = decode_frame(gossip_frame("elsewhere", "z", [("y", "inproc://y", 1)]), Limits())
    assert a.receive(foreign, 0.0) == [] and a.counters["rejected_other_mesh"] == 1 and not a.pending
