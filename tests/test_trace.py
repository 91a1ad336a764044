"""W3C traceparent: carried with a message and continued by what its handler publishes."""

from __future__ import annotations

import asyncio

from aio import eventually, run

import meshmq
from meshmq import _trace

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_traceparent_rules() -> None:
    assert _trace.valid(PARENT)
    assert not _trace.valid("00-" + "0" * 32 + "-00f067aa0ba902b7-01")  # an all-zero trace id
    assert not _trace.valid("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert not _trace.valid("not a traceparent")
    child = _trace.child(PARENT)
    assert _trace.valid(child) and child.split("-")[1] == PARENT.split("-")[1] and child != PARENT
    assert _trace.valid(_trace.new())
    assert _trace.for_publish({"traceparent": "own"}, True) == {"traceparent": "own"}  # the caller's wins
    assert _trace.for_publish(None, False) is None


def test_handlers_continue_the_trace_of_the_message_they_handle(mesh: str) -> None:
    """A plain handler, a coroutine handler and a blocking Agent's handler each publish on:
    the message they publish carries the same trace id, with a new span id."""

    async def main() -> None:
        sink = await meshmq.AsyncAgent("sink", mesh=mesh, durability="memory").start()
        seen: dict[str, str] = {}
        sink.subscribe("out.*", lambda m: seen.__setitem__(m.topic, m.headers.get("traceparent", "")))
        relay = await meshmq.AsyncAgent("relay", mesh=mesh, durability="memory").start()

        def plain(msg: meshmq.Message) -> None:
            relay.publish_nowait("out.plain", b"")

        async def coroutine(msg: meshmq.Message) -> None:
            await asyncio.sleep(0)
            await relay.publish("out.coroutine", b"")

        relay.subscribe("in.plain", plain)
        relay.subscribe("in.coroutine", coroutine)
        source = await meshmq.AsyncAgent("source", mesh=mesh, durability="memory").start()
        try:
            await source.wait_for_subscribers("in.plain", timeout=10)
            await source.wait_for_subscribers("in.coroutine", timeout=10)
            await relay.wait_for_subscribers("out.x", timeout=10)
            await source.publish("in.plain", b"", headers={"traceparent": PARENT})
            await source.publish("in.coroutine", b"", headers={"traceparent": PARENT})
            await eventually(lambda: len(seen) == 2, what="both published on")
            for value in seen.values():
                assert _trace.valid(value) and value.split("-")[1] == PARENT.split("-")[1] and value != PARENT
            await source.publish("in.plain", b"")  # no trace to carry: none made up
            await eventually(lambda: seen["out.plain"] == "", what="the untraced one")
        finally:
            for agent in (source, relay, sink):
                await agent.stop()

    run(main(), timeout=60)


def test_a_blocking_agents_handler_thread_continues_the_trace(mesh: str) -> None:
    from aio import wait_until

    with meshmq.Agent("sink", mesh=mesh, durability="memory") as sink, \
            meshmq.Agent("relay", mesh=mesh, durability="memory") as relay, \
            meshmq.Agent("source", mesh=mesh, durability="memory", tracing=True) as source:
        got: list[str] = []
        incoming: list[str] = []
        sink.subscribe("out.x", lambda m: got.append(m.headers["traceparent"]))

        def relay_on(msg: meshmq.Message) -> None:  # runs on the subscription's own thread
            incoming.append(msg.headers["traceparent"])
            relay.publish("out.x", b"")

        relay.subscribe("in.x", relay_on)
        source.wait_for_subscribers("in.x", timeout=10)
        relay.wait_for_subscribers("out.x", timeout=10)
        source.publish("in.x", b"")  # tracing=True: a new trace starts here
        wait_until(lambda: len(got) == 1, what="the relayed message")
        assert _trace.valid(incoming[0]) and _trace.valid(got[0]) and got[0] != incoming[0]
        assert got[0].split("-")[1] == incoming[0].split("-")[1]  # one trace


def test_with_opentelemetry_publish_and_handle_emit_spans_of_one_trace(mesh: str) -> None:
    """Config.tracing with OpenTelemetry installed (the dev extra installs it; meshmq never
    requires it): a publish span per message, a handle span around the handler, current
    while it runs, and what the handler publishes is a child of that."""
    import pytest

    trace = pytest.importorskip("opentelemetry.trace", reason="OpenTelemetry is optional")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    original = trace.get_tracer

    def from_provider(name: str, *args: object, **kwargs: object) -> object:
        return provider.get_tracer(name)

    trace.get_tracer = from_provider  # the test's own provider, without touching the global one
    try:
        async def main() -> None:
            sink = await meshmq.AsyncAgent("sink", mesh=mesh, durability="memory", tracing=True).start()
            got: list[str] = []
            sink.subscribe("out.x", lambda m: got.append(m.headers["traceparent"]))
            relay = await meshmq.AsyncAgent("relay", mesh=mesh, durability="memory", tracing=True).start()
            inner: list[object] = []

            async def on_in(msg: meshmq.Message) -> None:
                with tracer.start_as_current_span("app work") as span:  # nests in the handle span
                    inner.append(span)
                await relay.publish("out.x", b"")

            def failing(msg: meshmq.Message) -> None:
                raise ValueError("boom")

            relay.subscribe("in.x", on_in)
            relay.subscribe("bad.x", failing)
            source = await meshmq.AsyncAgent("source", mesh=mesh, durability="memory", tracing=True,
                                             max_attempts=1).start()
            try:
                for topic in ("in.x", "bad.x"):
                    await source.wait_for_subscribers(topic, timeout=10)
                await relay.wait_for_subscribers("out.x", timeout=10)
                await source.publish("in.x", b"")
                await source.publish("bad.x", b"")
                await eventually(lambda: len(got) == 1 and len(relay.dead_letters()) == 1, what="both handled")
            finally:
                for agent in (source, relay, sink):
                    await agent.stop()

        run(main(), timeout=60)
    finally:
        trace.get_tracer = original
    spans = {s.name: s for s in exporter.get_finished_spans()}
    first, handle, work, second, out = (spans["publish in.x"], spans["handle in.x"], spans["app work"],
                                        spans["publish out.x"], spans["handle out.x"])
    assert len({s.context.trace_id for s in (first, handle, work, second, out)}) == 1  # one trace
    assert handle.parent.span_id == first.context.span_id and work.parent.span_id == handle.context.span_id
    assert second.parent.span_id == handle.context.span_id and out.parent.span_id == second.context.span_id
    assert first.kind == trace.SpanKind.PRODUCER and handle.kind == trace.SpanKind.CONSUMER
    assert spans["handle bad.x"].status.status_code == trace.StatusCode.ERROR
