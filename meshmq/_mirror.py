"""Taps, both sides, on the agent's loop: mirroring what this agent publishes (and what
happens to it) to the taps of the mesh, and :class:`Tap`, what ``agent.tap()`` returns.

Mirroring stays off the data path. A publish that matches no tap costs one dict lookup
(cached per topic); one that does costs an append to that tap's bounded queue
(:class:`meshmq._tap.MirrorQueue`). A timer flushes the queues as sealed TAP frames
sent without blocking: a tap whose socket is full loses that batch, counted and
reported to it with the next one. So a slow or stalled tap never slows producers or
consumers; it sees a notice of what it missed instead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

from ._errors import UsageError
from ._tap import (
    CONTROL_EVENTS, DELIVERY_EVENTS, LOST, MAX_IDS_PER_EVENT, MESSAGE, STATS, MirrorQueue, TapEvent, event_item,
    message_item, range_item,
)
from ._topics import matches
from ._wire import Limits, decode_envelope, encode_envelope

log = logging.getLogger("meshmq.tap")

FLUSH_ITEMS = 512
"""Most items one TAP frame carries."""


class TapRoute:
    """A tap of the mesh this agent mirrors to: its patterns, what its certificate lets it
    read, and the items waiting for it."""

    __slots__ = ("node", "patterns", "events", "may_read", "queue", "stalled")

    def __init__(self, node: str, patterns: tuple[tuple[str, ...], ...], events: frozenset[str],
                 may_read: Callable[[str], bool], limit: int) -> None:
        self.node = node
        self.patterns = patterns
        self.events = events
        self.may_read = may_read
        self.queue = MirrorQueue(limit)
        self.stalled = False
        """Its socket refused the last frame: what comes for it is only counted (as lost) until
        a frame gets through again, so a stalled tap costs a publisher next to nothing."""

    def offer(self, item: list[Any]) -> None:
        if self.stalled:
            self.queue.lost += 1
        else:
            self.queue.push(item)

    def wants(self, topic: str) -> bool:
        return any(matches(p, topic) for p in self.patterns)


class Mirror:
    """The sending side: which taps want what, their queues, and the flush timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Any,
                 send: Callable[[str, int, list[Any]], bool]) -> None:
        self.loop = loop
        self.config = config
        self._send = send  # (tap node, lost, items) -> whether it left
        self.routes: dict[str, TapRoute] = {}
        self._by_topic: dict[str, tuple[TapRoute, ...]] = {}
        # What was published since the last flush: (topic, envelope, destinations (a node or a
        # list), lane), sorted out per tap when flushed, so that a publish pays one append and
        # nothing more.
        self._published: collections.deque[tuple[str, bytes, Any, int]] = collections.deque()
        self._unsorted_lost = 0
        self._saturated = False  # every tap stalled or full: publishes are only counted until a flush
        self._timer: asyncio.TimerHandle | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    def __bool__(self) -> bool:
        return bool(self.routes)

    def set_routes(self, taps: Mapping[str, tuple[tuple[tuple[str, ...], ...], frozenset[str],
                                                   Callable[[str], bool]]]) -> None:
        """The taps of the mesh now: node -> (patterns as tokens, delivery events it wants,
        may it read a topic)."""
        kept = {}
        for node, (patterns, events, may_read) in taps.items():
            route = self.routes.get(node)
            if route is None or route.patterns != patterns:
                route = TapRoute(node, patterns, events, may_read, self.config.tap_queue_messages)
            route.events = events
            route.may_read = may_read
            kept[node] = route
        self.routes = kept
        self._by_topic = {}
        self._saturated = False

    @property
    def wanted_kinds(self) -> frozenset[str]:
        """Every kind of event some tap wants."""
        return frozenset().union(*(route.events for route in self.routes.values()))

    def wants(self, kinds: Iterable[str]) -> bool:
        """Whether some tap wants any of these delivery events."""
        return any(not route.events.isdisjoint(kinds) for route in self.routes.values())

    def _for_topic(self, topic: str) -> tuple[TapRoute, ...]:
        routes = self._by_topic.get(topic)
        if routes is None:
            routes = tuple(r for r in self.routes.values() if r.wants(topic))
            if len(self._by_topic) >= 4096:
                self._by_topic = {}
            self._by_topic[topic] = routes
        return routes

    def message(self, topic: str, env: bytes, destinations: str | list[str], lane: int = 1) -> None:
        """A message this agent published, to ``destinations`` (a node, or a list) in priority
        ``lane``: the hot path, one bounded append; :meth:`flush` sorts it out per tap."""
        if self._saturated:  # every tap is stalled or full: count, and do nothing else
            self._unsorted_lost += 1
        else:
            published = self._published
            if len(published) >= self.config.tap_queue_messages:
                published.popleft()
                self._unsorted_lost += 1
            published.append((topic, env, destinations, lane))
        if self._timer is None:
            self._timer = self.loop.call_later(self.config.tap_flush_interval, self.flush)

    def _sort(self) -> None:
        """Hand what was published since the last flush to the queues of the taps that watch it."""
        published, self._published = self._published, collections.deque()
        lost, self._unsorted_lost = self._unsorted_lost, 0
        if lost:
            for route in self.routes.values():  # which taps would have wanted them is not known
                route.queue.lost += lost
        for topic, env, destinations, lane in published:
            routes = self._for_topic(topic)
            if routes:
                item = message_item(0.0, topic, env, [destinations] if type(destinations) is str else destinations,
                                    lane)
                for route in routes:
                    route.offer(item)
        self._saturated = bool(self.routes) and all(
            r.stalled or len(r.queue) >= r.queue.limit for r in self.routes.values())

    def event(self, kind: str, messages: list[tuple[str, bytes]], peer: str | None, detail: str | None = None) -> None:
        """A delivery event about ``messages`` ((topic, id) pairs), for the taps of each topic."""
        if self._published:
            self._sort()  # a tap sees a message before what happened to it
        by_topic: dict[str, list[bytes]] = {}
        for topic, mid in messages:
            by_topic.setdefault(topic, []).append(mid)
        at = time.time()
        pushed = False
        for topic, ids in by_topic.items():
            routes = tuple(r for r in self._for_topic(topic) if kind in r.events)
            if routes:
                for start in range(0, len(ids), MAX_IDS_PER_EVENT):
                    item = event_item(kind, at, topic, ids[start:start + MAX_IDS_PER_EVENT], peer, detail)
                    for route in routes:
                        route.offer(item)
                pushed = True
        if pushed:
            self._schedule()

    def journey(self, kind: str, peer: str, first: bytes, last: bytes, count: int, lane: int = 1) -> None:
        """``count`` messages, ``first``..``last`` (ids) of the stream to ``peer`` in ``lane``, were sent,
        sent again or acknowledged: one item, whatever ``count``; the tap maps it back to the
        messages it saw published (:class:`meshmq._tap.Journeys`)."""
        if self._published:
            self._sort()  # a tap sees a message before what happened to it
        self._to_taps_wanting(kind, range_item(kind, time.time(), peer, first, last, count, lane))

    def notice(self, kind: str, peer: str | None, detail: str) -> None:
        """An event about no message in particular (an outbox warning), for the taps that want it."""
        self._to_taps_wanting(kind, event_item(kind, time.time(), "", [], peer, detail))

    def stats(self, figures: dict[str, float]) -> None:
        """This agent's figures, for the taps that asked for them."""
        self._to_taps_wanting(STATS, [STATS, time.time(), figures])

    def _to_taps_wanting(self, kind: str, item: list[Any]) -> None:
        """``item`` for every tap that asked for ``kind``, whatever its patterns."""
        pushed = False
        for route in self.routes.values():
            if kind in route.events:
                route.offer(item)
                pushed = True
        if pushed:
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.config.tap_flush_interval, self.flush)

    def flush(self) -> None:
        """Send what waits for every tap, a frame's worth at a time."""
        self._timer = None
        self._sort()
        self._saturated = False  # decided again by the next sort, after this flush drained what it could
        for route in self.routes.values():
            if route.stalled:  # a frame with no items, to tell what was lost: does it get through now?
                if not self._send(route.node, route.queue.lost, []):
                    continue
                route.queue.lost = 0
                route.stalled = False
            while route.queue:
                items, lost = route.queue.take(FLUSH_ITEMS)
                shown = [_for_tap(item, route) for item in items]
                if not self._send(route.node, lost, shown):
                    route.queue.lost += len(items) + lost  # told with the next frame that leaves
                    self.counters["tap_items_unsent"] += len(items)
                    route.stalled = True
                    break
                self.counters["tap_items_sent"] += len(items)
        if any(route.stalled and route.queue.lost for route in self.routes.values()):
            self._schedule()  # keep trying, at the flush interval

    def close(self) -> None:
        self._published.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _for_tap(item: list[Any], route: TapRoute) -> list[Any]:
    """An item as it travels to ``route``'s tap: a message's payload only if the tap's
    certificate lets it subscribe to the message's topic."""
    if item[0] != MESSAGE:
        return item
    _, at, topic, env, dests, lane = item
    if route.may_read(topic):
        return [MESSAGE, at, env, dests, True, 0, lane]
    msg = decode_envelope(env, _LIMITS)
    stripped = encode_envelope(msg._id, msg.timestamp, msg.topic, msg.type, msg.source, msg.node,
                               msg.schema_version, msg.headers or None, msg.key, msg._format, b"")
    return [MESSAGE, at, stripped, dests, False, len(msg.raw), lane]


_LIMITS = Limits()


# --- the tap's side -------------------------------------------------------------------------


class Tap:
    """What a tap sees (:meth:`AsyncAgent.tap`): :class:`meshmq.TapEvent` objects, in the
    order they arrive. Iterate it (``async for``, or ``for`` on the blocking Agent) or call
    :meth:`get`; :meth:`close` stops it. When the reader falls more than
    ``tap_buffer_messages`` behind, newer events are dropped and a ``lost`` event says
    how many, as do the agents that mirror to it when it falls behind them."""

    def __init__(self, patterns: tuple[str, ...], limit: int, on_close: Callable[[Tap], None],
                 threaded: bool, events: frozenset[str] = frozenset(DELIVERY_EVENTS + CONTROL_EVENTS)) -> None:
        self.patterns = patterns
        self.events = events
        """The delivery events wanted besides the messages."""
        self._tokens = tuple(tuple(p.split(".")) for p in patterns)
        self.closed = False
        self._limit = limit
        self._buffer: collections.deque[TapEvent] = collections.deque()
        self._dropped = 0
        self._on_close = on_close
        self._waiter: asyncio.Future[None] | None = None
        self._cond = threading.Condition() if threaded else None
        self.counters: collections.Counter[str] = collections.Counter()

    def wants(self, topic: str) -> bool:
        return any(matches(p, topic) for p in self._tokens)

    def _push(self, event: TapEvent) -> None:
        """Loop thread: one event for the reader."""
        if self.closed:
            return
        if self._cond is not None:
            with self._cond:
                self._append(event)
                self._cond.notify()
        else:
            self._append(event)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _append(self, event: TapEvent) -> None:
        if len(self._buffer) >= self._limit:
            self._dropped += 1
            self.counters["events_dropped"] += 1
            return
        notice = self._lost_notice()
        if notice is not None:
            self._buffer.append(notice)
        self._buffer.append(event)
        self.counters["events"] += 1

    def __aiter__(self) -> AsyncIterator[TapEvent]:
        if self._cond is not None:
            raise UsageError("a tap of the blocking Agent is iterated with 'for', or read with get()")
        return self

    async def __anext__(self) -> TapEvent:
        while not self._buffer:
            notice = self._lost_notice()
            if notice is not None:
                return notice
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._buffer.popleft()

    def _lost_notice(self) -> TapEvent | None:
        """With the buffer read to its end: how many events did not fit in it, if any."""
        if not self._dropped:
            return None
        notice = TapEvent(LOST, time.time(), "", "", count=self._dropped,
                          detail="this tap's reader fell behind (tap_buffer_messages)")
        self._dropped = 0
        return notice

    def __iter__(self) -> Iterator[TapEvent]:
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def get(self, timeout: float | None = None) -> TapEvent | None:
        """Blocking Agent: the next event, or None when closed or after ``timeout`` seconds."""
        if self._cond is None:
            raise UsageError("get() is for taps of the blocking Agent; use 'async for' on AsyncAgent")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._buffer:
                notice = self._lost_notice()
                if notice is not None:
                    return notice
                if self.closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._buffer.popleft()

    def close(self) -> None:
        """Stop: this node stops being a tap (when it was its last one); the reader gets what
        arrived before, then the end."""
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        if self._cond is not None:
            with self._cond:
                self._cond.notify_all()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __repr__(self) -> str:
        return f"<Tap {' '.join(self.patterns)}{' closed' if self.closed else ''}>"


__all__ = ["DELIVERY_EVENTS", "Mirror", "Tap"]
