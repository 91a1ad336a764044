"""Wire format: the message envelope and the frames agents exchange.

Pure functions, no I/O. Every frame is one ZeroMQ message::

    byte 0   protocol version (PROTOCOL_VERSION)
    byte 1   frame kind (SEALED or DATA, RECEIPT, TAP; membership: HELLO, PING, ACK, PING_REQ, SYNC, BYE; WORK;
             REVOKE, POLICY, SCHEMAS)
    rest     msgpack body, positional arrays (compact, and fast to decode)

An envelope is encoded once by its publisher and travels as opaque bytes inside
DATA frames to every destination (the per-destination stream sequence number
lives in the frame, not in the envelope), so later layers can sign, encrypt and
store it as one unit. Decoding is strict: every field is type-checked and
bounded; anything else raises :class:`ProtocolError`, which callers count and
drop.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgpack

from ._errors import PayloadError, ProtocolError, TopicError
from ._message import FORMAT_BYTES, FORMAT_MSGPACK, Message
from ._topics import check_topic

PROTOCOL_VERSION = 7
ENVELOPE_VERSION = 1

HELLO = 1
PING = 2
BYE = 3
DATA = 4
SYNC = 5
ACK = 6
PING_REQ = 7
WORK = 8
RECEIPT = 9
SEALED = 10
"""A data frame sealed by its sender for its recipient (:mod:`meshmq._seal`); DATA is the
same unsealed, between agents that run with ``insecure=True``."""
TAP = 11
"""Mirrored traffic and delivery events for a tap (:mod:`meshmq._tap`), sealed like data."""
REVOKE = 12
"""Authority-signed revocations, compared by digest and pushed (see :mod:`meshmq._security`)."""
POLICY = 13
"""The mesh's policy: its version offered, and the authority-signed document pushed."""
SCHEMAS = 14
"""Message schemas: the keys of the schema documents a node holds offered, and the
authority-signed documents themselves pushed (see :mod:`meshmq._registry`)."""
KINDS = {HELLO: "hello", PING: "ping", BYE: "bye", DATA: "data", SYNC: "sync", ACK: "ack", PING_REQ: "ping-req",
         WORK: "work", RECEIPT: "receipt", SEALED: "sealed", TAP: "tap", REVOKE: "revoke", POLICY: "policy",
         SCHEMAS: "schemas"}
MAX_POLICY_FRAME_BYTES = 300 * 1024
MAX_SCHEMA_DOCUMENT_BYTES = 65 * 1024
"""Largest signed schema document: a schema of at most 64 KiB (``_security.MAX_SCHEMA_BYTES``)
and its type, mesh, times, issuer and signature."""
MAX_FRAME_SCHEMAS = 64
"""Most schema documents one schemas frame carries (more travel in several frames)."""
MAX_SCHEMA_FRAME_BYTES = 1024 * 1024
"""What a sender puts in one schemas frame at most (documents and keys), below max_frame_bytes."""
MAX_SCHEMA_KEYS = 4096
"""Most schema keys one offer carries: the most schemas an agent may hold (``Config.max_schemas``)."""
MAX_SYNC_ENTRIES = 256
"""Most membership entries (and most wants) one sync frame may carry, however large the mesh."""
MAX_REVOCATION_BYTES = 512
"""Largest encoded revocation (one is about 200 bytes)."""
MAX_FRAME_REVOCATIONS = 64
"""Most revocations one revoke frame carries (a longer list travels in several)."""

LANES = 3
"""Priority lanes, each a stream of its own to every destination: 0 high, 1 normal, 2 low."""
NORMAL_LANE = 1

_ID_BYTES = 16
_TOPIC_CACHE = 4096
_MAX_NAME = 255  # service, node id, type, key, group, mesh


@dataclasses.dataclass(frozen=True)
class Limits:
    """Decoder bounds, taken from :class:`Config` (kept separate so the core needs no Config)."""

    max_frame_bytes: int = 4 * 1024 * 1024
    max_payload_bytes: int = 1024 * 1024
    max_topic_length: int = 256
    max_topic_tokens: int = 32
    max_header_count: int = 64
    max_header_bytes: int = 16 * 1024
    max_batch_messages: int = 256
    max_subscriptions: int = 10_000

    unpack_options: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """msgpack bounds derived from the limits above (computed once, used per message)."""
    checked_topics: dict[str, None] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """Topics already found valid under these limits (bounded cache for the receive path)."""

    def __post_init__(self) -> None:
        self.unpack_options.update(
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=self.max_frame_bytes,
            max_str_len=max(self.max_header_bytes, self.max_topic_length, 4096),
            max_array_len=max(self.max_subscriptions * 2, self.max_batch_messages, 64),
            max_map_len=self.max_header_count,
            max_ext_len=0,
        )

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        names = [f.name for f in dataclasses.fields(cls) if f.name.startswith("max_")]
        return cls(**{name: getattr(config, name) for name in names})


# --- envelope ------------------------------------------------------------------------


def encode_payload(data: Any, limits: Limits) -> tuple[int, bytes]:
    """(format, bytes) for an application value; raise :class:`PayloadError` if it can't travel."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        fmt, raw = FORMAT_BYTES, bytes(data)
    else:
        try:
            raw = msgpack.packb(data, use_bin_type=True, datetime=False)
            # msgpack packs a tuple dict key as an array, which no receiver can rebuild as a key;
            # decoding once here turns that into an error for the publisher, not for every subscriber.
            msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(
                f"data of type {type(data).__name__} cannot be serialized: {exc}; "
                "send bytes, or dict/list/str/int/float/bool/None values with str or number keys"
            ) from None
        fmt = FORMAT_MSGPACK
    if len(raw) > limits.max_payload_bytes:
        raise PayloadError(f"payload of {len(raw)} bytes exceeds max_payload_bytes={limits.max_payload_bytes}")
    return fmt, raw


def check_headers(headers: Any, limits: Limits) -> dict[str, str] | None:
    """Validate free headers: str → str, bounded in count and size."""
    if headers is None or headers == {}:
        return None
    if not isinstance(headers, dict):
        raise PayloadError(f"headers must be a dict of str to str, not {type(headers).__name__}")
    if len(headers) > limits.max_header_count:
        raise PayloadError(f"{len(headers)} headers exceeds max_header_count={limits.max_header_count}")
    size = 0
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PayloadError(f"header {k!r}: keys and values must be str, got {type(k).__name__}: {type(v).__name__}")
        if not k:
            raise PayloadError("header names must not be empty")
        size += len(k.encode()) + len(v.encode())
    if size > limits.max_header_bytes:
        raise PayloadError(f"headers total {size} bytes, exceeding max_header_bytes={limits.max_header_bytes}")
    return dict(headers)


def encode_envelope(
    id_: bytes, timestamp: float, topic: str, type_: str | None, source: str, node: str,
    schema_version: int, headers: dict[str, str] | None, key: str | None, fmt: int, raw: bytes,
    packer: msgpack.Packer | None = None,
) -> bytes:
    """Envelope bytes. Arguments are assumed checked (see the agent's publish).

    ``packer`` is a reusable ``msgpack.Packer(use_bin_type=True)`` owned by the
    calling thread; making one per call costs as much as the packing itself.
    """
    env = [ENVELOPE_VERSION, id_, timestamp, topic, type_, source, node, schema_version, headers, key, fmt, raw]
    if packer is None:
        return msgpack.packb(env, use_bin_type=True)
    return packer.pack(env)


def _unpack(data: bytes | memoryview, limits: Limits) -> Any:
    try:
        return msgpack.unpackb(data, **limits.unpack_options)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None


def decode_envelope(data: bytes, limits: Limits, seq: int = 0) -> Message:
    """A :class:`Message` from envelope bytes, or :class:`ProtocolError`."""
    if len(data) > limits.max_frame_bytes:
        raise ProtocolError("envelope larger than max_frame_bytes")
    try:
        # The envelope sits in a frame already bounded by max_frame_bytes, and every field is
        # checked below, so msgpack's own bounds (the buffer's length) are enough here.
        env = msgpack.unpackb(data)
    except Exception as exc:
        raise ProtocolError(f"undecodable envelope: {type(exc).__name__}: {exc}") from None
    if type(env) is not list or len(env) != 12:
        raise ProtocolError("envelope is not a 12-field array")
    ver, id_, ts, topic, type_, source, node, schema_version, headers, key, fmt, raw = env
    if ver != ENVELOPE_VERSION:
        raise ProtocolError(f"unknown envelope version {ver!r}")
    if type(id_) is not bytes or len(id_) != _ID_BYTES:
        raise ProtocolError("bad message id")
    if type(ts) is not float and type(ts) is not int:
        raise ProtocolError("bad timestamp")
    if type(topic) is not str:
        raise ProtocolError("bad topic")  # checked before the cache lookup: a list or map is unhashable
    if topic not in limits.checked_topics:
        try:
            check_topic(topic, limits.max_topic_length, limits.max_topic_tokens)
        except TopicError as exc:
            raise ProtocolError(f"bad topic: {exc.problem}") from None
        if len(limits.checked_topics) >= _TOPIC_CACHE:
            limits.checked_topics.clear()
        limits.checked_topics[topic] = None
    if type_ is not None and (type(type_) is not str or len(type_) > _MAX_NAME):
        raise ProtocolError("bad type")
    if type(source) is not str or not 0 < len(source) <= _MAX_NAME or type(node) is not str or not 0 < len(node) <= _MAX_NAME:
        raise ProtocolError("bad source or node")
    if type(schema_version) is not int or schema_version < 0:
        raise ProtocolError("bad schema version")
    if headers is not None:
        if type(headers) is not dict or len(headers) > limits.max_header_count:
            raise ProtocolError("bad headers")
        size = 0
        for k, v in headers.items():
            if type(k) is not str or type(v) is not str or not k:
                raise ProtocolError("header name or value is not a str, or the name is empty")
            size += len(k.encode()) + len(v.encode())
        if size > limits.max_header_bytes:
            raise ProtocolError(f"headers total {size} bytes, over max_header_bytes")
    if key is not None and (type(key) is not str or len(key) > _MAX_NAME):
        raise ProtocolError("bad key")
    if type(fmt) is not int or (fmt != FORMAT_BYTES and fmt != FORMAT_MSGPACK):
        raise ProtocolError(f"unknown payload format {fmt!r}")
    if type(raw) is not bytes or len(raw) > limits.max_payload_bytes:
        raise ProtocolError("bad or oversized payload")
    return Message(id_, float(ts), topic, type_, source, node, schema_version, headers, key, fmt, raw, seq)


# --- endpoints -------------------------------------------------------------------------

_ENDPOINT = re.compile(
    r"^(?:tcp://(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r":(?P<port>\d{1,5}|\*)"
    r"|(?:ipc|inproc)://[A-Za-z0-9._/@-]{1,200})"
    r"(?:#(?P<key>[A-Za-z0-9_-]{43}))?$"
)


def split_endpoint(endpoint: str) -> tuple[str, str | None]:
    """(the ZeroMQ endpoint, the node's public key in base64url or None) of ``endpoint#key``.
    A node advertises its endpoints with its key: connecting needs it (CurveZMQ)."""
    plain, _, key = endpoint.partition("#")
    return plain, key or None


def is_endpoint(endpoint: object, *, wildcard_port: bool = False) -> bool:
    """Whether ``endpoint`` is a ZeroMQ endpoint we will connect to: tcp://host:port (an
    IPv4 address, [IPv6] or a host name), ipc:// or inproc://, optionally followed by
    ``#`` and the node's public key. Endpoints come from peers and mDNS, so anything else
    is refused before it reaches a socket."""
    if type(endpoint) is not str or len(endpoint) > 300:
        return False
    m = _ENDPOINT.match(endpoint)
    if m is None:
        return False
    port = m.group("port")
    if port is None:
        return True
    if port == "*":
        return wildcard_port
    return 0 < int(port) < 65536


# --- node records (the routing table's unit, spread by gossip) --------------------------

MAX_INCARNATION = 2**53
"""Incarnations above this are refused on decode (a counter that far ahead is forged or corrupt)."""
MAX_RECORD_ENDPOINTS = 16
MAX_RECORD_SCHEMAS = 1024
MAX_CERT_BYTES = 16 * 1024
MAX_RECORD_TAPS = 64


@dataclasses.dataclass(frozen=True, slots=True)
class Subscription:
    """What a node advertises: a pattern, the queue group it competes in (or None), and
    whether it is durable (publishers keep its messages while the node is down)."""

    pattern: str
    group: str | None = None
    durable: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node's entry in the routing table, made and versioned by that node alone.

    ``incarnation`` is the owner's counter when it made the record: it grows with
    every change of the record and every refutation of a rumour about the node, and
    restarts from 0 in a new life (a later ``started``). So ``(started, incarnation)``
    orders every record a node ever made.
    """

    node: str
    service: str
    endpoints: tuple[str, ...]
    subscriptions: tuple[Subscription, ...]
    incarnation: int
    started: float
    schemas: tuple[tuple[str, int], ...] = ()
    """(message type, schema version) pairs the node produces (filled in by the schema layer)."""
    cert: bytes | None = None
    """The node's certificate, from the mesh authority (see :mod:`meshmq._security`)."""
    sig: bytes | None = None
    """The node's Ed25519 signature over everything else (:meth:`signing_bytes`)."""
    taps: tuple[str, ...] = ()
    """Topic patterns the node watches as a tap (``meshmq tap``): agents mirror to it what
    they publish on them. Needs the tap right in its certificate."""
    tap_events: tuple[str, ...] = ()
    """The delivery events its taps want besides the messages (``sent``, ``acked``, ...):
    agents report only those, so a tap that wants few costs little."""

    def signing_bytes(self) -> bytes:
        """What the node signs: the record without its signature."""
        return msgpack.packb(self.to_wire()[:10], use_bin_type=True)

    @property
    def key(self) -> tuple[float, int]:
        return (self.started, self.incarnation)

    def to_wire(self) -> list[Any]:
        return [
            self.node, self.service, list(self.endpoints),
            [[s.pattern, s.group, True] if s.durable else [s.pattern, s.group] for s in self.subscriptions],
            self.incarnation, self.started,
            [list(s) for s in self.schemas], list(self.taps), list(self.tap_events), self.cert, self.sig,
        ]

    @classmethod
    def from_wire(cls, obj: Any, limits: Limits) -> NodeRecord:
        if type(obj) is not list or len(obj) != 11:
            raise ProtocolError("node record is not an 11-field array")
        node, service, endpoints, subs, incarnation, started, schemas, taps, tap_events, cert, sig = obj
        _check_node_id(node, "node id in record")
        if type(service) is not str or not 0 < len(service) <= _MAX_NAME:
            raise ProtocolError("bad service in record")
        if type(endpoints) is not list or not 0 < len(endpoints) <= MAX_RECORD_ENDPOINTS:
            raise ProtocolError("bad endpoints in record")
        for ep in endpoints:
            if not is_endpoint(ep):
                raise ProtocolError(f"bad endpoint in record: {str(ep)[:80]!r}")
        if type(subs) is not list or len(subs) > limits.max_subscriptions:
            raise ProtocolError("bad or too many subscriptions in record")
        parsed = []
        for s in subs:
            if type(s) is not list or not 2 <= len(s) <= 3 or (len(s) == 3 and s[2] is not True):
                raise ProtocolError("bad subscription in record")
            pattern, group = s[0], s[1]
            if type(pattern) is not str or not pattern or len(pattern) > limits.max_topic_length:
                raise ProtocolError("bad subscription pattern in record")
            if group is not None and (type(group) is not str or not group or len(group) > _MAX_NAME):
                raise ProtocolError("bad queue group in record")
            parsed.append(Subscription(pattern, group, len(s) == 3))
        _check_incarnation(incarnation, "record")
        _check_started(started, "record")
        if type(schemas) is not list or len(schemas) > MAX_RECORD_SCHEMAS:
            raise ProtocolError("bad or too many schemas in record")
        for sc in schemas:
            if (type(sc) is not list or len(sc) != 2 or type(sc[0]) is not str or not 0 < len(sc[0]) <= _MAX_NAME
                    or type(sc[1]) is not int or sc[1] < 0):
                raise ProtocolError("bad schema in record")
        if type(taps) is not list or len(taps) > MAX_RECORD_TAPS:
            raise ProtocolError("bad or too many tap patterns in record")
        for pattern in taps:
            if type(pattern) is not str or not pattern or len(pattern) > limits.max_topic_length:
                raise ProtocolError("bad tap pattern in record")
        if type(tap_events) is not list or len(tap_events) > 16 or not all(
                type(e) is str and 0 < len(e) <= 32 for e in tap_events):
            raise ProtocolError("bad tap events in record")
        if cert is not None and (type(cert) is not bytes or len(cert) > MAX_CERT_BYTES):
            raise ProtocolError("bad certificate in record")
        if sig is not None and (type(sig) is not bytes or len(sig) != 64):
            raise ProtocolError("bad signature in record")
        return cls(node, service, tuple(endpoints), tuple(parsed), incarnation, float(started),
                   tuple((sc[0], sc[1]) for sc in schemas), cert, sig, tuple(taps), tuple(tap_events))


def _check_node_id(node: Any, what: str) -> None:
    if type(node) is not str or not 0 < len(node) <= _MAX_NAME or "/" in node:
        raise ProtocolError(f"bad {what}")  # "/" separates a node id from a lane in stream keys


def _check_incarnation(value: Any, what: str) -> None:
    if type(value) is not int or not 0 <= value <= MAX_INCARNATION:
        raise ProtocolError(f"bad incarnation in {what}")


def _check_started(value: Any, what: str) -> None:
    if (type(value) is not float and type(value) is not int) or not 0 <= value < float("inf"):
        raise ProtocolError(f"bad start time in {what}")


# --- membership entries -------------------------------------------------------------------

ALIVE, SUSPECT, DEAD, LEFT = 0, 1, 2, 3
STATUS_NAMES = ("alive", "suspect", "dead", "left")


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """What one node believes about another: the membership state the mesh gossips.

    ``(started, incarnation, status)`` orders the claims about a node; ``record``
    is the newest record known for it (None when only a rumour was heard). ``by``
    names the node that first suspected it (for suspect entries; "" otherwise).
    See :mod:`meshmq._records` for the merge.
    """

    node: str
    started: float
    incarnation: int
    status: int
    record: NodeRecord | None = None
    by: str = ""

    @property
    def key(self) -> tuple[float, int, int]:
        return (self.started, self.incarnation, self.status)

    def to_wire(self, with_record: bool) -> list[Any]:
        rec = self.record.to_wire() if with_record and self.record is not None else None
        return [self.node, self.started, self.incarnation, self.status, self.by, rec]

    @classmethod
    def from_wire(cls, obj: Any, limits: Limits) -> Entry:
        if type(obj) is not list or len(obj) != 6:
            raise ProtocolError("membership entry is not a 6-field array")
        node, started, incarnation, status, by, rec = obj
        _check_node_id(node, "node id in entry")
        _check_started(started, "entry")
        _check_incarnation(incarnation, "entry")
        if type(status) is not int or not ALIVE <= status <= LEFT:
            raise ProtocolError("bad status in entry")
        if type(by) is not str or len(by) > _MAX_NAME:
            raise ProtocolError("bad suspecter in entry")
        record = None if rec is None else NodeRecord.from_wire(rec, limits)
        if record is not None and (record.node != node or record.key > (float(started), incarnation)):
            # A record is always claimed alive by its owner at its own (started, incarnation):
            # an entry cannot be older than the record it carries.
            raise ProtocolError("entry older than the record it carries, or about another node")
        return cls(node, float(started), incarnation, status, record, by)


# --- frames --------------------------------------------------------------------------

_HEAD = {kind: bytes((PROTOCOL_VERSION, kind)) for kind in KINDS}

SYNC_OPEN, SYNC_REPLY, SYNC_LAST = 0, 1, 2
"""A push-pull exchange: the opener sends a digest; the reply carries what the opener lacks,
what it wants and (when the tables differ) its own digest; the last frame answers wants."""


def _pack(kind: int, body: list[Any]) -> bytes:
    return _HEAD[kind] + msgpack.packb(body, use_bin_type=True)


def hello_frame(mesh: str, me: Entry, want_reply: bool) -> bytes:
    """Introduce ourselves (entry with our record) to a node that has proved its certificate."""
    return _pack(HELLO, [mesh, me.to_wire(True), want_reply])


def card_frame(mesh: str, me: Entry, cert: bytes, endpoint: str) -> bytes:
    """Introduce ourselves to an endpoint that has proved nothing yet (one planted by mDNS, a
    seed): our claim without the record, our certificate and where to answer. A certified node
    there answers with its record, and gets ours in return; anybody else learns no more than
    the certificate says."""
    return _pack(HELLO, [mesh, me.to_wire(False), True, cert, endpoint])


def ping_frame(mesh: str, node: str, endpoint: str, seq: int, target: str, sent_at: float = 0.0) -> bytes:
    """A probe of ``target``; ``sent_at`` is the sender's wall clock, for skew checks."""
    return _pack(PING, [mesh, node, endpoint, seq, target, sent_at])


def ack_frame(mesh: str, node: str, seq: int, nack: bool = False) -> bytes:
    """The answer to probe ``seq``; a NACK says a helper could not reach the target itself."""
    return _pack(ACK, [mesh, node, seq, nack])


def ping_req_frame(mesh: str, node: str, endpoint: str, seq: int, target: str, target_endpoint: str) -> bytes:
    """Ask a helper to probe ``target`` for us (an indirect probe) and forward the ack."""
    return _pack(PING_REQ, [mesh, node, endpoint, seq, target, target_endpoint])


def bye_frame(mesh: str, node: str, started: float, incarnation: int) -> bytes:
    return _pack(BYE, [mesh, node, started, incarnation])


def sync_frame(mesh: str, node: str, endpoint: str, phase: int, digest_hash: bytes, count: int,
               entries: list[list[Any]], wants: list[str]) -> bytes:
    """One step of a push-pull exchange: entries (wire form, with or without records) and wants."""
    return _pack(SYNC, [mesh, node, endpoint, phase, digest_hash, count, entries, wants])


REVOKE_OPEN, REVOKE_REPLY, REVOKE_PUSH = 0, 1, 2
"""Revocation lists are compared by digest: an open (digest only) is answered by a reply (the
answerer's digest, and its whole list when the digests differ); whoever then still differs
pushes its whole list. A push is also how a new revocation is forwarded. Pushes are not answered."""


def revoke_frame(mesh: str, node: str, phase: int, digest: bytes, revocations: list[bytes]) -> bytes:
    """Revocations (each authority-signed, opaque here) and the digest of the sender's list."""
    return _pack(REVOKE, [mesh, node, phase, digest, revocations])


def policy_frame(mesh: str, node: str, version: int, document: bytes | None) -> bytes:
    """The sender's policy version (0: none), and with ``document`` the signed policy itself
    (a push). A version lower than one's own is answered with a push, a higher one with an
    offer of one's own (so the other pushes)."""
    return _pack(POLICY, [mesh, node, version, document])


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyOffer:
    mesh: str
    node: str
    version: int
    document: bytes | None


SchemaKey = tuple[str, int, float, bytes]
"""What identifies a schema document a node holds: (message type, version, signed at, digest)."""


def schemas_frame(mesh: str, node: str, keys: list[SchemaKey] | None, documents: list[bytes],
                  answer: bool = False) -> bytes:
    """Schema documents (each authority-signed, opaque here) and, in an offer, the keys of every
    document the sender holds. An offer (``keys``, not ``answer``) is answered with the
    documents the offerer lacks and the answerer's keys (``answer``); an answer is answered with
    documents only; documents without keys (a push) are not answered. So an exchange ends after
    three steps at most."""
    wire_keys = None if keys is None else [list(k) for k in keys]
    return _pack(SCHEMAS, [mesh, node, wire_keys, documents, answer])


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaExchange:
    mesh: str
    node: str
    keys: tuple[SchemaKey, ...] | None
    """None in a push; else every document the sender holds (an offer, or with ``answer`` the
    answer to one)."""
    documents: tuple[bytes, ...]
    answer: bool


def work_frame(mesh: str, node: str, done: int) -> bytes:
    """How many queue-group messages from the receiver this node has finished (cumulative):
    the receiver's measure of the work it has outstanding here, for load balancing."""
    return _pack(WORK, [mesh, node, done])


def data_frame(node: str, epoch: int, first_seq: int, entries: list[Any],
               packer: msgpack.Packer | None = None, floor: int = 0, resent: bool = False,
               lane: int = NORMAL_LANE) -> bytes:
    """A batch of envelopes for one stream; entry i has sequence ``first_seq + i``.

    An entry is the envelope bytes, or ``[envelope, [group, ...]]`` when the
    receiver was chosen to serve queue groups for that message. ``floor`` is the
    lowest number the sender still keeps: the receiver stops waiting for any below it.
    ``resent``: these messages were sent before (the receiver may have handed them to
    its application before it restarted). ``lane``: the stream's priority lane (a sender
    has one stream per lane to each destination, each in order on its own).
    """
    body = [node, epoch, first_seq, floor, entries, resent, lane]
    return _HEAD[DATA] + (packer.pack(body) if packer is not None else msgpack.packb(body, use_bin_type=True))


def receipt_frame(node: str, epoch: int, committed: int, received: int, lane: int = NORMAL_LANE) -> bytes:
    """The receiver's ack of stream ``(node's peer → node, lane, epoch)``: everything up to
    ``received`` arrived, everything up to ``committed`` is handled and durable."""
    return _HEAD[RECEIPT] + msgpack.packb([node, epoch, committed, received, lane])


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """A greeting: the sender's claim with its record, or a *card* (``cert`` set): the claim
    without the record, for an endpoint that has not proved a certificate yet."""

    mesh: str
    entry: Entry
    want_reply: bool
    cert: bytes | None = None
    endpoint: str = ""
    """A card's: where its sender is (naming the key its certificate certifies)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    mesh: str
    node: str
    endpoint: str
    seq: int
    target: str
    sent_at: float = 0.0
    """The sender's wall clock when it sent the ping (seconds since the epoch)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    mesh: str
    node: str
    seq: int
    nack: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class PingReq:
    mesh: str
    node: str
    endpoint: str
    seq: int
    target: str
    target_endpoint: str


@dataclasses.dataclass(frozen=True, slots=True)
class Bye:
    mesh: str
    node: str
    started: float
    incarnation: int


@dataclasses.dataclass(frozen=True, slots=True)
class Sync:
    mesh: str
    node: str
    endpoint: str
    phase: int
    digest_hash: bytes
    count: int
    entries: tuple[Entry, ...]
    wants: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    mesh: str
    node: str
    done: int


@dataclasses.dataclass(frozen=True, slots=True)
class Revocations:
    mesh: str
    node: str
    phase: int
    digest: bytes
    revocations: tuple[bytes, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Data:
    node: str
    epoch: int
    first_seq: int
    floor: int
    entries: list[Any]
    resent: bool = False
    lane: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    node: str
    epoch: int
    committed: int
    received: int
    lane: int = 1


Frame = (Hello | Ping | Ack | PingReq | Bye | Sync | Work | Data | Receipt | Revocations | PolicyOffer
         | SchemaExchange)


def _fields(body: Any, n: int, what: str) -> list[Any]:
    if len(body) != n or type(body[0]) is not str or type(body[1]) is not str or not 0 < len(body[1]) <= _MAX_NAME:
        raise ProtocolError(f"bad {what}")
    return body  # type: ignore[no-any-return]


def _seq(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise ProtocolError(f"bad sequence number in {what}")
    return value


class OtherVersion(ProtocolError):
    """A frame of another protocol version than this node's: a node of another meshmq
    release, which this one cannot talk to (told apart from a malformed frame)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"unknown protocol version {version} (this node speaks {PROTOCOL_VERSION})")
        self.version = version


def speaks(versions: str | None) -> bool | None:
    """Whether a peer that announces the protocol ``versions`` it speaks (comma-separated,
    the mDNS ``proto`` property) speaks ours; None when it does not say."""
    if not versions:
        return None
    return str(PROTOCOL_VERSION) in versions.split(",")


def decode_frame(frame: bytes | memoryview, limits: Limits) -> Frame:
    """Parse one frame's outer layer; envelopes inside DATA stay bytes."""
    if len(frame) < 3:
        raise ProtocolError("frame too short")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError("frame larger than max_frame_bytes")
    version, kind = frame[0], frame[1]
    if version != PROTOCOL_VERSION:
        raise OtherVersion(version)
    if kind == DATA:
        return Data(*decode_data(frame, limits))
    if kind == SEALED or kind == TAP:
        raise ProtocolError(f"a {KINDS[kind]} frame is opened with its sender's keys (meshmq._seal)")
    body = _unpack(memoryview(frame)[2:], limits)
    if type(body) is not list:
        raise ProtocolError(f"{KINDS.get(kind, kind)} body is not an array")
    if kind == PING:
        mesh, node, endpoint, seq, target, sent_at = _fields(body, 6, "ping")
        if not is_endpoint(endpoint) or type(target) is not str or type(sent_at) is not float:
            raise ProtocolError("bad ping")
        return Ping(mesh, node, endpoint, _seq(seq, "ping"), target, sent_at)
    if kind == ACK:
        mesh, node, seq, nack = _fields(body, 4, "ack")
        if type(nack) is not bool:
            raise ProtocolError("bad ack")
        return Ack(mesh, node, _seq(seq, "ack"), nack)
    if kind == PING_REQ:
        mesh, node, endpoint, seq, target, target_endpoint = _fields(body, 6, "ping-req")
        if not is_endpoint(endpoint) or type(target) is not str or not is_endpoint(target_endpoint):
            raise ProtocolError("bad ping-req")
        return PingReq(mesh, node, endpoint, _seq(seq, "ping-req"), target, target_endpoint)
    if kind == HELLO:
        if len(body) not in (3, 5) or type(body[0]) is not str or type(body[2]) is not bool:
            raise ProtocolError("bad hello")
        entry = Entry.from_wire(body[1], limits)
        if entry.status != ALIVE:
            raise ProtocolError("a hello must carry the sender's claim, alive")
        if len(body) == 3:
            if entry.record is None:
                raise ProtocolError("a hello must carry the sender's record")
            return Hello(body[0], entry, body[2])
        cert, endpoint = body[3], body[4]
        if entry.record is not None or body[2] is not True:
            raise ProtocolError("a card carries no record and asks for an answer")
        if type(cert) is not bytes or not 0 < len(cert) <= MAX_CERT_BYTES:
            raise ProtocolError("bad certificate in card")
        if not is_endpoint(endpoint) or split_endpoint(endpoint)[1] is None:
            raise ProtocolError("a card's endpoint must name its key")
        return Hello(body[0], entry, True, cert, endpoint)
    if kind == RECEIPT:
        if len(body) != 5 or type(body[0]) is not str or not 0 < len(body[0]) <= _MAX_NAME or "/" in body[0]:
            raise ProtocolError("bad receipt")
        node, epoch, committed, received, lane = body
        committed, received = _seq(committed, "receipt"), _seq(received, "receipt")
        if received < committed:
            raise ProtocolError("receipt: received below committed")
        return Receipt(node, _seq(epoch, "receipt"), committed, received, check_lane(lane, "receipt"))
    if kind == WORK:
        mesh, node, done = _fields(body, 3, "work report")
        return Work(mesh, node, _seq(done, "work report"))
    if kind == BYE:
        mesh, node, started, incarnation = _fields(body, 4, "bye")
        _check_started(started, "bye")
        _check_incarnation(incarnation, "bye")
        return Bye(mesh, node, float(started), incarnation)
    if kind == SYNC:
        mesh, node, endpoint, phase, digest_hash, count, entries, wants = _fields(body, 8, "sync")
        if (not is_endpoint(endpoint) or phase not in (SYNC_OPEN, SYNC_REPLY, SYNC_LAST) or type(phase) is not int
                or type(digest_hash) is not bytes or len(digest_hash) > 32
                or type(count) is not int or count < 0 or type(entries) is not list or type(wants) is not list):
            raise ProtocolError("bad sync")
        if len(entries) > MAX_SYNC_ENTRIES or len(wants) > MAX_SYNC_ENTRIES:
            raise ProtocolError("too many entries or wants in sync")
        for w in wants:
            _check_node_id(w, "wanted node id")
        return Sync(mesh, node, endpoint, phase, digest_hash, count,
                    tuple(Entry.from_wire(e, limits) for e in entries), tuple(wants))
    if kind == POLICY:
        mesh, node, version, document = _fields(body, 4, "policy")
        _check_node_id(node, "node id in policy frame")
        if (type(mesh) is not str or type(version) is not int or not 0 <= version < 2**53
                or (document is not None and (type(document) is not bytes or len(document) > MAX_POLICY_FRAME_BYTES))):
            raise ProtocolError("bad policy frame")
        return PolicyOffer(mesh, node, version, document)
    if kind == SCHEMAS:
        mesh, node, keys, documents, answer = _fields(body, 5, "schemas frame")
        _check_node_id(node, "node id in schemas frame")
        if (type(answer) is not bool or (keys is not None and type(keys) is not list)
                or (answer and keys is None) or type(documents) is not list):
            raise ProtocolError("bad schemas frame")
        if (keys is not None and len(keys) > MAX_SCHEMA_KEYS) or len(documents) > MAX_FRAME_SCHEMAS:
            raise ProtocolError("too many schema keys or documents in a schemas frame")
        for d in documents:
            if type(d) is not bytes or not 0 < len(d) <= MAX_SCHEMA_DOCUMENT_BYTES:
                raise ProtocolError("bad schema document in schemas frame")
        return SchemaExchange(mesh, node, None if keys is None else tuple(_schema_key(k) for k in keys),
                              tuple(documents), answer)
    if kind == REVOKE:
        mesh, node, phase, digest, revocations = _fields(body, 5, "revoke")
        if (type(phase) is not int or phase not in (REVOKE_OPEN, REVOKE_REPLY, REVOKE_PUSH)
                or type(digest) is not bytes or len(digest) != 8 or type(revocations) is not list
                or len(revocations) > MAX_FRAME_REVOCATIONS):
            raise ProtocolError("bad revoke frame")
        for r in revocations:
            if type(r) is not bytes or not 0 < len(r) <= MAX_REVOCATION_BYTES:
                raise ProtocolError("bad revocation in revoke frame")
        return Revocations(mesh, node, phase, digest, tuple(revocations))
    raise ProtocolError(f"unknown frame kind {kind}")


def _schema_key(key: Any) -> SchemaKey:
    if type(key) is not list or len(key) != 4:
        raise ProtocolError("a schema key is not a 4-field array")
    type_, version, at, digest = key
    if (type(type_) is not str or not 0 < len(type_) <= _MAX_NAME or type(version) is not int
            or not 0 < version < 2**31 or type(at) is not float or not 0.0 <= at < float("inf")
            or type(digest) is not bytes or len(digest) != 16):
        raise ProtocolError("bad schema key")
    return type_, version, at, digest


def decode_data(frame: bytes | memoryview, limits: Limits) -> tuple[str, int, int, int, list[Any], bool, int]:
    """(sender node, epoch, first sequence, floor, entries, resent, lane) of a DATA frame: the
    receive hot path, without the :class:`Data` object. The caller has checked bytes 0 and 1."""
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError("frame larger than max_frame_bytes")
    body = _unpack(memoryview(frame)[2:], limits)
    if type(body) is not list or len(body) != 7:
        raise ProtocolError("data frame is not a 7-field array")
    node, epoch, first_seq, floor, entries, resent, lane = body
    if (type(node) is not str or not 0 < len(node) <= _MAX_NAME or "/" in node or type(epoch) is not int
            or type(first_seq) is not int or type(floor) is not int or type(resent) is not bool
            or not 0 < epoch < 2**63 or not 0 < first_seq < 2**63 or not 0 <= floor < 2**63):
        raise ProtocolError("bad data frame header")
    if type(entries) is not list or len(entries) > limits.max_batch_messages:
        raise ProtocolError("bad or oversized batch")
    return node, epoch, first_seq, floor, entries, resent, check_lane(lane, "data frame")


def check_lane(lane: Any, what: str) -> int:
    """A stream's priority lane from the wire: 0 (high), 1 (normal) or 2 (low)."""
    if type(lane) is not int or not 0 <= lane < LANES:
        raise ProtocolError(f"bad lane in {what}")
    return lane  # type: ignore[no-any-return]


def split_entry(entry: Any) -> tuple[bytes, tuple[str, ...]]:
    """(envelope bytes, queue groups) of one DATA entry, or :class:`ProtocolError`."""
    if type(entry) is bytes:
        return entry, ()
    if type(entry) is list and len(entry) == 2 and type(entry[0]) is bytes and type(entry[1]) is list:
        groups = entry[1]
        for g in groups:
            if type(g) is not str:
                raise ProtocolError("bad queue group in data entry")
        return entry[0], tuple(groups)
    raise ProtocolError("bad data entry")
