"""The protocol state of one mesh node: membership, failure detection, gossip. Pure, no I/O.

Like h11, it never touches a socket or a clock: the shell feeds it what
happened (``start``, ``discovered``, ``receive``, ``tick``...) with the current
monotonic time, and it returns :data:`Action` values for the shell to carry out.

**Records and gossip.** Every node owns one :class:`NodeRecord` and claims it
alive at its incarnation. Each node keeps one :class:`Entry` per node it has
heard of, merged with :func:`meshmq._records.merge` (a join semilattice, so
claims may arrive in any order and any number of times). Each
``gossip_interval`` a node opens a push-pull exchange with ``gossip_fanout``
random peers: a digest first (claims without records: news first, then a
random sample, at most ``gossip_entries``; and a hash of the whole table), then
each side sends only the records the other lacks and asks for those it lacks.
Every frame is bounded however large the mesh; a node that just joined gets
the full digest in pages.

**Failure detection (SWIM with Lifeguard's refinements).** Each
``probe_interval`` a node pings one peer (round robin over a shuffled list).
Without an ack within ``probe_timeout`` it asks ``indirect_probes`` others to
ping it; without any ack by the end of the period it suspects the peer and
gossips the suspicion. A suspected node that is alive refutes it by claiming a
higher incarnation. Otherwise it is declared dead when the suspicion times
out: the timeout starts long and shrinks as other nodes confirm the suspicion
independently, and the node probes a suspect next, so a crashed node is
confirmed at once while a lone false suspicion has time to be refuted. A node
whose own probes go unanswered, helpers included (it is the slow one),
stretches its probe interval and timeout (Lifeguard's local health). Any frame from a peer counts as an ack to a probe of it.

**Revocation.** When the authority revokes a node's certificate (or the node), the shell
calls :meth:`Node.revoke`: the node leaves routing at once (``PeerDown``, reason
``revoked``) and its claims are forgotten; from then on claims about it without a record
are ignored, and its records reach the shell's ``vouch``, which refuses them. A record
that passes (a renewed certificate) lifts the bar.

**Joining.** An endpoint learnt from mDNS or a seed is greeted with HELLO. Our record
goes only to an endpoint whose key a record we accepted names; any other endpoint gets
a *card* (our claim, certificate and endpoint, no record), so an endpoint planted by
mDNS learns nothing the certificate does not say. The node there answers with its own
record and a full digest (the shell proved the card's certificate before it reached the
core), and a node that sent a card sends its record once the answer proved the other
side. Endpoints of peers declared dead are greeted again for ``rejoin_window``, as mDNS
announces nothing when a partition heals; a node that hears itself declared dead
refutes it, so both sides of a healed partition rejoin.

Invariants:
- ``peers`` holds exactly the members in ``routes.records``: those whose record
  is of their current life and who are alive or suspect;
- every peer's ``endpoint`` has been announced with :class:`Connect` and not yet
  with :class:`Disconnect`; ``links`` counts the users of each endpoint (peers,
  pending greetings, links opened to answer a stranger);
- ``digest_hash`` is the XOR of :func:`entry_hash` over our own claim and every member;
- ``by_endpoint`` maps the endpoint of every peer to it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack

from ._config import Config
from ._errors import TopicError
from ._records import claim, entry_hash, merge
from ._routing import RoutingTable
from ._topics import check_pattern
from ._wire import (
    ALIVE, DEAD, LEFT, MAX_SYNC_ENTRIES, STATUS_NAMES, SUSPECT, SYNC_LAST, SYNC_OPEN, SYNC_REPLY, Ack, Bye, Data, Entry,
    Frame, Hello, Limits, NodeRecord, Ping, PingReq, Receipt, Subscription, Sync, ack_frame, bye_frame, card_frame,
    hello_frame, is_endpoint, ping_frame, ping_req_frame, split_endpoint, sync_frame,
)

_DEPARTED_KEPT = 256
MAX_HEALTH = 8
"""Most a node stretches its own probe interval and timeout: by (health + 1), as Lifeguard does."""
_RELAYS_KEPT = 1024

# --- actions the shell carries out ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open (or keep) a sending link to this endpoint."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """No one uses this endpoint any more: close the link and drop what waits on it."""

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
    """A node left routing: ``reason`` is ``left``, ``dead``, ``replaced`` or ``revoked``."""

    node: str
    service: str
    endpoint: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Suspected:
    """A peer is suspected (a probe went unanswered): declared dead unless it refutes in time."""

    node: str
    service: str
    by: str


Action = Connect | Disconnect | Send | PeerUp | PeerDown | Suspected


@dataclass(slots=True)
class Member:
    """What this node knows of another: the merged claim, and local bookkeeping."""

    entry: Entry
    changed_at: float
    """When the claim last changed here (the age of a tombstone)."""
    last_seen: float
    """When a frame last came from the node itself (or, until then, when we heard of it)."""
    endpoint: str = ""
    """The endpoint linked while the member is a peer (in routing); "" otherwise."""
    suspected_at: float = 0.0
    confirmations: set[str] = field(default_factory=set)
    """Nodes that suspected it independently, at the current incarnation."""
    spread_by: str = ""
    """The suspecter our digests name for it: the first one, or us once we confirmed."""
    replaced: bool = False
    """A later instance took its endpoint."""

    @property
    def record(self) -> NodeRecord:
        assert self.entry.record is not None
        return self.entry.record

    @property
    def routable(self) -> bool:
        e = self.entry
        return e.status <= SUSPECT and e.record is not None and e.record.started == e.started


@dataclass(frozen=True, slots=True)
class Departed:
    """A peer that left routing, kept a while for display (``meshmq peers --all``)."""

    node: str
    service: str
    endpoint: str
    reason: str
    """``dead``, ``left``, ``replaced`` or ``revoked``."""
    last_seen: float
    at: float


@dataclass(slots=True)
class Probe:
    seq: int
    target: str
    sent_at: float
    helpers: int = 0
    nacks: int = 0
    indirect_sent: bool = False


@dataclass(slots=True)
class Relay:
    """An indirect probe we run for another node: ack ``seq`` to ``endpoint`` if the target answers."""

    requester: str
    endpoint: str
    seq: int
    deadline: float


_DEFAULTS = Config()


@dataclass(slots=True)
class Timing:
    """The membership settings the core uses: each is the :class:`meshmq.Config` field of
    the same name, which holds its default and says what it means."""

    probe_interval: float = _DEFAULTS.probe_interval
    probe_timeout: float = _DEFAULTS.probe_timeout
    indirect_probes: int = _DEFAULTS.indirect_probes
    suspicion_mult: float = _DEFAULTS.suspicion_mult
    suspicion_max_mult: float = _DEFAULTS.suspicion_max_mult
    gossip_interval: float = _DEFAULTS.gossip_interval
    gossip_fanout: int = _DEFAULTS.gossip_fanout
    gossip_entries: int = _DEFAULTS.gossip_entries
    gossip_max_bytes: int = _DEFAULTS.gossip_max_bytes
    tombstone_ttl: float = _DEFAULTS.tombstone_ttl
    rejoin_window: float = _DEFAULTS.rejoin_window
    join_timeout: float = _DEFAULTS.join_timeout
    max_incarnation_jump: int = 1 << 20
    """A rumour claiming an incarnation further ahead than this of what we know is refused
    (not a Config setting: a live node's incarnation never moves that fast)."""

    @classmethod
    def from_config(cls, config: Config) -> Timing:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})

    def suspicion_bounds(self, nodes: int) -> tuple[float, float]:
        low = self.suspicion_mult * max(1.0, math.log10(max(nodes, 1))) * self.probe_interval
        return low, low * self.suspicion_max_mult


class Node:
    """Membership and routing state of the local node."""

    def __init__(self, mesh: str, record: NodeRecord, *, timing: Timing | None = None,
                 limits: Limits | None = None, max_peers: int = 4096, rng: random.Random | None = None,
                 sign: Callable[[NodeRecord], NodeRecord] | None = None,
                 vouch: Callable[[NodeRecord], str | None] | None = None) -> None:
        self.mesh = mesh
        # Injected by the agent (the core holds no keys): sign our records, check others'.
        # vouch returns None for a record it accepts, else why not (counted).
        self.sign = sign
        self.vouch = vouch
        if sign is not None:
            record = sign(record)
        # Injected so that tests in virtual time are deterministic (seed it); the agent passes none.
        self.rng = rng or random.Random()
        self.timing = timing or Timing()
        self.limits = limits or Limits()
        self.max_peers = max_peers
        self.max_pending = max(16, min(256, max_peers))
        """Greetings awaiting an answer at once (each holds a socket)."""
        self.routes = RoutingTable(record)
        self.me = claim(record)
        self.members: dict[str, Member] = {}
        self.peers: dict[str, Member] = {}
        self.by_endpoint: dict[str, str] = {}  # a peer's endpoint -> its node id
        self.links: collections.Counter[str] = collections.Counter()
        # Endpoints greeted whose node has not answered yet: endpoint -> last hello time.
        self.pending: dict[str, float] = {}
        self.seeds: tuple[str, ...] = ()
        # Keys named by the endpoints of records we accepted: our record may go there.
        self.proven_keys: set[str] = set()
        # Endpoints greeted with a card: our record goes there once their node proves itself.
        self.carded: set[str] = set()
        # Endpoints of peers declared dead -> when: greeted again until rejoin_window passes.
        self.lost: dict[str, float] = {}
        # Recently departed peers, newest last (bounded; for display only).
        self.departed: collections.OrderedDict[str, Departed] = collections.OrderedDict()
        self.counters: collections.Counter[str] = collections.Counter()
        self.digest_hash = entry_hash(self.me)
        # News: node -> digests that carried its latest claim so far, oldest news first. Each claim
        # is sent ~3*log2(N) times, newest first, so a change is never queued behind older ones
        # (a node that just joined a large mesh holds hundreds of claims that are news to it only).
        self.fresh: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._news(record.node)
        self.wanted: dict[str, float] = {}  # node -> when we last asked for its record
        self.health = 0  # Lifeguard's local health: our probe interval and timeout stretch by (health + 1)
        self.seq = 0
        self.probe: Probe | None = None
        self.probe_order: list[str] = []
        self.next_probe = 0.0
        self.next_gossip = 0.0
        self.relays: dict[int, Relay] = {}
        self.suspects: set[str] = set()
        self.next_expiry = 0.0
        self.barred: set[str] = set()
        """Revoked nodes: their claims are ignored unless they carry a record ``vouch`` accepts."""
        self._stopped = False

    @property
    def record(self) -> NodeRecord:
        return self.routes.local

    @property
    def node_id(self) -> str:
        return self.me.node

    @property
    def endpoint(self) -> str:
        return self.record.endpoints[0]

    # --- inputs ---------------------------------------------------------------------

    def start(self, now: float, seeds: tuple[str, ...] = ()) -> list[Action]:
        self.seeds = tuple(ep for ep in seeds if ep not in self.record.endpoints)
        self.next_probe = now + self.timing.probe_interval
        self.next_gossip = now + self.timing.gossip_interval
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
        if node is not None and (node in self.peers or node in self.barred):
            return actions
        ep = endpoints[0]
        last = self.pending.get(ep)
        if last is None or now - last >= self.timing.probe_interval:
            self._greet(ep, now, actions)
        return actions

    def receive(self, frame: Frame, now: float) -> list[Action]:
        """A frame from the network (DATA frames only count as signs of life here)."""
        actions: list[Action] = []
        if self._stopped:
            return actions
        if isinstance(frame, Data):
            self.touch(frame.node, now)
            return actions
        if isinstance(frame, Receipt):
            return actions  # the outbox's business, not membership's (and it carries no mesh)
        if frame.mesh != self.mesh:
            self.counters["rejected_other_mesh"] += 1
            return actions
        if isinstance(frame, Ping):
            self._on_ping(frame, now, actions)
        elif isinstance(frame, Ack):
            self._on_ack(frame, now, actions)
        elif isinstance(frame, PingReq):
            self._on_ping_req(frame, now, actions)
        elif isinstance(frame, Sync):
            self._on_sync(frame, now, actions)
        elif isinstance(frame, Hello):
            self._on_hello(frame, now, actions)
        elif isinstance(frame, Bye):
            self.touch(frame.node, now)
            self._learn(Entry(frame.node, frame.started, frame.incarnation, LEFT), frame.node, now, actions)
        return actions

    def touch(self, node: str, now: float) -> None:
        """A frame came from ``node``: it is alive now (and answers a probe of it)."""
        member = self.peers.get(node)
        if member is not None:
            member.last_seen = now
            probe = self.probe
            if probe is not None and probe.target == node:
                self._probe_answered(probe)

    def set_subscriptions(self, subscriptions: tuple[Subscription, ...], now: float) -> list[Action]:
        """Advertise a new set of subscriptions: a new incarnation of our record, gossiped at once."""
        self._claim(dataclasses.replace(self.record, subscriptions=subscriptions,
                                        incarnation=self.me.incarnation + 1))
        actions: list[Action] = []
        self.next_gossip = now  # a change travels in the next round, which is now
        self._gossip_round(now, actions)
        return actions

    def set_schemas(self, schemas: tuple[tuple[str, int], ...], now: float) -> list[Action]:
        """Advertise the (message type, schema version) pairs this node knows."""
        self._claim(dataclasses.replace(self.record, schemas=schemas, incarnation=self.me.incarnation + 1))
        actions: list[Action] = []
        self.next_gossip = now
        self._gossip_round(now, actions)
        return actions

    def set_taps(self, taps: tuple[str, ...], events: tuple[str, ...], now: float) -> list[Action]:
        """Advertise the topic patterns this node watches as a tap (empty: it is no tap) and
        the delivery events it wants reported."""
        self._claim(dataclasses.replace(self.record, taps=taps, tap_events=events,
                                        incarnation=self.me.incarnation + 1))
        actions: list[Action] = []
        self.next_gossip = now
        self._gossip_round(now, actions)
        return actions

    def set_certificate(self, cert: bytes, now: float) -> list[Action]:
        """Advertise a renewed certificate: a new incarnation of our record, gossiped at once
        (peers take the record with the higher incarnation, and with it the certificate)."""
        self._claim(dataclasses.replace(self.record, cert=cert, incarnation=self.me.incarnation + 1))
        actions: list[Action] = []
        self.next_gossip = now
        self._gossip_round(now, actions)
        return actions

    def revoke(self, node: str, now: float, reason: str = "revoked", max_barred: int = 65536) -> list[Action]:
        """The authority revoked ``node``'s certificate (or the node), or no longer vouches for
        it (``reason``): take it out of routing and forget what we know of it; ignore claims
        about it that carry no record. Its endpoints are no longer greeted. The shell refuses
        its records from now on."""
        actions: list[Action] = []
        if node == self.node_id:
            return actions
        if len(self.barred) >= max_barred:
            self.barred.clear()  # bounded; vouch still refuses its records
        self.barred.add(node)
        member = self.members.pop(node, None)
        if member is None:
            return actions
        self.digest_hash ^= entry_hash(member.entry)
        if node in self.peers:
            self._drop(member, reason, now, actions)
        if member.entry.record is not None:
            for ep in member.entry.record.endpoints:
                self.lost.pop(ep, None)
                self.carded.discard(ep)
                if self.pending.pop(ep, None) is not None:
                    self._unlink(ep, actions)
        self.fresh.pop(node, None)
        self.wanted.pop(node, None)
        self.suspects.discard(node)
        return actions

    def tick(self, now: float, wall: float = 0.0) -> list[Action]:
        """Timers: probes, suspicions, gossip rounds, greetings, tombstones.

        ``wall`` (seconds since the epoch) is stamped on pings so peers can see clock skew.
        """
        actions: list[Action] = []
        if self._stopped:
            return actions
        self._expire_suspicions(now, actions)
        self._probe_step(now, wall, actions)
        self._expire_relays(now, actions)
        self._gossip_round(now, actions)
        self._greetings(now, actions)
        self._expire_members(now, actions)
        return actions

    def next_deadline(self, now: float) -> float:
        """When ``tick`` should run next."""
        t = self.timing
        due = [self.next_probe, self.next_gossip, now + min(t.probe_interval, t.gossip_interval)]
        probe = self.probe
        if probe is not None:
            stretch = self.health + 1
            due.append(probe.sent_at + (t.probe_interval if probe.indirect_sent else t.probe_timeout) * stretch)
        for relay in self.relays.values():
            due.append(relay.deadline)
            break  # the oldest is first; later ones are checked on that tick
        if self.suspects:
            due.append(now + t.probe_interval / 4)
        return max(min(due), now + 0.001)

    def stop(self, now: float) -> list[Action]:
        """Leaving: say BYE to every peer. The node accepts no input afterwards."""
        self._stopped = True
        frame = bye_frame(self.mesh, self.node_id, self.me.started, self.me.incarnation)
        # Nodes we greeted may know us though their answer has not arrived: tell them too.
        endpoints = {m.endpoint for m in self.peers.values()} | set(self.pending)
        return [Send(ep, frame) for ep in sorted(endpoints)]

    def liveness(self, node: str, now: float) -> str:
        """``alive`` or ``suspect`` for peers; for departed nodes, how they left (or ``unknown``)."""
        member = self.peers.get(node)
        if member is not None:
            return STATUS_NAMES[member.entry.status]
        departed = self.departed.get(node)
        return departed.reason if departed is not None else "unknown"

    def entries(self) -> list[Entry]:
        """Every claim this node holds, its own first (for inspection and tests)."""
        return [self.me, *(m.entry for m in self.members.values())]

    # --- probing --------------------------------------------------------------------

    def _probe_step(self, now: float, wall: float, actions: list[Action]) -> None:
        t = self.timing
        stretch = self.health + 1
        probe = self.probe
        if probe is not None:
            target = self.peers.get(probe.target)
            if target is None:
                self.probe = None  # it left routing meanwhile
            elif not probe.indirect_sent and now >= probe.sent_at + t.probe_timeout * stretch:
                probe.indirect_sent = True
                helpers = [n for n, m in self.peers.items() if n != probe.target and m.entry.status == ALIVE]
                frame = ping_req_frame(self.mesh, self.node_id, self.endpoint, probe.seq, probe.target,
                                       target.record.endpoints[0])
                for helper in self.rng.sample(helpers, min(len(helpers), t.indirect_probes)):
                    probe.helpers += 1
                    self.counters["indirect_probes"] += 1
                    actions.append(Send(self.peers[helper].endpoint, frame))
            elif probe.indirect_sent and now >= probe.sent_at + t.probe_interval * stretch:
                self.probe = None
                self.counters["probes_failed"] += 1
                if probe.helpers and not probe.nacks:
                    self._adjust_health(+1)  # not even the helpers answered: we may be the slow one
                self._suspect(target, self.node_id, now, actions)
        if self.probe is None and now >= self.next_probe:
            self.next_probe = now + t.probe_interval * stretch
            target_id = self._next_target()
            if target_id is not None:
                member = self.peers[target_id]
                self.seq += 1
                self.probe = Probe(self.seq, target_id, now)
                self.counters["probes_sent"] += 1
                actions.append(Send(member.endpoint, ping_frame(
                    self.mesh, self.node_id, self.endpoint, self.seq, target_id, wall)))

    def _next_target(self) -> str | None:
        while self.probe_order:
            node = self.probe_order.pop()
            if node in self.peers:
                return node
        order = sorted(self.peers)
        self.rng.shuffle(order)
        self.probe_order = order
        return self.probe_order.pop() if self.probe_order else None

    def _probe_answered(self, probe: Probe) -> None:
        self.counters["probes_answered"] += 1
        if not probe.indirect_sent:
            self._adjust_health(-1)
        self.probe = None

    def _adjust_health(self, delta: int) -> None:
        self.health = min(MAX_HEALTH, max(0, self.health + delta))

    def _on_ping(self, ping: Ping, now: float, actions: list[Action]) -> None:
        self.touch(ping.node, now)
        if ping.target != self.node_id:
            # A former node on this endpoint (we replaced it): the prober will learn from gossip.
            self.counters["pings_for_another_node"] += 1
            return
        ep = self._reply_endpoint(ping.node, ping.endpoint, now, actions)
        if ep is not None:
            actions.append(Send(ep, ack_frame(self.mesh, self.node_id, ping.seq)))

    def _on_ack(self, ack: Ack, now: float, actions: list[Action]) -> None:
        relay = self.relays.pop(ack.seq, None)
        if relay is not None:
            if not ack.nack and ack.node in self.peers:
                self.touch(ack.node, now)
            self._answer_relay(relay, ack.nack, actions)
            return
        probe = self.probe
        if probe is not None and ack.seq == probe.seq:
            if ack.nack:
                probe.nacks += 1
                self.touch(ack.node, now)
                return
            self._probe_answered(probe)
        self.touch(ack.node, now)

    def _on_ping_req(self, req: PingReq, now: float, actions: list[Action]) -> None:
        self.touch(req.node, now)
        ep = self._reply_endpoint(req.node, req.endpoint, now, actions)
        if ep is None:
            return
        target = self.peers.get(req.target)
        if target is None:
            actions.append(Send(ep, ack_frame(self.mesh, self.node_id, req.seq, True)))
            return
        if len(self.relays) >= _RELAYS_KEPT:
            self.counters["rejected_relay_limit"] += 1
            return
        self.seq += 1
        self.counters["probes_relayed"] += 1
        self.relays[self.seq] = Relay(req.node, ep, req.seq, now + self.timing.probe_timeout * (self.health + 1))
        actions.append(Send(target.endpoint, ping_frame(self.mesh, self.node_id, self.endpoint, self.seq, req.target)))

    def _expire_relays(self, now: float, actions: list[Action]) -> None:
        for seq, relay in list(self.relays.items()):
            if now < relay.deadline:
                break  # in order of creation, and all share one timeout
            del self.relays[seq]
            # Lifeguard's NACK: the requester learns we are alive, so its own slowness is not to blame.
            self._answer_relay(relay, True, actions)

    def _answer_relay(self, relay: Relay, nack: bool, actions: list[Action]) -> None:
        """Forward the outcome of an indirect probe to its requester, if we are still linked to
        it: it may have been dropped (and its link closed) while the probe was out."""
        if relay.endpoint not in self.links:
            self.counters["relay_answers_unlinked"] += 1
            return
        actions.append(Send(relay.endpoint, ack_frame(self.mesh, self.node_id, relay.seq, nack)))

    # --- suspicion ------------------------------------------------------------------

    def _suspect(self, member: Member, by: str, now: float, actions: list[Action]) -> None:
        """Our own probe of ``member`` failed: suspect it, or confirm the suspicion it is under."""
        e = member.entry
        if e.status == ALIVE:
            self._learn(Entry(e.node, e.started, e.incarnation, SUSPECT, None, by), self.node_id, now, actions)
            if member.endpoint:
                # Tell the suspect itself at once: if it is alive it refutes without waiting for gossip.
                self._send_sync(member.endpoint, SYNC_OPEN, [self._wire_claim(member.entry, by)], [], actions)
        elif e.status == SUSPECT and by not in member.confirmations:
            member.confirmations.add(by)
            self.counters["suspicions_confirmed"] += 1
            member.spread_by = by  # entries name who suspected: spread our confirmation
            self._news(e.node)

    def _suspicion_timeout(self, member: Member) -> float:
        low, high = self.timing.suspicion_bounds(len(self.peers) + 1)
        confirmations = max(0, len(member.confirmations) - 1)
        k = max(1, self.timing.indirect_probes)
        shrink = math.log(confirmations + 1) / math.log(k + 1)
        return max(low, high - (high - low) * shrink)

    def _expire_suspicions(self, now: float, actions: list[Action]) -> None:
        for node in list(self.suspects):
            member = self.peers.get(node)
            if member is None or member.entry.status != SUSPECT:
                self.suspects.discard(node)
                continue
            e = member.entry
            if now - member.suspected_at >= self._suspicion_timeout(member):
                self.counters["suspicions_expired"] += 1
                self._learn(Entry(e.node, e.started, e.incarnation, DEAD), self.node_id, now, actions)

    # --- learning claims ------------------------------------------------------------

    def _learn(self, entry: Entry, source: str, now: float, actions: list[Action],
               wants: list[str] | None = None) -> None:
        """Merge one claim heard from ``source`` (first-hand when it is about the source itself)."""
        node = entry.node
        if node == self.node_id:
            self._about_me(entry, source, now)
            return
        member = self.members.get(node)
        if node in self.barred:
            if entry.record is None:
                self.counters["rejected_revoked_claims"] += 1
                return
            if not self._record_ok(entry.record, member):
                return
            self.barred.discard(node)  # a record vouched for: a renewed certificate
        elif entry.record is not None and not self._record_ok(entry.record, member):
            return
        if member is None:
            if len(self.members) >= self.max_peers:
                self.counters["rejected_peer_limit"] += 1
                return
            departed = self.departed.get(node)
            if departed is not None and source != node and entry.status == ALIVE and departed.reason == "left":
                # Its tombstone expired here; a stale rumour must not bring back a node that said goodbye.
                self.counters["stale_rumours"] += 1
                return
            member = Member(Entry(node, entry.started, entry.incarnation, entry.status, entry.record, entry.by), now, now)
            self.members[node] = member
            self.digest_hash ^= entry_hash(member.entry)
            old: Entry | None = None
        else:
            old = member.entry
            if (source != node and entry.started == old.started
                    and entry.incarnation > old.incarnation + self.timing.max_incarnation_jump):
                self.counters["rejected_incarnation_ahead"] += 1
                return
            new = merge(old, entry)
            if new == old:
                if entry.status == SUSPECT and entry.key == old.key and entry.by and entry.by not in member.confirmations:
                    member.confirmations.add(entry.by)  # another node suspects it independently
                    self.counters["suspicions_confirmed"] += 1
                self._want_if_stale(member, entry, source, wants, now)
                return
            self.digest_hash ^= entry_hash(old) ^ entry_hash(new)
            member.entry = new
        if old is None or old.key != member.entry.key:
            member.changed_at = now
            self._news(node)
        if source == node:
            member.last_seen = now
        self._transition(member, old, now, actions)
        self._want_if_stale(member, entry, source, wants, now)

    def _want_if_stale(self, member: Member, heard: Entry, source: str, wants: list[str] | None,
                       now: float) -> None:
        """Ask ``source`` for the record a claim refers to when ours is older (only live nodes
        need one). Asking is rate-limited per node, except of the node itself: a relay may hold
        the same stale record as we do, the owner always has the newest."""
        e = member.entry
        if wants is None or heard.record is not None or e.status > SUSPECT:
            return
        if e.record is not None and e.record.key >= (e.started, e.incarnation):
            return
        last = self.wanted.get(e.node)
        if source == e.node or last is None or now - last >= self.timing.gossip_interval:
            self.wanted[e.node] = now
            wants.append(e.node)

    def _transition(self, member: Member, old: Entry | None, now: float, actions: list[Action]) -> None:
        """Carry a changed claim into routing, links and suspicion timers."""
        e = member.entry
        node = e.node
        was = node in self.peers
        if e.status == SUSPECT and (old is None or old.status != SUSPECT or old.key != e.key):
            member.suspected_at = now
            member.confirmations = {e.by} if e.by else set()
            member.spread_by = e.by
            self.suspects.add(node)
            self.counters["suspicions"] += 1
            if was:
                actions.append(Suspected(node, member.record.service if member.record is not None else "", e.by or ""))
            if len(self.probe_order) <= 2 * len(self.peers):  # bounded, whatever rumours come
                self.probe_order.append(node)  # probe it next: a dead node gets confirmed quickly
        if member.routable:
            record = member.record
            if not was:
                endpoint = record.endpoints[0]
                if self._replaced_by_newer(record, now, actions):
                    return
                self._link(endpoint, actions)
                member.endpoint = endpoint
                member.replaced = False
                self.peers[node] = member
                self.by_endpoint[endpoint] = node
                self.departed.pop(node, None)
                for ep in record.endpoints:
                    self.lost.pop(ep, None)
                    self.carded.discard(ep)
                    if self.pending.pop(ep, None) is not None:
                        self._unlink(ep, actions)
                self.routes.update(record)
                actions.append(PeerUp(record))
            elif old is None or old.record is not record:
                if record.endpoints[0] != member.endpoint:
                    self._relink(member, record.endpoints[0], actions)  # a new life, on a new endpoint
                if self.routes.update(record):
                    actions.append(PeerUp(record))
        elif was:
            reason = "replaced" if member.replaced else "left" if e.status == LEFT else "dead"
            self._drop(member, reason, now, actions)

    def _relink(self, member: Member, endpoint: str, actions: list[Action]) -> None:
        node = member.entry.node
        if self.by_endpoint.get(member.endpoint) == node:
            del self.by_endpoint[member.endpoint]
        self._link(endpoint, actions)
        self._unlink(member.endpoint, actions)
        member.endpoint = endpoint
        self.by_endpoint[endpoint] = node
        self.counters["peers_moved"] += 1

    def _replaced_by_newer(self, record: NodeRecord, now: float, actions: list[Action]) -> bool:
        """Two instances on one endpoint: only one process can hold it, so the one that started
        earlier is gone for good. Declare it dead; return whether that is ``record``'s node."""
        other = self.peers.get(self.by_endpoint.get(record.endpoints[0], ""))
        if other is None or other.entry.node == record.node:
            return False
        older = self.members[record.node] if other.record.started > record.started else other
        e = older.entry
        older.replaced = True
        self._learn(Entry(e.node, e.started, e.incarnation, DEAD), self.node_id, now, actions)
        return older is not other

    def _drop(self, member: Member, reason: str, now: float, actions: list[Action]) -> None:
        node = member.entry.node
        del self.peers[node]
        if self.by_endpoint.get(member.endpoint) == node:
            del self.by_endpoint[member.endpoint]
        record = self.routes.remove(node)
        endpoint = member.endpoint
        service = record.service if record is not None else ""
        self.departed[node] = Departed(node, service, endpoint, reason, member.last_seen, now)
        self.departed.move_to_end(node)
        while len(self.departed) > _DEPARTED_KEPT:
            self.departed.popitem(last=False)
        if reason == "dead" and endpoint and endpoint not in self.seeds:
            if len(self.lost) >= self.max_peers:
                del self.lost[next(iter(self.lost))]  # forget the oldest
            self.lost[endpoint] = now
        if self.probe is not None and self.probe.target == node:
            self.probe = None
        self.counters[f"peers_{reason}"] += 1
        actions.append(PeerDown(node, service, endpoint, reason))
        member.endpoint = ""
        self._unlink(endpoint, actions)

    def _about_me(self, entry: Entry, source: str, now: float) -> None:
        """A claim about us: refute a suspicion or death of this life with a higher incarnation."""
        me = self.me
        if entry.started != me.started:
            if entry.started > me.started:
                self.counters["rejected_future_self"] += 1  # a later life of ours? forged or corrupt
            return  # an earlier life: our claim wins anyway
        if entry.key <= me.key:
            return
        if entry.incarnation > me.incarnation + self.timing.max_incarnation_jump:
            self.counters["rejected_incarnation_ahead"] += 1
            return
        self.counters["refuted"] += 1
        self._adjust_health(+1)  # others could not reach us in time: give them longer
        self._claim(dataclasses.replace(self.record, incarnation=entry.incarnation + 1))

    def _claim(self, record: NodeRecord) -> None:
        """Make ``record`` our new claim (alive at its incarnation) and put it in the news."""
        if self.sign is not None:
            record = self.sign(record)
        self.routes.set_local(record)
        self.digest_hash ^= entry_hash(self.me)
        self.me = claim(record)
        self.digest_hash ^= entry_hash(self.me)
        self._news(self.node_id)

    def _record_ok(self, record: NodeRecord, member: Member | None) -> bool:
        known = member.entry.record if member is not None else None
        if known is not None and known.started == record.started and known.endpoints != record.endpoints:
            # A node's endpoints are fixed for its life; a record that says otherwise is bogus.
            self.counters["rejected_bad_record"] += 1
            return False
        try:
            for sub in record.subscriptions:
                check_pattern(sub.pattern, self.limits.max_topic_length, self.limits.max_topic_tokens)
        except TopicError:
            self.counters["rejected_bad_record"] += 1
            return False
        if self.vouch is not None:
            problem = self.vouch(record)
            if problem is not None:
                self.counters[f"rejected_record_{problem}"] += 1
                return False
        self._prove(record.endpoints)
        return True

    def _prove(self, endpoints: Iterable[str]) -> None:
        """The keys these endpoints name are certified to the nodes they belong to."""
        if len(self.proven_keys) >= 65536:
            self.proven_keys.clear()  # refilled as records are accepted again
        for ep in endpoints:
            key = split_endpoint(ep)[1]
            if key is not None:
                self.proven_keys.add(key)

    def _proven(self, ep: str) -> bool:
        """Whether our record may go to ``ep``: we run without certificates, or its key is
        one a record we accepted names (CurveZMQ makes sure only that key's holder reads it)."""
        if self.sign is None or self.record.cert is None:
            return True
        key = split_endpoint(ep)[1]
        return key is not None and key in self.proven_keys

    # --- joining --------------------------------------------------------------------

    def _on_hello(self, hello: Hello, now: float, actions: list[Action]) -> None:
        entry = hello.entry
        if entry.node == self.node_id:
            return
        record = entry.record
        if record is None:  # a card (the codec allows no other hello without a record)
            # The shell proved its certificate and that it came over that certificate's key.
            self._prove((hello.endpoint,))
            self._answer_hello(entry.node, hello.endpoint, now, actions)
            return
        carded = [ep for ep in record.endpoints if ep in self.carded]
        wants: list[str] = []
        self._learn(entry, entry.node, now, actions, wants)
        if (hello.want_reply or carded) and self._proven(record.endpoints[0]):
            # Asked, or the answer to our card, by a node whose record we accepted: ours may go.
            self.carded.difference_update(carded)
            self._answer_hello(entry.node, record.endpoints[0], now, actions, hello.want_reply)

    def _answer_hello(self, node: str, endpoint: str, now: float, actions: list[Action],
                      digests: bool = True) -> None:
        """Our record to a node that proved itself; with ``digests``, the whole table as
        digests too (a newcomer knows nobody), page by page."""
        ep = self._reply_endpoint(node, endpoint, now, actions)
        if ep is None:
            return
        self.carded.discard(ep)
        actions.append(Send(ep, hello_frame(self.mesh, self.me, False)))
        if digests:
            claims = [self._wire_claim(m.entry) for m in self.members.values()]
            claims.append(self._wire_claim(self.me))
            for i in range(0, len(claims), MAX_SYNC_ENTRIES):
                self._send_sync(ep, SYNC_OPEN, claims[i:i + MAX_SYNC_ENTRIES], [], actions)

    def _greet(self, ep: str, now: float, actions: list[Action]) -> None:
        if ep not in self.pending:
            if len(self.pending) >= self.max_pending:
                # Each unanswered greeting holds a socket: a flood of hints (gossip, pings from
                # strangers, mDNS) must not open them without bound. They are retried later.
                self.counters["rejected_pending_limit"] += 1
                return
            self._link(ep, actions)
        self.pending[ep] = now
        if self._proven(ep):
            self.carded.discard(ep)
            actions.append(Send(ep, hello_frame(self.mesh, self.me, True)))
        else:
            assert self.record.cert is not None  # _proven says so
            self.carded.add(ep)
            actions.append(Send(ep, card_frame(self.mesh, self.me, self.record.cert, self.endpoint)))

    def _reply_endpoint(self, node: str, endpoint: str, now: float, actions: list[Action]) -> str | None:
        """Where to answer ``node``: its peer link, or a link opened for a node we do not know yet
        (it learnt of us first), which also greets it. None if no link may be opened."""
        member = self.peers.get(node)
        if member is not None and member.endpoint is not None:
            return member.endpoint
        if endpoint in self.links:
            return endpoint
        if endpoint in self.record.endpoints:
            return None
        self._greet(endpoint, now, actions)
        return endpoint if endpoint in self.links else None

    def _greetings(self, now: float, actions: list[Action]) -> None:
        """Re-greet seeds and lost endpoints; give up unanswered hints after join_timeout."""
        t = self.timing
        live = {m.endpoint for m in self.peers.values()}
        for ep in self.seeds:
            if ep not in self.pending and ep not in live:
                self._greet(ep, now, actions)  # the seed's node died or restarted: find it again
        for ep, died in list(self.lost.items()):
            if now - died > t.rejoin_window or ep in live:
                del self.lost[ep]
            elif ep not in self.pending:
                self._greet(ep, now, actions)
        for ep, last in list(self.pending.items()):
            if now - last >= t.join_timeout:
                if ep in self.seeds or ep in self.lost:
                    self._greet(ep, now, actions)  # it may come back: keep asking, slowly
                else:
                    del self.pending[ep]
                    self.carded.discard(ep)
                    self.counters["greetings_unanswered"] += 1  # nobody there, or nobody who could prove it
                    self._unlink(ep, actions)

    def _expire_members(self, now: float, actions: list[Action]) -> None:
        ttl = self.timing.tombstone_ttl
        if now < self.next_expiry:
            return
        self.next_expiry = now + ttl / 8
        for node, member in list(self.members.items()):
            if node not in self.peers and now - member.changed_at > ttl:
                del self.members[node]
                self.digest_hash ^= entry_hash(member.entry)
                self.fresh.pop(node, None)
                self.wanted.pop(node, None)

    # --- gossip ---------------------------------------------------------------------

    def _gossip_round(self, now: float, actions: list[Action]) -> None:
        """Open a push-pull exchange with a few random peers: a digest, news first."""
        t = self.timing
        if now < self.next_gossip:
            return
        # The round is taken even alone: a deadline left in the past would have the shell
        # tick every millisecond until the first peer came (a change reaches that peer with
        # our record when we meet, and the next round is at most one interval away).
        self.next_gossip = now + t.gossip_interval
        if not self.peers:
            return
        digest = self._digest(t.gossip_entries)
        for node in self.rng.sample(list(self.peers), min(len(self.peers), t.gossip_fanout)):
            self._send_sync(self.peers[node].endpoint, SYNC_OPEN, digest, [], actions)

    def _digest(self, budget: int) -> list[list[object]]:
        """Claims (without records) for one digest: news first, then a random sample."""
        limit = 3 * math.ceil(math.log2(len(self.members) + 2))
        news = list(itertools.islice(reversed(self.fresh), budget))
        out = []
        if self.node_id not in news:
            # Our own claim always goes: a peer holding our stale record then asks us for it.
            news = [self.node_id, *news[:budget - 1]]
        for node in news:
            told = self.fresh.get(node)
            if told is not None:
                if told + 1 >= limit:
                    del self.fresh[node]
                else:
                    self.fresh[node] = told + 1
            if node == self.node_id:
                out.append(self._wire_claim(self.me))
            else:
                member = self.members.get(node)
                if member is not None:
                    out.append(self._wire_claim(member.entry, member.spread_by))
        chosen = set(news)
        rest = budget - len(out)
        if rest > 0:
            others = [n for n in self.members if n not in chosen]
            for node in self.rng.sample(others, min(len(others), rest)):
                out.append(self._wire_claim(self.members[node].entry))
        return out

    def _news(self, node: str) -> None:
        self.fresh[node] = 0
        self.fresh.move_to_end(node)
        while len(self.fresh) > 8 * self.timing.gossip_entries:
            self.fresh.popitem(last=False)  # the oldest news; anti-entropy's samples still carry it

    @staticmethod
    def _wire_claim(entry: Entry, by: str = "") -> list[object]:
        wire = entry.to_wire(False)
        if by and entry.status == SUSPECT:
            wire[4] = by
        return wire

    def _send_sync(self, endpoint: str, phase: int, entries: list[list[object]], wants: list[str],
                   actions: list[Action]) -> None:
        if len(entries) > MAX_SYNC_ENTRIES:
            self.counters["sync_entries_deferred"] += len(entries) - MAX_SYNC_ENTRIES
        actions.append(Send(endpoint, sync_frame(
            self.mesh, self.node_id, self.endpoint, phase, self.digest_hash.to_bytes(8, "big"),
            len(self.members) + 1, entries[:MAX_SYNC_ENTRIES], wants[:MAX_SYNC_ENTRIES])))

    def _on_sync(self, sync: Sync, now: float, actions: list[Action]) -> None:
        self.touch(sync.node, now)
        exchange = sync.phase != SYNC_LAST  # digests in an exchange's last frame ask for nothing
        pushes: list[Entry] = []  # where our claim is newer than the digest's
        answers: list[Entry] = []  # what the sender asked for
        wants: list[str] = []
        for entry in sync.entries:
            if entry.record is not None or not exchange:
                self._learn(entry, sync.node, now, actions)
                continue
            self._learn(entry, sync.node, now, actions, wants)
            # Where our claim is newer than the digest's, push it (with its record) in the answer.
            if entry.node == self.node_id:
                if self.me.key > entry.key:
                    pushes.append(self.me)
            else:
                member = self.members.get(entry.node)
                if member is not None and member.entry.key > entry.key:
                    pushes.append(member.entry)
        for node in sync.wants:
            if node == self.node_id:
                answers.append(self.me)
            else:
                member = self.members.get(node)
                if member is not None and member.entry.record is not None:
                    answers.append(member.entry)
        digest: list[list[object]] = []
        if sync.phase == SYNC_OPEN and sync.digest_hash != self.digest_hash.to_bytes(8, "big"):
            digest = self._digest(self.timing.gossip_entries)
        if not (pushes or answers or wants or digest):
            return
        ep = self._reply_endpoint(sync.node, sync.endpoint, now, actions)
        if ep is None:
            return
        phase = SYNC_REPLY if sync.phase == SYNC_OPEN else SYNC_LAST
        if not exchange:
            wants = []
        # Records go only where a record we accepted proved the key (the shell lets no other
        # node's frames through; this holds without it too).
        records = self._records(answers, pushes) if self._proven(ep) else []
        self._send_sync(ep, phase, records + digest, wants, actions)

    def _records(self, answers: list[Entry], pushes: list[Entry]) -> list[list[object]]:
        """Entries with their records, up to about gossip_max_bytes (one always goes).

        Asked-for entries carry whatever record we have; pushed ones carry it only when it
        is the record of the claim itself (a lagging record would travel for nothing: the
        receiver asks the owner for the right one)."""
        out: list[list[object]] = []
        size = 0
        seen: set[str] = set()
        for entry, asked in itertools.chain(((e, True) for e in answers), ((e, False) for e in pushes)):
            if entry.node in seen:
                continue
            seen.add(entry.node)
            complete = entry.record is not None and entry.record.key == (entry.started, entry.incarnation)
            wire = entry.to_wire(asked or complete)
            n = len(msgpack.packb(wire, use_bin_type=True))
            if out and size + n > self.timing.gossip_max_bytes:
                self.counters["records_deferred"] += 1  # asked for again in a later round
                continue
            size += n
            out.append(wire)
        return out

    # --- links ----------------------------------------------------------------------

    def _link(self, ep: str, actions: list[Action]) -> None:
        self.links[ep] += 1
        if self.links[ep] == 1:
            actions.append(Connect(ep))

    def _unlink(self, ep: str, actions: list[Action]) -> None:
        self.links[ep] -= 1
        if self.links[ep] <= 0:
            del self.links[ep]
            actions.append(Disconnect(ep))
