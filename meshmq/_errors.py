"""The exceptions meshmq raises.

All derive from :class:`MeshError`. They are split by whose fault a failure is:
the caller's misuse (:class:`UsageError` and its children), a bad frame from a
peer (:class:`ProtocolError`, which the agent counts and drops rather than
raises), the agent's own lifecycle (:class:`AgentClosed`), and the mesh's
present state (:class:`Backpressure`, :class:`NoResponders`, timeouts).
Exceptions of zmq, msgpack, zeroconf, lmdb and nacl never leave the public API;
they are translated at the boundary and chained as ``__cause__``.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error meshmq raises."""


# --- the caller's misuse -----------------------------------------------------------


class UsageError(MeshError, ValueError):
    """A public call was given an argument it cannot accept."""


class ConfigError(UsageError):
    """A configuration value (keyword, ``Config`` field or ``MESHMQ_*`` variable) is invalid."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid config {field}: {problem}")
        self.field = field
        self.problem = problem


class TopicError(UsageError):
    """A topic or subscription pattern is malformed."""

    def __init__(self, topic: str, problem: str) -> None:
        super().__init__(f"invalid topic {topic!r}: {problem}")
        self.topic = topic
        self.problem = problem


class PayloadError(UsageError):
    """A payload, header or other message field cannot be sent (type or size)."""


# --- lifecycle ---------------------------------------------------------------------


class AgentClosed(MeshError):
    """The agent is not running: not started yet, or already stopped."""


# --- a peer's fault (counted and dropped; raised only by the codecs) ---------------


class ProtocolError(MeshError):
    """A frame or envelope from the network is malformed, oversized or of an unknown version."""


class NotPermitted(UsageError):
    """This agent's certificate does not allow what was asked (publishing on a topic,
    subscribing to a pattern); the message names the right that is missing."""


class CertificateError(MeshError):
    """A certificate (or a record's signature) is not valid: forged, expired, of another
    authority, or malformed. The message says which."""


# --- the mesh's present state ------------------------------------------------------


class Backpressure(MeshError):
    """The agent could not accept more work within the allowed time."""


class OutboxFull(Backpressure):
    """The outbox stayed at its limit (``max_outbox_messages`` / ``max_outbox_bytes``) for the
    whole publish timeout: receivers do not acknowledge as fast as messages are published."""

    def __init__(self, messages: int, size: int, timeout: float, detail: str = "") -> None:
        super().__init__(
            detail or f"the outbox is full ({messages} messages, {size} bytes waiting for acknowledgment) "
            f"and did not drain within {timeout:g}s; receivers are slow or down"
        )
        self.messages = messages
        self.bytes = size
        self.timeout = timeout


class SubscriptionFull(Backpressure):
    """A message this agent publishes to one of its own subscriptions found it holding
    ``subscription_queue_messages`` waiting for its handler or iterator, and it did not drain
    within the publish timeout. Such messages are handed over in-process, with no outbox
    between, so the subscription's limit holds the publisher back directly."""

    def __init__(self, pattern: str, queued: int, timeout: float) -> None:
        super().__init__(f"subscription {pattern!r} of this agent has {queued} messages waiting for its handler "
                         f"(subscription_queue_messages) and did not drain within {timeout:g}s; it is handled more "
                         f"slowly than this agent publishes to it")
        self.pattern = pattern
        self.queued = queued
        self.timeout = timeout


class RateLimited(Backpressure):
    """A policy rule's rate limit refused a publish (``on_excess = "reject"``, or ``"delay"``
    where waiting is not possible: ``publish_nowait``)."""

    def __init__(self, topic: str, rule: str, retry_after: float) -> None:
        super().__init__(f"publishing on {topic!r} is over the rate of policy rule {rule!r}; "
                         f"a token is due in {retry_after:.3f}s")
        self.topic = topic
        self.rule = rule
        self.retry_after = retry_after


class PeerQueueFull(OutboxFull):
    """The outbox holds as much as it may for one destination (``peer_queue_messages`` /
    ``peer_queue_bytes``) and it did not acknowledge any within the publish timeout."""

    def __init__(self, node: str, service: str, queued: int, timeout: float, size: int = 0) -> None:
        super().__init__(queued, size, timeout,
                         f"the outbox to {service} ({node}) is full ({queued} messages waiting for its "
                         f"acknowledgment) and did not drain within {timeout:g}s; the receiver is slow or gone")
        self.node = node
        self.service = service
        self.queued = queued


# --- local storage ---------------------------------------------------------------


class StoreError(MeshError):
    """The agent's durable store cannot be used: in use by another agent, full, or unreadable."""


class CorruptStore(StoreError):
    """The durable store failed its integrity check when opened.

    ``damaged`` names the affected records (database and key), at most a few
    dozen of them; ``count`` is how many there are. Nothing was skipped: the
    agent refuses to start unless told to quarantine the damaged records.
    """

    def __init__(self, path: str, problem: str, damaged: list[str] | None = None, count: int = 0) -> None:
        self.path = path
        self.damaged = damaged or []
        self.count = count or len(self.damaged)
        shown = f": {', '.join(self.damaged[:20])}" + (" ..." if self.count > 20 else "") if self.damaged else ""
        super().__init__(f"store {path} is damaged ({problem}){shown}; start with quarantine_store=True to move "
                         "the damaged records aside and go on, or restore the directory from a backup")


class NoResponders(MeshError):
    """A request was made on a topic that no node in the mesh serves."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"no responders for {topic!r}")
        self.topic = topic


class RemoteError(MeshError):
    """A responder's handler raised while answering a request; this is its error, carried back."""

    def __init__(self, topic: str, service: str, node: str, error: str) -> None:
        super().__init__(f"request on {topic!r} failed in {service} ({node}): {error}")
        self.topic = topic
        self.service = service
        self.node = node
        self.error = error


class MeshTimeout(MeshError, TimeoutError):
    """An operation did not complete within its timeout."""


class RequestTimeout(MeshTimeout):
    """A request got no reply within its timeout."""

    def __init__(self, topic: str, timeout: float) -> None:
        super().__init__(f"no reply to the request on {topic!r} within {timeout:g}s")
        self.topic = topic
        self.timeout = timeout


class SchemaError(MeshError, ValueError):
    """A message does not satisfy the schema declared for its type (or a schema is not one
    meshmq can check): ``field`` is where, ``rule`` the keyword it breaks."""

    def __init__(self, field: str, rule: str, problem: str) -> None:
        super().__init__(f"{field}: {problem} (schema rule {rule!r})")
        self.field = field
        self.rule = rule
        self.problem = problem


__all__ = [
    "AgentClosed",
    "Backpressure",
    "CertificateError",
    "ConfigError",
    "CorruptStore",
    "MeshError",
    "MeshTimeout",
    "NoResponders",
    "NotPermitted",
    "OutboxFull",
    "PayloadError",
    "PeerQueueFull",
    "ProtocolError",
    "RateLimited",
    "RemoteError",
    "RequestTimeout",
    "SchemaError",
    "StoreError",
    "SubscriptionFull",
    "TopicError",
    "UsageError",
]
