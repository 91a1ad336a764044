"""W3C Trace Context (``traceparent``) across the mesh.

A message's ``traceparent`` header travels with it. While a handler works on a message
that carries one, what the handler publishes continues that trace: same trace id, a new
span id, the handler's message as the parent. With ``Config.tracing`` on, a publish
outside any trace starts a new one. (OpenTelemetry is not required, nor used yet: a
collector that reads ``traceparent`` headers, ``meshmq tap`` included, sees the chain.)
"""

from __future__ import annotations

import contextvars
import os
import re

HEADER = "traceparent"
_FORMAT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

current: contextvars.ContextVar[str | None] = contextvars.ContextVar("meshmq_traceparent", default=None)
"""The ``traceparent`` of the message a handler is working on, in this context (task or thread)."""


def valid(value: str) -> bool:
    """Whether ``value`` is a ``traceparent`` meshmq can continue (version 00, non-zero ids)."""
    m = _FORMAT.match(value)
    return m is not None and m.group(1) != "ff" and set(m.group(2)) != {"0"} and set(m.group(3)) != {"0"}


def child(parent: str) -> str:
    """The ``traceparent`` of a message published while handling one with ``parent``."""
    _, trace_id, _, flags = parent.split("-")
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"


def new() -> str:
    """A ``traceparent`` starting a new trace (sampled)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def for_publish(headers: dict[str, str] | None, start: bool) -> dict[str, str] | None:
    """``headers`` with the ``traceparent`` a publish should carry: the caller's own if
    set, else the continuation of the message being handled, else (``start``) a new trace."""
    if headers is not None and HEADER in headers:
        return headers
    parent = current.get()
    if parent is not None:
        value = child(parent)
    elif start:
        value = new()
    else:
        return headers
    return {**(headers or {}), HEADER: value}


def handling(headers: dict[str, str]) -> contextvars.Token[str | None] | None:
    """Mark the start of handling a message with ``headers``; pass the token to :func:`done`."""
    value = headers.get(HEADER) if headers else None
    if value is None or not valid(value):
        return None if current.get() is None else current.set(None)
    return current.set(value)


def done(token: contextvars.Token[str | None] | None) -> None:
    if token is not None:
        current.reset(token)
