"""What a tap sees: the mirror of the traffic and of delivery events. Pure: no I/O, no
clock (times are arguments).

A tap is a node whose record names the topic patterns it watches. Every agent
mirrors to it, off the data path: what it publishes on those topics, and what
happens to those messages (sent, acknowledged, sent again, expired, failed in a
handler, dead-lettered, rejected). Mirroring never waits: items go into a bounded queue per tap
(:class:`MirrorQueue`), flushed on the agent's timer; when a tap falls behind, the
oldest items give way and the tap is told how many it did not get.

Items travel as msgpack lists, sealed to the tap like data frames. Whether the
payload travels too is decided per item by the sender, from the tap's certificate:
only for topics the tap may subscribe to.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable, Iterator
from typing import Any

from ._errors import ProtocolError
from ._wire import LANES

MESSAGE = "message"
SENT = "sent"
ACKED = "acked"
RETRIED = "retried"
EXPIRED = "expired"
FAILED = "failed"
"""A handler raised or nacked a message; the detail says which attempt, why, and when the
next one comes (after the last, ``dead-lettered`` follows instead)."""
DEAD_LETTERED = "dead-lettered"
REJECTED = "rejected"
LOST = "lost"
LIMITED = "limited"
"""A policy's rate limit delayed, refused or dead-lettered a publish."""
REROUTED = "rerouted"
"""A policy's content rule also sent a message to another topic (``peer`` names it)."""
DELIVERY_EVENTS = (SENT, ACKED, RETRIED, EXPIRED, FAILED, DEAD_LETTERED, REJECTED, LIMITED, REROUTED)
JOINED, LEFT, SUSPECTED, DEAD, REPLACED, REVOKED, ROUTES = (
    "joined", "left", "suspected", "dead", "replaced", "revoked", "routes")
REVOCATION = "revocation"
"""The tap's agent learnt a revocation from the mesh authority (of a node or a certificate)."""
OUTBOX_WARNING = "outbox-warning"
"""An agent's outbox (or its share for one destination) passed half, or nine tenths, of its limit."""
POLICY_CHANGE = "policy"
"""The tap's agent put a new version of the mesh's policy in force."""
SCHEMA_CHANGE = "schema"
"""The tap's agent took a schema pushed to the mesh (a new type or version, or a later body)."""
BREAKER = "breaker"
"""A publisher's circuit breaker for a destination opened, let a probe through (half-open) or
closed (``peer`` names the destination; the detail says how many messages wait for it)."""
CONTROL_EVENTS = (JOINED, LEFT, SUSPECTED, DEAD, REPLACED, REVOKED, ROUTES, REVOCATION, POLICY_CHANGE, SCHEMA_CHANGE,
                  OUTBOX_WARNING, BREAKER)
"""What the tap's own agent sees of the mesh (a node joined, left, was suspected, declared
dead, replaced by a new life, revoked; the routes changed; a revocation, a policy or a schema
arrived), and outbox warnings and circuit breakers, which the agents that publish report."""
STATS = "stats"
"""An agent's figures, sent to the taps that ask every ``tap_stats_interval`` (for ``meshmq top``)."""
STAT_FIELDS = ("published", "received", "outbox_messages", "outbox_bytes", "dead_letters", "retried",
               "latency_p50", "latency_p99")
KINDS = (MESSAGE, *DELIVERY_EVENTS, *CONTROL_EVENTS, STATS, LOST)
MAX_IDS_PER_EVENT = 4096
MAX_DESTINATIONS = 4096
_ID_BYTES = 16


def envelope_head(env: bytes) -> tuple[str, bytes] | None:
    """(topic, message id) of envelope bytes without decoding them all: an envelope is a
    msgpack array of 12 starting version 1, the 16-byte id, a float timestamp and the
    topic (``9c 01 c4 10 <id> cb <8 bytes> <str>``). None if it is not laid out so."""
    if env[:4] != b"\x9c\x01\xc4\x10" or len(env) < 31 or env[20] != 0xCB:
        return None
    head = env[29]
    if 0xA0 <= head <= 0xBF:
        start, length = 30, head - 0xA0
    elif head == 0xD9:
        start, length = 31, env[30]
    else:
        return None
    try:
        return env[start:start + length].decode(), env[4:20]
    except UnicodeDecodeError:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class TapEvent:
    """One thing a tap saw.

    ``kind`` is ``message`` (a message was published: its header, its destinations, and
    its payload if the tap may read it) or a delivery event naming the messages it is
    about: ``sent``, ``acked``, ``retried``, ``expired``, ``failed``, ``dead-lettered``,
    ``rejected``; or a control event the tap's own agent saw (``joined``, ``left``,
    ``dead``, ``replaced``, ``revoked``, ``routes``: ``peer`` is the node concerned); or
    ``lost``: ``count`` items the tap fell too far behind to be shown.
    ``node`` and ``service`` say which agent reported it; ``peer`` is the other end (the
    destination, or for ``rejected`` the sender).
    """

    kind: str
    at: float
    """When it happened (seconds since the epoch, the reporting agent's clock)."""
    node: str
    service: str
    ids: tuple[str, ...] = ()
    """Message ids (hex) the event is about (one for ``message``)."""
    peer: str | None = None
    peer_service: str | None = None
    topic: str | None = None
    type: str | None = None
    source: str | None = None
    destinations: tuple[str, ...] = ()
    """For ``message``: the services it was sent to (node ids where unknown)."""
    size: int | None = None
    headers: dict[str, str] | None = None
    raw: bytes | None = None
    """The payload, when the tap's certificate lets it read this topic (else None)."""
    format: int | None = None
    detail: str | None = None
    """Why, for ``expired``, ``dead-lettered`` and ``rejected``."""
    count: int | None = None
    """For ``lost``: how many items were not shown."""
    stats: dict[str, float] | None = None
    """For ``stats``: the reporting agent's figures (see :data:`STAT_FIELDS`)."""

    @property
    def data(self) -> Any:
        """The payload decoded as its publisher sent it (bytes stay bytes); None if not shown."""
        if self.raw is None:
            return None
        if self.format == 1:
            import msgpack

            return msgpack.unpackb(self.raw, raw=False, strict_map_key=False)
        return self.raw

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` line and the ``--record`` file format)."""
        out: dict[str, Any] = {"kind": self.kind, "at": self.at, "node": self.node, "service": self.service}
        for name in ("ids", "peer", "peer_service", "topic", "type", "source", "destinations", "size", "headers",
                     "format", "detail", "count", "stats"):
            value = getattr(self, name)
            if value is not None and value != ():
                out[name] = list(value) if isinstance(value, tuple) else value
        if self.raw is not None:
            if self.format == 1:
                try:
                    out["data"] = _jsonable(self.data)
                except (ValueError, TypeError):
                    pass
            out["raw_hex"] = self.raw.hex()
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TapEvent:
        """The event of a :meth:`to_json` dict; ValueError naming what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("a tap event is a JSON object")
        try:
            kind, at, node, service = obj["kind"], obj["at"], obj["node"], obj["service"]
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]!r}") from None
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if not isinstance(at, (int, float)) or not isinstance(node, str) or not isinstance(service, str):
            raise ValueError("at must be a number, node and service strings")
        raw = obj.get("raw_hex")
        try:
            payload = bytes.fromhex(raw) if isinstance(raw, str) else None
        except ValueError:
            raise ValueError("raw_hex is not hex") from None
        headers = obj.get("headers")
        if headers is not None and not (isinstance(headers, dict)
                                        and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise ValueError("headers must map strings to strings")
        fields: dict[str, Any] = {}
        for name, kinds in (("peer", str), ("peer_service", str), ("topic", str), ("type", str), ("source", str),
                            ("size", int), ("format", int), ("detail", str), ("count", int)):
            value = obj.get(name)
            if value is not None and not isinstance(value, kinds):
                raise ValueError(f"{name} has the wrong type")
            fields[name] = value
        lists: dict[str, Any] = {}
        for name in ("ids", "destinations"):
            value = obj.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings")
            lists[name] = tuple(value)
        stats = obj.get("stats")
        if stats is not None and not (isinstance(stats, dict) and all(
                isinstance(k, str) and isinstance(v, (int, float)) for k, v in stats.items())):
            raise ValueError("stats must map names to numbers")
        return cls(kind, float(at), node, service, headers=headers, raw=payload, stats=stats, **lists, **fields)


def _jsonable(value: Any) -> Any:
    """msgpack values as JSON can carry them: bytes as hex strings, keys as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    json.dumps(value)  # raises for what JSON cannot hold (nan is allowed by Python's json)
    return value


# --- the sender's side ---------------------------------------------------------------------


class MirrorQueue:
    """Items waiting to be mirrored to one tap, at most ``limit``: when full, the oldest
    give way and are counted (:attr:`lost`), so a tap that falls behind never slows
    the agent down and is told what it missed."""

    __slots__ = ("items", "limit", "lost")

    def __init__(self, limit: int) -> None:
        self.items: collections.deque[list[Any]] = collections.deque()
        self.limit = limit
        self.lost = 0

    def push(self, item: list[Any]) -> None:
        if len(self.items) >= self.limit:
            self.items.popleft()
            self.lost += 1
        self.items.append(item)

    def take(self, most: int) -> tuple[list[list[Any]], int]:
        """Up to ``most`` items, oldest first, and how many were lost since the last take."""
        n = min(most, len(self.items))
        taken = [self.items.popleft() for _ in range(n)]
        lost, self.lost = self.lost, 0
        return taken, lost

    def __len__(self) -> int:
        return len(self.items)


def message_item(at: float, topic: str, env: bytes, destinations: list[str], lane: int = 1) -> list[Any]:
    """A published message, as the sender queues it (whether its payload goes to a tap is
    decided per tap when it is flushed). ``at`` 0.0: when it was published (its timestamp).
    ``lane``: the priority lane whose streams carry it (the tap follows each stream apart)."""
    return [MESSAGE, at, topic, env, destinations, lane]


def event_item(kind: str, at: float, topic: str, ids: Iterable[bytes], peer: str | None,
               detail: str | None = None) -> list[Any]:
    ids = list(ids)
    assert len(ids) <= MAX_IDS_PER_EVENT  # the mirror splits longer lists
    return [kind, at, topic, ids, peer, detail]


# --- the tap's side ------------------------------------------------------------------------


RANGE = "range"
"""An item naming messages by the first and last of a run sent to one destination: how
``sent``, ``retried`` and ``acked`` travel, so that a sender pays per frame and per
receipt, not per message; the tap maps the run back to message ids (:class:`Journeys`)."""


def range_item(kind: str, at: float, peer: str, first: bytes, last: bytes, count: int, lane: int = 1) -> list[Any]:
    return [RANGE, kind, at, peer, first, last, count, lane]


class Journeys:
    """On a tap: for each stream (publisher, destination, priority lane), the ids published
    to it and not yet acknowledged, in the order published (which is the stream's order),
    with their topics; at most ``limit`` in all (the oldest give way)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._open: dict[tuple[str, str, int], collections.OrderedDict[str, str]] = {}
        self.limit = limit
        self.size = 0

    def published(self, node: str, message_id: str, topic: str, destinations: Iterable[str], lane: int = 1) -> None:
        for dest in destinations:
            run = self._open.setdefault((node, dest, lane), collections.OrderedDict())
            if message_id not in run:
                run[message_id] = topic
                self.size += 1
            if self.size > self.limit:
                run.popitem(last=False)
                self.size -= 1

    def between(self, node: str, dest: str, first: str, last: str, forget: bool, lane: int = 1) -> dict[str, list[str]]:
        """topic -> ids of the run ``first``..``last`` to ``dest``, found by position (the run
        is in stream order; ids of different lives of a node do not compare). ``forget``
        (acknowledged): they and every id before them are done. Nothing if ``last`` is not
        known (its message item was lost)."""
        run = self._open.get((node, dest, lane))
        found: dict[str, list[str]] = {}
        if not run or last not in run:
            return found
        inside = first not in run  # its message was acknowledged or lost: the run starts at the front
        done = []
        for message_id, topic in run.items():
            inside = inside or message_id == first
            if inside:
                found.setdefault(topic, []).append(message_id)
            done.append(message_id)
            if message_id == last:
                break
        if forget:
            for message_id in done:
                del run[message_id]
            self.size -= len(done)
            if not run:
                del self._open[(node, dest, lane)]
        return found

    def forget(self, node: str) -> None:
        for key in [k for k in self._open if node in k[:2]]:
            self.size -= len(self._open.pop(key))


def decode_items(items: Any, node: str, service: str, services: dict[str, str], limits: Any,
                 journeys: Journeys | None = None) -> Iterator[TapEvent]:
    """The events of a batch of mirrored items from ``node``; ProtocolError for a malformed one.
    ``journeys`` maps range items (sent, retried, acked) to the messages they are about."""
    from ._wire import decode_envelope

    if type(items) is not list:
        raise ProtocolError("tap items are not a list")
    for item in items:
        if type(item) is not list or not item or (item[0] not in KINDS and item[0] != RANGE):
            raise ProtocolError("bad tap item")
        kind = item[0]
        if kind == RANGE:
            if (len(item) != 8 or item[1] not in (SENT, RETRIED, ACKED) or type(item[2]) is not float
                    or type(item[3]) is not str or type(item[4]) is not bytes or type(item[5]) is not bytes
                    or len(item[4]) != _ID_BYTES or len(item[5]) != _ID_BYTES or type(item[6]) is not int
                    or type(item[7]) is not int or not 0 <= item[7] < LANES):
                raise ProtocolError("bad tap range item")
            run_kind, run_at, run_peer, run_first, run_last = item[1], item[2], item[3], item[4], item[5]
            if journeys is None:
                continue
            runs = journeys.between(node, run_peer, run_first.hex(), run_last.hex(), forget=run_kind == ACKED,
                                    lane=item[7])
            for run_topic, run_ids in runs.items():
                yield TapEvent(run_kind, run_at, node, service, ids=tuple(run_ids), peer=run_peer,
                               peer_service=services.get(run_peer), topic=run_topic)
            continue
        if kind == STATS:
            if len(item) != 3 or type(item[1]) is not float or type(item[2]) is not dict or len(item[2]) > 32:
                raise ProtocolError("bad tap stats item")
            figures = {k: float(v) for k, v in item[2].items()
                       if k in STAT_FIELDS and (type(v) is int or type(v) is float)}
            yield TapEvent(STATS, item[1], node, service, stats=figures)
            continue
        if kind == MESSAGE:
            if len(item) != 7:
                raise ProtocolError("bad tap message item")
            _, at, env, dests, shown, size, lane = item  # size: of the payload not shown
            if (type(env) is not bytes or type(dests) is not list or len(dests) > MAX_DESTINATIONS
                    or not all(type(d) is str for d in dests) or type(shown) is not bool or type(at) is not float
                    or type(size) is not int or size < 0 or type(lane) is not int or not 0 <= lane < LANES):
                raise ProtocolError("bad tap message item")
            msg = decode_envelope(env, limits)
            if journeys is not None:
                journeys.published(node, msg.id, msg.topic, dests, lane)
            yield TapEvent(MESSAGE, at or msg.timestamp, node, service, ids=(msg.id,), topic=msg.topic, type=msg.type,
                           source=msg.source, destinations=tuple(services.get(d) or d for d in dests),
                           size=len(msg.raw) if shown else size,
                           headers=msg.headers or None, raw=msg.raw if shown else None,
                           format=msg._format if shown else None)
        else:
            if len(item) != 6:
                raise ProtocolError("bad tap event item")
            _, at, topic, ids, peer, detail = item
            if (type(at) is not float or type(topic) is not str or len(topic) > limits.max_topic_length
                    or type(ids) is not list or len(ids) > MAX_IDS_PER_EVENT
                    or not all(type(i) is bytes and len(i) == _ID_BYTES for i in ids)
                    or (peer is not None and type(peer) is not str) or (detail is not None and type(detail) is not str)):
                raise ProtocolError("bad tap event item")
            yield TapEvent(kind, at, node, service, ids=tuple(i.hex() for i in ids), peer=peer,
                           peer_service=services.get(peer) if peer is not None else None, topic=topic or None,
                           detail=detail)
