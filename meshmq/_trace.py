"""W3C Trace Context (``traceparent``) across the mesh.

A message's ``traceparent`` header travels with it. While a handler works on a message
that carries one, what the handler publishes continues that trace: same trace id, a new
span id, the handler's message as the parent. With ``Config.tracing`` on, a publish
outside any trace starts a new one.

With ``Config.tracing`` on and OpenTelemetry installed (optional, never required), the
agent also emits spans: ``publish <topic>`` (PRODUCER) for each publish, whose context is
the ``traceparent`` the message carries, and ``handle <topic>`` (CONSUMER) around each
handler call, child of the message's ``traceparent`` and current while the handler runs,
so the application's own spans nest in it. Without OpenTelemetry the same chain is in
the headers, for any collector that reads them (``meshmq tap --json`` shows them).
"""

from __future__ import annotations

import contextvars
import os
import re
from typing import Any

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


def for_publish(headers: dict[str, str] | None, start: bool, topic: str = "") -> dict[str, str] | None:
    """``headers`` with the ``traceparent`` a publish should carry: the caller's own if
    set, else the continuation of the message being handled, else (``start``) a new trace.
    With ``start`` (``Config.tracing``) and OpenTelemetry, that context is a publish span's."""
    if headers is not None and HEADER in headers:
        return headers
    otel = _otel() if start else None
    value = otel.publish_span(topic, current.get()) if otel is not None else None
    if value is None:  # no OpenTelemetry, or none configured (its no-op tracer): the header alone
        parent = current.get()
        if parent is not None:
            value = child(parent)
        elif start:
            value = new()
        else:
            return headers
    return {**(headers or {}), HEADER: value}


class Handling:
    """What :func:`handling` started: the context variable's token, and a span if any."""

    __slots__ = ("token", "span")

    def __init__(self, token: contextvars.Token[str | None] | None, span: Any) -> None:
        self.token = token
        self.span = span


def handling(headers: dict[str, str], topic: str = "", spans: bool = False) -> Handling | None:
    """Mark the start of handling a message with ``headers``; pass the result to :func:`done`.
    With ``spans`` (``Config.tracing``) and OpenTelemetry, a ``handle`` span starts too."""
    value = headers.get(HEADER) if headers else None
    if value is None or not valid(value):
        value = None
    otel = _otel() if spans else None
    span = otel.handle_span(topic, value) if otel is not None else None
    if span is not None:
        value = otel.traceparent_of(span.span) or value  # type: ignore[union-attr]  # its child publishes
    if value is None and current.get() is None and span is None:
        return None
    return Handling(current.set(value), span)


def done(handled: Handling | None, error: BaseException | None = None) -> None:
    if handled is None:
        return
    if handled.span is not None:
        handled.span.end(error)
    if handled.token is not None:
        current.reset(handled.token)


# --- OpenTelemetry, when it is installed -----------------------------------------------------

_OTEL: Any = None
_OTEL_CHECKED = False


def _otel() -> _OpenTelemetry | None:
    global _OTEL, _OTEL_CHECKED
    if not _OTEL_CHECKED:
        _OTEL_CHECKED = True
        import importlib.util

        try:
            found = importlib.util.find_spec("opentelemetry.trace") is not None
        except ModuleNotFoundError:  # no "opentelemetry" package at all
            found = False
        _OTEL = _OpenTelemetry() if found else None
    return _OTEL  # type: ignore[no-any-return]


class _Span:
    """A started span, made current in this context until it ends."""

    __slots__ = ("span", "token", "_otel")

    def __init__(self, otel: _OpenTelemetry, span: Any, token: Any) -> None:
        self._otel = otel
        self.span = span
        self.token = token

    def end(self, error: BaseException | None) -> None:
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(self._otel.status(error))
        self.span.end()
        self._otel.context.detach(self.token)


class _OpenTelemetry:
    """The bits of the OpenTelemetry API meshmq uses (imported only when installed)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.context = context
        self.propagator = TraceContextTextMapPropagator()

    def _parent(self, traceparent: str | None) -> Any:
        return self.propagator.extract({HEADER: traceparent}) if traceparent else None

    def traceparent_of(self, span: Any) -> str | None:
        """The span's context as a ``traceparent``; None for a span that records nothing (no
        tracer provider configured: OpenTelemetry's default)."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self.trace.set_span_in_context(span))
        return carrier.get(HEADER)

    def publish_span(self, topic: str, parent: str | None) -> str | None:
        tracer = self.trace.get_tracer("meshmq")
        span = tracer.start_span(f"publish {topic}", context=self._parent(parent),
                                 kind=self.trace.SpanKind.PRODUCER,
                                 attributes={"messaging.system": "meshmq", "messaging.destination.name": topic,
                                             "messaging.operation.type": "publish"})
        try:
            return self.traceparent_of(span)
        finally:
            span.end()

    def handle_span(self, topic: str, parent: str | None) -> _Span:
        tracer = self.trace.get_tracer("meshmq")
        span = tracer.start_span(f"handle {topic}", context=self._parent(parent),
                                 kind=self.trace.SpanKind.CONSUMER,
                                 attributes={"messaging.system": "meshmq", "messaging.destination.name": topic,
                                             "messaging.operation.type": "process"})
        token = self.context.attach(self.trace.set_span_in_context(span))
        return _Span(self, span, token)

    def status(self, error: BaseException) -> Any:
        return self.trace.Status(self.trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
