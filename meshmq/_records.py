"""The membership lattice: how claims about a node combine. Pure functions, no state.

Every node keeps one :class:`~meshmq._wire.Entry` per node it has heard of. Two
entries about one node merge into the greater claim, componentwise:

- the status claim, ordered by ``(started, incarnation, status)``: a later life
  beats everything said about an earlier one; within a life a higher incarnation
  beats a lower one (the owner bumps it to refute a rumour or to change its
  record); at one incarnation ``alive < suspect < dead < left``, so a suspicion
  stands until the owner refutes it with a new incarnation (SWIM's rule);
- the record, ordered by ``(started, incarnation)`` and, only for two different
  records claiming the same version (a bug or a forgery), by their encoded bytes,
  so that every node still picks the same one.

Both orders are total and the merge takes the maximum of each, so it is
commutative, associative and idempotent (a join semilattice): nodes may hear
claims in any order, any number of times, from anyone, and still agree. A
removed subscription needs no tombstone of its own: the record that dropped it
has a higher incarnation and shadows the older one. A departed node's entry is
its tombstone; dropping expired tombstones is local housekeeping outside the
merge (see :class:`~meshmq._node.Node`).

``by`` (who suspected) travels with suspect entries for Lifeguard's confirmation
count; it is not part of the order and, between equal claims, the smaller name
is kept so the merge stays deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import msgpack

from ._wire import ALIVE, Entry, NodeRecord


def record_order(record: NodeRecord) -> tuple[float, int, bytes]:
    return (record.started, record.incarnation, msgpack.packb(record.to_wire(), use_bin_type=True))


def newer_record(a: NodeRecord | None, b: NodeRecord | None) -> NodeRecord | None:
    if a is None or a == b:
        return b
    if b is None:
        return a
    if a.key != b.key:
        return a if a.key > b.key else b
    return a if record_order(a) > record_order(b) else b


def claim(record: NodeRecord) -> Entry:
    """The owner's own claim: its record, alive at the record's version."""
    return Entry(record.node, record.started, record.incarnation, ALIVE, record)


def merge(a: Entry, b: Entry) -> Entry:
    """The join of two entries about the same node."""
    if a.node != b.node:
        raise ValueError(f"cannot merge entries about different nodes ({a.node!r}, {b.node!r})")
    record = newer_record(a.record, b.record)
    if a.key != b.key:
        top = a if a.key > b.key else b
        by = top.by
    else:
        top, by = a, min(a.by, b.by) if a.by and b.by else (a.by or b.by)
    if top.record is record and top.by == by:
        return top
    return Entry(top.node, top.started, top.incarnation, top.status, record, by)


def merge_tables(a: Mapping[str, Entry], b: Mapping[str, Entry]) -> dict[str, Entry]:
    """The join of two whole tables (node id -> entry): the union, merging shared nodes."""
    out = dict(a)
    for node, entry in b.items():
        mine = out.get(node)
        out[node] = entry if mine is None else merge(mine, entry)
    return out


def entry_hash(entry: Entry) -> int:
    """A 64-bit hash of an entry's claim, for the order-independent table digest."""
    h = hashlib.blake2b(f"{entry.node}\0{entry.started!r}\0{entry.incarnation}\0{entry.status}".encode(),
                        digest_size=8)
    return int.from_bytes(h.digest(), "big")


def table_hash(entries: Iterable[Entry]) -> int:
    """XOR of :func:`entry_hash` over a table: two nodes whose claims agree have equal hashes,
    and a node keeps its own up to date in O(1) per change."""
    out = 0
    for e in entries:
        out ^= entry_hash(e)
    return out
