"""The message a subscriber receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from ._errors import PayloadError, UsageError

FORMAT_BYTES = 0
"""The payload is the application's bytes, passed through untouched."""
FORMAT_MSGPACK = 1
"""The payload is a msgpack-encoded value (dict, list, str, number, bool, None)."""

_UNSET: Any = object()


class Message:
    """One received (or locally delivered) message.

    Header fields map 1:1 onto the concept documents' message header:
    ``id`` (messageId), ``timestamp``, ``type`` (eventType), ``source``
    (sourceService), ``schema_version``; plus ``topic``, the sending ``node``,
    free ``headers`` and the partition ``key``. ``raw`` is the payload as it
    travelled; ``data`` is it decoded (bytes stay bytes), decoded on first use.
    """

    __slots__ = (
        "_id", "timestamp", "topic", "type", "source", "node", "schema_version",
        "headers", "key", "raw", "_format", "_data", "seq", "_replier", "replied", "_work",
        "attempts", "_verdict", "_in_handler", "expires_at", "_rx", "_open", "redelivered",
    )

    def __init__(
        self, id_: bytes, timestamp: float, topic: str, type_: str | None, source: str, node: str,
        schema_version: int, headers: dict[str, str] | None, key: str | None, format_: int, raw: bytes,
        seq: int = 0,
    ) -> None:
        self._id = id_
        self.timestamp = timestamp
        self.topic = topic
        self.type = type_
        self.source = source
        self.node = node
        self.schema_version = schema_version
        self.headers: dict[str, str] = headers if headers is not None else {}
        self.key = key
        self._format = format_
        self.raw = raw
        self._data = _UNSET
        self.seq = seq
        self._replier: Callable[..., None] | None = None  # set by the agent on a request
        self.replied = False
        self._work: str | None = None  # queue-group work: the node to tell when it is finished
        self._rx: Any = None  # (sender, epoch, seq) of its stream: the inbox learns when it is finished
        self._open = 0  # subscriptions still working on it
        self.redelivered = False
        """The sender sent this message before: this node may have handed it to the application
        already, before a crash let it finish without committing that (or an ack got lost).
        Only such messages can be duplicates; an idempotent consumer need check only them."""
        self.attempts = 0
        """How many times this message was handed to a handler here (1 on the first call)."""
        self._verdict: float | None = None  # set by nack(): retry after this many seconds (-1: the backoff)
        self._in_handler = False
        self.expires_at: float | None = None
        """When the message stops being deliverable (seconds since the epoch; None: never)."""

    @property
    def is_request(self) -> bool:
        """Whether the sender waits for an answer (``agent.request``): answer with :meth:`reply`."""
        return self._replier is not None

    def reply(self, data: Any, *, type: str | None = None, headers: dict[str, str] | None = None) -> None:
        """Answer a request; the reply goes only to the requesting node.

        Works from plain and coroutine handlers alike (it does not wait). Only the
        first answer to a request counts; raises :class:`UsageError` if this message
        is not a request.
        """
        if self._replier is None:
            raise UsageError(f"message {self.id} on {self.topic!r} is not a request; nothing waits for a reply")
        self._replier(self, data, type, headers, None)
        self.replied = True

    def ack(self) -> None:
        """The handler is done with this message. Returning from the handler says the same;
        an explicit ack undoes an earlier :meth:`nack` of this call."""
        self._check_in_handler("ack")
        self._verdict = None

    def nack(self, delay: float | None = None) -> None:
        """Hand this message to the handler again after ``delay`` seconds (default: the
        retry backoff), once the handler returns. Later messages of its sender and topic (its
        key, in a queue group) wait behind it, so their order holds; other messages go on.
        After ``max_attempts`` the message is dead-lettered instead."""
        self._check_in_handler("nack")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))
                                  or not 0 <= delay <= 86_400):
            raise UsageError(f"nack delay must be 0 to 86400 seconds, got {delay!r}")
        self._verdict = -1.0 if delay is None else float(delay)

    def _check_in_handler(self, what: str) -> None:
        if not self._in_handler:
            raise UsageError(f"{what}() is for a subscription's handler, while it handles this message; "
                             "a consumer iterating a subscription decides itself what to do next")

    @property
    def id(self) -> str:
        """The message id: 32 hex digits, unique across the mesh."""
        return self._id.hex()

    @property
    def data(self) -> Any:
        """The decoded payload: the published value, or the published bytes as they were."""
        if self._data is _UNSET:
            if self._format == FORMAT_BYTES:
                self._data = self.raw
            else:
                try:
                    self._data = msgpack.unpackb(self.raw, raw=False, strict_map_key=False)
                except Exception as exc:  # a sender bug: the envelope checked out but the payload does not
                    raise PayloadError(f"payload of message {self.id} does not decode: {exc}") from None
        return self._data

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, topic={self.topic!r}, type={self.type!r}, "
            f"source={self.source!r}, size={len(self.raw)})"
        )
