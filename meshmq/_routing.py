"""The routing table: which nodes receive a topic. Pure, no I/O.

The table holds one :class:`NodeRecord` per known node (this node's own
included). Lookups go through a :class:`RouteIndex`, an immutable snapshot
rebuilt whenever a record changes; publishing threads may use a snapshot
without locks while the agent's loop replaces it.

Invariants:
- a :class:`Route` lists every node with a plain subscription matching the
  topic once, and every queue group matching it once with all its members;
- a node that is both a plain subscriber and a group member appears in both.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ._records import newer_record
from ._topics import matches
from ._wire import NodeRecord

_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class QueueGroup:
    """The members (node ids, sorted) of one queue group for a topic."""

    name: str
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Route:
    """Who receives one topic: plain subscribers and queue groups."""

    plain: tuple[str, ...]
    groups: tuple[QueueGroup, ...]

    @property
    def empty(self) -> bool:
        return not self.plain and not self.groups


_NO_ROUTE = Route((), ())


def rendezvous(members: tuple[str, ...], key: str) -> str:
    """The member that owns ``key`` by highest-random-weight hashing.

    Deterministic across processes (unlike ``hash``), so every publisher sends a
    key to the same member; when a member joins or leaves only the keys it wins
    or held move.
    """
    best, best_w = members[0], b""
    kb = key.encode()
    for m in members:
        w = hashlib.blake2b(kb + b"\x00" + m.encode(), digest_size=8).digest()
        if w > best_w:
            best, best_w = m, w
    return best


class RouteIndex:
    """Immutable snapshot of all subscriptions, with a bounded per-topic cache."""

    __slots__ = ("_entries", "_cache", "_turns")

    def __init__(self, entries: Iterable[tuple[tuple[str, ...], str, str | None]]) -> None:
        self._entries = tuple(entries)  # (pattern tokens, node, group or None)
        self._cache: dict[str, Route] = {}
        self._turns: dict[str, itertools.count[int]] = {}  # one turn counter per queue group

    def resolve(self, topic: str) -> Route:
        """The route for a checked topic."""
        route = self._cache.get(topic)
        if route is None:
            route = self._compute(topic)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = route
        return route

    def _compute(self, topic: str) -> Route:
        plain: dict[str, None] = {}
        groups: dict[str, set[str]] = {}
        for tokens, node, group in self._entries:
            if matches(tokens, topic):
                if group is None:
                    plain[node] = None
                else:
                    groups.setdefault(group, set()).add(node)
        if not plain and not groups:
            return _NO_ROUTE
        return Route(
            tuple(plain),
            tuple(QueueGroup(name, tuple(sorted(members))) for name, members in sorted(groups.items())),
        )

    def choose(self, group: QueueGroup, key: str | None, load: Callable[[str], int] | None = None) -> str:
        """The member of ``group`` that gets one message.

        With a key, the member that owns it (rendezvous hashing). Otherwise, with
        ``load`` (a member's outstanding work, as the publisher knows it), the least
        loaded member, ties taken in turn; without it, members in turn.
        """
        members = group.members
        if len(members) == 1:
            return members[0]
        if key is not None:
            return rendezvous(members, key)
        turn = self._turns.get(group.name)
        if turn is None:
            turn = self._turns.setdefault(group.name, itertools.count())
        start = next(turn) % len(members)
        if load is None:
            return members[start]
        best, best_load = members[start], load(members[start])
        for i in range(1, len(members)):
            member = members[(start + i) % len(members)]
            work = load(member)
            if work < best_load:
                best, best_load = member, work
        return best

    def destinations(self, topic: str, key: str | None,
                     load: Callable[[str], int] | None = None) -> dict[str, tuple[str, ...]]:
        """node id → the queue groups it serves for this message (``()`` for plain only)."""
        route = self.resolve(topic)
        out: dict[str, tuple[str, ...]] = dict.fromkeys(route.plain, ())
        for group in route.groups:
            node = self.choose(group, key, load)
            out[node] = out.get(node, ()) + (group.name,)
        return out


class RoutingTable:
    """Records of every known node, and the index built from them.

    The index is rebuilt lazily, on the first read after a change, so that learning
    many records at once (a node joining a large mesh) costs one rebuild, not one each.
    """

    def __init__(self, local: NodeRecord) -> None:
        self.local = local
        self.records: dict[str, NodeRecord] = {}
        self._index = RouteIndex(())
        self._dirty = True
        self.tap_version = 0
        """Grows whenever a node's tap patterns or tap events change (taps are not in the index)."""

    @property
    def index(self) -> RouteIndex:
        if self._dirty:
            self._rebuild()
        return self._index

    def set_local(self, record: NodeRecord) -> None:
        self.local = record
        self._dirty = True

    def update(self, record: NodeRecord) -> bool:
        """Take a peer's record if it is new or newer; return whether it was taken. Of two
        different records of one version (a node that equivocates) the one the membership
        merge keeps wins here too (:func:`~meshmq._records.newer_record`), so that routes
        follow the merge whatever order they came in."""
        known = self.records.get(record.node)
        if known is not None and (known == record or newer_record(known, record) is known):
            return False
        self.records[record.node] = record
        if (known.subscriptions if known is not None else ()) != record.subscriptions:
            self._dirty = True
        if known is None or (known.taps, known.tap_events) != (record.taps, record.tap_events):
            self.tap_version += 1
        return True

    def remove(self, node: str) -> NodeRecord | None:
        record = self.records.pop(node, None)
        if record is not None and record.subscriptions:
            self._dirty = True
        if record is not None and record.taps:
            self.tap_version += 1
        return record

    def _rebuild(self) -> None:
        entries = []
        for record in itertools.chain((self.local,), self.records.values()):
            for sub in record.subscriptions:
                # Patterns were checked against this node's limits when they arrived (or were made).
                entries.append((tuple(sub.pattern.split(".")), record.node, sub.group))
        self._index = RouteIndex(entries)
        self._dirty = False
