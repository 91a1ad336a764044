"""The membership lattice: merging claims is commutative, associative and idempotent."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmq._records import claim, entry_hash, merge, merge_tables, table_hash
from meshmq._wire import ALIVE, DEAD, LEFT, SUSPECT, Entry, NodeRecord, Subscription

NODES = ["a", "b", "c"]


@st.composite
def entries(draw: st.DrawFn, node: str | None = None) -> Entry:
    """Claims about one node, drawn from a small space so that ties and equal keys are common."""
    node = node or draw(st.sampled_from(NODES))
    started = draw(st.sampled_from([1.0, 2.0]))
    incarnation = draw(st.integers(0, 3))
    status = draw(st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT]))
    record = None
    if draw(st.booleans()):
        rec_started = draw(st.sampled_from([s for s in (1.0, 2.0) if s <= started]))
        rec_inc = draw(st.integers(0, incarnation if rec_started == started else 3))
        subs = draw(st.sampled_from([(), (Subscription("orders.*"),), (Subscription("x.>", "g"),)]))
        record = NodeRecord(node, "svc", (f"inproc://{node}",), subs, rec_inc, rec_started)
    by = draw(st.sampled_from(["", "a", "b"])) if status == SUSPECT else ""
    return Entry(node, started, incarnation, status, record, by)


@given(entries("a"), entries("a"))
def test_merge_is_commutative(x: Entry, y: Entry) -> None:
    assert merge(x, y) == merge(y, x)


@given(entries("a"), entries("a"), entries("a"))
def test_merge_is_associative(x: Entry, y: Entry, z: Entry) -> None:
    assert merge(merge(x, y), z) == merge(x, merge(y, z))


@given(entries("a"), entries("a"))
def test_merge_is_idempotent_and_absorbs(x: Entry, y: Entry) -> None:
    assert merge(x, x) == x
    m = merge(x, y)
    assert merge(m, x) == m and merge(m, y) == m


@given(entries("a"), entries("a"))
def test_merge_keeps_the_greater_claim_and_the_newest_record(x: Entry, y: Entry) -> None:
    m = merge(x, y)
    assert m.key == max(x.key, y.key)
    records = [r for r in (x.record, y.record) if r is not None]
    if records:
        assert m.record is not None and m.record.key == max(r.key for r in records)
    else:
        assert m.record is None


tables = st.lists(entries(), max_size=6).map(lambda es: {e.node: e for e in es})


@given(tables, tables, tables)
def test_table_merge_is_a_semilattice(x: dict[str, Entry], y: dict[str, Entry], z: dict[str, Entry]) -> None:
    assert merge_tables(x, y) == merge_tables(y, x)
    assert merge_tables(merge_tables(x, y), z) == merge_tables(x, merge_tables(y, z))
    assert merge_tables(x, x) == x


@given(st.lists(entries(), max_size=12), st.randoms())
def test_any_delivery_order_and_repetition_converges(claims: list[Entry], rnd: random.Random) -> None:
    """Two nodes hearing the same claims in different orders, some twice, end with equal tables."""
    shuffled = claims + rnd.sample(claims, len(claims) // 2)
    rnd.shuffle(shuffled)
    one: dict[str, Entry] = {}
    two: dict[str, Entry] = {}
    for e in claims:
        one = merge_tables(one, {e.node: e})
    for e in shuffled:
        two = merge_tables(two, {e.node: e})
    assert one == two
    assert table_hash(one.values()) == table_hash(two.values())


def test_a_suspicion_beats_alive_at_the_same_incarnation_and_a_refutation_beats_it() -> None:
    rec = NodeRecord("a", "svc", ("inproc://a",), (), 3, 1.0)
    alive = claim(rec)
    suspect = Entry("a", 1.0, 3, SUSPECT, None, "b")
    assert merge(alive, suspect).status == SUSPECT
    assert merge(alive, suspect).record == rec  # the record stays known
    refuted = claim(NodeRecord("a", "svc", ("inproc://a",), (), 4, 1.0))
    assert merge(merge(alive, suspect), refuted) == refuted
    assert merge(refuted, Entry("a", 1.0, 3, DEAD)).status == ALIVE  # a stale death loses
    assert merge(refuted, Entry("a", 1.0, 4, DEAD)).status == DEAD


def test_a_later_life_beats_any_claim_about_an_earlier_one() -> None:
    old_left = Entry("a", 1.0, 99, LEFT)
    new = claim(NodeRecord("a", "svc", ("inproc://a",), (), 0, 2.0))
    assert merge(old_left, new) == new


def test_a_removed_subscription_cannot_come_back() -> None:
    with_sub = claim(NodeRecord("a", "svc", ("inproc://a",), (Subscription("orders.*"),), 1, 1.0))
    without = claim(NodeRecord("a", "svc", ("inproc://a",), (), 2, 1.0))
    for order in ((with_sub, without), (without, with_sub)):
        merged = merge(*order)
        assert merged.record is not None and merged.record.subscriptions == ()


def test_equal_versions_with_different_content_pick_the_same_record_everywhere() -> None:
    one = NodeRecord("a", "svc", ("inproc://a",), (Subscription("x"),), 1, 1.0)
    two = NodeRecord("a", "svc", ("inproc://a",), (Subscription("y"),), 1, 1.0)
    assert merge(claim(one), claim(two)) == merge(claim(two), claim(one))


def test_merging_claims_about_different_nodes_is_a_bug() -> None:
    with pytest.raises(ValueError, match="different nodes"):
        merge(Entry("a", 1.0, 0, ALIVE), Entry("b", 1.0, 0, ALIVE))


def test_the_table_hash_ignores_order_and_records() -> None:
    a = Entry("a", 1.0, 2, ALIVE)
    b = Entry("b", 1.0, 0, DEAD)
    assert table_hash([a, b]) == table_hash([b, a]) == entry_hash(a) ^ entry_hash(b)
    assert table_hash([a]) != table_hash([Entry("a", 1.0, 2, SUSPECT)])
