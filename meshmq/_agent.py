"""The asyncio agent: one per service process. The I/O shell around the pure core.

It carries out what :class:`~meshmq._node.Node` decides (connect, send, drop a
peer), moves envelopes through the :class:`~meshmq._transport.Transport`, and
hands received messages to local subscriptions. Everything here runs on the
agent's event loop, except :meth:`AsyncAgent._enqueue`, which the blocking
:class:`~meshmq.Agent` calls from its own threads (it only touches thread-safe
links and an immutable route snapshot).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import inspect
import ipaddress
import itertools
import logging
import os
import queue
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import zmq

from ._config import MAX_TTL, Config
from ._discovery import Discovery
from ._delivery import NEVER, Destination, Entry, GroupCommit, Inbox, Lane, Outbox, Remembered
from ._errors import (
    AgentClosed, Backpressure, ConfigError, MeshError, MeshTimeout, NoResponders, NotPermitted, OutboxFull,
    PeerQueueFull, ProtocolError, RateLimited, RemoteError, RequestTimeout, SchemaError, StoreError,
    SubscriptionFull, UsageError,
)
from ._health import Health, WaitingFor, assess, envelope_time
from ._log import QuietLogger
from ._metrics import LatencyHistogram, MetricsServer, exposition, gauges_of
from . import _trace
from ._policy import Policy, PolicyError, TokenBucket, lane as priority_lane, load as load_policy
from ._registry import DISPLACED, FULL, NEW, REPLACED, SchemaDocument, SchemaRegistry
from ._schema import check_schema, validate as validate_schema
from ._message import FORMAT_BYTES, Message
from ._node import Connect, Disconnect, Node, PeerDown, PeerUp, Send, Suspected, Timing
from ._routing import RouteIndex
from ._mirror import Mirror, Tap
from ._seal import ForgedFrame, Signer, StoreCipher, open_data, open_tap, seal_data, seal_fields
from ._security import (
    KEY_FILE, NODE, Authority, Certificate, CertificateError, NodeKeys, Revocation, RevocationList, Rights, b64,
    check_policy_document, check_schema_document,
    check_certificate, curve_public_of, decode_certificate, home, load_or_create_key, node_id_of,
    parse_authorities, unarmor, unarmor_revocations, unb64, verify,
)
from ._store import Batch, Contents, Store, open_instance
from ._tap import (
    ACKED, BREAKER, CONTROL_EVENTS, DEAD_LETTERED, DELIVERY_EVENTS, EXPIRED, FAILED, JOINED, LEFT, LIMITED, LOST, OUTBOX_WARNING,
    REJECTED, RETRIED, REROUTED, REVOCATION, ROUTES, SCHEMA_CHANGE, SENT, STATS, SUSPECTED, Journeys, TapEvent,
    decode_items,
    envelope_head,
)
from ._topics import check_pattern, check_topic, check_user_topic, matches, reply_topic
from ._transport import Link, Transport, Wakeup
from ._wire import (
    DATA, MAX_FRAME_REVOCATIONS, MAX_FRAME_SCHEMAS, MAX_SCHEMA_FRAME_BYTES, PROTOCOL_VERSION, REVOKE_OPEN,
    REVOKE_PUSH, REVOKE_REPLY, SEALED, TAP, Hello, Limits, NodeRecord, OtherVersion, Ping, PolicyOffer, Receipt,
    Revocations, SchemaExchange, SchemaKey, Subscription as AdvertisedSubscription, Work, check_headers,
    policy_frame, schemas_frame,
    decode_data, decode_envelope, decode_frame, encode_envelope, encode_payload, revoke_frame, split_endpoint,
    split_entry, work_frame,
)

log = logging.getLogger("meshmq.agent")
quiet = QuietLogger(log)

SEND_NOW_WINDOW = 0.0002
"""Seconds after an immediate send during which further messages to the link are batched."""
DEV_CERT_VALIDITY = 30 * 86400.0
"""Seconds a certificate an agent issues itself from the development authority is valid."""
OUTBOX_TICK = 0.05
"""Seconds between two checks of the outbox for retransmissions and expired messages."""
SECURITY_TICK = 1.0
"""Seconds between two looks at the certificate, authority and revocation files (renewal and
rollover without a restart) and at the peers' certificates (expired or no longer trusted)."""
REVOCATION_SYNC_ROUNDS = 5
"""Gossip intervals between two comparisons of revocation lists with a random peer (new
revocations are pushed at once; this repairs what was lost)."""
REVOKED_LINGER = 0.5
"""Seconds a revoked peer's link stays open for the frame that tells it why it is cut off."""
_SCHEMA_META = "schema:"
"""Store meta keys of the schema documents kept: ``schema:TYPE:VERSION`` (one each, so taking
one document rewrites only its own, not every schema held)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
Handler = Callable[[Message], Any]


def _check_seconds(name: str, value: object, *, zero: bool = False) -> float:
    """A timeout argument: a positive number of seconds (or zero, where allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero):
        raise UsageError(f"{name} must be a {'non-negative' if zero else 'positive'} number of seconds, got {value!r}")
    return float(value)


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise UsageError(f"{kind} {value!r} must be 1-63 characters: letters, digits, '.', '-', '_'")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class PeerInfo:
    """A node this agent knows: what ``meshmq peers`` shows."""

    node: str
    service: str
    endpoint: str
    subscriptions: tuple[tuple[str, str | None], ...]
    last_seen: float
    """Seconds since the peer was last heard from."""
    clock_offset: float | None = None
    """The peer's wall clock minus ours, in seconds, from its last ping (None before one arrived)."""
    state: str = "alive"
    """``alive``; ``suspect`` (a probe went unanswered: declared dead unless it refutes in time);
    or, for departed peers, ``dead``, ``left``, ``replaced``, ``revoked`` (by the mesh authority)
    or ``untrusted`` (its certificate expired, or its authority is no longer trusted)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a handler could not take, or one the outbox could not deliver in time
    (``meshmq dlq`` shows the same)."""

    id: str
    reason: str
    """``handler failed`` (it raised every time), ``nacked`` (it asked for a retry every time) or
    ``expired`` (its time to live ran out: before a handler took it, or, with ``destination``
    set, before the destination acknowledged it)."""
    attempts: int
    error: str | None
    """The last exception, as ``Type: text``."""
    at: float
    """When it was dead-lettered (seconds since the epoch)."""
    pattern: str
    queue: str | None
    """The subscription it failed in."""
    message: Message
    record: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    destination: str | None = None
    """For a message the outbox gave up on: the node it did not reach (else None)."""


def _message_record(msg: Message) -> dict[str, Any]:
    return {"id": msg._id, "timestamp": msg.timestamp, "topic": msg.topic, "type": msg.type, "source": msg.source,
            "node": msg.node, "schema_version": msg.schema_version, "headers": msg.headers or None, "key": msg.key,
            "format": msg._format, "raw": msg.raw}


def _message_from_record(r: dict[str, Any]) -> Message:
    return Message(r["id"], r["timestamp"], r["topic"], r["type"], r["source"], r["node"], r["schema_version"],
                   r["headers"], r["key"], r["format"], r["raw"])


def _dead_letter(letter_id: str, record: dict[str, Any]) -> DeadLetter:
    msg = _message_from_record(record["message"])
    if TTL in msg.headers:
        msg.expires_at = _expiry(msg)  # for display; a replay hands the message over whatever its TTL
    return DeadLetter(letter_id, record["reason"], record["attempts"], record["error"], record["at"],
                      record["pattern"], record["queue"], msg, record, record.get("destination"))


def _expiry(msg: Message) -> float | None:
    """When a message with a TTL header stops being deliverable (None if the header is bad)."""
    try:
        ttl = float(msg.headers[TTL])
    except ValueError:
        return None
    return msg.timestamp + ttl if 0 < ttl <= MAX_TTL else None  # nan fails too


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxEntry:
    """Messages waiting in the outbox for one destination."""

    node: str
    service: str
    messages: int
    bytes: int
    up: bool
    """Whether the destination is reachable now (else its messages wait for it to return)."""
    since_sent: float | None
    """Seconds since something was last sent to it (None: nothing yet in this run)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RouteEntry:
    """One subscription somewhere in the mesh: what ``meshmq routes`` shows."""

    pattern: str
    group: str | None
    """Queue group (each message goes to one member of it), or None for a plain subscriber."""
    service: str
    node: str


class _ThreadState:
    """What one publishing thread owns: a reusable msgpack packer and its own counters,
    so the hot path takes no lock (stats() sums them)."""

    __slots__ = ("packer", "published", "unrouted")

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)
        self.published = 0
        self.unrouted = 0


_Prepared = tuple[str, "str | None", bytes, bytes, _ThreadState, float]
"""(topic, key, message id, envelope, publishing thread's state, expiry or NEVER)"""


_HANDING = ("handing over",)
"""A received message's ``_rx`` while it is being handed to its subscriptions: those that
finish it at once need not tell the inbox."""


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: the failure is counted where it happened


def _settle_publish(target: concurrent.futures.Future[str], mid: str, waiter: asyncio.Future[None]) -> None:
    """Hand the outcome of a commit to a blocking publisher's future."""
    if target.done():
        return
    exc = None if waiter.cancelled() else waiter.exception()
    if exc is None:
        target.set_result(mid)
    else:
        target.set_exception(exc)


REPLY_TO = "meshmq-reply-to"
"""Header of a request: the node waiting for the reply."""
IN_REPLY_TO = "meshmq-in-reply-to"
"""Header of a reply: the id of the request it answers."""
REPLY_ERROR = "meshmq-error"
"""Header of a reply whose responder failed: the error, as text."""
TTL = "meshmq-ttl"
"""Header of a message with a time to live: seconds after its timestamp."""


@dataclasses.dataclass(slots=True)
class _Request:
    topic: str
    future: asyncio.Future[Message]
    responders: set[str]
    """Nodes the request went to; when all have left, nobody can answer."""


OrderKey = tuple[str, str, "str | None"] | bytes
"""What a subscription keeps order by: sending node, topic, and (queue groups) key; a queue
group's message without a key is on its own (its id)."""


class _Full(Exception):
    """Internal: the outbox (``dest`` None), one destination's share of it, or (a
    :class:`Subscription`) a subscription of this agent it publishes to, is full; nothing
    was kept."""

    def __init__(self, dest: Destination | Subscription | None) -> None:
        self.dest = dest


class _HandlerThread:
    """Runs a blocking :class:`Agent`'s plain handler on threads of its own (one per message
    the subscription's ``concurrency`` lets it work on at once), and looks like a coroutine
    handler to the subscription (which keeps order, retries and dead-letters as for any
    handler). So slow handler code never stalls the agent's loop: probes are answered and the
    node is not suspected while a handler works."""

    def __init__(self, fn: Callable[[Message], Any], name: str, threads: int = 1) -> None:
        self.__wrapped__ = fn
        self.tracing = False  # set by the subscription: spans around each call (Config.tracing)
        self._jobs: queue.SimpleQueue[tuple[Message, asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._names = [name] if threads == 1 else [f"{name}#{i}" for i in range(1, threads + 1)]
        self._started = False

    async def __call__(self, msg: Message) -> None:
        loop = asyncio.get_running_loop()
        if not self._started:
            self._started = True
            for name in self._names:
                threading.Thread(target=self._run, args=(loop,), name=name, daemon=True).start()
        done: asyncio.Future[None] = loop.create_future()
        self._jobs.put((msg, done))
        await done

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while (job := self._jobs.get()) is not None:
            msg, done = job
            token = _trace.handling(msg.headers, msg.topic, self.tracing)
            error: Exception | None = None
            try:
                self.__wrapped__(msg)
            except Exception as exc:
                error = exc
                loop.call_soon_threadsafe(_settle, done, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, None)
            finally:
                _trace.done(token, error)

    def close(self) -> None:
        for _ in self._names:
            self._jobs.put(None)  # each thread ends after the message in hand (daemons: never block exit)


def _settle(future: asyncio.Future[None], exc: Exception | None) -> None:
    if not future.done():  # the subscription may have been closed meanwhile
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


class Subscription:
    """A live subscription. Close it with :meth:`close`.

    With a handler, every matching message is passed to it (a coroutine handler
    is awaited, one message at a time, in arrival order; with ``concurrency`` N,
    up to N at a time, never two of one order key). A message whose handler
    fails waits for its retry; only the later messages of its sender and topic
    (and key, in a queue group; a queue group's message without a key holds back
    nothing) wait behind it. Without one, iterate
    it: ``async for msg in sub`` on :class:`AsyncAgent`, ``for msg in sub`` or
    :meth:`get` on :class:`Agent`. Used as a decorator, the decorated function
    becomes the handler.
    """

    def __init__(self, agent: AsyncAgent, pattern: str, queue: str | None, handler: Handler | None,
                 threaded: bool, blocking: bool = False, concurrency: int = 1) -> None:
        self.pattern = pattern
        self.queue = queue
        self.durable = False
        """Whether publishers keep this subscription's messages while its node is down."""
        self.concurrency = concurrency
        """Messages its handler works on at once, never two of one order key."""
        self._blocking = blocking  # a blocking Agent's: plain handlers run on threads of their own
        self._agent = agent
        self._check_concurrency(handler)
        handler = self._adopt(handler)
        self.handler = handler
        self.closed = False
        self.delivered = 0
        self._agent = agent
        self._tokens = check_pattern(pattern, agent.config.max_topic_length, agent.config.max_topic_tokens)
        self._threaded = threaded  # iterated from another thread (blocking Agent)
        self._buffer: collections.deque[Message] = collections.deque()
        self._limit = agent.config.subscription_queue_messages
        self._async_ready: asyncio.Future[None] | None = None
        self._cond = threading.Condition() if threaded else None
        self._workers: list[asyncio.Task[None]] = []
        self._queued_mode = (handler is None or inspect.iscoroutinefunction(handler)
                             or isinstance(handler, _HandlerThread))
        self._held: dict[OrderKey, collections.deque[Message]] = {}
        """Per order key that is busy, the later messages of that key, which wait: its message
        waits for a retry (and is first here), or is in a handler (concurrency > 1). Messages
        of other keys go on meanwhile."""
        self._held_count = 0
        self._retries: dict[OrderKey, asyncio.TimerHandle] = {}  # the timer of each key's waiting retry
        self._ready: collections.deque[OrderKey] = collections.deque()  # keys whose retry is due (queued mode)
        self._in_hand: set[Message] = set()  # the messages coroutine handlers work on

    # --- configuration --------------------------------------------------------------

    def __call__(self, handler: Handler) -> Handler:
        """Decorator form: ``@agent.subscribe("orders.*")`` makes the function the handler."""
        if not callable(handler):
            raise UsageError(f"handler must be callable, got {handler!r}")
        self._check_concurrency(handler)
        self._agent._call_on_loop(self._set_handler, handler)
        return handler

    def _check_concurrency(self, handler: Handler | None) -> None:
        if self.concurrency > 1 and handler is not None and not self._blocking \
                and not inspect.iscoroutinefunction(handler):
            raise UsageError(f"concurrency={self.concurrency} needs a coroutine handler on AsyncAgent: a plain "
                             "function runs on the agent's loop, one call at a time (on the blocking Agent it "
                             "runs on that many threads)")

    def _adopt(self, handler: Handler | None) -> Handler | None:
        if handler is None or not self._blocking or inspect.iscoroutinefunction(handler):
            return handler
        threaded = _HandlerThread(handler, f"meshmq-handler-{self.pattern}",  # type: ignore[arg-type]
                                  self.concurrency)
        threaded.tracing = self._agent._tracing
        return threaded

    def _set_handler(self, handler: Handler) -> None:
        handler = self._adopt(handler)  # type: ignore[assignment]
        self.handler = handler
        self._queued_mode = inspect.iscoroutinefunction(handler) or isinstance(handler, _HandlerThread)
        waiting = list(self._buffer)
        self._buffer.clear()
        for msg in waiting:  # delivered before the decorator ran: keep their order
            self._deliver(msg)

    def close(self) -> None:
        """Stop receiving; the pattern is withdrawn from the mesh. Idempotent."""
        if not self.closed:
            self._agent._call_on_loop(self._agent._unsubscribe, self)

    # --- delivery (loop thread) --------------------------------------------------------

    def _order_key(self, msg: Message) -> OrderKey:
        """What order is kept by: sender and topic, and in a queue group also the key (one
        key's messages go to one member, in order). A queue group's messages without a key
        are spread over its members by their load, in no order: each is on its own."""
        if self.queue is None:
            return msg.node, msg.topic, None
        return (msg.node, msg.topic, msg.key) if msg.key is not None else msg._id

    def _backlog(self) -> int:
        """Messages received and not yet handed over: buffered, or held behind a retry."""
        return len(self._buffer) + self._held_count

    def _deliver(self, msg: Message) -> None:
        self.delivered += 1
        if not self._queued_mode:
            if self._held:
                held = self._held.get(self._order_key(msg))
                if held is not None:  # behind its key's message that waits for a retry: order holds
                    held.append(msg)
                    self._held_count += 1
                    if self._backlog() >= self._limit:
                        self._agent._overloaded(self)
                    return
            self._handle_now(msg)
            return
        if self._cond is not None and self.handler is None:
            with self._cond:
                self._buffer.append(msg)
                self._cond.notify()
        else:
            self._buffer.append(msg)
            if self.handler is not None:
                if not self._workers:
                    self._workers = [asyncio.ensure_future(self._run_handler()) for _ in range(self.concurrency)]
                elif self._async_ready is not None and not self._async_ready.done():
                    self._async_ready.set_result(None)
            elif self._async_ready is not None and not self._async_ready.done():
                self._async_ready.set_result(None)
        if len(self._buffer) + self._held_count >= self._limit:  # _backlog(), inline: once per message
            self._agent._overloaded(self)

    def _attempt(self, msg: Message) -> None:
        msg.attempts += 1
        msg._verdict = None
        msg._in_handler = True

    def _outcome(self, msg: Message, exc: Exception | None) -> float | None:
        """After a handler call: seconds until the next attempt, or None when done with."""
        msg._in_handler = False
        if exc is not None:
            return self._agent._handler_failed(self, msg, exc)
        return self._agent._nacked(self, msg) if msg._verdict is not None else None

    def _expired(self, msg: Message) -> bool:
        """Whether the message's time to live has passed (it is then dead-lettered, and done)."""
        if msg.expires_at is None or time.time() < msg.expires_at:
            return False
        self._agent._dead_letter(self, msg, "expired",
                                 f"its time to live ran out {time.time() - msg.expires_at:.3f}s ago")
        self._finished(msg)
        return True

    def _handle_now(self, msg: Message) -> None:
        """Call a plain handler; if the message is to be retried, hold it (later ones wait).
        The hot path of a plain subscription: what is rare (an expiry, a trace, a verdict)
        costs a test here, and its function call only when it happens."""
        if msg.expires_at is not None and self._expired(msg):
            return
        msg.attempts += 1  # as _attempt
        msg._verdict = None
        msg._in_handler = True
        traced = msg.headers or self._agent._tracing or _trace.current.get() is not None
        token = _trace.handling(msg.headers, msg.topic, self._agent._tracing) if traced else None
        error: Exception | None = None
        try:
            self.handler(msg)  # type: ignore[misc]
        except Exception as exc:
            error = exc
            retry = self._outcome(msg, exc)
        else:
            msg._in_handler = False  # as _outcome
            retry = None if msg._verdict is None else self._agent._nacked(self, msg)
        finally:
            if token is not None:
                _trace.done(token, error)
        if retry is None:
            if msg._rx is _HANDING and self.queue is None:
                msg._open -= 1  # as _finished does, without asking for the thread: this is the loop's
            else:
                self._finished(msg)
            return
        self._hold(msg, retry)

    def _hold(self, msg: Message, delay: float) -> None:
        """Hold ``msg`` for another attempt in ``delay`` seconds, before the later messages of
        its order key; the subscription goes on with the other keys' messages."""
        if self.closed:  # its handler closed the subscription: let go of it as _abandon does
            self._agent.counters["dropped_on_unsubscribe"] += 1
            self._finished(msg)
            return
        key = self._order_key(msg)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = collections.deque()
        held.appendleft(msg)
        self._held_count += 1
        assert self._agent._loop is not None
        self._retries[key] = self._agent._loop.call_later(delay, self._retry_due, key)

    def _retry_due(self, key: OrderKey) -> None:
        del self._retries[key]
        if self.closed:
            return
        if self._queued_mode:  # the worker hands it over, before what is buffered
            self._ready.append(key)
            if self._async_ready is not None and not self._async_ready.done():
                self._async_ready.set_result(None)
            return
        held = self._held[key]
        while held:  # in order, until one is held again
            msg = held.popleft()
            self._held_count -= 1
            self._drained()
            self._handle_now(msg)
            if key in self._retries or self.closed:
                return
        del self._held[key]

    async def _run_handler(self) -> None:
        """A worker: one message at a time (``concurrency`` workers share the subscription)."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            while True:
                key: OrderKey | None
                if self._ready or self._held or self.concurrency > 1:
                    taken = self._take()
                    if taken is None:
                        break
                    key, msg = taken
                elif self._buffer:  # the common case, inline: one worker, no retry waiting
                    msg, key = self._buffer.popleft(), None
                    self._drained()
                else:
                    break
                self._in_hand.add(msg)
                retry = await self._attempt_async(msg)
                self._in_hand.discard(msg)  # (closing cleared it)
                if self.closed:  # by its own handler: _abandon let go of the message
                    return
                if retry is not None:
                    self._hold(msg, retry)  # first of its key again
                elif key is not None:  # its key's next message, if any, before anything newer
                    if self._held[key]:
                        self._ready.appendleft(key)
                    else:
                        del self._held[key]
            if self._async_ready is None or self._async_ready.done():  # idle workers wait together
                self._async_ready = loop.create_future()
            await self._async_ready

    def _take(self) -> tuple[OrderKey | None, Message] | None:
        """The next message a worker may work on, or None when there is none; with the order
        key the worker must release when done with it (None: the key is not marked busy,
        as a lone worker's keys never need to be)."""
        if self._ready:  # a held key's turn (its retry is due, or the one before it is done)
            key = self._ready.popleft()
            msg = self._held[key].popleft()
            self._held_count -= 1
            self._drained()
            return key, msg
        concurrent = self.concurrency > 1
        while self._buffer:
            msg = self._buffer.popleft()
            busy: OrderKey | None = None
            if self._held or concurrent:
                key = self._order_key(msg)
                if (held := self._held.get(key)) is not None:  # behind its key's busy message: order holds
                    held.append(msg)
                    self._held_count += 1
                    continue
                if concurrent:
                    busy = key
                    self._held[key] = collections.deque()  # busy while in hand
            self._drained()
            return busy, msg
        return None

    async def _attempt_async(self, msg: Message) -> float | None:
        """One attempt of a coroutine handler (or a blocking Agent's handler thread): seconds
        until the next, or None when the message is done with."""
        if self._expired(msg):
            return None
        self._attempt(msg)
        # A blocking Agent's handler thread brackets its own call (span and context).
        token = None if type(self.handler) is _HandlerThread else _trace.handling(
            msg.headers, msg.topic, self._agent._tracing)
        error: Exception | None = None
        try:
            await self.handler(msg)  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
            if self.closed:
                return None
            retry = self._outcome(msg, exc)
        else:
            if self.closed:
                return None
            retry = self._outcome(msg, None)
        finally:
            _trace.done(token, error)
        if retry is None:
            self._finished(msg)
        return retry

    def _drained(self) -> None:
        if len(self._buffer) + self._held_count == self._limit // 2:  # _backlog(), inline: once per message
            self._agent._call_on_loop(self._agent._maybe_resume)

    def _finished(self, msg: Message) -> None:
        """This subscription is done with ``msg`` (handled, dead-lettered, or taken by the
        iterating consumer): once every subscription it went to is, the inbox may acknowledge
        it; a queue group's publisher counts it as no longer outstanding here."""
        rx = msg._rx
        if rx is not None or (msg._work is not None and self.queue is not None):
            agent = self._agent
            if threading.get_ident() != agent._loop_thread:
                agent._call_on_loop(agent._message_finished, msg, self.queue is not None)
            elif rx is _HANDING and self.queue is None:
                msg._open -= 1  # finished while being handed over: the inbox never needs to hear of it
            else:
                agent._message_finished(msg, self.queue is not None)

    def _abandon(self) -> None:
        """Closed by the application: what it will not take is done with (and counted)."""
        if self._cond is not None:
            with self._cond:
                left = list(self._buffer)
                self._buffer.clear()
        else:
            left = list(self._buffer)
            self._buffer.clear()
        left.extend(self._in_hand)
        for held in self._held.values():
            left.extend(held)
        self._in_hand.clear()
        self._held.clear()
        self._held_count = 0
        self._ready.clear()
        self._cancel_retries()
        if left:
            self._agent.counters["dropped_on_unsubscribe"] += len(left)
        for msg in left:
            self._finished(msg)

    def _cancel_retries(self) -> None:
        for timer in self._retries.values():
            timer.cancel()
        self._retries.clear()

    def _closed(self) -> None:
        self.closed = True
        self._cancel_retries()
        if isinstance(self.handler, _HandlerThread):
            self.handler.close()
        for worker in self._workers:
            worker.cancel()
        if self._async_ready is not None and not self._async_ready.done():
            self._async_ready.set_result(None)
        if self._cond is not None:
            with self._cond:
                self._cond.notify_all()

    # --- iteration ------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Message]:
        if self.handler is not None or self._threaded:
            raise UsageError("only a subscription without a handler, on AsyncAgent, is an async iterator")
        self._check_iterable()
        return self

    def _check_iterable(self) -> None:
        if self.concurrency > 1:
            raise UsageError(f"concurrency={self.concurrency} is for a handler; an iterating consumer "
                             "takes one message at a time (subscribe with concurrency=1)")

    async def __anext__(self) -> Message:
        while True:
            while not self._buffer:
                if self.closed:
                    raise StopAsyncIteration
                self._async_ready = asyncio.get_running_loop().create_future()
                await self._async_ready
            msg = self._buffer.popleft()
            self._drained()
            if not self._expired(msg):  # an expired one is dead-lettered, not given out
                self._finished(msg)
                return msg

    def __iter__(self) -> Iterator[Message]:
        if self.handler is not None or not self._threaded:
            raise UsageError("only a subscription without a handler, on the blocking Agent, is an iterator")
        while True:
            msg = self.get()
            if msg is None:
                return
            yield msg

    def get(self, timeout: float | None = None) -> Message | None:
        """Blocking Agent: the next message, or None when closed or after ``timeout`` seconds."""
        if self._cond is None:
            raise UsageError("get() is for subscriptions of the blocking Agent; use 'async for' on AsyncAgent")
        self._check_iterable()
        deadline = None if timeout is None else time.monotonic() + _check_seconds("timeout", timeout, zero=True)
        while True:
            with self._cond:
                while not self._buffer:
                    if self.closed:
                        return None
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    self._cond.wait(remaining)
                msg = self._buffer.popleft()
            self._drained()
            if not self._expired(msg):  # an expired one is dead-lettered, not given out
                self._finished(msg)
                return msg

    @property
    def pending(self) -> int:
        """Messages received and not yet done with: buffered, in a coroutine's or a blocking
        Agent's handler, or waiting for a retry (with the later ones of their order key)."""
        return self._backlog() + len(self._in_hand)

    def __repr__(self) -> str:
        group = f", queue={self.queue!r}" if self.queue else ""
        return (f"Subscription({self.pattern!r}{group}, delivered={self.delivered}, pending={self.pending}, "
                f"closed={self.closed})")


class AsyncAgent:
    """The meshmq agent for asyncio services.

    >>> async with AsyncAgent("orders") as agent:
    ...     await agent.publish("orders.placed", {"orderId": "ORD-1"}, type="OrderPlaced")

    Args:
        service: this service's name, shown to peers and in every message's ``source``.
        config: a :class:`Config` (default: built from the environment).
        **overrides: any :class:`Config` field, e.g. ``seeds=["tcp://10.0.0.5:7400#KEY"]``.
    """

    def __init__(self, service: str, *, config: Config | None = None, **overrides: Any) -> None:
        self.service = _check_name("service name", service)
        self.config = Config.load(config, **overrides)
        self.limits = Limits.from_config(self.config)
        self._keys = NodeKeys.generate()  # replaced by the kept one when the store opens
        self.node_id = self._keys.node_id
        self.counters: collections.Counter[str] = collections.Counter()
        self._counters_lock = threading.Lock()
        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._subs: list[Subscription] = []
        self._type_handlers: dict[str, list[Handler]] = {}
        self._plain_cache: dict[str, list[Subscription]] = {}
        self._group_cache: dict[tuple[str, str], list[Subscription]] = {}
        self._turns: dict[str, itertools.count[int]] = {}  # local members of each queue group take turns
        # Queue-group work, for balancing by outstanding work: as a publisher, what we sent each
        # node and what it reported finished; as a member, what we finished for each publisher.
        self._work_sent: dict[str, int] = {}
        self._work_reported: dict[str, int] = {}
        self._work_done: collections.Counter[str] = collections.Counter()
        self._work_unreported: set[str] = set()
        self._work_timer: asyncio.TimerHandle | None = None
        self._node: Node | None = None
        self._transport: Transport | None = None
        self._discovery: Discovery | None = None
        self._node_links: dict[str, Link] = {}
        self._local: collections.deque[Any] = collections.deque()  # what this node published to itself
        self._local_scheduled = False
        self._limit_local = self.config.subscription_queue_messages  # of _local (see _local_full)
        self._index = RouteIndex(())
        self._remembered = Remembered()
        self._route_waiters = Wakeup()
        self._space_waiters = Wakeup()
        self._overloaded_subs: set[Subscription] = set()
        # While a subscription is full, received messages wait here, in order, to be handed over
        # (entry, (sender, epoch, seq), resent, size); the rest of the traffic (probes, gossip,
        # receipts) is handled as it comes.
        self._taking_data = True
        self._aside: collections.deque[tuple[Any, tuple[Any, int, int], bool, int]] = collections.deque()
        self._aside_bytes = 0
        self._data_aside = False  # not taking data, or messages still aside: new ones queue behind them
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_due = 0.0  # when the tick was asked for: a later one measures how long the loop was held
        self._last_stall: tuple[float, float] | None = None  # (wall time, seconds held) of the last stall
        self._outbox_timer: asyncio.TimerHandle | None = None
        self._id_prefix = os.urandom(8)  # message ids: unique per life, even with a kept identity
        self._store: Store | None = None
        self._contents: Contents | None = None
        self._commit: GroupCommit | None = None
        self._outbox: Outbox | None = None
        self._inbox: Inbox | None = None
        self._batch_waiter: asyncio.Future[None] | None = None
        self._intake: collections.deque[tuple[_Prepared, concurrent.futures.Future[str] | None]] = collections.deque()
        self._intake_scheduled = False
        self._intake_blocked = False  # a publish waits for room in the outbox; the rest wait behind it
        self._intake_error: BaseException | None = None
        self._next_replay_check = 0.0
        self._replaying = False
        self.store_dir: Path | None = None
        """Where this agent keeps its state (None with ``durability="memory"``)."""
        self._id_counter = itertools.count(1)
        self._checked_topics: dict[str, None] = {}
        self._fanout: dict[str, tuple[str, ...]] = {}  # topic -> nodes, for routes without queue groups
        self._single: dict[str, Lane] = {}  # topic -> the stream to its one remote destination, where it has one
        self._lanes: dict[str, int] = {}  # topic -> its priority lane (from the policy), as looked up
        self._tls = threading.local()
        self._thread_states: list[_ThreadState] = []
        self._received = 0
        self._requests: dict[str, _Request] = {}  # request id -> what waits for its reply
        self._clock_offsets: dict[str, float] = {}  # peer node -> its wall clock minus ours, seconds
        self._started_at = 0.0
        self._last_route_change = 0.0
        self._reply_topic = reply_topic(self.node_id)
        self._cert: bytes | None = None
        self._trusted: tuple[bytes, ...] = ()
        self._certs: dict[bytes, Certificate] = {}  # certificate bytes -> checked certificate
        self._vouched: dict[bytes, tuple[str | None, float]] = {}  # record signature -> verdict, until
        self._curve_nodes: dict[str, str] = {}  # CURVE key (Z85) of a certified node -> its node id
        self._rights = Rights(None)  # ours: everything until the certificate is loaded at start
        self._peer_rights: dict[str, Rights] = {}  # node -> what its certificate allows
        self._secure = not self.config.insecure
        self._signer: Signer | None = None
        self._peer_keys: dict[str, tuple[bytes, bytes]] = {}  # node -> (its public key, the box key we share)
        self._sealed_head = bytes((PROTOCOL_VERSION, SEALED))
        self._mirror: Mirror | None = None  # what this agent mirrors to the taps of the mesh
        self._taps: list[Tap] = []  # this node's own taps (it is a tap while it has one)
        self._tap_packer = msgpack.Packer(use_bin_type=True)
        self._tapped = False  # some tap of the mesh watches this agent
        self._tap_version = -1  # of the routing table's taps, when they were last read
        self._journeys: Journeys | None = None  # as a tap: which messages the sent/acked runs are about
        self._observed: frozenset[str] = frozenset()  # outbox events (sent, acked, retried) some tap wants
        self._tracing = self.config.tracing
        self._policy: Policy | None = None  # in force: Config.policy_file, or the mesh's signed one
        self._breaker_spec: Any = None  # the policy's circuit breaker (see _apply_breakers)
        self._windowed = False  # the policy gives some topic a priority: the outbox keeps a send window
        self.policy_version = 0
        """The version of the mesh policy in force (0: none; pinned files count as their own)."""
        self._policy_document: bytes | None = None  # the authority-signed policy in force, to pass on
        self._policy_versions: dict[str, int] = {}  # peer -> the policy version it last said it has
        self._schemas: dict[tuple[str, int], dict[str, Any]] = {}  # (type, version) -> JSON Schema (subset)
        self._registry = SchemaRegistry(self.config.max_schemas)  # the mesh's pushed schemas (secure agents only)
        # What messages are checked with: the registry's schemas, overlaid by those declared in code.
        # Replaced whole, never mutated (publishers on other threads read it); under _schemas_lock.
        self._checked_schemas: dict[tuple[str, int], dict[str, Any]] = {}
        self._schemas_lock = threading.Lock()
        self._schema_conflicts: set[SchemaKey] = set()  # pushed schemas that code overrides here, told once
        self._schema_watch: Callable[[tuple[SchemaKey, ...]], bool] | None = None  # see _wait_for_schemas
        self._schema_holders: set[str] = set()  # peers whose keys, since, satisfy the watch
        self._upcasters: dict[tuple[str, int], tuple[int, Callable[[Any], Any]]] = {}  # (type, from) -> (to, fn)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}  # (rule, topic or "") -> its rate limit
        self._buckets_lock = threading.Lock()  # publishers may be several threads (blocking Agent)
        self._window_latency: LatencyHistogram | None = None  # delivery latency since the last stats report
        self._stats_timer: asyncio.TimerHandle | None = None
        self._outbox_levels: dict[str | None, int] = {}  # outbox warnings told: destination (None: all) -> level
        self._latency: LatencyHistogram | None = None  # while the metrics endpoint is on
        self._metrics: MetricsServer | None = None
        self.metrics_port = 0
        """The port of this agent's metrics endpoint (``Config.metrics_port``), 0 when off."""
        self._revocations = RevocationList(self.config.mesh, (), self.config.max_revocations)
        self._revocation_digests: dict[str, bytes] = {}  # peer -> digest of its revocation list, last heard
        self._revoked_keys: set[str] = set()  # CURVE keys of nodes cut off: their frames are counted apart
        self._revoked_self = False
        self._dev_authority: Authority | None = None
        self._own_certificate: bytes | None = None  # set by `meshmq cert revoke` for its short-lived agent
        self._watched: dict[str, object] = {}  # file setting -> what stat said when it was last read
        self._next_security_check = 0.0
        self._next_revocation_sync = 0.0

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> AsyncAgent:
        """Open the store, bind, announce, and start meeting peers. Returns at once; peers
        arrive within ~1 s. Messages kept in the outbox from the last run go out as their
        receivers are found again."""
        if self._state != "new":
            raise AgentClosed(f"agent {self.service!r} was already started" if self._state == "running"
                              else f"agent {self.service!r} is stopped and cannot be restarted; create a new one")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        cfg = self.config
        if cfg.durability != "memory":
            await self._open_store(loop)
        else:
            self._store = Store.open(None, durability="memory")  # dead letters live as long as we do
            self._set_identity(self._keys)  # a new one each start: nothing keeps it
        try:
            await loop.run_in_executor(None, self._load_certificate)
            self._load_policy()
            kept = self._contents.meta.get("policy") if self._contents is not None else None
            if kept is not None and self._policy is None and self._secure:
                self._adopt_policy(kept, "the store", keep=False)
            if self._contents is not None and self._secure:
                kept_schemas = [v for k, v in sorted(self._contents.meta.items())
                                if k.startswith(_SCHEMA_META) and type(v) is bytes]
                self._learn_schemas(kept_schemas, "the store", None, keep=False)
        except BaseException:
            self._close_store()
            raise
        interfaces = _expand_interfaces(cfg.interfaces)
        transport = Transport(cfg, self.node_id, self._on_frame, self._produce,
                              self._keys.curve_keys() if self._secure else None)
        try:
            bound = transport.async_bind(loop, _bind_endpoints(cfg, interfaces))
        except zmq.ZMQError as exc:
            transport.async_close(0)
            self._close_store()
            raise MeshError(f"cannot bind {cfg.bind or interfaces}: {exc}") from exc
        # Advertised with our key: whoever connects needs it (CurveZMQ), and it names us.
        endpoints = tuple(f"{ep}#{b64(self._keys.public)}" for ep in bound) if self._secure else bound
        self._transport = transport
        try:
            self._start_delivery(loop)
            self._mirror = Mirror(loop, cfg, self._send_tap)
            self._forget_revoked()
            self._started_at = time.monotonic()
            record = NodeRecord(self.node_id, self.service, endpoints, self._advertised(), 0, time.time(),
                                tuple(sorted(self._schemas)), cert=self._cert, taps=self._tap_patterns(),
                                tap_events=self._tap_event_kinds())
            self._node = Node(cfg.mesh, record, timing=Timing.from_config(cfg), limits=self.limits,
                              max_peers=cfg.max_peers, sign=self._sign_record if self._secure else None,
                              vouch=self._vouch if self._secure else _refuse_secure)
            self._state = "running"
            self._apply(self._node.start(time.monotonic(), cfg.seeds))
        except BaseException:  # nothing half-started is left behind (threads, sockets, the store lock)
            self._state = "stopped"
            transport.async_close(0)
            self._close_store()
            raise
        if cfg.metrics_port:
            await self._start_metrics()
        if cfg.discovery:
            self._discovery = Discovery(mesh=cfg.mesh, node=self.node_id, service=self.service,
                                        endpoints=endpoints, interfaces=interfaces, on_hint=self._on_hint,
                                        on_other_version=self._on_other_version)
            try:
                await self._discovery.async_start()
            except Exception as exc:  # no multicast here: seeds and hellos still work
                quiet.warning("mdns", "mDNS discovery unavailable on %s: %s", interfaces, exc)
                self._discovery = None
        self._schedule_tick()
        self._outbox_tick()
        log.info("agent %s (%s) started on %s, mesh %r", self.service, self.node_id, ", ".join(endpoints), cfg.mesh)
        return self

    async def _start_metrics(self) -> None:
        cfg = self.config
        server = MetricsServer(self._render_metrics)
        try:
            self.metrics_port = await server.start(cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:
            await self.stop()
            raise ConfigError("metrics_port", f"cannot listen on {cfg.metrics_host}:{cfg.metrics_port}: "
                                              f"{exc.strerror}") from None
        self._metrics = server
        self._latency = LatencyHistogram()
        log.info("metrics at http://%s:%d/metrics", cfg.metrics_host, self.metrics_port)

    def _render_metrics(self) -> str:
        stats = self.stats()
        assert self._latency is not None
        pending = [(sub.pattern, sub.queue, sub.pending) for sub in self._subs]
        return exposition(stats, gauges_of(stats, self.peers(), pending), self._latency,
                          {"service": self.service, "node": self.node_id, "mesh": self.config.mesh})

    def _load_policy(self) -> None:
        path = self.config.policy_file
        if path is None:
            return
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError("policy_file", f"cannot read {path}: {exc.strerror}") from None
        try:
            self._policy = load_policy(text, str(path))
        except PolicyError as exc:
            raise ConfigError("policy_file", str(exc)) from None
        self.policy_version = self._policy.version
        self._apply_breakers()
        log.info("policy %s version %d: %d rules (pinned: policies pushed to the mesh are not taken)", path,
                 self._policy.version, len(self._policy.rules))

    def _pace(self, topic: str, can_wait: bool, mid: bytes) -> float:
        """The policy's rate limit on publishing ``topic``: 0.0 (a token was taken), seconds to
        wait before asking again (``on_excess = "delay"`` and the caller can wait), or -1.0
        (``"dead-letter"``: the message is not sent). Raises :class:`RateLimited` otherwise."""
        rule = self._policy.first("rate", topic, self.service) if self._policy is not None else None
        if rule is None:
            return 0.0
        rate = rule.rate
        assert rate is not None
        key = (rule.name, topic if rate.per == "topic" else "")
        now = time.monotonic()
        with self._buckets_lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= 65536:
                    self._buckets.clear()  # bounded: a bucket starts full again
                bucket = self._buckets[key] = TokenBucket(rate.per_second, rate.burst, now)
            wait = bucket.take(now)
        if wait == 0.0:
            return 0.0
        with self._counters_lock:
            self.counters["policy_rate_limited"] += 1
        if rate.on_excess == "delay" and can_wait:
            return wait
        if rate.on_excess == "dead-letter":
            with self._counters_lock:
                self.counters["dropped_by_policy"] += 1
            return -1.0
        self._call_on_loop(self._tap_event, LIMITED, [(topic, mid)], None, f"refused by policy rule {rule.name!r}")
        raise RateLimited(topic, rule.name, wait)

    def _lane_of(self, topic: str) -> int:
        """The priority lane of messages on ``topic``: the policy's ``priority`` for it (0 high,
        1 normal, 2 low; normal without a rule), looked up once per topic."""
        number = self._lanes.get(topic)
        if number is None:
            rule = self._policy.first("priority", topic, self.service) if self._policy is not None else None
            number = priority_lane(rule.priority if rule is not None else None)
            if len(self._lanes) >= 4096:
                self._lanes.clear()
            self._lanes[topic] = number
        return number

    # --- the mesh's policy, signed by the authority and spread by gossip -------------------

    def push_policy(self, document: bytes) -> bool:
        """Put a policy signed by the mesh authority (``meshmq policy push`` makes one) in force
        here and hand it to every peer, which does the same and passes it on; every agent
        switches to it at once, whole. Returns False if this agent has that version or a newer
        one already.

        Raises:
            CertificateError: not a policy document of a trusted authority for this mesh.
            UsageError: the policy inside does not check (line and rule named), or this agent
                pins a local ``policy_file``.
        """
        self._check_running()
        if self.config.policy_file is not None:
            raise UsageError(f"this agent pins the policy file {self.config.policy_file}; it does not take the "
                             "mesh's policy")
        version, text, _ = check_policy_document(bytes(document), self._trusted, self.config.mesh)
        try:
            load_policy(text, f"policy version {version}")
        except PolicyError as exc:
            raise UsageError(str(exc)) from None
        if not self._adopt_policy(bytes(document), "this process"):
            return False
        assert self._node is not None
        for member in list(self._node.peers.values()):
            self._send_policy(member.endpoint, with_document=True)
        return True

    def _adopt_policy(self, document: bytes, source: str, keep: bool = True) -> bool:
        """Take a signed policy if it is newer than the one in force; False otherwise (refused
        ones are counted and logged)."""
        try:
            version, text, _ = check_policy_document(document, self._trusted, self.config.mesh)
            policy = load_policy(text, f"policy version {version}")
        except (CertificateError, PolicyError) as exc:
            self.counters["policies_refused"] += 1
            quiet.warning("policy", "a policy from %s was refused: %s", source, exc)
            return False
        if version <= self.policy_version:
            return False
        self._policy, self._policy_document, self.policy_version = policy, document, version  # at once, whole
        self._fanout, self._single, self._lanes = {}, {}, {}  # priorities may have changed: look up again
        with self._buckets_lock:
            self._buckets.clear()
        self._apply_breakers()
        self.counters["policies_taken"] += 1
        log.info("policy version %d from %s in force: %d rules", version, source, len(policy.rules))
        self._control("policy", None, None, f"version {version} from {source}: {len(policy.rules)} rules")
        if keep and self._store is not None:
            batch = Batch()
            batch.put_meta("policy", document)
            self._store.submit(batch)
        return True

    def _apply_breakers(self) -> None:
        """What the policy asks of the outbox. Its circuit breaker, for every destination of
        this publisher: the first rule with a ``breaker`` that names this service or none
        (breakers are per destination, so a rule's topic does not select them). Its send
        window, while some rule gives this service's topics a priority (lanes need it)."""
        spec = None
        windowed = False
        if self._policy is not None:
            for rule in self._policy.rules:
                if spec is None and rule.breaker is not None and rule.service in (None, self.service):
                    spec = rule.breaker
                windowed = windowed or (rule.priority is not None and rule.service in (None, self.service))
        if self._outbox is not None:
            self._outbox.breaker_spec = spec
            self._outbox.windowed = windowed
        self._breaker_spec = spec
        self._windowed = windowed

    def _send_policy(self, endpoint: str, with_document: bool) -> None:
        if self._transport is not None:
            self._transport.async_send_control(endpoint, policy_frame(
                self.config.mesh, self.node_id, self.policy_version,
                self._policy_document if with_document else None))

    def _on_policy(self, frame: PolicyOffer) -> None:
        """A peer's policy version, or its signed policy: take a newer one and pass it on; answer
        an older version with ours, a newer one with our version (so it sends its own)."""
        assert self._node is not None
        if frame.mesh != self.config.mesh or not self._secure or self.config.policy_file is not None:
            return
        member = self._node.peers.get(frame.node)
        if len(self._policy_versions) >= 2 * self.config.max_peers:
            self._policy_versions.clear()
        self._policy_versions[frame.node] = frame.version
        if frame.document is not None and frame.version > self.policy_version:
            if self._adopt_policy(frame.document, f"peer {frame.node}"):
                peers = [m for n, m in self._node.peers.items() if n != frame.node]
                for m in random.sample(peers, min(len(peers), self.config.gossip_fanout)):
                    self._send_policy(m.endpoint, with_document=True)
            return
        if member is None or frame.document is not None:
            return
        if frame.version < self.policy_version:
            self._send_policy(member.endpoint, with_document=True)
        elif frame.version > self.policy_version:
            self._send_policy(member.endpoint, with_document=False)

    # --- the mesh's schemas, signed by the authority and spread by gossip -------------------

    def push_schema(self, document: bytes) -> bool:
        """Take a schema signed by the mesh authority (``meshmq schema add`` makes one) and hand
        it to every peer, which does the same and passes it on: every secure agent then checks
        messages of its type and version with it, on publish and on receipt (a schema declared
        in code for the same pair wins in that agent). Of two documents for one pair, every
        agent keeps the one signed last. Returns False if this agent holds it, or a later one,
        already.

        Raises:
            UsageError: this agent runs with ``insecure=True`` (schemas pushed to the mesh are
                trusted because the authority signed them; declare the schema in code instead),
                or it keeps ``max_schemas`` schemas already and this one is of a new type or
                version.
            CertificateError: not a schema document of a trusted authority for this mesh.
            SchemaError: what the document holds is not a schema meshmq can check.
        """
        self._check_running()
        if not self._secure:
            raise UsageError("this agent runs insecure (insecure=True): it takes no schemas pushed to the mesh, "
                             "whose trust comes from the mesh authority's signature; declare the schema in code "
                             "instead: agent.schema(TYPE, VERSION, {...})")
        return bool(self._learn_schemas([bytes(document)], "this process", None, strict=True))

    def _learn_schemas(self, blobs: list[bytes] | tuple[bytes, ...], source: str, sender: str | None, *,
                       keep: bool = True, strict: bool = False) -> list[SchemaDocument]:
        """Schema documents from ``source``: check each, keep the last signed of each (type,
        version), of at most ``max_schemas`` pairs, the smallest (see :mod:`meshmq._registry`),
        and return those newly taken, after keeping them in the store (with ``keep``), telling
        taps, and passing them on. Refused ones are counted and logged (raised instead with
        ``strict``, which also refuses a new pair when full) and change nothing; displaced
        ones are counted, logged and dropped from the store.

        Taken from this process (``sender`` None), they go to every peer: one hop to everyone
        in a full mesh. Taken from a peer, they go on to ``gossip_fanout`` random others, in
        case the first agent did not reach everyone."""
        taken = []
        displaced = []
        for blob in blobs:
            try:
                type_, version, schema, at, digest = check_schema_document(blob, self._trusted, self.config.mesh)
            except (CertificateError, SchemaError) as exc:
                self.counters["schemas_refused"] += 1
                if strict:
                    raise
                quiet.warning(f"schema:{source}", "a schema from %s was refused: %s", source, exc)
                continue
            document = SchemaDocument(type_, version, schema, at, digest, blob)
            full = (f"this agent keeps at most max_schemas={self.config.max_schemas} schemas, the smallest by "
                    f"type and version; raise max_schemas")
            with self._schemas_lock:
                registry = self._registry
                if strict and document.pair not in registry.entries and len(registry) >= registry.limit:
                    raise UsageError(f"{full}: {type_} version {version} would displace another or be refused")
                verdict = registry.add(document)
                gone = registry.displaced if verdict == DISPLACED else None
            if verdict == FULL:
                self.counters["schemas_refused_full"] += 1
                quiet.log(logging.ERROR, "schemas-full", "%s: %s version %d from %s was refused", full, type_,
                          version, source)
            elif verdict in (NEW, REPLACED, DISPLACED):
                taken.append(document)
                self.counters["schemas_adopted"] += 1
                log.info("schema %s version %d from %s taken (%s)", type_, version, source,
                         "a later one" if verdict == REPLACED else "new")
                self._control(SCHEMA_CHANGE, None, None, f"{type_} version {version} from {source}")
                if gone is not None:
                    displaced.append(gone)
                    self.counters["schemas_displaced"] += 1
                    quiet.log(logging.ERROR, "schemas-full", "%s: %s version %d from %s displaced %s version %d, "
                              "which messages are no longer checked with", full, type_, version, source,
                              gone.type, gone.version)
                    self._control(SCHEMA_CHANGE, None, None, f"{gone.type} version {gone.version} displaced")
        if not taken:
            return taken
        self._rebuild_checked_schemas()
        if keep and self._store is not None:
            batch = Batch()
            with self._schemas_lock:
                held = dict(self._registry.entries)
            for document in taken:
                if held.get(document.pair) is document:  # not displaced by a later one of these
                    batch.put_meta(f"{_SCHEMA_META}{document.type}:{document.version}", document.blob)
            for document in displaced:
                if document.pair not in held:
                    batch.drop_meta(f"{_SCHEMA_META}{document.type}:{document.version}")
            self._store.submit(batch).add_done_callback(_schemas_stored)
        if self._node is not None and self._transport is not None:
            peers = [n for n in self._node.peers if n != sender]
            if sender is not None:
                peers = random.sample(peers, min(len(peers), self.config.gossip_fanout))
            for node in peers:
                self._send_schemas(self._node.peers[node].endpoint, None, [d.blob for d in taken])
        return taken

    def _rebuild_checked_schemas(self) -> None:
        """What messages are checked with: the registry's schemas and, over them, those declared
        in code (this agent's own word wins). A pushed schema that code overrides with another
        body is counted and logged, once per document."""
        with self._schemas_lock:
            checked = self._registry.schemas()
            conflicts = set()
            for pair, schema in self._schemas.items():
                pushed = self._registry.entries.get(pair)
                if pushed is not None and pushed.schema != schema:
                    conflicts.add(pushed.key)
                checked[pair] = schema
            self._checked_schemas = checked
            told, self._schema_conflicts = self._schema_conflicts, conflicts
        for type_, version, _, _ in sorted(conflicts - told):
            with self._counters_lock:
                self.counters["schema_conflicts"] += 1
            quiet.warning(f"schema-conflict:{type_}:{version}", "%s version %d: the schema declared in code "
                          "differs from the one pushed to the mesh; this agent checks with the one in code",
                          type_, version)

    def _send_schemas(self, endpoint: str, keys: list[SchemaKey] | None, blobs: list[bytes],
                      answer: bool = False) -> None:
        """Send schema documents to a peer, in frames that fit MAX_SCHEMA_FRAME_BYTES (and
        max_frame_bytes); ``keys`` (an offer, or with ``answer`` an answer) ride on the last."""
        if self._transport is None:
            return
        budget = min(self.config.max_frame_bytes, MAX_SCHEMA_FRAME_BYTES) - 1024
        pages: list[list[bytes]] = [[]]
        size = 0
        for blob in blobs:
            if pages[-1] and (size + len(blob) + 8 > budget or len(pages[-1]) >= MAX_FRAME_SCHEMAS):
                pages.append([])
                size = 0
            pages[-1].append(blob)
            size += len(blob) + 8
        if keys is not None and pages[-1] and size + 100 * len(keys) + 8 > budget:
            pages.append([])  # the keys (at most about 100 bytes each) go alone
        mesh = self.config.mesh
        for i, page in enumerate(pages):
            last = i == len(pages) - 1
            if page or (last and keys is not None):
                self._transport.async_send_control(endpoint, schemas_frame(
                    mesh, self.node_id, keys if last else None, page, answer and last))

    def _offer_schemas(self, endpoint: str) -> None:
        """Offer a peer the keys of every schema document held (it answers with what we lack,
        and its own keys)."""
        if self._secure:
            self._send_schemas(endpoint, self._registry.keys(), [])

    def _on_schemas(self, frame: SchemaExchange) -> None:
        """A peer's schema documents and keys (authenticated as from ``frame.node``): take the
        documents, then answer an offer with what the offerer lacks and our keys, and an answer
        with what the answerer lacks. Insecure agents take none: the trust is the authority's."""
        assert self._node is not None
        if frame.mesh != self.config.mesh:
            self.counters["rejected_other_mesh"] += 1
            return
        if not self._secure:
            return
        member = self._node.peers.get(frame.node)
        if member is not None:
            self._node.touch(frame.node, time.monotonic())
        if frame.documents:
            self._learn_schemas(frame.documents, f"peer {frame.node}", frame.node)
        if frame.keys is None or member is None or frame.node not in self._node.peers:
            return
        if self._schema_watch is not None and self._schema_watch(frame.keys):
            self._schema_holders.add(frame.node)
        lacking = [d.blob for d in self._registry.lacking(frame.keys)]
        if not frame.answer:  # always answered, so that the offerer learns what we hold
            self._send_schemas(member.endpoint, self._registry.keys(), lacking, answer=True)
        elif lacking:
            self._send_schemas(member.endpoint, None, lacking)

    async def _wait_for_schemas(self, holds: Callable[[tuple[SchemaKey, ...]], bool],
                                timeout: float) -> tuple[int, int]:
        """Offer our schema keys to every peer and wait (up to ``timeout``) until the keys each
        answers with satisfy ``holds``; returns (peers whose do, peers). Documents come before
        the keys that end an answer, so once a peer has answered, we hold what it holds. Used
        by ``meshmq schema``: ``add`` waits for the agents to hold its schema, ``ls`` and
        ``show`` for the mesh's schemas."""
        assert self._node is not None
        self._schema_watch, self._schema_holders = holds, set()
        deadline = time.monotonic() + timeout
        try:
            while True:
                peers = dict(self._node.peers)
                behind = [m.endpoint for n, m in peers.items() if n not in self._schema_holders]
                if not behind or time.monotonic() >= deadline:
                    return len(peers) - len(behind), len(peers)
                for endpoint in behind:
                    self._offer_schemas(endpoint)  # their answer says what they hold
                await self._routes_changed(min(0.2, max(0.0, deadline - time.monotonic())))
        finally:
            self._schema_watch = None

    def _routes_for(self, topic: str, data: Any, type_: str | None, key: str | None,
                    headers: dict[str, str] | None) -> list[str]:
        """Topics the policy's content rules also send this message to."""
        if self._policy is None:
            return []
        routes = self._policy.routes(topic, self.service)
        if not routes:
            return []
        fields = {"data": data, "headers": headers or {}, "topic": topic, "type": type_, "source": self.service,
                  "key": key}
        extra = [r.to for r in routes if r.to != topic and r.when.matches(fields)]
        if extra:
            with self._counters_lock:
                self.counters["policy_rerouted"] += len(extra)
        return list(dict.fromkeys(extra))

    def _start_delivery(self, loop: asyncio.AbstractEventLoop) -> None:
        """The outbox and inbox, with what the store kept from the last run."""
        assert self._store is not None
        durable = self.config.durability != "memory"
        self._commit = GroupCommit(self._store, loop) if durable else None
        self._outbox = Outbox(self.node_id, self.config, self._commit, wake=self._wake,
                              dead_letter=self._undeliverable, counters=self.counters,
                              seal=self._seal_frame if self._secure else None)
        self._outbox.breaker_spec = self._breaker_spec
        self._outbox.windowed = self._windowed
        self._outbox.space.append(self._space_waiters.fire)
        self._outbox.on_breaker = self._breaker_changed
        self._inbox = Inbox(self.node_id, self.config, self._commit, loop, self._send_to, self.counters)
        if self._commit is not None:
            self._commit.before.append(self._before_commit)
        contents = self._contents
        if contents is not None:
            self._outbox.restore(contents, time.monotonic())
            self._inbox.restore(contents)
            self._remembered.restore(contents.peers, self.limits, time.time(), self.config.durable_forget_after)
            self._contents = None
            if self._outbox.count:
                log.info("outbox: %d messages from the last run wait for %d destinations",
                         self._outbox.count, len(self._outbox.dests))

    async def _open_store(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open this instance's store (its integrity check may take a while: off the loop) and
        take the identity kept there, or keep ours there for the next start."""
        cfg = self.config
        root = cfg.data_dir if cfg.data_dir is not None else Path.home() / ".meshmq"
        found: list[NodeKeys] = []

        def cipher_for(directory: Path) -> StoreCipher:
            # The identity is the key beside the store (created with it); it also encrypts and
            # signs the messages the store keeps. The store remembers which node it belongs to,
            # so a key swapped under it is caught.
            found.append(NodeKeys(load_or_create_key(directory / KEY_FILE, "node")))
            return StoreCipher(found[-1])

        store, self.store_dir = await loop.run_in_executor(None, functools.partial(
            open_instance, root, self.service, durability=cfg.durability, map_size=cfg.max_store_bytes,
            quarantine=cfg.quarantine_store, meta={"service": self.service}, cipher_for=cipher_for))
        self._store = store
        try:
            keys = found[-1]
            self._contents = contents = await loop.run_in_executor(None, store.load)
            kept = contents.meta.get("node")
            if kept is None:
                batch = Batch()
                batch.put_meta("node", keys.node_id)
                await asyncio.wrap_future(store.submit(batch))
            elif kept != keys.node_id:
                raise StoreError(f"store {self.store_dir} belongs to node {kept}, but its node.key is node "
                                 f"{keys.node_id}'s: restore the key, or move the store aside")
            self._set_identity(keys)
        except BaseException:
            self._close_store()
            raise
        if store.counters["quarantined"]:
            log.warning("store %s: %d damaged records were moved to quarantine", self.store_dir,
                        store.counters["quarantined"])

    def _set_identity(self, keys: NodeKeys) -> None:
        self._keys = keys
        self.node_id = keys.node_id
        self._signer = Signer(keys) if self._secure else None
        self._reply_topic = reply_topic(keys.node_id)

    def _load_certificate(self) -> None:
        """This node's certificate, and the authorities whose certificates it trusts: the
        configured authority keys and ``certificate``, or this user's development authority,
        from which the agent issues itself one. Then the revocations it knows."""
        cfg = self.config
        keys = self._keys
        now = time.time()
        if not self._secure:
            log.warning("agent %s runs INSECURE (insecure=True): no certificates, no encryption, no signatures, "
                        "no access rights; any process that reaches its endpoint can read and inject messages. "
                        "For experiments only; secure agents will not talk to it", self.service)
            return
        if cfg.authority is None:
            authority = Authority.development()
            quiet.log(logging.INFO, "dev-authority",
                      "certified by this user's development authority (%s): agents of this user on this machine "
                      "trust each other; for several hosts run 'meshmq authority init' and give every agent "
                      "MESHMQ_AUTHORITY and its MESHMQ_CERTIFICATE ('meshmq cert issue')", home())
            self._dev_authority = authority
            self._cert = self._own_certificate or self._dev_certificate(now)
            self._trusted = (authority.public,)
            self._rights = Rights(decode_certificate(self._cert))
            self._load_revocations()
            return
        trusted = self._read_authorities()
        if self._own_certificate is not None:
            data = self._own_certificate
        else:
            if cfg.certificate is None:
                raise ConfigError("certificate", "an agent of a mesh with an authority needs its certificate file "
                                                 "(meshmq cert issue ... -o FILE; MESHMQ_CERTIFICATE=FILE)")
            self._watched["certificate"] = _stat(cfg.certificate)
            try:
                data = unarmor(Path(cfg.certificate).read_text())
            except OSError as exc:
                raise ConfigError("certificate", f"cannot read {cfg.certificate}: {exc.strerror}") from None
            except CertificateError as exc:
                raise ConfigError("certificate", f"{cfg.certificate}: {exc}") from None
        try:
            cert = check_certificate(data, trusted, cfg.mesh, now)
        except CertificateError as exc:
            raise ConfigError("certificate", f"{cfg.certificate}: {exc}") from None
        if cert.node_key != keys.public:
            raise ConfigError("certificate", f"{cfg.certificate} is for node {cert.node_id}, not this agent's "
                                             f"node {keys.node_id} (issue it for this agent's key)")
        if cert.service != self.service:
            raise ConfigError("certificate", f"{cfg.certificate} is for service {cert.service!r}, "
                                             f"not {self.service!r}")
        self._cert = data
        self._trusted = trusted
        self._rights = Rights(cert)
        for sub in self._subs:  # made before start: now the certificate is known
            self._rights.check_subscribe(sub.pattern, sub._tokens)
        self._load_revocations()

    def _sign_record(self, record: NodeRecord) -> NodeRecord:
        unsigned = dataclasses.replace(record, sig=None)
        return dataclasses.replace(unsigned, sig=self._keys.sign(unsigned.signing_bytes()))

    def _vouch(self, record: NodeRecord) -> str | None:
        """Why a peer's record must be refused, or None: signed by the node it is about, with a
        certificate of a trusted authority for that node, service and mesh, valid now."""
        if record.sig is None or record.cert is None:
            return "unsigned"
        if self._revocations.node_revoked(record.node):
            return "revoked"
        seen = self._vouched.get(record.sig)
        if seen is not None and seen[1] >= time.time() and (seen[0] is not None or record.node in self._peer_keys):
            return seen[0]
        cert = self._trusted_certificate(record.cert, f"record of {record.node} ({record.service})")
        if cert is None:
            return "untrusted"
        if self._revocations.revoked(cert):
            problem = "revoked"
        elif cert.node_id != record.node or cert.service != record.service:
            problem = "mismatch"
        elif not verify(cert.node_key, record.signing_bytes(), record.sig):
            problem = "forged"
        elif any(split_endpoint(ep)[1] != b64(cert.node_key) for ep in record.endpoints):
            problem = "mismatch"  # an endpoint that names another key would lead us elsewhere
        elif not (rights := Rights.of(cert)).may_subscribe_all(record.subscriptions):
            problem = "not_permitted"  # it would receive what its certificate does not allow
        elif record.taps and not cert.tap:
            problem = "not_permitted"  # a tap without the tap right: nothing is mirrored to it
        else:
            problem = None
            self._peer_rights[record.node] = rights
            if self._peer_keys.get(record.node, (b"",))[0] != cert.node_key:
                assert self._signer is not None
                if len(self._peer_keys) >= 65536:
                    self._peer_keys.clear()  # refilled as records are vouched again
                self._peer_keys[record.node] = (cert.node_key, self._signer.shared_key(cert.node_key))
            self._admit(cert, record.node)
        if problem is not None:
            quiet.warning(f"record:{record.node}", "record of %s (%s) refused: %s", record.node, record.service,
                          problem)
        if len(self._vouched) >= 4096:
            self._vouched.clear()
        self._vouched[record.sig] = (problem, cert.not_after)
        return problem

    def _vouch_card(self, node: str, cert_data: bytes, endpoint: str) -> str | None:
        """Why a stranger's card must be refused, or None: a certificate of a trusted authority
        for that node and mesh, valid now, whose key its endpoint names. (Its frames count as
        the node's when they come over that key: the shell checks that per frame.)"""
        if self._revocations.node_revoked(node):
            return "revoked"
        cert = self._trusted_certificate(cert_data, f"card of {node}")
        if cert is None:
            return "untrusted"
        if self._revocations.revoked(cert):
            return "revoked"
        if cert.node_id != node or split_endpoint(endpoint)[1] != b64(cert.node_key):
            quiet.warning(f"card:{node}", "card of %s refused: its certificate is another node's", node)
            return "mismatch"
        self._admit(cert, node)
        return None

    def _trusted_certificate(self, data: bytes, whose: str) -> Certificate | None:
        """The certificate ``data`` if a trusted authority issued it for this mesh and it is
        valid now (checked once, then cached); None, logged, if not."""
        now = time.time()
        cert = self._certs.get(data)
        if cert is None:
            try:
                cert = check_certificate(data, self._trusted, self.config.mesh, now)
            except CertificateError as exc:
                quiet.warning(f"cert:{whose}", "%s refused: certificate %s", whose, exc)
                return None
            if len(self._certs) >= 4096:
                self._certs.clear()
            self._certs[data] = cert
        elif not cert.valid_at(now):
            return None
        return cert

    def _admit(self, cert: Certificate, node: str) -> None:
        """Frames that come over ``cert``'s key are ``node``'s from now on."""
        if len(self._curve_nodes) >= 65536:
            self._curve_nodes.clear()
        self._curve_nodes[curve_public_of(cert.node_key).decode()] = node

    # --- revocation, renewal and authority keys ------------------------------------------

    def _dev_certificate(self, now: float) -> bytes:
        """A certificate from this user's development authority, with every right."""
        assert self._dev_authority is not None
        return self._dev_authority.issue(node_key=self._keys.public, service=self.service, mesh=self.config.mesh,
                                         publish=(">",), subscribe=(">",), tap=True, not_before=now - 300,
                                         not_after=now + DEV_CERT_VALIDITY)

    def _read_authorities(self) -> tuple[bytes, ...]:
        """The authority keys of ``Config.authority`` (keys, and files of keys)."""
        assert self.config.authority is not None
        self._watched["authority"] = _stat_all(self.config.authority)
        try:
            return parse_authorities(self.config.authority, read=_read_authority_file)
        except UsageError as exc:
            raise ConfigError("authority", str(exc)) from None

    def _load_revocations(self) -> None:
        """The revocations kept in the store and those of ``Config.revocations`` (at start, off
        the loop). An agent whose own certificate is revoked does not start."""
        cfg = self.config
        self._revocations = RevocationList(cfg.mesh, self._trusted, cfg.max_revocations)
        now = time.time()
        contents = self._contents
        kept = contents.meta.get("revocations") if contents is not None else None
        if isinstance(kept, list):
            for data in kept:
                if type(data) is bytes:
                    self._take_revocation(data, now, "the store")
        if cfg.revocations is not None:
            self._watched["revocations"] = _stat(cfg.revocations)
            try:
                blobs = unarmor_revocations(Path(cfg.revocations).read_text(), cfg.max_revocations)
            except OSError as exc:
                raise ConfigError("revocations", f"cannot read {cfg.revocations}: {exc.strerror}") from None
            except CertificateError as exc:
                raise ConfigError("revocations", f"{cfg.revocations}: {exc}") from None
            for data in blobs:
                self._take_revocation(data, now, str(cfg.revocations))
        assert self._cert is not None
        own = decode_certificate(self._cert)
        if self._revocations.revoked(own):
            fix = ("a node revoked for good needs a new node key" if self._revocations.node_revoked(own.node_id)
                   else "issue it a new certificate (meshmq cert issue)")
            raise ConfigError("certificate", f"this agent's certificate (serial {own.serial.hex()}) or its node "
                                             f"{own.node_id} is revoked by the mesh authority; {fix}")

    def _take_revocation(self, data: bytes, now: float, source: str,
                         strict: bool = False) -> tuple[str, Revocation | None]:
        """Add one revocation to the list, counting and logging what is refused (raising
        instead with ``strict``). Returns (verdict, revocation): see :class:`RevocationList`,
        plus ``rejected``."""
        try:
            verdict, revocation = self._revocations.add(data, now)
        except CertificateError as exc:
            self.counters["revocations_rejected"] += 1
            if strict:
                raise
            quiet.warning(f"revocation:{source}", "a revocation from %s was refused: %s", source, exc)
            return "rejected", None
        if verdict == "full":
            self.counters["revocations_refused_full"] += 1
            problem = (f"this agent keeps at most max_revocations={self.config.max_revocations} revocations: "
                       f"a revocation from {source} was refused; raise max_revocations")
            if strict:
                raise UsageError(problem)
            quiet.log(logging.ERROR, "revocations-full", "%s", problem)
        elif verdict == "new":
            self.counters["revocations"] += 1
        return verdict, revocation

    def add_revocation(self, revocation: bytes | str) -> bool:
        """Take revocations signed by the mesh authority (what ``meshmq cert revoke`` writes: a
        revocation file's text, or one revocation's bytes): cut off at once what they name, keep
        them in the store, and spread them to every peer, which does the same. Returns whether
        any was new to this agent.

        Raises:
            CertificateError: not a revocation, or not of a trusted authority for this mesh.
            UsageError: this agent keeps ``max_revocations`` revocations already.
        """
        self._check_running()
        if isinstance(revocation, (bytes, bytearray)) and not bytes(revocation).lstrip().startswith(b"-----"):
            blobs = [bytes(revocation)]
        else:
            text = revocation if isinstance(revocation, str) else bytes(revocation).decode(errors="replace")
            blobs = unarmor_revocations(text, self.config.max_revocations)
        return self._learn_revocations(blobs, "this process", None, strict=True)

    def _learn_revocations(self, blobs: list[bytes] | tuple[bytes, ...], source: str, sender: str | None,
                           strict: bool = False) -> bool:
        """Revocations from ``source``: enforce the new ones, keep and forward what changed.

        Taken from this process (``sender`` None: the API, a file, the store), they go to every
        peer: in a full mesh that is one hop to everyone. Taken from a peer, they go on to
        ``gossip_fanout`` random peers only, in case the first agent did not reach everyone;
        so one revocation costs about (1 + fanout) frames per agent, not one per pair."""
        changed = []
        now = time.time()
        for data in blobs:
            verdict, revocation = self._take_revocation(data, now, source, strict)
            if verdict == "new":
                assert revocation is not None
                self._enforce(revocation)
            if verdict in ("new", "replaced"):
                changed.append(data)
        if changed:
            if self._commit is not None and self._store is not None:
                # Queued now, not in this turn's group commit: a stop right after still keeps it.
                batch = Batch()
                batch.put_meta("revocations", self._revocations.blobs())
                self._store.submit(batch).add_done_callback(_revocations_stored)
            if not self._revoked_self and self._node is not None:  # peers drop what a revoked node sends
                peers = [n for n in self._node.peers if n != sender]
                if sender is not None:
                    peers = random.sample(peers, min(len(peers), self.config.gossip_fanout))
                for node in peers:
                    self._send_revocations(self._node.peers[node].endpoint, REVOKE_PUSH, changed)
        return bool(changed)

    def _enforce(self, revocation: Revocation) -> None:
        """Cut off at once every node the revocation names (and note if it names us)."""
        subject = revocation.node or revocation.subject.hex()
        log.warning("the mesh authority revoked %s %s", revocation.kind, subject)
        self._control(REVOCATION, revocation.node, None, f"the mesh authority revoked {revocation.kind} {subject}")
        self._vouched.clear()  # verdicts were given before the revocation
        assert self._cert is not None
        if self._revocations.revoked(decode_certificate(self._cert)) and not self._revoked_self:
            self._revoked_self = True
            self.counters["revoked_self"] += 1
            log.error("this agent's %s is revoked by the mesh authority: its peers refuse it from now on. %s",
                      "node" if revocation.kind == NODE else f"certificate (serial {subject})",
                      "A node revoked for good needs a new node key." if revocation.kind == NODE else
                      "Give it a new certificate (renew_certificate, or replace its MESHMQ_CERTIFICATE file).")
        nodes = set()
        if revocation.node is not None and revocation.node != self.node_id:
            nodes.add(revocation.node)
        if self._node is not None:
            for node, member in self._node.members.items():
                record = member.entry.record
                if record is not None and record.cert is not None and self._cert_revoked(record.cert):
                    nodes.add(node)
        self._cut_off(nodes, "revoked", ban=revocation.kind == NODE,
                      tell=self._revocations.entries[revocation.key][1])

    def _cert_revoked(self, data: bytes) -> bool:
        cert = self._certs.get(data)
        if cert is None:
            try:
                cert = decode_certificate(data)
            except CertificateError:
                return False
        return self._revocations.revoked(cert)

    def _cut_off(self, nodes: set[str], reason: str, ban: bool, tell: bytes | None = None) -> None:
        """Take ``nodes`` out of the mesh as this agent sees it: no frame of theirs is acted on
        from now on (their CURVE keys are forgotten; with ``ban`` the ZAP handler refuses them
        too), they leave routing, their links close (after sending peers the revocation
        ``tell``), and what waits for them in the outbox is dropped and counted."""
        if not nodes:
            return
        keys = {key for key, node in self._curve_nodes.items() if node in nodes}
        for key in keys:
            del self._curve_nodes[key]
        if len(self._revoked_keys) + len(keys) > 65536:
            self._revoked_keys.clear()  # bounded; these only pick the counter of dropped frames
        if reason == "revoked":
            self._revoked_keys |= keys
        transport = self._transport
        if ban and transport is not None:
            transport.banned = transport.banned | keys  # replaced, never mutated: the ZAP thread reads it
        for node in nodes:
            self._peer_rights.pop(node, None)
            self._peer_keys.pop(node, None)
            self._revocation_digests.pop(node, None)
            if self._remembered.forget(node, self._store_batch):
                self._fanout, self._single = {}, {}
            if self._node is None:
                continue
            member = self._node.peers.get(node)
            if member is not None and transport is not None and tell is not None:
                # Tell it why (it logs it), on a link that then closes: the core unlinks it next.
                transport.async_send_and_close(member.endpoint, revoke_frame(
                    self.config.mesh, self.node_id, REVOKE_PUSH, self._revocations.digest, [tell]), REVOKED_LINGER)
            if member is not None:
                self.counters[f"peers_cut_off_{reason}"] += 1
            self._apply(self._node.revoke(node, time.monotonic(), reason))
            if self._outbox is not None and node in self._outbox.dests:
                self._peer_down(node)  # remembered while down: its messages go now

    def _forget_revoked(self) -> None:
        """At start: durable subscribers remembered from the last run that are revoked now."""
        for node, record in list(self._remembered.records.items()):
            if self._revocations.node_revoked(node) or (record.cert is not None and self._cert_revoked(record.cert)):
                self._remembered.forget(node, self._store_batch)
                assert self._outbox is not None
                dropped = self._outbox.peer_down(node, False)
                if dropped:
                    self.counters["dropped_peer_gone"] += dropped

    # revocation lists compared between peers (frames REVOKE; see _wire)

    def _send_revocations(self, endpoint: str, phase: int, blobs: list[bytes]) -> None:
        """Send revocations (and our list's digest) to a peer, in frames of at most
        MAX_FRAME_REVOCATIONS; all but the last one are pushes."""
        assert self._transport is not None
        mesh, digest = self.config.mesh, self._revocations.digest
        pages = [blobs[i:i + MAX_FRAME_REVOCATIONS] for i in range(0, len(blobs), MAX_FRAME_REVOCATIONS)] or [[]]
        for i, page in enumerate(pages):
            last = i == len(pages) - 1
            self._transport.async_send_control(endpoint, revoke_frame(
                mesh, self.node_id, phase if last else REVOKE_PUSH, digest, page))

    def _compare_revocations(self, endpoint: str) -> None:
        """Open a comparison of revocation lists with the peer at ``endpoint`` (after this loop
        turn: a new peer must first have our hello, sent in this turn)."""
        if self._loop is not None:
            self._loop.call_soon(self._send_revocations_open, endpoint)

    def _send_revocations_open(self, endpoint: str) -> None:
        if self._state == "running" and self._transport is not None and endpoint in self._transport.links:
            self._send_revocations(endpoint, REVOKE_OPEN, [])
            if self.config.policy_file is None and self._secure:
                self._send_policy(endpoint, with_document=False)  # a newcomer may have an older policy
            self._offer_schemas(endpoint)  # and lack schemas (or hold some we lack)

    def _on_revocations(self, frame: Revocations) -> None:
        """A peer's revocations (authenticated as from ``frame.node``): take what is new, then
        answer an open with our digest (and our list if the digests differ), and a reply
        that still differs from ours with our list."""
        assert self._node is not None
        if frame.mesh != self.config.mesh:
            self.counters["rejected_other_mesh"] += 1
            return
        member = self._node.peers.get(frame.node)
        if member is not None:
            self._node.touch(frame.node, time.monotonic())
            if len(self._revocation_digests) >= 2 * self.config.max_peers:
                self._revocation_digests.clear()
            self._revocation_digests[frame.node] = frame.digest
        if frame.revocations:
            self._learn_revocations(frame.revocations, f"peer {frame.node}", frame.node)
        if member is None or frame.node not in self._node.peers:
            return
        differs = frame.digest != self._revocations.digest
        if frame.phase == REVOKE_OPEN:
            self._send_revocations(member.endpoint, REVOKE_REPLY, self._revocations.blobs() if differs else [])
        elif frame.phase == REVOKE_REPLY and differs:
            self._send_revocations(member.endpoint, REVOKE_PUSH, self._revocations.blobs())

    async def _wait_revocations_spread(self, timeout: float) -> tuple[int, int]:
        """Wait (up to ``timeout``) until every peer's revocation list has our digest; returns
        (peers that have it, peers). Used by ``meshmq cert revoke``."""
        assert self._node is not None
        deadline = time.monotonic() + timeout
        while True:
            digest = self._revocations.digest
            peers = dict(self._node.peers)
            behind = [m.endpoint for n, m in peers.items() if self._revocation_digests.get(n) != digest]
            if not behind or time.monotonic() >= deadline:
                return len(peers) - len(behind), len(peers)
            for endpoint in behind:
                self._send_revocations(endpoint, REVOKE_OPEN, [])
            await self._routes_changed(min(0.2, max(0.0, deadline - time.monotonic())))

    # run-time changes: renewal, authority keys, expiry

    def renew_certificate(self, certificate: bytes | str | os.PathLike[str]) -> None:
        """Take a new certificate while running (a renewal, new rights, or one from a new
        authority key): peers get the agent's record with it at once, re-signed at a higher
        incarnation; nothing is interrupted. ``certificate``: a file's path, its text, or the
        certificate's bytes. Replacing the file of ``Config.certificate`` does the same.

        Raises:
            CertificateError: it is not valid now, not of a trusted authority and this mesh,
                not for this node and service, or revoked.
            NotPermitted: it does not allow a subscription this agent has.
        """
        self._check_running()
        if isinstance(certificate, os.PathLike) or (isinstance(certificate, str)
                                                   and not certificate.lstrip().startswith("-----")):
            try:
                certificate = Path(certificate).read_text()
            except OSError as exc:
                raise UsageError(f"cannot read the certificate {certificate}: {exc.strerror}") from None
        if isinstance(certificate, str):
            data = unarmor(certificate)
        elif bytes(certificate).lstrip().startswith(b"-----"):
            data = unarmor(bytes(certificate).decode(errors="replace"))
        else:
            data = bytes(certificate)
        self._renew(data)

    def _renew(self, data: bytes) -> bool:
        """Adopt ``data`` as our certificate (checked); returns whether it changed."""
        cert = check_certificate(data, self._trusted, self.config.mesh, time.time())
        if cert.node_key != self._keys.public:
            raise CertificateError(f"the certificate is for node {cert.node_id}, not this agent's node "
                                   f"{self.node_id}")
        if cert.service != self.service:
            raise CertificateError(f"the certificate is for service {cert.service!r}, not {self.service!r}")
        if self._revocations.revoked(cert):
            raise CertificateError(f"the certificate (serial {cert.serial.hex()}) is revoked")
        rights = Rights(cert)
        for sub in self._subs:
            rights.check_subscribe(sub.pattern, sub._tokens)
        if data == self._cert:
            return False
        self._cert = data
        self._rights = rights
        self._revoked_self = False
        self.counters["certificate_renewals"] += 1
        log.info("certificate renewed: serial %s, valid until %s", cert.serial.hex(), cert.describe()["not_after"])
        if self._node is not None:
            self._apply(self._node.set_certificate(data, time.monotonic()))
        return True

    def _security_tick(self, now: float) -> None:
        """Run-time changes, from the agent's timer: compare revocation lists with a random
        peer now and then; every SECURITY_TICK look at the files (renewal, rollover) and the
        peers' certificates (expired or no longer trusted ones are cut off)."""
        node = self._node
        assert node is not None
        if not self._secure:
            return  # nothing to check: no certificates, no revocations
        if now >= self._next_revocation_sync:
            self._next_revocation_sync = now + REVOCATION_SYNC_ROUNDS * self.config.gossip_interval
            if node.peers:
                peer = node.peers[random.choice(list(node.peers))]
                self._send_revocations(peer.endpoint, REVOKE_OPEN, [])
                if self.config.policy_file is None:
                    self._send_policy(peer.endpoint, with_document=False)
                self._offer_schemas(peer.endpoint)
        if now < self._next_security_check:
            return
        self._next_security_check = now + SECURITY_TICK
        wall = time.time()
        for gone in self._revocations.expire(wall):
            log.info("forgot the revocation of %s %s: the certificate has expired", gone.kind, gone.subject.hex())
        try:
            self._reload_files(wall)
        except MeshError as exc:
            self.counters["reload_failed"] += 1
            quiet.warning("reload", "a changed security file was not taken: %s", exc)
        self._check_peers()

    def _reload_files(self, wall: float) -> None:
        cfg = self.config
        if cfg.authority is not None and _stat_all(cfg.authority) != self._watched.get("authority"):
            trusted = self._read_authorities()
            if trusted != self._trusted:
                log.info("authority keys changed: trusting %s", ", ".join(b64(k)[:12] + "…" for k in trusted))
                self._trusted = trusted
                self._revocations.authorities = trusted
                self._certs.clear()
                self._vouched.clear()
        if self._own_certificate is None:
            if cfg.certificate is not None and _stat(cfg.certificate) != self._watched.get("certificate"):
                self._watched["certificate"] = _stat(cfg.certificate)
                self.renew_certificate(cfg.certificate)
            elif self._dev_authority is not None:
                assert self._cert is not None
                cert = decode_certificate(self._cert)
                if cert.not_after - wall < DEV_CERT_VALIDITY / 2:  # renewed long before it runs out
                    self._renew(self._dev_certificate(wall))
        if cfg.revocations is not None and _stat(cfg.revocations) != self._watched.get("revocations"):
            self._watched["revocations"] = _stat(cfg.revocations)
            try:
                blobs = unarmor_revocations(Path(cfg.revocations).read_text(), cfg.max_revocations)
            except OSError as exc:
                raise UsageError(f"cannot read {cfg.revocations}: {exc.strerror}") from None
            self._learn_revocations(blobs, str(cfg.revocations), None)

    def _check_peers(self) -> None:
        """Cut off peers whose record this agent no longer vouches for: the certificate expired,
        or its authority is no longer trusted (verdicts are cached until a certificate expires)."""
        assert self._node is not None
        failed: dict[str, set[str]] = {}
        for node, member in self._node.peers.items():
            problem = self._vouch(member.record)
            if problem is not None:
                failed.setdefault(problem, set()).add(node)
        for problem, nodes in failed.items():
            self._cut_off(nodes, problem, ban=False)

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    async def stop(self) -> None:
        """Say goodbye and close. Waits up to ``stop_timeout`` for peers that are up to
        acknowledge what was sent to them; what they did not stays in the outbox (with a
        durable store) and goes after the next start. Idempotent."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopping"
        assert self._node is not None and self._transport is not None and self._outbox is not None
        deadline = time.monotonic() + self.config.stop_timeout
        while self._unacked_to_live_peers() and time.monotonic() < deadline:
            await self._space_waiters.wait(min(0.05, deadline - time.monotonic()))
        self._apply(self._node.stop(time.monotonic()))
        self._transport.flush_all()
        for handle in (self._tick_handle, self._work_timer, self._outbox_timer, self._stats_timer):
            if handle is not None:
                handle.cancel()
        if self._discovery is not None:
            await self._discovery.async_close()
        for sub in list(self._subs):
            sub._closed()
        if self._metrics is not None:
            await self._metrics.stop()
            self._metrics = None
        if self._mirror is not None:
            self._mirror.close()
        for tap in list(self._taps):
            tap.close()
        self._transport.async_close(linger=max(0.0, min(0.5, deadline - time.monotonic())))
        self._aside.clear()  # not acknowledged as handled: their senders keep them
        self._aside_bytes = 0
        if self._store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._close_store)
        self._state = "stopped"
        self._route_waiters.fire()
        if self._outbox.count:
            log.info("agent %s stopped with %d messages in its outbox%s", self.service, self._outbox.count,
                     "" if self._commit is not None else " (durability memory: they are lost)")
        log.info("agent %s (%s) stopped", self.service, self.node_id)

    def _unacked_to_live_peers(self) -> bool:
        assert self._outbox is not None
        return any(d.pending and d.link is not None for d in self._outbox.dests.values())

    async def __aenter__(self) -> AsyncAgent:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints this agent receives on (after start)."""
        return self._node.record.endpoints if self._node else ()

    def _check_running(self) -> None:
        if self._state != "running":
            what = "not started (use 'async with' or await start())" if self._state == "new" else "stopped"
            raise AgentClosed(f"agent {self.service!r} is {what}")

    # --- publishing -----------------------------------------------------------------

    async def publish(self, topic: str, data: Any, *, type: str | None = None, key: str | None = None,
                      headers: dict[str, str] | None = None, schema_version: int = 1,
                      ttl: float | None = None) -> str:
        """Send ``data`` to every subscriber of ``topic``; return the message id.

        ``data`` is bytes (sent as they are) or a msgpack-able value. ``type`` is
        the event type used by :meth:`on`; ``key`` keeps related messages on one
        queue-group member; ``ttl`` (seconds, default ``Config.default_ttl``) is how
        long the message stays deliverable: after it, it is dead-lettered instead of
        handed to a handler.

        Returns once the message is in the outbox: committed to the store (per
        ``Config.durability``) for every destination, including durable subscribers that
        are down. Concurrent publishes share one commit. While the outbox (or one
        destination's share of it) is full, waits up to ``publish_timeout``, then raises
        :class:`OutboxFull` (:class:`PeerQueueFull`); nothing is kept then. The same holds
        for a subscription of this agent that matches ``topic`` and is full
        (``subscription_queue_messages``): :class:`SubscriptionFull`. If the commit
        fails, raises :class:`StoreError` and the message is not sent.
        """
        if type is None and key is None and headers is None and ttl is None and schema_version == 1:
            mid = self._publish_plain(topic, data)
            if mid is not None:
                return mid
        prepared = self._prepare(topic, data, type, key, headers, schema_version, ttl)
        if self._policy is not None:
            return await self._publish_by_policy(prepared, data, type, key, headers, schema_version, ttl)
        try:  # the common case, without a second coroutine per message
            stored = self._enqueue(prepared)
        except _Full:
            stored = await self._enqueue_when_room(prepared)
        if stored:
            await self._committed()
        return prepared[2].hex()

    async def _publish_by_policy(self, prepared: _Prepared, data: Any, type_: str | None, key: str | None,
                                 headers: dict[str, str] | None, schema_version: int, ttl: float | None) -> str:
        """:meth:`publish` under a policy: paced by its rate limit, and also sent where its
        content rules route it."""
        topic = prepared[0]
        delayed = False
        while (wait := self._pace(topic, can_wait=True, mid=prepared[2])) > 0:
            if not delayed:
                delayed = True
                self._tap_event(LIMITED, [(topic, prepared[2])], None, f"delayed {wait:.3f}s by the policy")
            await asyncio.sleep(wait)
        if wait < 0:
            self._policy_dead_letter(prepared, topic)
            return prepared[2].hex()
        routes = self._routes_for(topic, data, type_, key, headers)
        for to in routes:
            self._tap_event(REROUTED, [(topic, prepared[2])], None, f"also to {to} by the policy")
        batch = [prepared] + [self._prepare(to, data, type_, key, headers, schema_version, ttl) for to in routes]
        stored = False
        for one in batch:
            try:
                stored = self._enqueue(one) or stored
            except _Full:
                stored = await self._enqueue_when_room(one) or stored
        if stored:
            await self._committed()
        return prepared[2].hex()

    def _policy_dead_letter(self, prepared: _Prepared, topic: str) -> None:
        """A message the policy's rate limit dead-letters instead of sending (kept, never lost)."""
        msg = decode_envelope(prepared[3], self.limits)
        self._call_on_loop(self._tap_event, LIMITED, [(topic, prepared[2])], None, "dead-lettered by the policy")
        self._call_on_loop(self._store_dead_letter, msg, "rate-limited", f"over the rate of the policy for {topic}",
                           f"policy:{topic}", None, 0, None)

    def _committed(self) -> asyncio.Future[None]:
        """A future done when the batch being built is committed (failed: StoreError)."""
        waiter = self._batch_waiter
        if waiter is None:
            assert self._loop is not None and self._commit is not None
            waiter = self._batch_waiter = self._loop.create_future()
            self._commit.add()
        return waiter

    def _before_commit(self, batch: Batch) -> Callable[[BaseException | None], None] | None:
        waiter, self._batch_waiter = self._batch_waiter, None
        if waiter is None:
            return None

        def done(exc: BaseException | None) -> None:
            if waiter.done():
                return
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc if isinstance(exc, MeshError) else StoreError(str(exc)))

        return done

    async def _enqueue_when_room(self, prepared: _Prepared) -> bool:
        """Back-pressure: retry :meth:`_enqueue` as the outbox drains, for up to ``publish_timeout``."""
        deadline = time.monotonic() + self.config.publish_timeout
        while True:
            await self._space_waiters.wait(min(deadline - time.monotonic(), 0.1))
            try:
                return self._enqueue(prepared)
            except _Full as full:
                if deadline - time.monotonic() <= 0:
                    raise self._full_error(full.dest) from None

    def publish_nowait(self, topic: str, data: Any, *, type: str | None = None, key: str | None = None,
                       headers: dict[str, str] | None = None, schema_version: int = 1,
                       ttl: float | None = None) -> str:
        """As :meth:`publish`, for plain (non-async) code on the agent's loop, such as a
        handler: raises :class:`OutboxFull` (or :class:`SubscriptionFull`) at once instead of waiting for room, and
        returns before the outbox commit is done (a crash within the next milliseconds may
        lose the message; use ``await publish`` where that matters)."""
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            raise UsageError("AsyncAgent.publish_nowait must be called on the agent's event loop; "
                             "from other threads use the blocking meshmq.Agent")
        if type is None and key is None and headers is None and ttl is None and schema_version == 1:
            mid = self._publish_plain(topic, data)
            if mid is not None:
                return mid
        prepared = self._prepare(topic, data, type, key, headers, schema_version, ttl)
        batch = [prepared]
        if self._policy is not None:
            if self._pace(topic, can_wait=False, mid=prepared[2]) < 0:  # delay is not possible here: RateLimited
                self._policy_dead_letter(prepared, topic)
                return prepared[2].hex()
            batch += [self._prepare(to, data, type, key, headers, schema_version, ttl)
                      for to in self._routes_for(topic, data, type, key, headers)]
        for one in batch:
            try:
                if self._enqueue(one):
                    self._committed().add_done_callback(_consume_exception)  # counted by the outbox if it fails
            except _Full as full:
                raise self._full_error(full.dest) from None
        return prepared[2].hex()

    def _full_error(self, dest: Destination | Subscription | None) -> Backpressure:
        with self._counters_lock:
            self.counters["publish_backpressure_errors"] += 1
        timeout = self.config.publish_timeout
        if isinstance(dest, Subscription):
            return SubscriptionFull(dest.pattern, dest._backlog(), timeout)
        if dest is None:
            assert self._outbox is not None
            return OutboxFull(self._outbox.count, self._outbox.bytes, timeout)
        return PeerQueueFull(dest.node, dest.service, dest.pending, timeout, dest.bytes)

    def _prepare(self, topic: str, data: Any, type_: str | None, key: str | None,
                 headers: dict[str, str] | None, schema_version: int, ttl: float | None = None) -> _Prepared:
        """Check every argument and encode the envelope: safe from any thread, touches no shared state."""
        if self._state != "running":
            self._check_running()
        if ttl is None and self._policy is not None and (rule := self._policy.first("ttl", topic, self.service)):
            ttl = rule.ttl
        if ttl is not None or self.config.default_ttl:
            headers = self._with_ttl(headers, ttl)
        if self._tracing or _trace.current.get() is not None:
            if headers is None or isinstance(headers, dict):
                headers = _trace.for_publish(headers, self._tracing, topic)
        if (type_ is None and key is None and headers is None and schema_version == 1
                and type(data) is bytes and len(data) <= self.limits.max_payload_bytes
                and topic in self._checked_topics):
            fmt, raw, hdrs = FORMAT_BYTES, data, None  # the plain case: nothing else to check
        else:
            if topic not in self._checked_topics:
                cfg = self.config
                check_user_topic(topic, cfg.max_topic_length, cfg.max_topic_tokens)
                if len(self._checked_topics) >= 4096:
                    self._checked_topics.clear()
                self._checked_topics[topic] = None
            if type_ is not None and (type(type_) is not str or not 0 < len(type_) <= 255):
                raise UsageError(f"type must be a non-empty str of at most 255 characters, got {type_!r}")
            if key is not None and (type(key) is not str or not 0 < len(key) <= 255):
                raise UsageError(f"key must be a non-empty str of at most 255 characters, got {key!r}")
            if type(schema_version) is not int or schema_version < 0:
                raise UsageError(f"schema_version must be a non-negative int, got {schema_version!r}")
            if type(data) is bytes and len(data) <= self.limits.max_payload_bytes:
                fmt, raw = FORMAT_BYTES, data
            else:
                fmt, raw = encode_payload(data, self.limits)
            hdrs = None if headers is None else check_headers(headers, self.limits)
        if self._checked_schemas or self._policy is not None:
            self._check_outgoing(topic, data, type_, schema_version)
        return self._seal(topic, type_, schema_version, hdrs, key, fmt, raw)

    def _with_ttl(self, headers: dict[str, str] | None, ttl: float | None) -> dict[str, str]:
        if ttl is None:
            ttl = self.config.default_ttl
        elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL:
            raise UsageError(f"ttl must be more than 0 and at most {MAX_TTL:g} seconds, got {ttl!r}")
        if headers is not None and not isinstance(headers, dict):
            return headers  # check_headers names the problem
        return {**(headers or {}), TTL: repr(float(ttl))}

    def _seal(self, topic: str, type_: str | None, schema_version: int, headers: dict[str, str] | None,
              key: str | None, fmt: int, raw: bytes) -> _Prepared:
        """A new message id and the envelope bytes, packed with this thread's packer."""
        if not self._rights.may_publish(topic):
            # may_publish is False only under a certificate: cert is not None here.
            raise NotPermitted(f"this agent's certificate does not allow publishing on {topic!r} "
                               "(it allows: "
                               f"{', '.join(self._rights.cert.publish) or 'nothing'})")  # type: ignore[union-attr]
        state = self._thread_state()
        mid = self._id_prefix + next(self._id_counter).to_bytes(8, "big")
        now = time.time()
        env = encode_envelope(mid, now, topic, type_, self.service, self.node_id,
                              schema_version, headers, key, fmt, raw, state.packer)
        expires = now + float(headers[TTL]) if headers is not None and TTL in headers else NEVER
        return topic, key, mid, env, state, expires

    def _publish_plain(self, topic: str, data: Any) -> str | None:
        """The hot path of publish (loop thread): bytes, no options, a topic already checked
        with one remote subscriber, an outbox in memory with room, nothing that watches or
        changes messages (policy, taps, schemas, tracing, a default time to live). It does
        what _prepare, _seal and _enqueue do for such a message, without their tests for
        what does not apply; None when anything does (the caller takes the general path,
        which also raises the errors)."""
        lane = self._single.get(topic)
        if (lane is None or type(data) is not bytes or len(data) > self.limits.max_payload_bytes
                or topic not in self._checked_topics or self._state != "running" or self._policy is not None
                or self._tapped or self._tracing or self._checked_schemas or self.config.default_ttl
                or _trace.current.get() is not None):
            return None
        outbox = self._outbox
        assert outbox is not None
        if outbox.durable or not self._rights.may_publish(topic):
            return None
        state = self._thread_state()
        mid = self._id_prefix + next(self._id_counter).to_bytes(8, "big")
        env = encode_envelope(mid, time.time(), topic, None, self.service, self.node_id, 1, None, None,
                              FORMAT_BYTES, data, state.packer)
        size = len(env)
        dest = lane.dest
        if (outbox.count >= outbox.max_count or outbox.bytes + size > outbox.max_bytes
                or dest.count >= outbox.max_dest_count or dest.bytes + size > outbox.max_dest_bytes):
            return None  # full: the general path waits for room or raises (this id goes unused)
        outbox.put(lane, env, size, NEVER, 0.0)
        state.published += 1
        if dest.link is not None:
            self._send_soon(dest.link, lane)
        return mid.hex()

    def _enqueue(self, prepared: _Prepared) -> bool:
        """Put one envelope in the outbox for every destination, or for none (raises
        :class:`_Full`). Loop thread only. Returns whether a commit must be waited for."""
        topic, key, mid, env, state, expires = prepared
        if self._state != "running":
            self._check_running()
        outbox = self._outbox
        assert outbox is not None
        lane = self._single.get(topic)
        if lane is not None:  # the hot path: one remote subscriber, room in the outbox
            size = len(env)
            dest = lane.dest
            if (outbox.count < outbox.max_count and outbox.bytes + size <= outbox.max_bytes
                    and dest.count < outbox.max_dest_count and dest.bytes + size <= outbox.max_dest_bytes):
                if self._tapped:
                    self._mirror.message(topic, env, dest.node, lane.number)  # type: ignore[union-attr]
                outbox.put(lane, env, size, expires, 0.0)
                state.published += 1
                if outbox.durable:
                    return True
                if dest.link is not None:
                    self._send_soon(dest.link, lane)
                return False
        nodes = self._fanout.get(topic)
        if nodes is not None:  # the common case: plain subscribers only, every node gets the same entry
            targets: list[tuple[str, Any]] = [(node, env) for node in nodes]
        else:
            targets = self._targets(topic, key, env)
        if not targets:
            state.unrouted += 1
            if self._tapped:
                self._mirror.message(topic, env, [])  # type: ignore[union-attr]
            return False
        size = len(env)
        lanes = []
        local = None
        number = self._lane_of(topic)
        for node, entry in targets:
            if node == self.node_id:
                local = entry
                continue
            lanes.append((outbox.lane(node, self._service_of(node), self._node_links.get(node), number), entry))
        if local is not None and (self._overloaded_subs or len(self._local) >= self._limit_local):
            sub = self._local_full(topic)
            if sub is not None:
                raise _Full(sub)
        if lanes:
            full = outbox.full([lane.dest for lane, _ in lanes], size)
            if full is not None:
                raise _Full(None if full is True else full)  # type: ignore[arg-type]
        if self._tapped:  # before it is sent: a tap sees a message before what happens to it
            self._mirror.message(topic, env, [lane.dest.node for lane, _ in lanes]  # type: ignore[union-attr]
                                 + ([self.node_id] if local is not None else []), number)
        if lanes:
            now = time.monotonic()
            durable = outbox.durable
            for lane, entry in lanes:
                outbox.put(lane, entry, size, expires, now)
                link = lane.dest.link
                if link is not None and not durable:
                    self._send_soon(link, lane)
        if local is not None:
            self._local.append(local)
            if not self._local_scheduled:
                self._local_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._flush_local)
        state.published += 1
        return bool(lanes) and outbox.durable

    def _send_soon(self, link: Link, lane: Lane) -> None:
        """An idle link sends at once (latency); what follows within SEND_NOW_WINDOW is
        flushed together at the end of the loop turn (throughput), or as soon as a full
        frame's worth waits (a publisher that never yields still keeps the pipe busy).
        Nothing while the destination's send window is full: its next receipt wakes the link."""
        if link.watching or lane.dest.held:
            return
        stream = lane.stream
        transport = self._transport
        assert transport is not None
        if link.scheduled:
            if stream.ready - stream.sent_upto >= self.config.max_batch_messages:
                # A busy link, not an idle one: what follows is batched too (without this, the
                # next message after each full frame left alone, in a frame of its own).
                transport.flush(link)
                link.hot_until = time.monotonic() + SEND_NOW_WINDOW
            return
        now = time.monotonic()
        if now >= link.hot_until and not link.frames:
            link.hot_until = now + SEND_NOW_WINDOW
            transport.flush(link)
        else:
            transport.wake(link)

    def _service_of(self, node: str) -> str:
        assert self._node is not None
        peer = self._node.peers.get(node)
        if peer is not None:
            return peer.record.service
        record = self._remembered.records.get(node)
        return record.service if record is not None else ""

    def _thread_state(self) -> _ThreadState:
        """This thread's packer and counters (publishers may be several threads of the blocking Agent)."""
        try:
            return self._tls.state  # type: ignore[no-any-return]
        except AttributeError:
            state = self._tls.state = _ThreadState()
            self._thread_states.append(state)
            return state

    def _resolve_fanout(self, topic: str) -> tuple[str, ...] | None:
        """The nodes of a topic routed to plain subscribers only (cached); None otherwise."""
        route = self._index.resolve(topic)
        if route.groups or self._remembered.index.resolve(topic).groups:
            return None  # the per-message path chooses group members
        nodes = tuple(dict.fromkeys(route.plain + self._remembered.plain(topic, self._node_links)))
        fanout = self._fanout
        if len(fanout) >= 4096:
            fanout.clear()
            self._single = {}
        fanout[topic] = nodes
        if len(nodes) == 1 and nodes[0] != self.node_id and self._outbox is not None:
            node = nodes[0]
            self._single[topic] = self._outbox.lane(node, self._service_of(node), self._node_links.get(node),
                                                    self._lane_of(topic))
        return nodes

    def _targets(self, topic: str, key: str | None, env: bytes) -> list[tuple[str, Any]]:
        """(node, entry) for every destination of one message, choosing queue-group members;
        durable subscribers that are down count as destinations (their messages wait)."""
        nodes = self._resolve_fanout(topic)
        if nodes is not None:
            return [(node, env) for node in nodes]
        work = self._work_sent
        chosen = self._index.destinations(topic, key, self._outstanding)
        served = {g for groups in chosen.values() for g in groups}
        for node, groups in self._remembered.destinations(topic, key, served, self._node_links).items():
            chosen[node] = tuple(chosen.get(node, ())) + tuple(groups)
        targets = []
        for node, groups in chosen.items():
            if groups:
                # An estimate; reports from the member correct it.
                work[node] = work.get(node, 0) + len(groups)
            targets.append((node, [env, list(groups)] if groups else env))
        return targets

    def _wake(self, link: Link) -> None:
        assert self._transport is not None
        self._transport.wake(link)

    def _produce(self, link: Link) -> list[bytes]:
        assert self._outbox is not None
        return self._outbox.frames(link, time.monotonic())

    def _flush_local(self) -> None:
        """Deliver what this node published to itself, in order (in-process: not kept in the outbox).
        Only what waits now: what handlers publish to this node meanwhile goes in the next loop
        turn, so a chain of handlers publishing to each other never keeps the loop from the
        network and its timers."""
        self._local_scheduled = False
        local = self._local
        waited = len(local) >= self._limit_local  # a publisher may wait for room (see _local_full)
        for _ in range(len(local)):
            if not local:  # a reply to this node's own request flushed from inside a handler
                break
            self._deliver_entry(local.popleft(), None, 0)
        if waited:
            self._space_waiters.fire()

    def _local_full(self, topic: str) -> Subscription | None:
        """The subscription of this agent with no room for a message it publishes on ``topic``:
        one that stopped the agent taking data (:meth:`_overloaded`), or any it matches while
        ``subscription_queue_messages`` such messages wait to be handed over (a publisher that
        never yields). None if there is room."""
        for sub in self._overloaded_subs:
            if not sub.closed and matches(sub._tokens, topic):
                return sub
        if len(self._local) >= self._limit_local:
            return next((s for s in self._subs if matches(s._tokens, topic)), None)
        return None

    def _send_to(self, node: str, frame: bytes) -> None:
        """A control frame to a node, if it is linked (receipts: lost ones are repeated)."""
        link = self._node_links.get(node)
        if link is not None and self._transport is not None:
            self._transport.async_send_control(link.endpoint, frame)
        else:
            self.counters["receipts_unsent"] += 1

    def _undeliverable(self, dest: Destination, entry: Entry, reason: str) -> None:
        """A message the outbox gave up on (its time to live ran out before ``dest`` acked it)."""
        env = entry if type(entry) is bytes else entry[0]
        try:
            msg = decode_envelope(env, self.limits, 0)
        except ProtocolError:
            return
        groups = None if type(entry) is bytes else entry[1]
        why = f"not acknowledged by {dest.service or '?'} ({dest.node}) in time"
        self._tap_event(EXPIRED, [(msg.topic, msg._id)], dest.node, why)
        self._store_dead_letter(msg, reason, why, f"outbox:{dest.node}", ",".join(groups) if groups else None,
                                msg.attempts, dest.node)

    def _take_intake(self) -> None:
        """Publishes handed over by the blocking Agent's threads, in their order. One that finds
        the outbox full waits for room, and those behind it wait behind it."""
        # No lock: deque appends and pops are thread-safe, and the flag is cleared before the
        # intake is emptied, so a publish that finds it set has appended in time to be taken.
        self._intake_scheduled = False
        if self._intake_blocked:
            return
        intake = self._intake
        batch = [intake.popleft() for _ in range(len(intake))]  # what comes meanwhile schedules a take
        for i, (prepared, future) in enumerate(batch):
            if future is not None and future.done():
                continue
            try:
                stored = self._enqueue(prepared)
            except _Full:
                self._intake_blocked = True
                intake.extendleft(reversed(batch[i + 1:]))  # before what was handed over meanwhile
                asyncio.ensure_future(self._intake_when_room(prepared, future))
                return
            except MeshError as exc:
                self._intake_failed(future, exc)
                continue
            if future is None:
                continue
            if stored:
                self._committed().add_done_callback(functools.partial(_settle_publish, future, prepared[2].hex()))
            else:
                future.set_result(prepared[2].hex())

    def _intake_failed(self, future: concurrent.futures.Future[str] | None, exc: BaseException) -> None:
        if future is not None:
            if not future.done():
                future.set_exception(exc)
        elif self._intake_error is None:
            self._intake_error = exc  # raised by the publisher's next publish
        else:
            self.counters["publish_errors_unreported"] += 1

    async def _intake_when_room(self, prepared: _Prepared, future: concurrent.futures.Future[str] | None) -> None:
        try:
            if await self._enqueue_when_room(prepared):
                await self._committed()
        except MeshError as exc:
            self._intake_failed(future, exc)
        else:
            if future is not None and not future.done():
                future.set_result(prepared[2].hex())
        finally:
            self._intake_blocked = False
            self._take_intake()

    def _publish_threadsafe(self, prepared: _Prepared, wait: bool = True) -> concurrent.futures.Future[str] | None:
        """From a blocking Agent's thread: hand a publish to the loop (woken once per batch).
        Returns a future of its outcome, or with ``wait=False`` None (a failure is kept for
        the next publish)."""
        future: concurrent.futures.Future[str] | None = concurrent.futures.Future() if wait else None
        self._intake.append((prepared, future))  # then the flag: see _take_intake
        if not self._intake_scheduled:
            self._intake_scheduled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._take_intake)
        return future


    # --- request / reply --------------------------------------------------------------

    async def request(self, topic: str, data: Any, *, timeout: float = 5.0, type: str | None = None,
                      key: str | None = None, headers: dict[str, str] | None = None,
                      schema_version: int = 1) -> Message:
        """Send a request and return the first reply.

        Every subscriber of ``topic`` gets the request (a queue group: one member) and
        may answer with ``msg.reply(data)``; the first answer wins. Raises
        :class:`NoResponders` at once when no node serves ``topic`` (or when every node
        it went to leaves), :class:`RequestTimeout` after ``timeout`` seconds, and
        :class:`RemoteError` when the responder's handler raised.
        """
        _check_seconds("timeout", timeout)
        request_headers = {**(check_headers(headers, self.limits) or {}), REPLY_TO: self.node_id}
        prepared = self._prepare(topic, data, type, key, request_headers, schema_version)
        responders = set(self._index.destinations(topic, key)) if self._state == "running" else set()
        if not responders:
            raise NoResponders(topic)
        assert self._loop is not None
        fut: asyncio.Future[Message] = self._loop.create_future()
        request_id = prepared[2].hex()
        self._requests[request_id] = _Request(topic, fut, responders)
        try:
            try:
                stored = self._enqueue(prepared)
            except _Full:
                stored = await self._enqueue_when_room(prepared)
            if stored:
                await self._committed()
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                self.counters["requests_timed_out"] += 1
                raise RequestTimeout(topic, timeout) from None
        finally:
            self._requests.pop(request_id, None)

    def _reply(self, request: Message, data: Any, type_: str | None, headers: dict[str, str] | None,
               error: str | None) -> None:
        """Send an answer (or an error) straight to the node that made ``request``."""
        node = request.headers.get(REPLY_TO, "")
        reply_headers = {**(headers or {}), IN_REPLY_TO: request.id}
        if error is not None:
            reply_headers[REPLY_ERROR] = error
        if self._state != "running":
            self._check_running()
        if node != self.node_id and node not in self._node_links:
            with self._counters_lock:
                self.counters["replies_undeliverable"] += 1
            raise NoResponders(reply_topic(node))  # the requester left
        fmt, raw = encode_payload(data, self.limits)
        prepared = self._seal(reply_topic(node), type_, 1, check_headers(reply_headers, self.limits), None, fmt, raw)
        if threading.get_ident() == self._loop_thread:
            self._send_reply(node, prepared, raise_full=True)
        else:  # a blocking Agent's handler thread
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._send_reply, node, prepared, False)

    def _send_reply(self, node: str, prepared: _Prepared, raise_full: bool) -> None:
        """Put a reply in the outbox for the requester alone (no commit is waited for)."""
        outbox = self._outbox
        if outbox is None or self._state != "running":
            return
        env = prepared[3]
        if node == self.node_id:
            self._local.append(env)
            self._flush_local()
        else:
            lane = outbox.lane(node, self._service_of(node), self._node_links.get(node), self._lane_of(prepared[0]))
            dest = lane.dest
            full = outbox.full([dest], len(env))
            if full is not None:
                if raise_full:
                    raise self._full_error(None if full is True else dest)
                self.counters["replies_dropped_outbox_full"] += 1
                quiet.warning("reply-full", "a reply to %s was dropped: the outbox is full", node)
                return
            now = time.monotonic()
            outbox.put(lane, env, len(env), NEVER, now)
            if dest.link is not None and not outbox.durable:
                self._send_soon(dest.link, lane)
        self.counters["replies_sent"] += 1

    def _on_reply(self, msg: Message) -> None:
        pending = self._requests.get(msg.headers.get(IN_REPLY_TO, ""))
        if pending is None or pending.future.done():
            self.counters["replies_late"] += 1  # another responder was first, or the request timed out
            return
        error = msg.headers.get(REPLY_ERROR)
        if error is not None:
            pending.future.set_exception(RemoteError(pending.topic, msg.source, msg.node, error))
        else:
            pending.future.set_result(msg)

    def _responder_left(self, node: str) -> None:
        for pending in self._requests.values():
            pending.responders.discard(node)
            if not pending.responders and not pending.future.done():
                pending.future.set_exception(NoResponders(pending.topic))

    # --- receiving ------------------------------------------------------------------

    def _on_frame(self, frame: bytes, peer: str) -> None:
        """A frame from the network, and the CURVE key of the connection it came over: it is
        acted on only if that key is the one certified for the node the frame says it is from."""
        assert self._node is not None
        try:
            if len(frame) > 2 and frame[0] == PROTOCOL_VERSION and (frame[1] == SEALED or frame[1] == DATA):
                if self._data_aside and self._aside_bytes + len(frame) > self.config.paused_data_bytes:
                    self._refuse_data(len(frame))
                    return
                self._on_data_frame(frame, peer)  # the hot path
                return
            if len(frame) > 2 and frame[0] == PROTOCOL_VERSION and frame[1] == TAP:
                self._on_tap_frame(frame, peer)
                return
            # A Frame, dispatched below on `kind is X`: cheaper than isinstance per frame, but mypy
            # does not narrow through it, so to mypy the fields of each kind are Any here.
            decoded: Any = decode_frame(frame, self.limits)
        except OtherVersion as exc:
            self.counters["frames_other_version"] += 1
            quiet.warning(f"version:{self.node_id}:{exc.version}", "dropped a frame of meshmq protocol version %d; "
                          "this agent speaks %d. Agents of different protocol versions cannot exchange "
                          "messages: run one meshmq release across a mesh", exc.version, PROTOCOL_VERSION)
            return
        except ForgedFrame as exc:
            self.counters["frames_forged"] += 1
            quiet.warning("forged", "dropped a data frame that does not prove its sender (%d bytes): %s",
                          len(frame), exc)
            return
        except ProtocolError as exc:
            self.counters["frames_rejected"] += 1
            quiet.warning("frame", "dropped a malformed frame (%d bytes): %s", len(frame), exc)
            return
        kind = type(decoded)
        if kind is Hello:
            node = decoded.entry.node
            record = decoded.entry.record
            if self._secure and self._curve_nodes.get(peer) != node:
                # A stranger: its certificate must name this connection's key.
                if record is not None:
                    problem = self._vouch(record)
                    if problem is not None:
                        self.counters[f"rejected_record_{problem}"] += 1
                elif decoded.cert is not None:
                    problem = self._vouch_card(node, decoded.cert, decoded.endpoint)
                    if problem is not None:
                        self.counters[f"rejected_card_{problem}"] += 1
        else:
            node = decoded.node
        if self._secure and self._curve_nodes.get(peer) != node:
            self._unauthenticated(node, peer)
            return
        if isinstance(decoded, Revocations):
            self._on_revocations(decoded)
            return
        if isinstance(decoded, PolicyOffer):
            self._on_policy(decoded)
            return
        if isinstance(decoded, SchemaExchange):
            self._on_schemas(decoded)
            return
        if kind is Receipt:
            assert self._outbox is not None
            self._outbox.on_receipt(decoded.node, decoded.lane, decoded.epoch, decoded.committed, decoded.received,
                                    time.monotonic())
            return
        if kind is Work:
            if decoded.mesh == self.config.mesh and decoded.node in self._node.peers:
                self._node.touch(decoded.node, time.monotonic())
                if decoded.done > self._work_reported.get(decoded.node, 0):  # reports may cross
                    self._work_reported[decoded.node] = decoded.done
            return
        if kind is Ping and decoded.sent_at and decoded.node in self._node.peers:
            # One-way delay is well under a millisecond here; seconds of difference are skew.
            self._clock_offsets[decoded.node] = decoded.sent_at - time.time()
        self._apply(self._node.receive(decoded, time.monotonic()))

    def _on_data_frame(self, frame: bytes, peer: str) -> None:
        """A data frame: sealed (signed by the node of the connection's key, encrypted to us), or
        plain between insecure agents; anything else is refused (ProtocolError, ForgedFrame)."""
        assert self._node is not None
        if frame[1] == SEALED:
            if not self._secure:
                raise ProtocolError("a sealed data frame reached an insecure agent")
            node = self._curve_nodes.get(peer)
            keys = self._peer_keys.get(node) if node is not None else None
            if node is None or keys is None:
                self._unauthenticated("?", peer)
                return
            epoch, first_seq, floor, entries, resent, lane = open_data(frame, self.limits, node, keys[1],
                                                                       self.node_id)
        elif self._secure:
            raise ForgedFrame("an unsealed data frame reached a secure agent")
        else:
            node, epoch, first_seq, floor, entries, resent, lane = decode_data(frame, self.limits)
        self._node.touch(node, time.monotonic())
        self._on_data(node, epoch, first_seq, floor, entries, resent, lane)

    def _seal_frame(self, node: str, epoch: int, first_seq: int, floor: int, resent: bool, entries: list[Any],
                    packer: msgpack.Packer, lane: int) -> bytes | None:
        """A sealed data frame for ``node`` (None while its key is unknown)."""
        keys = self._peer_keys.get(node)
        if keys is None or self._signer is None:
            self.counters["frames_unsealable"] += 1
            return None
        return seal_data(self._sealed_head, self._signer, keys[1], self.node_id, node, epoch, first_seq, floor,
                         resent, entries, packer, lane)

    def _on_data(self, node: str, epoch: int, first_seq: int, floor: int, entries: list[Any],
                 resent: bool, lane: int) -> None:
        """One data frame: in order, without duplicates, to the subscriptions; a receipt is due."""
        inbox = self._inbox
        assert inbox is not None
        sender = inbox.sender(node, lane)
        before = sender.stream.epoch
        got = sender.stream.on_batch(epoch, floor, first_seq, entries)
        if got.ack:
            inbox.received(sender, before)
        if got.deliver:
            epoch = sender.stream.epoch
            if self._data_aside:
                self._set_aside(sender, epoch, got.deliver, resent)
            else:
                for seq, entry in got.deliver:
                    self._deliver_entry(entry, (sender, epoch, seq), seq, resent)
        if got.deliver or got.skipped:
            inbox.advance(sender)

    def _unauthenticated(self, node: str, peer: str) -> None:
        if peer in self._revoked_keys or self._revocations.node_revoked(node):
            self.counters["frames_revoked"] += 1
            quiet.warning(f"revoked:{node}", "dropped a frame from %s, whose certificate is revoked", node)
            return
        self.counters["frames_unauthenticated"] += 1
        quiet.warning(f"unauth:{peer}", "dropped a frame that says it is from %s over a connection "
                      "authenticated as another key (or none known yet)", node)

    def _message_finished(self, msg: Message, in_group: bool) -> None:
        """A subscription is done with ``msg`` (loop thread)."""
        if in_group and msg._work is not None:
            self._work_finished(msg._work)
        rx = msg._rx
        if rx is not None:
            msg._open -= 1
            if msg._open == 0 and rx is not _HANDING and self._inbox is not None:
                self._inbox.finished(*rx)

    # --- queue-group load ---------------------------------------------------------------

    def _outstanding(self, node: str) -> int:
        """Queue-group messages sent to ``node`` that it has not reported finished."""
        return self._work_sent.get(node, 0) - self._work_reported.get(node, 0)

    def _work_finished(self, publisher: str) -> None:
        """One queue-group message from ``publisher`` is finished here: tell it, soon (batched)."""
        self._work_done[publisher] += 1
        if publisher == self.node_id:
            self._work_reported[publisher] = self._work_done[publisher]
            return
        self._work_unreported.add(publisher)
        if self._work_timer is None and self._loop is not None and self._state == "running":
            self._work_timer = self._loop.call_later(self.config.work_report_interval, self._report_work)

    def _report_work(self) -> None:
        self._work_timer = None
        if self._transport is None or self._state != "running":
            return
        for publisher in self._work_unreported:
            link = self._node_links.get(publisher)
            if link is not None:
                self._transport.async_send_control(
                    link.endpoint, work_frame(self.config.mesh, self.node_id, self._work_done[publisher]))
        self._work_unreported.clear()

    def _deliver_entry(self, entry: Any, rx: tuple[Any, int, int] | None, seq: int, resent: bool = False) -> bool:
        """Hand one received (or self-published) message to every subscription it is for.
        The inbox learns first how many subscriptions must finish it (they may finish at once).
        Returns whether one still works on it (False: handled, rejected, or nobody's)."""
        try:
            if type(entry) is bytes:  # the common case: no queue group chose us
                msg = decode_envelope(entry, self.limits, seq)
                groups: tuple[str, ...] = ()
            else:
                env, groups = split_entry(entry)
                msg = decode_envelope(env, self.limits, seq)
        except ProtocolError as exc:
            self.counters["messages_rejected"] += 1
            quiet.warning("envelope", "dropped a malformed message: %s", exc)
            return False  # nobody works on it: handled
        if rx is not None and self._secure:
            if msg.node != rx[0].node:  # a node signs only for itself: nobody relays data
                self.counters["rejected_wrong_sender"] += 1
                quiet.warning(f"sender:{rx[0].node}", "dropped message %s: it names node %s but came from %s",
                              msg.id, msg.node, rx[0].node)
                self._tap_event(REJECTED, [(msg.topic, msg._id)], rx[0].node, f"names node {msg.node}")
                return False
            rights = self._peer_rights.get(msg.node)
            if rights is None or not rights.may_publish(msg.topic):
                self.counters["rejected_not_permitted"] += 1
                quiet.warning(f"perm:{msg.node}", "dropped message %s on %s from %s: its certificate does not "
                              "allow publishing there", msg.id, msg.topic, msg.node)
                self._tap_event(REJECTED, [(msg.topic, msg._id)], msg.node, "its certificate does not allow "
                                "publishing on this topic")
                return False
        if self._checked_schemas or self._upcasters:
            problem = self._check_incoming(msg)
            if problem is not None:
                self.counters["rejected_schema"] += 1
                self._store_dead_letter(msg, "schema", problem, msg.topic, None, 0, None)
                return False  # kept in the dead letters: handled
        self._received += 1
        if self._latency is not None or self._window_latency is not None:
            late = time.time() - msg.timestamp
            if self._latency is not None:
                self._latency.observe(late)
            if self._window_latency is not None:
                self._window_latency.observe(late)
        if resent:
            msg.redelivered = True
            self.counters["received_resent"] += 1
        if msg.headers:
            if REPLY_TO in msg.headers:
                msg._replier = self._reply
            if TTL in msg.headers:
                self._set_expiry(msg)
        subs = self._plain_cache.get(msg.topic)
        if subs is None:
            subs = self._match_plain(msg.topic)
        members = self._group_members(msg, groups) if groups else ()
        if rx is not None:
            msg._rx = _HANDING
            msg._open = len(subs) + len(members)
        for sub in subs:
            sub._deliver(msg)
        for member in members:
            member._deliver(msg)
        if rx is not None and msg._open > 0:  # some subscription still works on it
            msg._rx = rx
            self._inbox.unfinished(rx[0], rx[2], rx[1])  # type: ignore[union-attr]
            return True
        if not subs and not members:
            if msg.topic == self._reply_topic:
                self._on_reply(msg)
            else:
                # Our subscription closed after the sender routed this message to us.
                self.counters["received_without_subscription"] += 1
        return False

    def _group_members(self, msg: Message, groups: tuple[str, ...]) -> list[Subscription]:
        """For each queue group the sender chose us for, the local member whose turn it is."""
        chosen = []
        for group in groups:
            members = self._group_cache.get((msg.topic, group))
            if members is None:
                members = self._match_group(msg.topic, group)
            if members:
                turn = self._turns.get(group)
                if turn is None:
                    turn = self._turns[group] = itertools.count()
                msg._work = msg.node
                chosen.append(members[next(turn) % len(members)])
        return chosen

    def _match_group(self, topic: str, group: str) -> list[Subscription]:
        members = [s for s in self._subs if s.queue == group and matches(s._tokens, topic)]
        if len(self._group_cache) > 4096:
            self._group_cache.clear()
        self._group_cache[(topic, group)] = members
        return members

    def _match_plain(self, topic: str) -> list[Subscription]:
        subs = [s for s in self._subs if s.queue is None and matches(s._tokens, topic)]
        if len(self._plain_cache) > 4096:
            self._plain_cache.clear()
        self._plain_cache[topic] = subs
        return subs

    def _handler_failed(self, sub: Subscription, msg: Message, exc: Exception) -> float | None:
        """A handler raised: return the delay before its next attempt, or None when the message
        is done with (a request's error reply went back, or it was dead-lettered)."""
        self.counters["handler_errors"] += 1
        quiet.log(logging.ERROR, f"handler:{sub.pattern}",
                  "handler of %r raised on message %s (topic %s), attempt %d: %r",
                  sub.pattern, msg.id, msg.topic, msg.attempts, exc)
        error = f"{type(exc).__name__}: {exc}"[:1024]
        if msg.is_request:
            if not msg.replied:
                try:  # the requester sees the failure now rather than a timeout later (it may retry)
                    self._reply(msg, None, None, None, error)
                except MeshError as reply_exc:
                    quiet.warning("error-reply", "could not send the error reply for %s: %s", msg.id, reply_exc)
            return None
        return self._retry_or_dead_letter(sub, msg, "handler failed", error, None)

    def _set_expiry(self, msg: Message) -> None:
        msg.expires_at = _expiry(msg)
        if msg.expires_at is None:
            self.counters["bad_ttl_headers"] += 1  # a sender's bug: deliver it as if it had none

    def _nacked(self, sub: Subscription, msg: Message) -> float | None:
        """A handler nacked: the delay before the next attempt, or None once dead-lettered."""
        self.counters["nacked"] += 1
        delay = msg._verdict
        return self._retry_or_dead_letter(sub, msg, "nacked", None, None if delay is None or delay < 0 else delay)

    def _retry_or_dead_letter(self, sub: Subscription, msg: Message, reason: str, error: str | None,
                              delay: float | None) -> float | None:
        cfg = self.config
        attempts, backoff, backoff_max = cfg.max_attempts, cfg.retry_backoff, cfg.retry_backoff_max
        rule = self._policy.first("retry", msg.topic, msg.source) if self._policy is not None else None
        if rule is not None and rule.retry is not None:
            attempts, backoff, backoff_max = rule.retry.max_attempts, rule.retry.backoff, rule.retry.backoff_max
        if msg.attempts < attempts:
            self.counters["handler_retries"] += 1
            if delay is None:
                base = min(backoff_max, backoff * 2 ** (msg.attempts - 1))
                delay = base * (0.8 + 0.4 * random.random())  # jitter: retries of many messages spread out
            if self._tapped:
                self._tap_event(FAILED, [(msg.topic, msg._id)], None,
                                f"attempt {msg.attempts} of {attempts} {reason}{': ' + error if error else ''}; "
                                f"next in {delay:.3g}s")
            return delay
        self._dead_letter(sub, msg, reason, error)
        return None

    def _dead_letter(self, sub: Subscription, msg: Message, reason: str, error: str | None) -> None:
        """Keep a message its handler could not take, with why, in the store (never dropped silently)."""
        self._store_dead_letter(msg, reason, error, sub.pattern, sub.queue, msg.attempts, None)

    def _store_dead_letter(self, msg: Message, reason: str, error: str | None, pattern: str, queue: str | None,
                           attempts: int, destination: str | None) -> None:
        """Write a dead letter in the next group commit: before (or with) the inbox position that
        acknowledges the message, so the sender never forgets a message we did not keep."""
        self.counters["dead_lettered"] += 1
        letter_id = f"{msg.id}-{os.urandom(3).hex()}"
        self._tap_event(DEAD_LETTERED, [(msg.topic, msg._id)], destination, f"{reason}: {error}" if error else reason)
        quiet.warning(f"dlq:{pattern}", "message %s (topic %s) dead-lettered as %s after %d attempts: %s",
                      msg.id, msg.topic, letter_id, attempts, error or reason)
        record = {
            "reason": reason, "attempts": attempts, "error": error, "at": time.time(),
            "pattern": pattern, "queue": queue, "message": _message_record(msg), "destination": destination,
        }
        if self._store is None:
            self.counters["dead_letters_lost"] += 1
            return

        def committed(exc: BaseException | None) -> None:
            if exc is not None:
                self.counters["dead_letters_lost"] += 1
                quiet.log(logging.ERROR, "dlq-store", "dead letter %s could not be stored: %s", letter_id, exc)

        if self._commit is not None and self._state == "running":
            self._commit.add(committed).put_dead_letter(letter_id, record)
        else:
            batch = Batch()
            batch.put_dead_letter(letter_id, record)
            self._store.submit(batch).add_done_callback(lambda f: committed(f.exception()))

    # --- dead letters ---------------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """The messages this agent's handlers could not take, oldest first."""
        if self._store is None:
            return []
        letters = [_dead_letter(letter_id, record) for letter_id, record in self._store.dead_letters()]
        return sorted(letters, key=lambda d: (d.at, d.id))

    async def replay_dead_letters(self, ids: list[str] | None = None) -> int:
        """Hand dead letters (``ids``, or all) to this agent's subscriptions again, each to the
        subscription it failed in (same pattern and queue group); return how many went.
        Letters with no such subscription now stay where they are."""
        self._check_running()
        return await self._replay(self.dead_letters() if ids is None else self._letters(ids))

    async def purge_dead_letters(self, ids: list[str] | None = None) -> int:
        """Delete dead letters (``ids``, or all); return how many."""
        self._check_running()
        letters = self.dead_letters() if ids is None else self._letters(ids)
        if letters:
            assert self._store is not None
            batch = Batch()
            for letter in letters:
                batch.drop_dead_letter(letter.id)
            await asyncio.wrap_future(self._store.submit(batch))
        return len(letters)

    def _letters(self, ids: list[str]) -> list[DeadLetter]:
        known = {d.id: d for d in self.dead_letters()}
        missing = [i for i in ids if i not in known]
        if missing:
            raise UsageError(f"no dead letter with id {', '.join(map(repr, missing[:5]))}")
        return [known[i] for i in ids]

    async def _replay(self, letters: list[DeadLetter]) -> int:
        done = []
        for letter in letters:
            if letter.destination is not None:
                if self._resend(letter):
                    done.append(letter.id)
                continue
            sub = next((s for s in self._subs if not s.closed and s.pattern == letter.pattern
                        and s.queue == letter.queue), None)
            if sub is None:
                continue
            msg = _message_from_record(letter.record["message"])  # no expiry: replayed on purpose
            if msg.headers and REPLY_TO in msg.headers:
                msg._replier = self._reply
            sub._deliver(msg)
            done.append(letter.id)
        if done:
            assert self._store is not None
            batch = Batch()
            for letter_id in done:
                batch.drop_dead_letter(letter_id)
            await asyncio.wrap_future(self._store.submit(batch))
            self.counters["dead_letters_replayed"] += len(done)
        return len(done)

    def _resend(self, letter: DeadLetter) -> bool:
        """Put a message the outbox gave up on back in it, for the same destination, without its
        time to live (replayed on purpose). False if that destination is unknown now."""
        node = letter.destination
        assert node is not None and self._outbox is not None
        if node not in self._node_links and node not in self._remembered.records and node not in self._outbox.dests:
            return False
        r = letter.record["message"]
        headers = {k: v for k, v in (r["headers"] or {}).items() if k != TTL} or None
        env = encode_envelope(r["id"], r["timestamp"], r["topic"], r["type"], r["source"], r["node"],
                              r["schema_version"], headers, r["key"], r["format"], r["raw"])
        lane = self._outbox.lane(node, self._service_of(node), self._node_links.get(node), self._lane_of(r["topic"]))
        entry: Any = env if letter.queue is None else [env, letter.queue.split(",")]  # the groups it went for
        self._outbox.put(lane, entry, len(env), NEVER, time.monotonic())
        if lane.dest.link is not None and not self._outbox.durable:
            self._wake(lane.dest.link)
        return True

    def _overloaded(self, sub: Subscription) -> None:
        """A subscription's backlog reached its limit: take no more data until it halves.

        The network is still read: probes, gossip and receipts are handled as they come, so
        a consumer that falls behind is not taken for dead, and its own outbox still hears
        its receipts. Received messages wait aside (see :meth:`_set_aside`)."""
        self._overloaded_subs.add(sub)
        if self._taking_data:
            self._taking_data = False
            self._data_aside = True
            self.counters["receive_paused"] += 1

    def _set_aside(self, sender: Any, epoch: int, received: list[tuple[int, Any]], resent: bool) -> None:
        """Messages of a data frame that arrived while data waits: received (the stream reports
        them so, and their sender stops sending them again), not handed over yet, so the
        position acknowledged as handled stays before them."""
        inbox = self._inbox
        assert inbox is not None
        aside = self._aside
        for seq, entry in received:
            inbox.unfinished(sender, seq, epoch)
            size = len(entry) if type(entry) is bytes else len(entry[0])
            aside.append((entry, (sender, epoch, seq), resent, size))
            self._aside_bytes += size

    def _refuse_data(self, size: int) -> None:
        """A data frame while ``paused_data_bytes`` of messages wait aside: dropped unread and
        unacknowledged, so its sender keeps its messages and sends them again (as after a
        loss). Nothing is lost, and memory stays bounded."""
        self.counters["data_frames_refused_paused"] += 1
        quiet.warning("paused", "a full subscription keeps this agent from taking data, and %d bytes of messages "
                      "wait already (paused_data_bytes): a frame of %d bytes is left for its sender to send again",
                      self._aside_bytes, size)

    def _maybe_resume(self) -> None:
        before = len(self._overloaded_subs)
        self._overloaded_subs = {
            s for s in self._overloaded_subs if not s.closed and s._backlog() > s._limit // 2
        }
        if len(self._overloaded_subs) < before:
            self._space_waiters.fire()  # publishers to this agent's own subscriptions may go on
        if not self._overloaded_subs and not self._taking_data and self._state == "running" and self._loop is not None:
            self._taking_data = True
            self._loop.call_soon(self._take_aside)  # not from inside a handler that closed its subscription

    def _take_aside(self) -> None:
        """Hand over the messages set aside, oldest first, a read slice at a time, until none is
        left or a subscription is full again; messages arriving meanwhile queue behind them."""
        if not self._taking_data or self._state != "running":
            return
        aside = self._aside
        inbox = self._inbox
        assert inbox is not None
        until = time.monotonic() + self.config.read_slice
        try:
            while aside and self._taking_data:
                entry, rx, resent, size = aside.popleft()
                self._aside_bytes -= size
                if not self._deliver_entry(entry, rx, rx[2], resent):
                    inbox.finished(*rx)  # nobody works on it (handled at once, or refused): done with
                if time.monotonic() >= until:
                    break
        finally:
            self._data_aside = not self._taking_data or bool(aside)
        if aside and self._taking_data and self._loop is not None:
            self._loop.call_soon(self._take_aside)  # the rest after other work (a read slice's worth)

    # --- subscribing ----------------------------------------------------------------

    def subscribe(self, pattern: str, handler: Handler | None = None, *, queue: str | None = None,
                  durable: bool | None = None, concurrency: int = 1) -> Subscription:
        """Receive messages whose topic matches ``pattern`` (``*`` one token, ``>`` the rest).

        ``handler`` may be a function or a coroutine function; without one the
        returned :class:`Subscription` is an async iterator, or a decorator.
        With ``queue``, each message goes to one member of that queue group.
        ``durable`` (default: True for queue groups, else False) makes publishers keep
        this subscription's messages while this node is down, and send them when it
        returns with its identity (it needs a store: not with ``durability="memory"``).
        A subscription that is not durable gets only what is published while it is alive.
        ``concurrency`` (coroutine handlers) is how many messages the handler works on at
        once; never two of one order key (sender and topic, or key in a queue group), so
        each key keeps its order. May be called before :meth:`start`.
        """
        return self._subscribe(pattern, handler, queue, threaded=False, durable=durable, concurrency=concurrency)

    def _subscribe(self, pattern: str, handler: Handler | None, queue: str | None, threaded: bool,
                   blocking: bool = False, durable: bool | None = None, concurrency: int = 1) -> Subscription:
        if self._state in ("stopping", "stopped"):
            self._check_running()
        if handler is not None and not callable(handler):
            raise UsageError(f"handler must be callable, got {handler!r}")
        if queue is not None:
            _check_name("queue group", queue)
        if durable is not None and type(durable) is not bool:
            raise UsageError(f"durable must be True or False, got {durable!r}")
        if durable and self.config.durability == "memory":
            raise UsageError("a durable subscription needs a store that keeps this node's identity; "
                             "durability='memory' has none (use 'os' or 'fsync')")
        if durable is None:
            durable = queue is not None and self.config.durability != "memory"
        limit = self.config.subscription_queue_messages
        if type(concurrency) is not int or not 1 <= concurrency <= limit:
            raise UsageError(f"concurrency must be a whole number from 1 to subscription_queue_messages "
                             f"({limit}), got {concurrency!r}")
        if len(self._subs) >= self.config.max_subscriptions:
            raise UsageError(f"this agent already has max_subscriptions={self.config.max_subscriptions}")
        sub = Subscription(self, pattern, queue, handler, threaded, blocking, concurrency)
        self._rights.check_subscribe(pattern, sub._tokens)
        sub.durable = durable
        self._subs.append(sub)
        self._subscriptions_changed()
        self._next_replay_check = 0.0  # letters waiting for this subscription go at the next tick
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            sub._abandon()
            sub._closed()
            self._overloaded_subs.discard(sub)
            self._subscriptions_changed()
            self._maybe_resume()

    def _subscriptions_changed(self) -> None:
        self._plain_cache = {}
        self._group_cache = {}
        if self._node is not None and self._state == "running":
            self._apply(self._node.set_subscriptions(self._advertised(), time.monotonic()))

    def _advertised(self) -> tuple[AdvertisedSubscription, ...]:
        seen: dict[AdvertisedSubscription, None] = {}
        for s in self._subs:
            seen[AdvertisedSubscription(s.pattern, s.queue, s.durable)] = None
        return tuple(seen)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    # --- dispatch by type (the concept documents' handler registry) ---------------------

    # --- schemas ---------------------------------------------------------------------------

    def schema(self, type: str, version: int, schema: dict[str, Any]) -> None:
        """Declare the JSON Schema (a subset: see :mod:`meshmq._schema`) of messages of ``type``
        at ``version``: what this agent publishes with that type and version is checked before
        it leaves (:class:`SchemaError` names the field and the rule), and what it receives is
        checked before a handler sees it (dead-lettered otherwise). Peers see the pair in this
        node's record (``meshmq schema ls``). It wins over a schema pushed to the mesh for the
        same pair (:meth:`push_schema`), in this agent."""
        _check_name("message type", type)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise UsageError(f"a schema version is a whole number from 1, got {version!r}")
        check_schema(schema)
        with self._schemas_lock:
            self._schemas[(type, version)] = schema
        self._rebuild_checked_schemas()
        self._schemas_changed()

    def upcast(self, type: str, from_version: int, to_version: int) -> Callable[[Callable[[Any], Any]], Any]:
        """Register the decorated function as the way from ``from_version`` to ``to_version`` of
        ``type``'s data: a message of an older version is carried up the chain of upcasters
        before a handler sees it (``msg.schema_version`` says which version it is then)."""
        _check_name("message type", type)
        if not (isinstance(from_version, int) and isinstance(to_version, int) and 1 <= from_version < to_version):
            raise UsageError(f"an upcaster goes from a version to a higher one, not {from_version} -> {to_version}")

        def register(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
            if not callable(fn):
                raise UsageError(f"an upcaster must be callable, got {fn!r}")
            self._upcasters[(type, from_version)] = (to_version, fn)
            return fn

        return register

    def _schemas_changed(self) -> None:
        if self._node is not None and self._state == "running":
            self._call_on_loop(lambda: self._apply(self._node.set_schemas(  # type: ignore[union-attr]
                tuple(sorted(self._schemas)), time.monotonic())))

    def _check_outgoing(self, topic: str, data: Any, type_: str | None, schema_version: int) -> None:
        """Before a publish: the policy's required schema of the topic, and the declared schema."""
        rule = self._policy.first("schema", topic, self.service) if self._policy is not None else None
        if rule is not None and rule.schema is not None and (type_, schema_version) != rule.schema:
            raise SchemaError("type", "policy", f"policy rule {rule.name!r} requires type {rule.schema[0]!r} "
                                                f"version {rule.schema[1]} on {topic!r}, not {type_!r} version "
                                                f"{schema_version}")
        schema = self._checked_schemas.get((type_, schema_version)) if type_ is not None else None
        if schema is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            validate_schema(schema, data)

    def _check_incoming(self, msg: Message) -> str | None:
        """Carry a received message up its upcasters, then check it; why not, or None."""
        if msg.type is None or (not self._upcasters and not self._checked_schemas):
            return None
        try:
            data, version = msg.data, msg.schema_version
            while (step := self._upcasters.get((msg.type, version))) is not None:
                version, data = step[0], step[1](data)
            if version != msg.schema_version:
                msg._data, msg.schema_version = data, version
                self.counters["messages_upcast"] += 1
            schema = self._checked_schemas.get((msg.type, version))
            if schema is not None and not isinstance(data, (bytes, bytearray)):
                validate_schema(schema, data)
        except SchemaError as exc:
            return str(exc)
        except Exception as exc:  # an upcaster that fails, or a payload that does not decode
            return f"{type(exc).__name__}: {exc}"
        return None

    def on(self, type: str) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of messages of this ``type``.

        Messages reach it through subscriptions whose handler is :meth:`dispatch`:
        ``agent.subscribe("orders.>", agent.dispatch)``.
        """
        _check_name("message type", type)

        def register(fn: Handler) -> Handler:
            if not callable(fn):
                raise UsageError(f"handler must be callable, got {fn!r}")
            self._type_handlers.setdefault(type, []).append(fn)
            return fn

        return register

    def _dispatch_blocking(self, msg: Message) -> None:
        """:meth:`dispatch` for a blocking Agent, on its subscription's handler thread."""
        handlers = self._type_handlers.get(msg.type or "")
        if not handlers:
            self._call_on_loop(self._unhandled, msg)
            return
        for fn in handlers:
            result = fn(msg)
            if isinstance(result, Coroutine):
                assert self._loop is not None
                asyncio.run_coroutine_threadsafe(result, self._loop).result()

    def _unhandled(self, msg: Message) -> None:
        self.counters["unhandled_type"] += 1
        quiet.warning(f"type:{msg.type}", "no handler for message type %r (topic %s)", msg.type, msg.topic)

    async def dispatch(self, msg: Message) -> None:
        """Hand ``msg`` to the handlers registered with :meth:`on` for its type.

        A message whose type has no handler is counted and logged (rate-limited), not an error.
        """
        handlers = self._type_handlers.get(msg.type or "")
        if not handlers:
            self._unhandled(msg)
            return
        for fn in handlers:
            result = fn(msg)
            if isinstance(result, Awaitable):
                await result

    # --- looking at the mesh --------------------------------------------------------

    def peers(self, *, departed: bool = False) -> list[PeerInfo]:
        """The nodes this agent routes to, with their state; with ``departed``, also the
        peers that recently left routing (dead, left or replaced)."""
        if self._node is None:
            return []
        now = time.monotonic()
        node = self._node
        out = [
            PeerInfo(n, p.record.service, p.endpoint,
                     tuple((s.pattern, s.group) for s in p.record.subscriptions), now - p.last_seen,
                     self._clock_offsets.get(n), node.liveness(n, now))
            for n, p in node.peers.items()
        ]
        if departed:
            out += [PeerInfo(d.node, d.service, d.endpoint, (), now - d.last_seen, None, d.reason)
                    for d in node.departed.values() if d.node not in node.peers]
        return sorted(out, key=lambda p: (p.state not in ("alive", "suspect"), p.service, p.node))

    def routes(self, topic: str | None = None) -> list[RouteEntry]:
        """Every subscription this agent routes to, or with ``topic`` those that would receive it
        (each plain subscriber gets a copy; each queue group, one of its members)."""
        if self._node is None:
            return []
        if topic is not None:
            check_topic(topic, self.config.max_topic_length, self.config.max_topic_tokens)
        table = self._node.routes
        entries = [
            RouteEntry(sub.pattern, sub.group, record.service, record.node)
            for record in (table.local, *table.records.values())
            for sub in record.subscriptions
            if topic is None or matches(tuple(sub.pattern.split(".")), topic)
        ]
        return sorted(entries, key=lambda e: (e.pattern, e.group or "", e.service, e.node))

    def stats(self) -> dict[str, int]:
        """Counters of this agent: messages published, received, rejected, dropped, ..."""
        out: collections.Counter[str] = collections.Counter(self.counters)
        out["received"] = self._received
        out["published"] = sum(st.published for st in self._thread_states)
        out["published_without_subscribers"] = sum(st.unrouted for st in self._thread_states)
        if self._node is not None:
            out.update(self._node.counters)
            out["peers"] = len(self._node.peers)
        if self._transport is not None:
            out.update(self._transport.counters)
            out["frames_sent"] = self._transport.frames_sent
        if self._outbox is not None:
            out["outbox_messages"] = self._outbox.count
            out["outbox_bytes"] = self._outbox.bytes
            out["outbox_destinations"] = sum(1 for d in self._outbox.dests.values() if d.pending)
            for lane in self._outbox.lanes.values():
                out.update(lane.stream.counters)
        if self._inbox is not None:
            for sender in self._inbox.senders.values():
                out.update(sender.stream.counters)
        if self._store is not None:
            out.update({f"store_{k}": v for k, v in self._store.counters.items()})
        if self._mirror is not None:
            out.update(self._mirror.counters)
            out["taps_watching"] = len(self._mirror.routes)
        return dict(out)

    def health(self) -> Health:
        """Is this agent all right: peers up, the outbox's backlog and age and whether its
        destinations are up, dead letters of late, the certificate's time left, the store.
        ``health().status`` is ``ok``, ``warn`` or ``fail``; ``str()`` shows every check."""
        self._check_running()
        assert self._outbox is not None
        live = self._node_links
        waiting = []
        for node, dest in self._outbox.dests.items():
            if not dest.pending:
                continue
            times = [envelope_time(first if type(first) is bytes else first[0]) for first in dest.firsts()]
            waiting.append(WaitingFor(node, dest.service, dest.pending, dest.bytes, node in live,
                                      min((t for t in times if t is not None), default=None)))
        peers = self.peers()
        cfg = self.config
        cert = self._rights.cert if self._secure else None
        store = self._store
        return assess(
            now=time.time(), peers=sum(p.state == "alive" for p in peers),
            suspects=sum(p.state == "suspect" for p in peers), waiting=waiting,
            max_messages=cfg.max_outbox_messages, max_bytes=cfg.max_outbox_bytes, max_age=cfg.health_max_outbox_age,
            dead_letter_times=[r["at"] for _, r in store.dead_letters()] if store is not None else [],
            dead_letter_window=cfg.health_dead_letter_window,
            cert_not_after=cert.not_after if cert is not None else None, cert_warning=cfg.health_certificate_warning,
            quarantined=store.counters["quarantined"] if store is not None else 0, revoked=self._revoked_self,
            backlogs=[(s.pattern + (f"@{s.queue}" if s.queue else ""), s.pending) for s in self._subs],
            backlog_limit=cfg.subscription_queue_messages, stalls=self.counters["loop_stalls"],
            last_stall=self._last_stall, stall_window=cfg.health_stall_window)

    def outbox(self) -> list[OutboxEntry]:
        """What waits in the outbox, per destination (``meshmq outbox`` shows the same)."""
        if self._outbox is None:
            return []
        live = self._node_links
        return sorted((OutboxEntry(node, service, n, size, node in live, age)
                       for node, (service, n, size, age) in self._outbox.pending().items()),
                      key=lambda e: (-e.messages, e.node))

    async def wait_for_subscribers(self, topic: str, count: int = 1, timeout: float = 5.0) -> int:
        """Wait until at least ``count`` nodes receive ``topic`` (queue groups count once); return how many."""
        self._check_running()
        check_topic(topic, self.config.max_topic_length, self.config.max_topic_tokens)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UsageError(f"count must be a whole number of at least 1, got {count!r}")
        deadline = time.monotonic() + _check_seconds("timeout", timeout, zero=True)
        while True:
            n = self._receivers(topic)
            if n >= count:
                return n
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MeshTimeout(f"{n} of {count} subscribers of {topic!r} found within {timeout:g}s")
            await self._routes_changed(remaining)

    def _receivers(self, topic: str) -> int:
        route = self._index.resolve(topic)
        return len(route.plain) + len(route.groups)

    async def wait_settled(self, timeout: float = 2.0, quiet_period: float = 0.3) -> int:
        """Wait until every node discovered so far has answered and none new appeared for
        ``quiet_period`` seconds (bounded by ``timeout``); return the number of peers."""
        self._check_running()
        assert self._node is not None
        deadline = time.monotonic() + _check_seconds("timeout", timeout, zero=True)
        _check_seconds("quiet_period", quiet_period, zero=True)
        while True:
            now = time.monotonic()
            settled = not self._node.pending or set(self._node.pending) <= set(self._node.seeds)
            if settled and now - max(self._started_at, self._last_route_change) >= quiet_period:
                return len(self._node.peers)
            if now >= deadline:
                return len(self._node.peers)
            await self._routes_changed(min(deadline - now, quiet_period / 3))

    async def _routes_changed(self, timeout: float) -> None:
        await self._route_waiters.wait(timeout)

    # --- taps -------------------------------------------------------------------------

    def tap(self, *patterns: str, events: bool | Iterable[str] = True) -> Tap:
        """Watch the mesh's traffic on ``patterns`` (default ``>``: everything): every agent
        mirrors to this one what it publishes there, and what happens to it: ``events`` is
        True (every delivery event: sent, acked, retried, expired, failed, dead-lettered, rejected),
        False (messages only) or the kinds wanted (agents report only those). Iterate the
        returned :class:`Tap` for :class:`TapEvent` objects. Needs the tap right in this
        agent's certificate (the development authority gives it); payloads come only for
        topics the certificate allows subscribing to. Agents started after the tap, or
        before it, mirror alike: the tap is in the routing table."""
        return self._tap(patterns, events, threaded=False)

    def _tap(self, patterns: tuple[str, ...], events: bool | Iterable[str], threaded: bool) -> Tap:
        self._check_running()
        cert = self._rights.cert
        if self._secure and (cert is None or not cert.tap):
            raise NotPermitted("this agent's certificate has no tap right (meshmq cert issue ... --tap)")
        patterns = patterns or (">",)
        for pattern in patterns:
            check_pattern(pattern, self.config.max_topic_length, self.config.max_topic_tokens)
        if events is True or events is False:
            kinds = frozenset(DELIVERY_EVENTS + CONTROL_EVENTS) if events else frozenset()
        else:
            kinds = frozenset(events)
            unknown = kinds - set(DELIVERY_EVENTS + CONTROL_EVENTS + (STATS,))  # outbox-warning: a control event
            if unknown:
                raise UsageError(f"unknown tap event kind {', '.join(sorted(unknown))}; "
                                 f"the kinds are {', '.join(DELIVERY_EVENTS + CONTROL_EVENTS + (STATS,))}")
        tap = Tap(tuple(patterns), self.config.tap_buffer_messages, self._tap_closed, threaded, kinds)
        self._taps.append(tap)
        if self._journeys is None:
            self._journeys = Journeys(self.config.tap_buffer_messages * 10)
        self._taps_changed()
        return tap

    def _tap_closed(self, tap: Tap) -> None:
        def closed() -> None:
            if tap in self._taps:
                self._taps.remove(tap)
                self._taps_changed()

        self._call_on_loop(closed)

    def _tap_patterns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for tap in self._taps for p in tap.patterns))

    def _tap_event_kinds(self) -> tuple[str, ...]:
        wanted = set().union(*(tap.events for tap in self._taps)) if self._taps else set()
        return tuple(k for k in DELIVERY_EVENTS + (OUTBOX_WARNING, BREAKER, STATS) if k in wanted)

    def _taps_changed(self) -> None:
        if self._node is not None and self._state == "running":
            self._apply(self._node.set_taps(self._tap_patterns(), self._tap_event_kinds(), time.monotonic()))
            self._rebuild_taps()

    def _rebuild_taps(self) -> None:
        """Which taps of the mesh this agent mirrors to, from the routing table (and itself)."""
        assert self._node is not None and self._mirror is not None and self._outbox is not None
        table = self._node.routes
        self._tap_version = table.tap_version
        records = dict(table.records)
        if self._taps:
            records[self.node_id] = table.local
        routes = {}
        for node, record in records.items():
            if not record.taps:
                continue
            rights = self._rights if node == self.node_id else self._peer_rights.get(node)
            if self._secure and (rights is None or rights.cert is None or not rights.cert.tap):
                continue  # its record was refused already; this is the last guard
            patterns = []
            for pattern in record.taps:
                try:
                    patterns.append(check_pattern(pattern, self.config.max_topic_length,
                                                  self.config.max_topic_tokens))
                except UsageError:
                    continue
            reader = rights if rights is not None else Rights(None)
            routes[node] = (tuple(patterns), frozenset(record.tap_events),
                            lambda topic, r=reader: r.may_subscribe(tuple(topic.split("."))))
        self._mirror.set_routes(routes)
        self._tapped = bool(routes)
        # Per-message work for sent / acked / retried only while some tap wants them.
        self._observed = frozenset(k for k in (SENT, ACKED, RETRIED) if self._mirror.wants((k,)))
        self._outbox.observe = self._observe if self._observed else None
        if self._mirror.wants((STATS,)):
            if self._window_latency is None:
                self._window_latency = LatencyHistogram()
            if self._stats_timer is None and self._loop is not None:
                self._stats_timer = self._loop.call_later(self.config.tap_stats_interval, self._report_stats)
        else:
            self._window_latency = None

    def _observe(self, kind: str, lane: Lane, entries: list[Any]) -> None:
        """The outbox sent, sent again or was acknowledged ``entries``, a run of one stream
        (a tap watches): one item names the run by its first and last message ids."""
        kind = {"sent": SENT, "retried": RETRIED, "acked": ACKED}[kind]
        if kind not in self._observed or not entries:
            return
        ends = []
        for entry in (entries[0], entries[-1]):
            env = entry if type(entry) is bytes else entry[0]
            head = envelope_head(env)
            if head is None:
                try:
                    head = ("", decode_envelope(env, self.limits)._id)
                except ProtocolError:
                    return
            ends.append(head[1])
        self._mirror.journey(kind, lane.dest.node, ends[0], ends[1], len(entries), lane.number)  # type: ignore[union-attr]

    def _tap_event(self, kind: str, messages: list[tuple[str, bytes]], peer: str | None,
                   detail: str | None = None) -> None:
        if self._tapped:
            self._mirror.event(kind, messages, peer, detail)  # type: ignore[union-attr]

    def _report_stats(self) -> None:
        """This agent's figures to the taps that asked (``meshmq top``), every tap_stats_interval."""
        self._stats_timer = None
        window, mirror = self._window_latency, self._mirror
        if window is None or mirror is None or self._state != "running":
            return
        stats = self.stats()
        figures: dict[str, float] = {
            "published": stats.get("published", 0), "received": stats.get("received", 0),
            "outbox_messages": stats.get("outbox_messages", 0), "outbox_bytes": stats.get("outbox_bytes", 0),
            "dead_letters": self._store.count(b"dlq") if self._store is not None else 0,
            "retried": stats.get("messages_resent", 0)}
        for name, q in (("latency_p50", 0.5), ("latency_p99", 0.99)):
            value = window.percentile(q)
            if value is not None:
                figures[name] = value
        self._window_latency = LatencyHistogram()
        mirror.stats(figures)
        assert self._loop is not None
        self._stats_timer = self._loop.call_later(self.config.tap_stats_interval, self._report_stats)

    def _control(self, kind: str, node: str | None, service: str | None, detail: str | None) -> None:
        """A change of the mesh this agent saw, for its own taps."""
        if not self._taps:
            return
        event = TapEvent(kind, time.time(), self.node_id, self.service, peer=node, peer_service=service,
                         detail=detail)
        for tap in self._taps:
            if kind in tap.events:
                tap._push(event)

    def _send_tap(self, node: str, lost: int, items: list[Any]) -> bool:
        """One frame of mirrored items to the tap ``node``; False if it cannot leave now."""
        if node == self.node_id:
            self._tap_items(self.node_id, lost, items)
            return True
        link = self._node_links.get(node)
        if link is None or self._transport is None:
            return False
        fields = [self.node_id, node, lost, items]
        if self._secure:
            keys = self._peer_keys.get(node)
            if keys is None:
                return False
            frame = seal_fields(bytes((PROTOCOL_VERSION, TAP)), keys[1], fields, self._tap_packer)
        else:
            frame = bytes((PROTOCOL_VERSION, TAP)) + self._tap_packer.pack(fields)
        if len(frame) > self.config.max_frame_bytes:
            self.counters["tap_frames_too_large"] += 1
            return False
        return self._transport.async_send_now(link.endpoint, frame)

    def _on_tap_frame(self, frame: bytes, peer: str) -> None:
        """Mirrored items from an agent, for this node's taps."""
        if self._secure:
            node = self._curve_nodes.get(peer)
            keys = self._peer_keys.get(node) if node is not None else None
            if node is None or keys is None:
                self._unauthenticated("?", peer)
                return
            lost, items = open_tap(frame, self.limits, node, keys[1], self.node_id)
        else:
            try:
                fields = msgpack.unpackb(memoryview(frame)[2:], **self.limits.unpack_options)
            except Exception as exc:
                raise ProtocolError(f"undecodable tap frame: {type(exc).__name__}") from None
            if type(fields) is not list or len(fields) != 4 or fields[1] != self.node_id or type(fields[0]) is not str:
                raise ProtocolError("bad tap frame")
            node, _, lost, items = fields
            if type(lost) is not int or lost < 0 or type(items) is not list:
                raise ProtocolError("bad tap frame")
        if not self._taps:
            self.counters["tap_frames_unwanted"] += 1  # it learns we stopped with our next record
            return
        self._tap_items(node, lost, items)

    def _tap_items(self, node: str, lost: int, items: list[Any]) -> None:
        assert self._node is not None
        services = {n: m.record.service for n, m in self._node.peers.items()}
        services[self.node_id] = self.service
        service = services.get(node, "?")
        events = list(decode_items(items, node, service, services, self.limits, self._journeys))  # all or none
        self.counters["tap_events"] += len(events)
        if lost:
            self.counters["tap_items_lost"] += lost
            notice = TapEvent(LOST, time.time(), node, service, count=lost,
                              detail=f"this tap fell behind {service}'s mirror")
            for tap in self._taps:
                tap._push(notice)
        for event in events:
            topic = event.topic
            for tap in self._taps:
                if event.kind != "message" and event.kind not in tap.events:
                    continue
                if topic is None or tap.wants(topic):  # stats have no topic
                    tap._push(event)

    # --- carrying out the core's decisions ------------------------------------------------

    def _apply(self, actions: list[Any]) -> None:
        transport = self._transport
        assert transport is not None and self._node is not None
        changed = False
        for action in actions:
            kind = type(action)
            if kind is Send:
                transport.async_send_control(action.endpoint, action.frame)
            elif kind is Connect:
                try:
                    transport.async_connect(action.endpoint)
                except zmq.ZMQError as exc:  # the codec checks endpoints; this is the last guard
                    self.counters["connect_failed"] += 1
                    quiet.warning("connect", "cannot connect to %r: %s", action.endpoint, exc)
            elif kind is PeerUp:
                rec = action.record
                link = transport.links.get(rec.endpoints[0])
                if link is not None:
                    link.node, link.service = rec.node, rec.service
                    if rec.node not in self._node_links:
                        log.info("peer up: %s (%s) at %s", rec.service, rec.node, rec.endpoints[0])
                        self._control(JOINED, rec.node, rec.service, rec.endpoints[0])
                        self._compare_revocations(rec.endpoints[0])  # a newcomer may lack some (or have more)
                    self._node_links[rec.node] = link
                    assert self._outbox is not None
                    self._outbox.peer_up(rec.node, rec.service, link, time.monotonic())
                changed = True
            elif kind is PeerDown:
                self._node_links.pop(action.node, None)
                self._peer_down(action.node)
                for table in (self._work_sent, self._work_reported, self._work_done):
                    table.pop(action.node, None)
                self._work_unreported.discard(action.node)
                self._clock_offsets.pop(action.node, None)
                if self._requests:
                    self._responder_left(action.node)
                log.info("peer %s: %s (%s)", action.reason, action.service, action.node)
                self._control(action.reason if action.reason in CONTROL_EVENTS else LEFT, action.node,
                              action.service, action.reason)
                changed = True
            elif kind is Disconnect:
                transport.async_disconnect(action.endpoint)
            elif kind is Suspected:
                self._control(SUSPECTED, action.node, action.service, f"suspected by {action.by}" if action.by else None)
        if changed or self._node.routes.index is not self._index:
            self._fanout, self._single = {}, {}
        if self._node.routes.index is not self._index:
            self._index = self._node.routes.index
            if self._taps:
                records = self._node.routes.records
                self._control(ROUTES, None, None, f"{sum(len(r.subscriptions) for r in records.values())} "
                                                  f"subscriptions of {len(records)} peers")
            self._remembered.sync({n: p.record for n, p in self._node.peers.items()}, self._store_batch,
                                  time.time())
            changed = True
        if changed or self._node.routes.tap_version != self._tap_version:
            self._rebuild_taps()
        if changed:
            self._last_route_change = time.monotonic()
            self._route_waiters.fire()

    def _peer_down(self, node: str) -> None:
        """A node left routing: its messages wait for it if it has durable subscriptions,
        else they are dropped, counted and logged."""
        assert self._outbox is not None
        keep = self._remembered.went_down(node, time.time(), self._store_batch)
        dropped = self._outbox.peer_down(node, keep)
        if dropped:
            self.counters["dropped_peer_gone"] += dropped
            quiet.warning(f"gone:{node}", "%d messages to %s were dropped: it left and has no durable "
                          "subscription to keep them for", dropped, node)

    def _store_batch(self) -> Batch | None:
        """The batch being built for the next group commit (None: nothing is stored)."""
        return self._commit.add() if self._commit is not None else None

    def _on_hint(self, node: str | None, endpoints: tuple[str, ...], mesh: str | None) -> None:
        """An mDNS hint that ``node`` is at ``endpoints``: greeted, and believed only once the
        answer proves a certificate. A hint whose node id is not the one its endpoints' key
        derives is a lie told for free: refused before we greet it (and so hand it our record)."""
        if self._node is None or self._state != "running":
            return
        if self._secure and node is not None and any(_node_of_endpoint(ep) != node for ep in endpoints):
            if any(split_endpoint(ep)[1] is None for ep in endpoints):
                self.counters["rejected_hint_without_key"] += 1  # an insecure agent: never talked to
                return
            self.counters["rejected_hint_mismatch"] += 1
            quiet.warning("hint", "ignored an mDNS hint for node %s at an endpoint of another key", node)
            return
        self._apply(self._node.discovered(time.monotonic(), node, endpoints, mesh))

    def _on_other_version(self, node: str | None, versions: str, endpoints: tuple[str, ...]) -> None:
        """mDNS announces a node of this mesh that speaks only other protocol versions: say so
        (once a minute per node), and leave it alone; a greeting would be dropped there."""
        self.counters["peers_other_version"] += 1
        quiet.warning(f"announced:{self.node_id}:{node}", "node %s at %s announces meshmq protocol version %s; "
                      "this agent speaks %d. Agents of different protocol versions cannot exchange messages: "
                      "run one meshmq release across a mesh", node or "?", ", ".join(endpoints), versions,
                      PROTOCOL_VERSION)

    def _schedule_tick(self) -> None:
        assert self._loop is not None and self._node is not None
        now = time.monotonic()
        delay = max(self._node.next_deadline(now) - now, 0.001)
        self._tick_due = now + delay
        self._tick_handle = self._loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        if self._state != "running" or self._node is None or self._transport is None:
            return
        now = time.monotonic()
        if now - self._tick_due > self.config.probe_timeout:
            self._loop_stalled(now - self._tick_due)
        self._apply(self._node.tick(now, time.time()))
        self._transport.flush_all()  # fallback for a missed writable edge
        if self._overloaded_subs:
            self._maybe_resume()
        if now >= self._next_replay_check and self._store is not None and not self._replaying:
            self._next_replay_check = now + 1.0
            if self._remembered.expire(time.time(), self.config.durable_forget_after, self._store_batch):
                self._fanout, self._single = {}, {}
            if self._store.count(b"replay"):  # asked for by `meshmq dlq replay`, maybe from another process
                self._replaying = True
                asyncio.ensure_future(self._replay_requested())
        self._security_tick(now)
        self._schedule_tick()

    def _loop_stalled(self, late: float) -> None:
        """The loop ran nothing else for ``late`` seconds: something held it (blocking code in a
        plain function or coroutine handler, most often). Probes wait as long for an answer, so
        the peers may have suspected this node, and may declare it dead if it lasts."""
        self.counters["loop_stalls"] += 1
        self._last_stall = (time.time(), late)
        quiet.warning("stall", "the event loop of agent %s was held for %.2fs (blocked, or busy without a "
                      "break), longer than a peer waits for a probe answer (probe_timeout %gs): peers may take "
                      "this node for dead. Blocking work belongs off the loop: a coroutine handler that awaits "
                      "it, a thread, or the blocking Agent",
                      self.service, late, self.config.probe_timeout)

    def _outbox_tick(self) -> None:
        """Retransmissions and expiries of the outbox (a short timer: backoffs start at 0.2 s)."""
        if self._state != "running" or self._outbox is None or self._loop is None:
            return
        now = time.monotonic()
        if self._transport is not None:
            # A timer callback runs after the loop turn's reading: unless frames still wait,
            # every receipt that had arrived is read (see Outbox.hear).
            self._outbox.hear(now, self._transport.behind)
        if self._outbox.count:
            self._outbox.tick(now, time.time())
        if self._tapped and OUTBOX_WARNING in self._mirror.wanted_kinds:  # type: ignore[union-attr]
            self._watch_outbox()
        self._outbox_timer = self._loop.call_later(OUTBOX_TICK, self._outbox_tick)

    def _breaker_changed(self, dest: Destination, before: str, after: str) -> None:
        """A circuit breaker of the outbox changed state: for the taps that watch breakers."""
        if self._tapped and BREAKER in self._mirror.wanted_kinds:  # type: ignore[union-attr]
            self._mirror.notice(BREAKER, dest.node,  # type: ignore[union-attr]
                                f"{before} -> {after} for {dest.service or dest.node}: {dest.count} messages wait")

    def _watch_outbox(self) -> None:
        """Outbox warnings for taps: when the outbox, or one destination's share of it, goes
        past half or nine tenths of its limit (told once per level, again after it drains
        below a quarter)."""
        outbox = self._outbox
        assert outbox is not None and self._mirror is not None
        cfg = self.config
        shares: list[tuple[str | None, str, float, float]] = [
            (None, "the outbox", outbox.count / cfg.max_outbox_messages, outbox.bytes / cfg.max_outbox_bytes)]
        shares += [(d.node, f"the share for {d.service or d.node}", d.pending / cfg.peer_queue_messages,
                    d.bytes / cfg.peer_queue_bytes) for d in outbox.dests.values() if d.pending]
        levels = self._outbox_levels
        for node, what, by_count, by_bytes in shares:
            fill = max(by_count, by_bytes)
            level = 2 if fill >= 0.9 else 1 if fill >= 0.5 else 0
            before = levels.get(node, 0)
            if level > before:
                self._mirror.notice(OUTBOX_WARNING, node, f"{what} is {fill:.0%} full")
                levels[node] = level
            elif fill < 0.25 and before:
                del levels[node]

    async def _replay_requested(self) -> None:
        try:
            assert self._store is not None
            letters = {d.id: d for d in self.dead_letters()}
            requested = self._store.replay_requests()
            gone = [i for i in requested if i not in letters]  # purged meanwhile
            if gone:
                batch = Batch()
                for letter_id in gone:
                    batch.drop_replay(letter_id)
                await asyncio.wrap_future(self._store.submit(batch))
            await self._replay([letters[i] for i in requested if i in letters])
        except MeshError as exc:
            quiet.warning("dlq-replay", "replaying dead letters failed: %s", exc)
        finally:
            self._replaying = False

    def _call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the agent's loop: now if we are on it (or it has not started), else soon."""
        if self._loop is None or threading.get_ident() == self._loop_thread or self._state != "running":
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)


def _refuse_secure(record: NodeRecord) -> str | None:
    """An insecure agent's check of a peer's record: it refuses secure nodes' (signed) records,
    so that insecure and secure agents never route to each other."""
    return "secure" if record.sig is not None or record.cert is not None else None


def _node_of_endpoint(endpoint: str) -> str | None:
    """The node id that the key named in ``endpoint#KEY`` belongs to (None: no usable key)."""
    key = split_endpoint(endpoint)[1]
    try:
        return node_id_of(unb64(key)) if key else None
    except ValueError:  # not base64
        return None


def _revocations_stored(future: concurrent.futures.Future[None]) -> None:
    """(The store's writer thread.) A revocation list that could not be stored is still
    enforced; it is lost at a restart unless a peer or ``Config.revocations`` has it."""
    exc = future.exception()
    if exc is not None:
        log.error("the revocation list could not be stored: %s", exc)


def _schemas_stored(future: concurrent.futures.Future[None]) -> None:
    """(The store's writer thread.) Schemas that could not be stored are still checked with;
    after a restart the agent learns them again from the first peer it meets."""
    exc = future.exception()
    if exc is not None:
        log.error("schemas pushed to the mesh could not be stored: %s", exc)


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What tells that a file changed: (inode, size, mtime in ns); None if it is not there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _stat_all(authority: str) -> tuple[tuple[int, int, int] | None, ...]:
    """:func:`_stat` of every file named in ``Config.authority`` (keys are not files)."""
    items = [item.strip() for item in authority.split(",")]
    return tuple(_stat(Path(item).expanduser()) for item in items if item and not _KEY.match(item))


_KEY = re.compile(r"^[A-Za-z0-9_-]{43}=?$")


def _read_authority_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the authority key file {path}: {exc.strerror}") from None


def _expand_interfaces(interfaces: tuple[str, ...]) -> list[str]:
    """IP addresses to bind and announce on; ``all`` means every address of every interface."""
    if "all" not in interfaces:
        return list(interfaces)
    import ifaddr

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                found.append(ip.ip)
    return found or ["127.0.0.1"]


def _bind_endpoints(config: Config, interfaces: list[str]) -> list[str]:
    if config.bind:
        return [ep.strip() for ep in config.bind.split(",")]
    out = []
    for ip in interfaces:
        host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
        out.append(f"tcp://{host}:*")
    return out
