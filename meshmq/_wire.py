"""Wire format: the message envelope and the frames agents exchange.

Pure functions, no I/O. Every frame is one ZeroMQ message::

    byte 0   protocol version (PROTOCOL_VERSION)
    byte 1   frame kind (HELLO, PING, BYE, DATA)
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

PROTOCOL_VERSION = 1
ENVELOPE_VERSION = 1

HELLO = 1
PING = 2
BYE = 3
DATA = 4
GOSSIP = 5
KINDS = {HELLO: "hello", PING: "ping", BYE: "bye", DATA: "data", GOSSIP: "gossip"}
MAX_GOSSIP_ENTRIES = 256
"""Most (node, endpoint, version) entries one gossip frame may carry."""

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
    r"^tcp://(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r":(?P<port>\d{1,5}|\*)$"
    r"|^(?:ipc|inproc)://[A-Za-z0-9._/@-]{1,200}$"
)


def is_endpoint(endpoint: object, *, wildcard_port: bool = False) -> bool:
    """Whether ``endpoint`` is a ZeroMQ endpoint we will connect to: tcp://host:port (an
    IPv4 address, [IPv6] or a host name), ipc:// or inproc://. Endpoints come from peers and
    mDNS, so anything else is refused before it reaches a socket."""
    if type(endpoint) is not str or len(endpoint) > 255:
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


# --- node records (the routing table's unit; gossiped in the next layer) -------------


@dataclasses.dataclass(frozen=True, slots=True)
class Subscription:
    """What a node advertises: a pattern, and the queue group it competes in (or None)."""

    pattern: str
    group: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node's entry in the routing table. ``version`` grows with every change."""

    node: str
    service: str
    endpoints: tuple[str, ...]
    subscriptions: tuple[Subscription, ...]
    version: int
    started: float

    def to_wire(self) -> list[Any]:
        return [
            self.node, self.service, list(self.endpoints),
            [[s.pattern, s.group] for s in self.subscriptions], self.version, self.started,
        ]

    @classmethod
    def from_wire(cls, obj: Any, limits: Limits) -> NodeRecord:
        if type(obj) is not list or len(obj) != 6:
            raise ProtocolError("node record is not a 6-field array")
        node, service, endpoints, subs, version, started = obj
        if type(node) is not str or not 0 < len(node) <= _MAX_NAME:
            raise ProtocolError("bad node id in record")
        if type(service) is not str or not 0 < len(service) <= _MAX_NAME:
            raise ProtocolError("bad service in record")
        if type(endpoints) is not list or not 0 < len(endpoints) <= 16:
            raise ProtocolError("bad endpoints in record")
        for ep in endpoints:
            if not is_endpoint(ep):
                raise ProtocolError(f"bad endpoint in record: {str(ep)[:80]!r}")
        if type(subs) is not list or len(subs) > limits.max_subscriptions:
            raise ProtocolError("bad or too many subscriptions in record")
        parsed = []
        for s in subs:
            if type(s) is not list or len(s) != 2:
                raise ProtocolError("bad subscription in record")
            pattern, group = s
            if type(pattern) is not str or not pattern or len(pattern) > limits.max_topic_length:
                raise ProtocolError("bad subscription pattern in record")
            if group is not None and (type(group) is not str or not group or len(group) > _MAX_NAME):
                raise ProtocolError("bad queue group in record")
            parsed.append(Subscription(pattern, group))
        if type(version) is not int or version < 0:
            raise ProtocolError("bad record version")
        if type(started) is not float and type(started) is not int:
            raise ProtocolError("bad start time in record")
        return cls(node, service, tuple(endpoints), tuple(parsed), version, float(started))


# --- frames --------------------------------------------------------------------------

_HEAD = {kind: bytes((PROTOCOL_VERSION, kind)) for kind in KINDS}


def hello_frame(mesh: str, record: NodeRecord, want_reply: bool) -> bytes:
    return _HEAD[HELLO] + msgpack.packb([mesh, record.to_wire(), want_reply], use_bin_type=True)


def ping_frame(mesh: str, node: str, version: int, endpoint: str, sent_at: float = 0.0) -> bytes:
    """Liveness: the sender's record version and endpoint, and its wall clock (for skew checks)."""
    return _HEAD[PING] + msgpack.packb([mesh, node, version, endpoint, sent_at], use_bin_type=True)


def bye_frame(mesh: str, node: str) -> bytes:
    return _HEAD[BYE] + msgpack.packb([mesh, node], use_bin_type=True)


def gossip_frame(mesh: str, node: str, entries: list[tuple[str, str, int]]) -> bytes:
    return _HEAD[GOSSIP] + msgpack.packb([mesh, node, [list(e) for e in entries]], use_bin_type=True)


def data_frame(node: str, epoch: int, first_seq: int, entries: list[Any],
               packer: msgpack.Packer | None = None) -> bytes:
    """A batch of envelopes for one stream; entry i has sequence ``first_seq + i``.

    An entry is the envelope bytes, or ``[envelope, [group, ...]]`` when the
    receiver was chosen to serve queue groups for that message.
    """
    body = [node, epoch, first_seq, entries]
    return _HEAD[DATA] + (packer.pack(body) if packer is not None else msgpack.packb(body, use_bin_type=True))


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    mesh: str
    record: NodeRecord
    want_reply: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    mesh: str
    node: str
    version: int
    endpoint: str
    sent_at: float = 0.0
    """The sender's wall clock when it sent the ping (seconds since the epoch)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Bye:
    mesh: str
    node: str


@dataclasses.dataclass(frozen=True, slots=True)
class Gossip:
    """Membership hints: nodes the sender knows, where they are, and their record versions."""

    mesh: str
    node: str
    entries: tuple[tuple[str, str, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Data:
    node: str
    epoch: int
    first_seq: int
    entries: list[Any]


Frame = Hello | Ping | Bye | Data | Gossip


def decode_frame(frame: bytes | memoryview, limits: Limits) -> Frame:
    """Parse one frame's outer layer; envelopes inside DATA stay bytes."""
    if len(frame) < 3:
        raise ProtocolError("frame too short")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError("frame larger than max_frame_bytes")
    version, kind = frame[0], frame[1]
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown protocol version {version}")
    if kind == DATA:
        return Data(*decode_data(frame, limits))
    body = _unpack(memoryview(frame)[2:], limits)
    if type(body) is not list:
        raise ProtocolError(f"{KINDS.get(kind, kind)} body is not an array")
    if kind == PING:
        if (len(body) != 5 or type(body[0]) is not str or type(body[1]) is not str
                or type(body[2]) is not int or not is_endpoint(body[3]) or type(body[4]) is not float):
            raise ProtocolError("bad ping")
        return Ping(body[0], body[1], body[2], body[3], body[4])
    if kind == HELLO:
        if len(body) != 3 or type(body[0]) is not str or type(body[2]) is not bool:
            raise ProtocolError("bad hello")
        return Hello(body[0], NodeRecord.from_wire(body[1], limits), body[2])
    if kind == BYE:
        if len(body) != 2 or type(body[0]) is not str or type(body[1]) is not str:
            raise ProtocolError("bad bye")
        return Bye(body[0], body[1])
    if kind == GOSSIP:
        if len(body) != 3 or type(body[0]) is not str or type(body[1]) is not str or type(body[2]) is not list:
            raise ProtocolError("bad gossip")
        if len(body[2]) > MAX_GOSSIP_ENTRIES:
            raise ProtocolError("too many gossip entries")
        entries = []
        for e in body[2]:
            if (type(e) is not list or len(e) != 3 or type(e[0]) is not str or not 0 < len(e[0]) <= _MAX_NAME
                    or not is_endpoint(e[1]) or type(e[2]) is not int or e[2] < 0):
                raise ProtocolError("bad gossip entry")
            entries.append((e[0], e[1], e[2]))
        return Gossip(body[0], body[1], tuple(entries))
    raise ProtocolError(f"unknown frame kind {kind}")


def decode_data(frame: bytes | memoryview, limits: Limits) -> tuple[str, int, int, list[Any]]:
    """(sender node, epoch, first sequence, entries) of a DATA frame: the receive hot path,
    without the :class:`Data` object. The caller has checked bytes 0 and 1."""
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError("frame larger than max_frame_bytes")
    body = _unpack(memoryview(frame)[2:], limits)
    if type(body) is not list or len(body) != 4:
        raise ProtocolError("data frame is not a 4-field array")
    node, epoch, first_seq, entries = body
    if type(node) is not str or type(epoch) is not int or type(first_seq) is not int:
        raise ProtocolError("bad data frame header")
    if type(entries) is not list or len(entries) > limits.max_batch_messages:
        raise ProtocolError("bad or oversized batch")
    return node, epoch, first_seq, entries


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
