"""The routing table: who receives a topic, queue-group choice, and index rebuilds."""

from __future__ import annotations

import collections
import itertools

import pytest

from meshmq._routing import QueueGroup, Route, RouteIndex, RoutingTable, rendezvous
from meshmq._topics import check_pattern
from meshmq._wire import NodeRecord, Subscription


def record(node: str, *subs: str | tuple[str, str], incarnation: int = 1) -> NodeRecord:
    parsed = tuple(Subscription(s) if isinstance(s, str) else Subscription(*s) for s in subs)
    return NodeRecord(node, "svc", (f"inproc://{node}",), parsed, incarnation, 0.0)


def table(local: NodeRecord, *peers: NodeRecord) -> RoutingTable:
    t = RoutingTable(local)
    for p in peers:
        assert t.update(p)
    return t


def index(*entries: tuple[str, str, str | None]) -> RouteIndex:
    return RouteIndex((check_pattern(p), node, group) for p, node, group in entries)


# --- resolution ----------------------------------------------------------------------


def test_plain_subscribers_each_appear_once() -> None:
    t = table(
        record("me"),
        record("a", "orders.*", "orders.>", "orders.placed"),  # three matching patterns, one entry
        record("b", "orders.placed"),
        record("c", "inventory.>"),
    )
    route = t.index.resolve("orders.placed")
    assert sorted(route.plain) == ["a", "b"]
    assert route.groups == ()
    assert not route.empty
    assert t.index.destinations("orders.placed", None) == {"a": (), "b": ()}


def test_local_subscriptions_are_routed_too() -> None:
    t = table(record("me", "orders.*"), record("a", "orders.*"))
    assert sorted(t.index.resolve("orders.x").plain) == ["a", "me"]


def test_no_subscriber_gives_the_empty_route() -> None:
    t = table(record("me"), record("a", "orders.*"))
    route = t.index.resolve("billing.due")
    assert route.empty and route == Route((), ())
    assert t.index.destinations("billing.due", "k") == {}


def test_each_queue_group_gets_the_message_once() -> None:
    t = table(
        record("me"),
        record("w1", ("jobs.>", "workers")),
        record("w2", ("jobs.*", "workers")),
        record("w3", ("jobs.resize", "workers"), ("jobs.>", "workers")),  # two patterns, one membership
        record("a1", ("jobs.resize", "audit")),
        record("x", ("other.*", "workers")),  # same group name, pattern does not match
    )
    route = t.index.resolve("jobs.resize")
    assert route.plain == ()
    assert route.groups == (QueueGroup("audit", ("a1",)), QueueGroup("workers", ("w1", "w2", "w3")))
    for key in (None, "k1", "k2", "k3"):
        dest = t.index.destinations("jobs.resize", key)
        served = collections.Counter(g for groups in dest.values() for g in groups)
        assert served == {"audit": 1, "workers": 1}
        assert dest["a1"] == ("audit",)


def test_a_node_both_plain_and_in_a_group_appears_in_both() -> None:
    t = table(record("me"), record("a", "jobs.*", ("jobs.*", "workers")), record("b", ("jobs.*", "workers")))
    route = t.index.resolve("jobs.x")
    assert route.plain == ("a",)
    assert route.groups == (QueueGroup("workers", ("a", "b")),)
    seen = collections.Counter()
    for i in range(20):
        dest = t.index.destinations("jobs.x", f"key-{i}")
        assert "a" in dest  # always, as a plain subscriber
        seen[dest.get("b") == ("workers",)] += 1
        if dest["a"] == ("workers",):
            assert "b" not in dest  # the group went to a, along with its plain copy
    assert seen[True] and seen[False]  # over 20 keys both members served the group


def test_destinations_merge_groups_chosen_on_the_same_node() -> None:
    ix = index(("t", "a", "g1"), ("t", "a", "g2"))
    assert ix.destinations("t", None) == {"a": ("g1", "g2")}


# --- rendezvous hashing ----------------------------------------------------------------


def test_rendezvous_is_pinned_across_processes_and_versions() -> None:
    # blake2b, not hash(): every publisher (any process, any release) must pick the same owner.
    members = ("a", "b", "c")
    assert [rendezvous(members, k) for k in ("k", "order-1", "order-2", "x")] == ["a", "a", "b", "a"]


def test_rendezvous_ignores_member_order() -> None:
    members = ("n1", "n2", "n3", "n4")
    for key in (f"k{i}" for i in range(200)):
        owners = {rendezvous(p, key) for p in itertools.permutations(members)}
        assert len(owners) == 1


def test_rendezvous_balances_keys() -> None:
    members = tuple(f"node-{i}" for i in range(5))
    counts = collections.Counter(rendezvous(members, f"key-{i}") for i in range(10_000))
    assert set(counts) == set(members)
    assert all(1700 < c < 2300 for c in counts.values()), counts


def test_a_joining_member_takes_only_its_share() -> None:
    before = tuple(f"node-{i}" for i in range(5))
    after = (*before, "node-5")
    keys = [f"key-{i}" for i in range(10_000)]
    moved = [k for k in keys if rendezvous(before, k) != rendezvous(after, k)]
    assert len(moved) < 0.25 * len(keys)  # ideal: 1/6, about 16.7 %
    assert len(moved) > 0.10 * len(keys)
    assert all(rendezvous(after, k) == "node-5" for k in moved)  # keys move only to the newcomer


def test_a_leaving_member_moves_only_its_own_keys() -> None:
    before = tuple(f"node-{i}" for i in range(6))
    after = tuple(m for m in before if m != "node-2")
    for k in (f"key-{i}" for i in range(10_000)):
        owner = rendezvous(before, k)
        if owner != "node-2":
            assert rendezvous(after, k) == owner


def test_key_affinity_in_a_group() -> None:
    ix = index(("jobs.*", "w1", "g"), ("jobs.*", "w2", "g"), ("jobs.*", "w3", "g"))
    for i in range(50):
        key = f"cust-{i}"
        first = ix.destinations("jobs.x", key)
        assert all(ix.destinations("jobs.x", key) == first for _ in range(5))
        (node,) = first
        assert node == rendezvous(("w1", "w2", "w3"), key)


# --- round robin without a key ---------------------------------------------------------


def test_round_robin_without_key_spreads_evenly() -> None:
    ix = index(("jobs.*", "w1", "g"), ("jobs.*", "w2", "g"), ("jobs.*", "w3", "g"))
    counts = collections.Counter(node for _ in range(300) for node in ix.destinations("jobs.x", None))
    assert counts == {"w1": 100, "w2": 100, "w3": 100}


def test_a_group_of_one_always_gets_it() -> None:
    ix = index(("jobs.*", "w1", "g"))
    assert all(ix.destinations("jobs.x", None) == {"w1": ("g",)} for _ in range(10))


@pytest.mark.parametrize("case", ["two groups on one topic", "two topics alternately"])
def test_round_robin_is_per_group(case: str) -> None:
    if case == "two groups on one topic":
        ix = index(("t", "a", "g1"), ("t", "b", "g1"), ("t", "a", "g2"), ("t", "b", "g2"))
        topics = ["t"]
    else:
        ix = index(("t1", "a", "g1"), ("t1", "b", "g1"), ("t2", "a", "g2"), ("t2", "b", "g2"))
        topics = ["t1", "t2"]
    served: collections.Counter[tuple[str, str]] = collections.Counter()
    for _ in range(100):
        for topic in topics:
            for node, groups in ix.destinations(topic, None).items():
                served.update((g, node) for g in groups)
    assert served == {("g1", "a"): 50, ("g1", "b"): 50, ("g2", "a"): 50, ("g2", "b"): 50}


# --- the table and its index -----------------------------------------------------------


def test_a_newer_record_changes_routing_and_an_older_one_is_ignored() -> None:
    t = table(record("me"), record("a", "orders.*", incarnation=2))
    assert t.index.resolve("orders.x").plain == ("a",)  # now cached in this index
    assert not t.update(record("a", "orders.*", incarnation=2))  # the same record again: ignored
    assert not t.update(record("a", "billing.*", incarnation=1))  # older: ignored
    assert t.index.resolve("orders.x").plain == ("a",)
    assert t.update(record("a", "billing.*", incarnation=3))
    assert t.index.resolve("orders.x").empty  # the cached route did not survive
    assert t.index.resolve("billing.due").plain == ("a",)
    assert t.records["a"].incarnation == 3


def test_of_two_records_of_one_version_the_one_the_merge_keeps_wins_in_either_order() -> None:
    from meshmq._records import newer_record

    one, two = record("a", "orders.*", incarnation=2), record("a", "billing.*", incarnation=2)
    for first, second in ((one, two), (two, one)):
        t = table(record("me"), first)
        assert t.update(second) == (newer_record(first, second) is second)
        assert t.records["a"] == newer_record(one, two)


def test_index_is_rebuilt_only_when_subscriptions_change() -> None:
    t = table(record("me"), record("a", "orders.*"))
    snapshot = t.index
    assert t.update(record("a", "orders.*", incarnation=2))  # taken, but routing is the same
    assert t.index is snapshot
    assert t.update(record("a", "orders.>", incarnation=3))
    assert t.index is not snapshot


def test_removing_a_node_removes_its_routes() -> None:
    t = table(record("me"), record("a", "orders.*"), record("b", "orders.*"))
    assert sorted(t.index.resolve("orders.x").plain) == ["a", "b"]
    removed = t.remove("a")
    assert removed is not None and removed.node == "a"
    assert t.index.resolve("orders.x").plain == ("b",)
    assert t.remove("a") is None


def test_set_local_changes_local_routes() -> None:
    t = table(record("me", "orders.*"))
    assert t.index.resolve("orders.x").plain == ("me",)
    t.set_local(record("me", "billing.*", incarnation=2))
    assert t.index.resolve("orders.x").empty
    assert t.index.resolve("billing.x").plain == ("me",)
    assert t.local.incarnation == 2


def test_old_snapshots_stay_valid_after_a_rebuild() -> None:
    # Publishing threads may hold a snapshot while the loop replaces it.
    t = table(record("me"), record("a", "orders.*"))
    old = t.index
    t.remove("a")
    assert old.resolve("orders.x").plain == ("a",)
    assert t.index.resolve("orders.x").empty


def test_route_cache_is_bounded() -> None:
    ix = index((">", "a", None))
    for i in range(10_000):
        assert ix.resolve(f"t{i}").plain == ("a",)
    assert len(ix._cache) <= 4096


def test_choose_takes_the_least_loaded_member_and_breaks_ties_in_turn() -> None:
    t = table(record("me"), record("a", ("jobs.*", "w")), record("b", ("jobs.*", "w")), record("c", ("jobs.*", "w")))
    group = t.index.resolve("jobs.x").groups[0]
    load = {"a": 5, "b": 1, "c": 3}
    assert {t.index.choose(group, None, load.__getitem__) for _ in range(6)} == {"b"}
    even = dict.fromkeys("abc", 0)
    picks = [t.index.choose(group, None, even.__getitem__) for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]  # equal load: in turn
    assert t.index.choose(group, "order-7", load.__getitem__) == t.index.choose(group, "order-7")  # keys win
    assert t.index.destinations("jobs.x", None, load.__getitem__) == {"b": ("w",)}
