"""The protocol state of one mesh node: peers, their records, liveness. Pure, no I/O.

Like h11, it never touches a socket or a clock: the shell feeds it what
happened (``start``, ``discovered``, ``receive``, ``tick``...) with the current
monotonic time, and it returns :data:`Action` values for the shell to carry out.

Membership protocol (the gossiped, SWIM-style layer builds on these records):

- A node that learns an endpoint (mDNS, a seed) connects and sends HELLO with its
  record, asking for a reply; the peer stores the record, connects back and
  replies with its own. So a new node is reachable as soon as it has browsed one
  peer, without waiting for its own mDNS announcement to settle.
- Each node pings every peer each ``heartbeat_interval``; a ping carries the
  sender's record version, and a receiver whose copy is older asks for a fresh
  HELLO. A changed record (new subscription) is pushed to all peers at once.
- Each ``gossip_interval`` a node tells ``gossip_fanout`` random peers a bounded
  sample of the nodes it knows (node, endpoint, record version); a receiver
  greets those it has not met. So seeds plus gossip build the full mesh where
  multicast does not reach, and records still come first-hand, from each node.
- A peer silent for ``peer_timeout`` is declared dead and leaves routing; BYE
  removes it at once. The endpoint of a dead peer is greeted again, like a seed,
  for ``rejoin_window``: when a partition heals, mDNS announces nothing new.

Invariants:
- ``peers`` holds exactly the nodes present in ``routes.records``;
- every peer's ``endpoint`` has been announced with :class:`Connect` and not yet
  with :class:`Disconnect`; ``links`` counts the nodes using each endpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from dataclasses import dataclass

from ._errors import TopicError
from ._routing import RoutingTable
from ._topics import check_pattern
from ._wire import (
    Bye, Data, Frame, Gossip, Hello, Limits, NodeRecord, Ping, Subscription, bye_frame, gossip_frame, hello_frame,
    is_endpoint, ping_frame,
)


_DEPARTED_KEPT = 256

# --- actions the shell carries out ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open (or keep) a sending link to this endpoint."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """No node uses this endpoint any more: close the link and drop what waits on it."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class Send:
    """Send one control frame on the link to this endpoint."""

    endpoint: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class PeerUp:
    """A node joined routing (or changed its record)."""

    record: NodeRecord


@dataclass(frozen=True, slots=True)
class PeerDown:
    """A node left routing: ``reason`` is ``left``, ``dead`` or ``replaced``."""

    node: str
    service: str
    endpoint: str
    reason: str


Action = Connect | Disconnect | Send | PeerUp | PeerDown


@dataclass(slots=True)
class Peer:
    record: NodeRecord
    endpoint: str
    last_seen: float
    last_ping: float


@dataclass(frozen=True, slots=True)
class Departed:
    """A peer that left routing, kept a while for display (``meshmq peers --all``)."""

    node: str
    service: str
    endpoint: str
    reason: str
    """``dead``, ``left`` or ``replaced``."""
    last_seen: float
    at: float


@dataclass(slots=True)
class Timing:
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    rejoin_window: float = 600.0
    """How long the endpoint of a peer declared dead is greeted again (a partition may heal)."""
    gossip_interval: float = 0.5
    """Seconds between gossip rounds."""
    gossip_fanout: int = 3
    """Peers told per gossip round."""
    gossip_entries: int = 32
    """Most membership entries per gossip frame (bounded however large the mesh)."""


class Node:
    """Membership and routing state of the local node."""

    def __init__(self, mesh: str, record: NodeRecord, *, timing: Timing | None = None,
                 limits: Limits | None = None, max_peers: int = 4096, rng: random.Random | None = None) -> None:
        self.mesh = mesh
        # Injected so that tests in virtual time are deterministic (seed it); the agent passes none.
        self.rng = rng or random.Random()
        self.next_gossip = 0.0
        self.fresh: dict[str, int] = {}  # peers joined lately -> gossip frames that carried them so far
        self.timing = timing or Timing()
        self.limits = limits or Limits()
        self.max_peers = max_peers
        self.max_pending = max(16, min(256, max_peers))
        """Greetings awaiting an answer at once (each holds a socket)."""
        self.routes = RoutingTable(record)
        self.peers: dict[str, Peer] = {}
        self.links: collections.Counter[str] = collections.Counter()
        # Endpoints we said hello to but whose node has not answered yet: endpoint -> last hello time.
        self.pending: dict[str, float] = {}
        self.seeds: tuple[str, ...] = ()
        # Endpoints of peers declared dead -> when: greeted again like seeds until rejoin_window
        # passes, because mDNS announces nothing new when a partition heals.
        self.lost: dict[str, float] = {}
        # Recently departed peers, newest last (bounded; for display only).
        self.departed: collections.OrderedDict[str, Departed] = collections.OrderedDict()
        self.counters: collections.Counter[str] = collections.Counter()
        self._stopped = False

    @property
    def record(self) -> NodeRecord:
        return self.routes.local

    @property
    def node_id(self) -> str:
        return self.routes.local.node

    # --- inputs ---------------------------------------------------------------------

    def start(self, now: float, seeds: tuple[str, ...] = ()) -> list[Action]:
        self.seeds = tuple(ep for ep in seeds if ep not in self.record.endpoints)
        actions: list[Action] = []
        for ep in self.seeds:
            self._greet(ep, now, actions)
        return actions

    def discovered(self, now: float, node: str | None, endpoints: tuple[str, ...], mesh: str | None) -> list[Action]:
        """A hint (mDNS, a seed) that a node may be reachable at ``endpoints``."""
        actions: list[Action] = []
        if self._stopped or (mesh is not None and mesh != self.mesh):
            return actions
        valid = tuple(ep for ep in endpoints if is_endpoint(ep))
        if len(valid) != len(endpoints):
            self.counters["rejected_bad_hint"] += 1  # mDNS data is a hint; a malformed one is ignored
        endpoints = valid
        if not endpoints:
            return actions
        if node == self.node_id or set(endpoints) & set(self.record.endpoints):
            return actions
        if node is not None and node in self.peers:
            return actions
        ep = endpoints[0]
        last = self.pending.get(ep)
        if last is None or now - last >= self.timing.heartbeat_interval:
            self._greet(ep, now, actions)
        return actions

    def receive(self, frame: Frame, now: float) -> list[Action]:
        """A control frame from the network (DATA frames only refresh liveness here)."""
        actions: list[Action] = []
        if self._stopped:
            return actions
        if isinstance(frame, Data):
            self.touch(frame.node, now)
            return actions
        if frame.mesh != self.mesh:
            self.counters["rejected_other_mesh"] += 1
            return actions
        if isinstance(frame, Ping):
            peer = self.peers.get(frame.node)
            if peer is None:
                # A peer that knew an earlier us (or missed our hello): introduce ourselves.
                self.counters["ping_from_unknown"] += 1
                if frame.node != self.node_id:
                    actions.extend(self.discovered(now, frame.node, (frame.endpoint,), frame.mesh))
            else:
                peer.last_seen = now
                if frame.version > peer.record.version:
                    actions.append(Send(peer.endpoint, hello_frame(self.mesh, self.record, True)))
        elif isinstance(frame, Hello):
            self._hello(frame, now, actions)
        elif isinstance(frame, Bye):
            if frame.node in self.peers:
                self._drop(frame.node, "left", actions, now)
        elif isinstance(frame, Gossip):
            self._gossip(frame, now, actions)
        return actions

    def touch(self, node: str, now: float) -> None:
        peer = self.peers.get(node)
        if peer is not None:
            peer.last_seen = now

    def set_subscriptions(self, subscriptions: tuple[Subscription, ...], now: float) -> list[Action]:
        """Advertise a new set of subscriptions: bump the record and push it to every peer."""
        record = dataclasses.replace(self.record, subscriptions=subscriptions, version=self.record.version + 1)
        self.routes.set_local(record)
        frame = hello_frame(self.mesh, record, False)
        return [Send(peer.endpoint, frame) for peer in self.peers.values()]

    def tick(self, now: float, wall: float = 0.0) -> list[Action]:
        """Timers: declare silent peers dead, send due pings, re-greet unanswered seeds.

        ``wall`` (seconds since the epoch) is stamped on pings so peers can see clock skew.
        """
        actions: list[Action] = []
        if self._stopped:
            return actions
        t = self.timing
        for node, peer in list(self.peers.items()):
            if now - peer.last_seen > t.peer_timeout:
                self._drop(node, "dead", actions, now)
            elif now - peer.last_ping >= t.heartbeat_interval:
                peer.last_ping = now
                actions.append(Send(peer.endpoint, ping_frame(
                    self.mesh, self.node_id, self.record.version, self.record.endpoints[0], wall)))
        self._gossip_round(now, actions)
        live_endpoints = {peer.endpoint for peer in self.peers.values()}
        for ep in self.seeds:
            if ep not in self.pending and ep not in live_endpoints:
                self._greet(ep, now, actions)  # the seed's node died or restarted: find it again
        for ep, died in list(self.lost.items()):
            if now - died > t.rejoin_window or ep in live_endpoints:
                del self.lost[ep]
            elif ep not in self.pending:
                self._greet(ep, now, actions)
        for ep, last in list(self.pending.items()):
            if now - last >= t.peer_timeout:
                if ep in self.seeds or ep in self.lost:
                    self._greet(ep, now, actions)  # it may come back: keep asking, slowly
                else:
                    del self.pending[ep]
                    self._unlink(ep, actions)
        return actions

    def _gossip_round(self, now: float, actions: list[Action]) -> None:
        """Tell a few random peers a bounded sample of who we know (ourselves always first)."""
        t = self.timing
        if now < self.next_gossip or not self.peers:
            return
        self.next_gossip = now + t.gossip_interval
        budget = t.gossip_entries - 1
        # News first (peers that joined lately, each sent about 3*log2(N) times, as SWIM
        # disseminates changes), then a random sample of the others.
        limit = 3 * math.ceil(math.log2(len(self.peers) + 1))
        news = sorted((n for n in self.fresh if n in self.peers), key=lambda n: self.fresh[n])[:budget]
        for n in list(self.fresh):
            if n not in self.peers:
                del self.fresh[n]
        for n in news:
            self.fresh[n] += 1
            if self.fresh[n] >= limit:
                del self.fresh[n]
        rest = [n for n in self.peers if n not in news]
        chosen = news + self.rng.sample(rest, min(len(rest), budget - len(news)))
        entries = [(self.node_id, self.record.endpoints[0], self.record.version)]
        entries += [(n, self.peers[n].endpoint, self.peers[n].record.version) for n in chosen]
        frame = gossip_frame(self.mesh, self.node_id, entries)
        for node in self.rng.sample(sorted(self.peers), min(len(self.peers), t.gossip_fanout)):
            actions.append(Send(self.peers[node].endpoint, frame))

    def _gossip(self, frame: Gossip, now: float, actions: list[Action]) -> None:
        """Greet the nodes a peer knows and we do not; records come from the nodes themselves."""
        self.touch(frame.node, now)
        for node, endpoint, version in frame.entries:
            if node == self.node_id:
                continue
            peer = self.peers.get(node)
            if peer is None:
                if endpoint in self.pending or len(self.peers) >= self.max_peers:
                    continue
                departed = self.departed.get(node)
                if departed is not None and departed.reason != "dead":
                    continue  # it said goodbye, or was replaced: a stale rumour
                self.counters["gossip_introductions"] += 1
                actions.extend(self.discovered(now, node, (endpoint,), self.mesh))
            elif version > peer.record.version:
                # We missed its latest record: ask the node itself.
                actions.append(Send(peer.endpoint, hello_frame(self.mesh, self.record, True)))

    def next_deadline(self, now: float) -> float:
        """When ``tick`` should run next (often enough for pings and gossip rounds alike)."""
        return now + min(self.timing.heartbeat_interval / 2, self.timing.gossip_interval)

    def stop(self, now: float) -> list[Action]:
        """Leaving: say BYE to every peer. The node accepts no input afterwards."""
        self._stopped = True
        frame = bye_frame(self.mesh, self.node_id)
        # Nodes we greeted may know us though their answer has not arrived: tell them too.
        endpoints = {peer.endpoint for peer in self.peers.values()} | set(self.pending)
        return [Send(ep, frame) for ep in sorted(endpoints)]

    # --- internals ------------------------------------------------------------------

    def _greet(self, ep: str, now: float, actions: list[Action]) -> None:
        if ep not in self.pending:
            if len(self.pending) >= self.max_pending:
                # Each unanswered greeting holds a socket: a flood of hints (gossip, pings from
                # strangers, mDNS) must not open them without bound. They are retried later.
                self.counters["rejected_pending_limit"] += 1
                return
            self._link(ep, actions)
        self.pending[ep] = now
        actions.append(Send(ep, hello_frame(self.mesh, self.record, True)))

    def _hello(self, hello: Hello, now: float, actions: list[Action]) -> None:
        rec = hello.record
        if rec.node == self.node_id:
            return
        try:
            for sub in rec.subscriptions:
                check_pattern(sub.pattern, self.limits.max_topic_length, self.limits.max_topic_tokens)
        except TopicError:
            self.counters["rejected_bad_record"] += 1
            return
        peer = self.peers.get(rec.node)
        endpoint = rec.endpoints[0]
        # A node that restarted on the same endpoint replaces its former self at once
        # (before the peer limit is checked: the replacement does not grow the table).
        for other, p in list(self.peers.items()):
            if other != rec.node and p.endpoint == endpoint and p.record.started <= rec.started:
                self._drop(other, "replaced", actions, now)
        if peer is None and len(self.peers) >= self.max_peers:
            self.counters["rejected_peer_limit"] += 1
            return
        if peer is None:
            self._link(endpoint, actions)
            self.peers[rec.node] = Peer(rec, endpoint, now, now)
            self.departed.pop(rec.node, None)
            self.fresh[rec.node] = 0
            self.routes.update(rec)
            actions.append(PeerUp(rec))
        else:
            peer.last_seen = now
            if self.routes.update(rec):
                peer.record = rec
                actions.append(PeerUp(rec))
        for ep in rec.endpoints:
            self.lost.pop(ep, None)
            if self.pending.pop(ep, None) is not None:
                self._unlink(ep, actions)
        if hello.want_reply:
            actions.append(Send(endpoint, hello_frame(self.mesh, self.record, False)))

    def liveness(self, node: str, now: float) -> str:
        """``alive``, ``suspect`` (silent for over half of peer_timeout), or how it departed."""
        peer = self.peers.get(node)
        if peer is not None:
            return "alive" if now - peer.last_seen <= self.timing.peer_timeout / 2 else "suspect"
        departed = self.departed.get(node)
        return departed.reason if departed is not None else "unknown"

    def _drop(self, node: str, reason: str, actions: list[Action], now: float) -> None:
        peer = self.peers.pop(node)
        self.routes.remove(node)
        self.departed[node] = Departed(node, peer.record.service, peer.endpoint, reason, peer.last_seen, now)
        self.departed.move_to_end(node)
        while len(self.departed) > _DEPARTED_KEPT:
            self.departed.popitem(last=False)
        if reason == "dead" and peer.endpoint not in self.seeds:
            if len(self.lost) >= self.max_peers:
                del self.lost[next(iter(self.lost))]  # forget the oldest
            self.lost[peer.endpoint] = now
        self.counters[f"peers_{reason}"] += 1
        actions.append(PeerDown(node, peer.record.service, peer.endpoint, reason))
        self._unlink(peer.endpoint, actions)

    def _link(self, ep: str, actions: list[Action]) -> None:
        self.links[ep] += 1
        if self.links[ep] == 1:
            actions.append(Connect(ep))

    def _unlink(self, ep: str, actions: list[Action]) -> None:
        self.links[ep] -= 1
        if self.links[ep] <= 0:
            del self.links[ep]
            actions.append(Disconnect(ep))
