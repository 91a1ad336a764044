"""One frozen, validated object holding every default and limit of an agent.

Each field can be set three ways, later ones winning: the default below, a
``MESHMQ_<FIELD>`` environment variable, and a keyword override of the agent
(``AsyncAgent("orders", probe_interval=1.0)``). Every limit meshmq enforces lives
here, so nothing is unbounded by accident.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._wire import MAX_SCHEMA_KEYS, is_endpoint

_MESH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_KiB = 1024
MAX_TTL = 366 * 86_400.0
"""Longest time to live a message may have (seconds)."""
_MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Settings of one agent. Build with :meth:`Config.load` to read the environment."""

    # --- identity and reachability ---
    mesh: str = "default"
    """Name of the mesh; agents of different meshes ignore each other."""
    interfaces: tuple[str, ...] = ("127.0.0.1",)
    """Addresses to bind and advertise. Loopback only by default; ``all`` opts in to every interface."""
    bind: str | None = None
    """Explicit ZeroMQ endpoint(s) to bind, comma-separated (e.g. ``tcp://127.0.0.1:7400``); default: one OS-chosen port per interface."""
    seeds: tuple[str, ...] = ()
    """Static peer endpoints (``tcp://host:port#KEY``, as ``meshmq peers`` shows them) for networks where multicast does not reach."""
    discovery: bool = True
    """Announce and browse with mDNS. Seeds work with it off."""
    data_dir: Path | None = None
    """Root of the agents' state (``MESHMQ_DATA_DIR``); default ``~/.meshmq``. An agent keeps its own in ``<data_dir>/<service>/<n>``, the first instance directory no running agent holds, so several instances of a service on one host each keep their own, and a restarted one finds its identity again."""
    durability: str = "fsync"
    """What the agent's store survives: ``fsync`` (power loss), ``os`` (a crash of the process, not of the machine) or ``memory`` (nothing: no store, a new identity each start)."""
    max_store_bytes: int = 1 << 30
    """Largest size of the agent's store on disk (LMDB's map size); a commit that would pass it fails with StoreError."""
    quarantine_store: bool = False
    """Start even if the store fails its integrity check, moving the damaged records aside (they are reported either way)."""

    # --- security ---
    authority: str | None = None
    """Public key of the mesh authority (``meshmq authority init`` prints it); agents trust certificates and revocations it signed. Several, comma-separated, to roll over to a new authority key; an item that is not a key is a file of keys, one per line (``authority.pub``), re-read while the agent runs when it changes. None: this user's development authority in MESHMQ_HOME (~/.meshmq), created on first use, which lets the user's agents on this machine trust each other with no set-up."""
    certificate: Path | None = None
    """This agent's certificate file (``meshmq cert issue``), required with ``authority``; with the development authority the agent issues its own. Re-read while the agent runs when it changes: replacing the file renews the certificate without a restart."""
    revocations: Path | None = None
    """A file of revocations (``meshmq cert revoke -o FILE``) to load at start and whenever it changes. Revocations also arrive by gossip and are kept in the agent's store; this file is for agents that start while no peer holding them runs."""
    max_revocations: int = 10_000
    """Most revocations an agent keeps (each about 200 bytes); one beyond it is refused, logged and counted (revocations_refused_full). A revoked certificate's revocation is forgotten once the certificate has expired."""
    max_schemas: int = 1024
    """Most message schemas pushed to the mesh (``meshmq schema add``) an agent keeps, one per type and version (at most 4096); beyond it the smallest pairs by type and version are kept: a smaller new one displaces the greatest (schemas_displaced), others are refused (schemas_refused_full); both logged."""
    policy_file: Path | None = None
    """A policy file (``docs/policies.md``) this agent enforces: rate limits on what it publishes, default TTLs, retries of its handlers and content routes. Checked at start (ConfigError naming line and rule)."""
    insecure: bool = False
    """For experiments only: no certificates, no CurveZMQ, no signed or encrypted frames, no access rights (a warning is logged at start). Insecure and secure agents never talk: neither connects to the other's endpoints, and each refuses the other's records."""

    # --- membership and failure detection (SWIM with Lifeguard's refinements) ---
    probe_interval: float = 0.5
    """Seconds between two probes (pings) by this node, each of one peer in turn."""
    probe_timeout: float = 0.2
    """Seconds to wait for a direct ack before asking other peers to probe (less than probe_interval)."""
    indirect_probes: int = 3
    """Peers asked to probe a node that did not answer directly."""
    suspicion_mult: float = 3.0
    """A suspected node is declared dead after at least suspicion_mult * max(1, log10(nodes)) * probe_interval seconds unless it refutes."""
    suspicion_max_mult: float = 6.0
    """A suspicion no other node confirms lasts up to suspicion_max_mult times that minimum."""
    gossip_interval: float = 0.2
    """Seconds between push-pull gossip rounds."""
    gossip_fanout: int = 3
    """Peers in each gossip round."""
    gossip_entries: int = 32
    """Most node claims in one round's digest, however large the mesh (at most 256)."""
    gossip_max_bytes: int = 64 * _KiB
    """Records sent in one gossip frame stop at about this size (a single larger record travels alone)."""
    tombstone_ttl: float = 60.0
    """Seconds the entry of a departed node is kept, so that stale rumours cannot bring it back."""
    join_timeout: float = 3.0
    """Seconds an unanswered greeting (an mDNS hint) is repeated before it is given up."""
    rejoin_window: float = 600.0
    """Seconds during which the endpoint of a peer declared dead is still greeted, so a healed partition rejoins."""
    work_report_interval: float = 0.02
    """Seconds between a queue-group member's reports of finished work to the publishers that sent it (how fresh their load balancing is)."""

    # --- delivery (the outbox) ---
    max_outbox_messages: int = 1_000_000
    """Messages the outbox keeps for all destinations together; beyond it, publish waits up to publish_timeout, then raises OutboxFull."""
    max_outbox_bytes: int = 256 * _MiB
    """Bytes of messages the outbox keeps for all destinations together (keep it well under max_store_bytes)."""
    retransmit_initial: float = 0.2
    """Seconds before an unacknowledged message is sent again; doubles (with jitter) while the receiver stays silent."""
    retransmit_max: float = 5.0
    """Longest wait between two retransmissions."""
    unread_receipts_wait: float = 1.0
    """Seconds a retransmission waits past its time while the agent is behind on reading the network (receipts may be among the unread frames); after that it goes anyway."""
    max_held_messages: int = 1024
    """Messages a receiver holds from one sender while waiting for an earlier one that is missing."""
    durable_forget_after: float = 7 * 86400.0
    """Seconds a publisher remembers a durable subscriber that is down (keeping its messages, within their TTL) before it forgets it."""

    # --- handling ---
    default_ttl: float = 0.0
    """Seconds a message stays deliverable after it is published, unless publish(ttl=...) says otherwise; 0: no limit. An expired message is dead-lettered, not handed to a handler."""
    max_attempts: int = 5
    """Times a handler gets one message (it raised or nacked it) before the message is dead-lettered."""
    retry_backoff: float = 0.1
    """Seconds before a message is handed to a failing handler again; doubles with each attempt."""
    retry_backoff_max: float = 10.0
    """Longest wait between two attempts."""

    # --- sizes ---
    max_frame_bytes: int = 4 * _MiB
    """Largest ZeroMQ frame accepted; larger ones are refused by the socket."""
    max_payload_bytes: int = 1 * _MiB
    """Largest message payload (after serialization)."""
    max_topic_length: int = 256
    """Longest topic or pattern, in characters."""
    max_topic_tokens: int = 32
    """Most dot-separated tokens in a topic or pattern."""
    max_header_count: int = 64
    """Most free headers on one message."""
    max_header_bytes: int = 16 * _KiB
    """Largest total size of a message's free headers (keys plus values, UTF-8)."""
    max_batch_messages: int = 256
    """Most messages packed into one frame to a peer."""
    max_batch_bytes: int = 256 * _KiB
    """Target size of one batch frame; a single larger message travels alone."""
    max_subscriptions: int = 10_000
    """Most subscriptions one node may advertise (own and accepted from peers)."""
    max_peers: int = 4096
    """Most peers one node tracks; records beyond it are refused and counted."""

    # --- queues and time limits ---
    peer_queue_messages: int = 250_000
    """Messages the outbox keeps for one destination before publishing to it waits (back-pressure), then raises PeerQueueFull."""
    peer_queue_bytes: int = 128 * _MiB
    """Bytes the outbox keeps for one destination before publishing to it waits (back-pressure)."""
    send_window: int = 8192
    """While the policy gives some topic a priority: messages on their way to one destination (sent, not yet reported arrived) before the rest wait in the outbox, where the priority lanes decide their turn (in the socket's queue it would be first come first served). No window without priorities."""
    lane_starve_after: int = 8
    """Frames in a row a lower priority lane with messages due may be passed over for higher ones before it sends one (so low priority is slower, never starved)."""
    subscription_queue_messages: int = 10_000
    """Messages waiting for one subscription's handler or iterator before the agent stops taking data, until half of them are done. It still reads and answers the rest (probes, gossip, receipts)."""
    paused_data_bytes: int = 32 * _MiB
    """Bytes of received messages (envelopes) an agent keeps aside while a full subscription stops it taking data, to hand over when it resumes. Data frames beyond it are dropped unread and counted (``data_frames_refused_paused``); their senders keep the messages and send them again."""
    publish_timeout: float = 5.0
    """Seconds ``publish`` waits for room in a full outbox before raising ``OutboxFull`` (``PeerQueueFull`` when one destination is full; ``SubscriptionFull`` when a subscription of the same agent is)."""
    socket_hwm: int = 1000
    """ZeroMQ high-water mark, in frames, of every socket."""
    read_slice: float = 0.005
    """Seconds the agent reads the network in one loop turn before its other work (timers, receipts) runs: a backlog is read in slices."""
    blocking_intake_messages: int = 1000
    """With durability "memory": publishes a blocking Agent hands its loop before publish waits for the loop to catch up (small keeps them in the CPU's caches)."""
    stop_timeout: float = 2.0
    """Seconds ``stop`` spends flushing queued messages before closing."""
    tap_queue_messages: int = 10_000
    """Items (mirrored messages and delivery events) each tap may have waiting at this agent; beyond it the oldest give way, counted and reported to the tap as not shown. Taps never slow publishing."""
    tap_buffer_messages: int = 10_000
    """Events a tap (``agent.tap()``, ``meshmq tap``) keeps that its reader has not taken yet; beyond it the newest are dropped and reported as not shown."""
    tap_stats_interval: float = 1.0
    """Seconds between two reports of an agent's figures (rates, outbox, dead letters, latency) to the taps that ask for them (``meshmq top``)."""
    tap_flush_interval: float = 0.05
    """Seconds between two flushes of the mirror to the taps (their events arrive batched, this late at most)."""
    tracing: bool = False
    """Start a W3C trace (a ``traceparent`` header) on every publish that is not already part of one. Without it, traces are only carried on: what a handler publishes continues the trace of the message it handles."""
    metrics_port: int = 0
    """Serve Prometheus metrics of this agent at http://metrics_host:PORT/metrics (counters, outbox and peer gauges, a delivery-latency histogram); 0: off."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint listens on (loopback by default; a scraper elsewhere needs another)."""
    health_max_outbox_age: float = 60.0
    """Seconds the oldest message may wait in the outbox before ``health()`` warns."""
    health_dead_letter_window: float = 300.0
    """``health()`` warns when a message was dead-lettered within this many seconds."""
    health_stall_window: float = 300.0
    """``health()`` warns when the agent's event loop was held longer than ``probe_timeout`` (``loop_stalls``) within this many seconds."""
    health_certificate_warning: float = 7 * 86_400.0
    """``health()`` warns when the certificate expires within this many seconds."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check_type(f.name, str(f.type), value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        _check(bool(_MESH_NAME.match(self.mesh)), "mesh", f"{self.mesh!r} must be 1-63 letters, digits, '-' or '_'")
        _check(len(self.interfaces) > 0, "interfaces", "at least one interface is required")
        for iface in self.interfaces:
            if iface != "all":
                try:
                    ipaddress.ip_address(iface)
                except ValueError:
                    raise ConfigError("interfaces", f"{iface!r} is not an IP address or 'all'") from None
        if self.bind is not None:
            for ep in self.bind.split(","):
                _check(_is_endpoint(ep.strip()), "bind", f"{ep!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:7400")
        for seed in self.seeds:
            _check(_is_endpoint(seed), "seeds", f"{seed!r} is not an endpoint like tcp://127.0.0.1:7400#KEY")
            _check("#" in seed or self.insecure, "seeds", f"{seed!r} lacks the node's key: every hop is encrypted (CurveZMQ), so a "
                   "seed is given as tcp://host:port#KEY, as 'meshmq peers' and agent.endpoints show it")
        _check(self.durability in ("fsync", "os", "memory"), "durability",
               f"{self.durability!r} must be fsync, os or memory")
        _positive(self, "probe_interval", "probe_timeout", "indirect_probes", "suspicion_mult", "gossip_interval",
                  "gossip_fanout", "gossip_entries", "gossip_max_bytes", "tombstone_ttl", "join_timeout",
                  "rejoin_window", "work_report_interval", "publish_timeout", "stop_timeout", "max_attempts",
                  "tap_flush_interval", "tap_stats_interval", "health_max_outbox_age", "health_dead_letter_window", "health_stall_window",
                  "health_certificate_warning",
                  "retry_backoff", "retry_backoff_max", "retransmit_initial", "retransmit_max", "durable_forget_after",
                  "read_slice", "unread_receipts_wait")
        _check(self.gossip_entries <= 256, "gossip_entries", f"{self.gossip_entries} is above the wire limit of 256")
        _check(
            self.probe_timeout < self.probe_interval,
            "probe_timeout",
            f"{self.probe_timeout:g}s must be less than probe_interval ({self.probe_interval:g}s)",
        )
        _check(0 <= self.default_ttl <= MAX_TTL, "default_ttl",
               f"{self.default_ttl:g} must be 0 (no limit) up to {MAX_TTL:g} seconds")
        _check(self.suspicion_max_mult >= 1, "suspicion_max_mult", f"{self.suspicion_max_mult:g} must be at least 1")
        _check(0 <= self.metrics_port <= 65535, "metrics_port", f"{self.metrics_port} must be 0 (off) or a TCP port")
        _positive(
            self, "max_frame_bytes", "max_payload_bytes", "max_topic_length", "max_topic_tokens",
            "max_header_count", "max_header_bytes", "max_batch_messages", "max_batch_bytes",
            "max_subscriptions", "max_peers", "peer_queue_messages", "peer_queue_bytes",
            "subscription_queue_messages", "paused_data_bytes", "send_window", "lane_starve_after", "socket_hwm", "max_store_bytes", "max_outbox_messages",
            "max_outbox_bytes", "max_held_messages", "tap_queue_messages", "tap_buffer_messages", "max_revocations",
            "max_schemas", "blocking_intake_messages",
        )
        _check(self.max_schemas <= MAX_SCHEMA_KEYS, "max_schemas",
               f"{self.max_schemas} is above the wire limit of {MAX_SCHEMA_KEYS}")
        _check(
            self.max_frame_bytes >= self.max_payload_bytes + self.max_header_bytes + 4 * _KiB,
            "max_frame_bytes",
            "must exceed max_payload_bytes + max_header_bytes + 4 KiB so that every valid message fits one frame",
        )

    # --- construction ---

    @classmethod
    def load(cls, base: Config | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """``base`` if given, else the defaults with ``MESHMQ_*`` variables applied; then ``overrides``.

        A ``MESHMQ_`` variable that names no setting is reported with a warning (a typo
        would otherwise be silently ignored).
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if base is None:
            known = {"MESHMQ_" + f.name.upper() for f in dataclasses.fields(cls)} | _OTHER_VARIABLES
            for var in env:
                if var.startswith("MESHMQ_") and var not in known:
                    _warn_unknown(var)
            for f in dataclasses.fields(cls):
                raw = env.get("MESHMQ_" + f.name.upper())
                if raw is not None and raw != "":
                    values[f.name] = _parse(f.name, f.type, raw, f"MESHMQ_{f.name.upper()}")
            base = cls(**values)
        return base.replace(**overrides) if overrides else base

    def replace(self, **overrides: Any) -> Config:
        """A copy with ``overrides`` applied and validated; unknown names are an error."""
        known = {f.name: f for f in dataclasses.fields(self)}
        coerced: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in known:
                raise ConfigError(name, f"unknown setting (known: {', '.join(sorted(known))})")
            coerced[name] = _coerce(name, known[name].type, value)
        return dataclasses.replace(self, **coerced)

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(field, environment variable, default, help) for every setting: used by ``--help``."""
        docs = _field_docs()
        return [
            (f.name, "MESHMQ_" + f.name.upper(), f.default, docs.get(f.name, ""))
            for f in dataclasses.fields(cls)
        ]


def _check_type(name: str, kind: str, value: Any) -> Any:
    """The value if it has the field's type (lossless forms converted: list → tuple, int → float)."""
    if "tuple" in kind:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return value if isinstance(value, tuple) else tuple(value)
        raise ConfigError(name, f"expected a list of strings, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected True or False, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(name, f"expected a number, got {value!r}")
    if "Path" in kind:
        if value is None or isinstance(value, Path):
            return value
        if isinstance(value, (str, os.PathLike)):
            return Path(value).expanduser()
        raise ConfigError(name, f"expected a path, got {value!r}")
    if isinstance(value, str) or (value is None and "None" in kind):
        return value
    raise ConfigError(name, f"expected a string, got {value!r}")


def _check(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise ConfigError(field, problem)


def _positive(cfg: Config, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(value > 0, name, f"{value!r} must be greater than zero")


def _is_endpoint(ep: str) -> bool:
    # For binding, ZeroMQ also takes '*' as the host (every interface) and as the port.
    return is_endpoint(ep.replace("tcp://*:", "tcp://0.0.0.0:", 1), wildcard_port=True)


# Variables read elsewhere (key and certificate home, test switches), not Config fields.
_OTHER_VARIABLES = {"MESHMQ_HOME"}
_warned: set[str] = set()


def _warn_unknown(var: str) -> None:
    if var not in _warned and len(_warned) < 64:
        import logging  # here, not at the top: logging loads threading, which the pure core avoids

        _warned.add(var)
        logging.getLogger("meshmq.config").warning(
            "environment variable %s names no meshmq setting (see 'meshmq config'); ignored", var)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, annotation: Any, raw: str, source: str) -> Any:
    """Parse an environment string into the field's type."""
    kind = str(annotation)
    try:
        if "tuple" in kind:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == "bool":
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind == "int":
            return int(raw.replace("_", ""))
        if kind == "float":
            return float(raw)
        if "Path" in kind:
            return Path(raw).expanduser()
        return raw
    except ValueError as exc:
        raise ConfigError(name, f"{source}={raw!r}: {exc}") from None


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Keyword overrides may also be given as strings, as in the environment."""
    kind = str(annotation)
    if isinstance(value, str) and kind not in ("str", "str | None"):
        return _parse(name, annotation, value, "value")
    return _check_type(name, kind, value)


def _field_docs() -> dict[str, str]:
    """The docstring under each field, read from this module's source (for ``--help``)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Config))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = str(after.value.value)
    return docs
