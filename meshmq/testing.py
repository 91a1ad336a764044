"""Test helpers: a fake clock and an in-memory network for the pure core.

As ``trio.testing`` does for trio, this module lets tests (yours and ours) drive
meshmq's protocol logic in virtual time, with no sockets and no real waiting::

    from meshmq.testing import MemoryNetwork, make_node

    net = MemoryNetwork()
    net.add(make_node("a", subscriptions=["orders.*"]))
    net.add(make_node("b"), seeds=["inproc://a"])
    net.run(1.0)                      # one virtual second: hellos, pings, ...
    assert "a" in net.node("inproc://b").peers

:class:`MemoryNetwork` plays the I/O shell: it carries out the
:data:`~meshmq._node.Action` values a :class:`~meshmq._node.Node` returns,
delivering each :class:`~meshmq._node.Send` frame (decoded with
:func:`~meshmq._wire.decode_frame`) to the node bound at its endpoint, in FIFO
order and with no latency. Links can be cut and healed to simulate partitions
and silent peers. Nothing here imports zmq, zeroconf, lmdb, asyncio or threading.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Iterable

from ._node import Action, Connect, Disconnect, Node, PeerDown, PeerUp, Send, Timing
from ._wire import Limits, NodeRecord, Subscription, decode_frame

__all__ = ["Event", "FakeClock", "LinkError", "MemoryNetwork", "make_node"]


class FakeClock:
    """A monotonic clock that moves only when told to (no real waiting).

    Calling the clock returns :meth:`now`, so it can stand in for ``time.monotonic``
    wherever a clock function is injected.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        """The current virtual time, in seconds."""
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        """Move time forward by ``dt`` seconds and return the new time.

        Raises:
            ValueError: ``dt`` is negative (a monotonic clock never goes back).
        """
        if dt < 0:
            raise ValueError(f"a monotonic clock cannot go back ({dt!r}s)")
        self._now += dt
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"


SubscriptionSpec = str | tuple[str, str | None] | Subscription


def make_node(
    node_id: str,
    service: str = "svc",
    endpoint: str | None = None,
    subscriptions: Iterable[SubscriptionSpec] = (),
    *,
    mesh: str = "test",
    started: float = 0.0,
    incarnation: int = 0,
    timing: Timing | None = None,
    limits: Limits | None = None,
    max_peers: int = 4096,
) -> Node:
    """A :class:`Node` core built in one line.

    Args:
        node_id: the node id; the endpoint defaults to ``inproc://<node_id>``.
        subscriptions: patterns, ``(pattern, group)`` pairs or :class:`Subscription` values.
        started: the record's start time (a restarted node has a later one).
    """
    subs = tuple(_subscription(s) for s in subscriptions)
    record = NodeRecord(node_id, service, (endpoint or f"inproc://{node_id}",), subs, incarnation, started)
    # Seeded by the node id: gossip picks the same peers on every run.
    return Node(mesh, record, timing=timing, limits=limits, max_peers=max_peers, rng=random.Random(node_id))


def _subscription(spec: SubscriptionSpec) -> Subscription:
    if isinstance(spec, Subscription):
        return spec
    if isinstance(spec, str):
        return Subscription(spec)
    pattern, group = spec
    return Subscription(pattern, group)


class LinkError(AssertionError):
    """A node broke the shell's contract, e.g. sent on an endpoint it never connected to."""


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One action a node returned, with when and where it happened."""

    time: float
    endpoint: str
    action: Action


class MemoryNetwork:
    """Several :class:`Node` cores wired together in memory, driven by a :class:`FakeClock`.

    Nodes are keyed by the first endpoint of their record. Every action a node
    returns is carried out here and appended to :attr:`events`. A frame is
    dropped (and counted in :attr:`dropped`) when its link is cut or no node is
    bound at its endpoint, as a real network would lose it.

    Args:
        clock: the virtual clock (a new one at 0.0 by default).
        strict: raise :class:`LinkError` when a node sends on an endpoint it has
            not announced with :class:`Connect` (the shell's contract).
        max_deliveries: bound on frames delivered by one :meth:`flush`, so that a
            protocol loop fails the test instead of hanging it.
        loss: share of frames lost at random (0 to 1), drawn from ``rng``.
        rng: the random source for ``loss`` (seeded, so runs repeat).
        record_events: keep every action in :attr:`events` (turn off for large meshes).
    """

    def __init__(self, clock: FakeClock | None = None, *, strict: bool = True,
                 max_deliveries: int = 100_000, loss: float = 0.0, rng: random.Random | None = None,
                 record_events: bool = True) -> None:
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be between 0 and 1, got {loss!r}")
        self.clock = clock or FakeClock()
        self.strict = strict
        self.max_deliveries = max_deliveries
        self.loss = loss
        self.rng = rng or random.Random(0)
        self.record_events = record_events
        self.nodes: dict[str, Node] = {}
        self.events: list[Event] = []
        self.dropped: collections.Counter[str] = collections.Counter()
        self.sent_frames: collections.Counter[str] = collections.Counter()
        """Frames each node (by endpoint) handed to the network."""
        self.sent_bytes: collections.Counter[str] = collections.Counter()
        """Bytes each node (by endpoint) handed to the network."""
        self.paused: dict[str, list[tuple[str, str, bytes]]] = {}
        # endpoint of a node -> endpoints it holds a sending link to
        self.links: dict[str, set[str]] = {}
        self._cut: set[frozenset[str]] = set()
        self._in_flight: collections.deque[tuple[str, str, bytes]] = collections.deque()

    # --- membership -----------------------------------------------------------------

    def add(self, node: Node, seeds: Iterable[str] = ()) -> Node:
        """Bind ``node`` at its endpoint, start it with ``seeds`` and deliver what follows."""
        ep = node.record.endpoints[0]
        if ep in self.nodes:
            raise ValueError(f"endpoint {ep} is already bound")
        self.nodes[ep] = node
        self.links[ep] = set()
        self.execute(ep, node.start(self.clock.now(), tuple(seeds)))
        return node

    def node(self, endpoint: str) -> Node:
        """The node bound at ``endpoint``."""
        return self.nodes[endpoint]

    def stop(self, endpoint: str) -> None:
        """Stop a node gracefully (it says BYE), then unbind it."""
        self.execute(endpoint, self.nodes[endpoint].stop(self.clock.now()))
        self.crash(endpoint)

    def crash(self, endpoint: str) -> None:
        """Unbind a node without a word: frames to its endpoint are lost from now on."""
        del self.nodes[endpoint]
        del self.links[endpoint]

    # --- faults ---------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """Lose every frame between endpoints ``a`` and ``b``, both ways."""
        self._cut.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        """Undo :meth:`cut`."""
        self._cut.discard(frozenset((a, b)))

    def isolate(self, endpoint: str) -> None:
        """Cut ``endpoint`` off from every node bound now."""
        for other in self.nodes:
            if other != endpoint:
                self.cut(endpoint, other)

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._cut

    def pause(self, endpoint: str) -> None:
        """Freeze a node, as a long GC pause or SIGSTOP would: it neither ticks nor reads, and
        frames sent to it wait (they are not lost) until :meth:`resume`."""
        self.paused.setdefault(endpoint, [])

    def resume(self, endpoint: str) -> None:
        """Undo :meth:`pause`: the node reads what waited for it, then ticks."""
        held = self.paused.pop(endpoint, [])
        self._in_flight.extendleft(reversed(held))
        self.flush()

    # --- driving --------------------------------------------------------------------

    def execute(self, endpoint: str, actions: Iterable[Action]) -> None:
        """Carry out what the node at ``endpoint`` returned, then deliver until quiet."""
        self._carry_out(endpoint, actions)
        self.flush()

    def discovered(self, endpoint: str, other: str, node_id: str | None = None) -> None:
        """Tell the node at ``endpoint`` that a node may be reachable at ``other`` (an mDNS hint)."""
        node = self.nodes[endpoint]
        self.execute(endpoint, node.discovered(self.clock.now(), node_id, (other,), node.mesh))

    def tick(self) -> None:
        """Run every node's timers at the current time, then deliver what they sent.

        All nodes act on the state they had before this tick (as concurrent processes
        would), so news travels at most one gossip hop per round, not along a chain of
        nodes within one tick.
        """
        for ep in sorted(self.nodes):
            node = self.nodes.get(ep)
            if node is not None and ep not in self.paused:
                self._carry_out(ep, node.tick(self.clock.now()))
        self.flush()

    def run(self, seconds: float, step: float = 0.125) -> None:
        """Advance the clock by ``seconds`` in steps of ``step``, ticking every node after each.

        Step times are computed as ``start + k * step`` so long runs do not drift;
        the last step lands exactly on ``start + seconds``.
        """
        if step <= 0:
            raise ValueError("step must be positive")
        start = self.clock.now()
        end = start + seconds
        k = 0
        while self.clock.now() < end:
            k += 1
            target = min(start + k * step, end)
            self.clock.advance(target - self.clock.now())
            self.tick()

    def flush(self) -> int:
        """Deliver frames in flight (and those their handling sends) until none is left.

        Returns:
            How many frames were delivered.
        """
        delivered = 0
        while self._in_flight:
            if delivered >= self.max_deliveries:
                raise RuntimeError(f"more than {self.max_deliveries} frames in one flush: a protocol loop?")
            src, dst, frame = self._in_flight.popleft()
            if self.is_cut(src, dst):
                self.dropped["cut"] += 1
                continue
            node = self.nodes.get(dst)
            if node is None:
                self.dropped["unbound"] += 1
                continue
            if dst in self.paused:
                self.paused[dst].append((src, dst, frame))
                continue
            if self.loss and self.rng.random() < self.loss:
                self.dropped["lost"] += 1
                continue
            delivered += 1
            self._carry_out(dst, node.receive(decode_frame(frame, node.limits), self.clock.now()))
        return delivered

    # --- inspection -----------------------------------------------------------------

    def actions(self, endpoint: str, kind: type | tuple[type, ...] = object) -> list[Action]:
        """The actions of one node so far, optionally only those of ``kind``."""
        return [e.action for e in self.events if e.endpoint == endpoint and isinstance(e.action, kind)]

    def peer_changes(self, endpoint: str) -> list[PeerUp | PeerDown]:
        """The PeerUp/PeerDown actions of one node, in order."""
        return [a for a in self.actions(endpoint, (PeerUp, PeerDown)) if isinstance(a, (PeerUp, PeerDown))]

    # --- internals ------------------------------------------------------------------

    def _carry_out(self, endpoint: str, actions: Iterable[Action]) -> None:
        now = self.clock.now()
        links = self.links.get(endpoint)
        for action in actions:
            if self.record_events:
                self.events.append(Event(now, endpoint, action))
            if links is None:  # the node was unbound (crashed): its actions go nowhere
                continue
            if isinstance(action, Connect):
                links.add(action.endpoint)
            elif isinstance(action, Disconnect):
                links.discard(action.endpoint)
            elif isinstance(action, Send):
                if action.endpoint not in links:
                    if self.strict:
                        raise LinkError(f"{endpoint} sent on {action.endpoint} without a Connect")
                    self.dropped["unlinked"] += 1
                    continue
                self.sent_frames[endpoint] += 1
                self.sent_bytes[endpoint] += len(action.frame)
                self._in_flight.append((endpoint, action.endpoint, action.frame))
