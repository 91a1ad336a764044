"""Prometheus metrics of one agent: a text endpoint (``Config.metrics_port``) and the
delivery-latency histogram behind it.

The exposition is built from ``agent.stats()`` when scraped, so it costs nothing between
scrapes; the only per-message work is one histogram observation per delivered message,
done only while the endpoint is on.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("meshmq.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the delivery-latency histogram: publish time to hand-over."""

COUNTERS = {
    # metric name: (help, stats keys summed)
    "meshmq_published_total": ("Messages published by this agent.", ("published",)),
    "meshmq_delivered_total": ("Messages received and handed to subscriptions.", ("received",)),
    "meshmq_acked_total": ("Messages acknowledged by their destinations.", ("messages_acked",)),
    "meshmq_retried_total": ("Messages sent again (no acknowledgment in time).", ("messages_resent",)),
    "meshmq_handler_retries_total": ("Handler attempts repeated after a failure or nack.", ("handler_retries",)),
    "meshmq_dead_lettered_total": ("Messages dead-lettered.", ("dead_lettered",)),
    "meshmq_expired_total": ("Messages whose time to live ran out in the outbox.", ("expired_in_outbox",)),
    "meshmq_dropped_by_policy_total": ("Messages dropped by a policy rule.", ("dropped_by_policy",)),
}
REJECTED_PREFIXES = ("rejected_", "frames_forged", "frames_unauthenticated", "frames_rejected", "frames_revoked",
                     "frames_other_version")


class LatencyHistogram:
    """Cumulative Prometheus histogram of delivery latency (seconds)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        if seconds < 0:
            seconds = 0.0  # clocks of two hosts disagree: count it, in the first bucket
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def percentile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (0..1); None if empty.
        Above the last bound: that bound (the histogram cannot say more)."""
        if not self.count:
            return None
        rank = q * self.count
        running = 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            if running >= rank:
                return bound
        return self.buckets[-1]

    def lines(self, name: str, labels: str) -> list[str]:
        """The exposition lines; ``labels`` are the common ones (``k="v",...``)."""
        out = [f"# HELP {name} Seconds from publish to hand-over to a subscription (publisher's clock).",
               f"# TYPE {name} histogram"]
        running = 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(stats: dict[str, int], gauges: dict[str, tuple[str, dict[str, float]]],
               histogram: LatencyHistogram, labels: dict[str, str]) -> str:
    """The Prometheus text format (version 0.0.4) of an agent's figures."""
    common = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
    lines: list[str] = []
    for name, (help_text, keys) in COUNTERS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter",
                  f"{name}{{{common}}} {sum(stats.get(k, 0) for k in keys)}"]
    lines += ["# HELP meshmq_rejected_total Frames and messages refused, by reason.",
              "# TYPE meshmq_rejected_total counter"]
    for key in sorted(k for k in stats if k.startswith(REJECTED_PREFIXES)):
        lines.append(f'meshmq_rejected_total{{{common},reason="{_label(key)}"}} {stats[key]}')
    for name, (help_text, series) in gauges.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for extra, value in series.items():
            lines.append(f"{name}{{{common}{',' + extra if extra else ''}}} {value:g}")
    lines += ["# HELP meshmq_counter_total Every counter of agent.stats(), by name.",
              "# TYPE meshmq_counter_total counter"]
    for key in sorted(stats):
        lines.append(f'meshmq_counter_total{{{common},name="{_label(key)}"}} {stats[key]}')
    lines += histogram.lines("meshmq_delivery_latency_seconds", common)
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A tiny HTTP server on the agent's loop answering ``GET /metrics``."""

    def __init__(self, render: Callable[[], str]) -> None:
        self._render = render
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) >= 2 and line[0] == "GET" and line[1].split("?")[0] == "/metrics":
                body, status = self._render().encode(), "200 OK"
                kind = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, kind = b"meshmq serves GET /metrics only\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that does not speak HTTP, or goes away: nothing to answer
        except Exception as exc:  # never let one scrape take the agent down
            log.warning("metrics request failed: %s", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def gauges_of(stats: dict[str, int], peers: list[Any],
              pending: Iterable[tuple[str, str | None, int]] = ()) -> dict[str, tuple[str, dict[str, float]]]:
    """The gauges, from the agent's counters, its peers, and (pattern, queue group, pending)
    of each subscription (those alike are summed)."""
    states: dict[str, float] = {}
    for p in peers:
        states[p.state] = states.get(p.state, 0) + 1
    backlog: dict[str, float] = {}
    for pattern, queue, n in pending:
        series = f'pattern="{_label(pattern)}",queue="{_label(queue or "")}"'
        backlog[series] = backlog.get(series, 0) + n
    return {
        "meshmq_subscription_pending": ("Messages a subscription received and has not finished: buffered, "
                                        "in its handler, or waiting for a retry.", backlog),
        "meshmq_outbox_messages": ("Messages waiting in the outbox for an acknowledgment.",
                                   {"": stats.get("outbox_messages", 0)}),
        "meshmq_outbox_bytes": ("Bytes waiting in the outbox.", {"": stats.get("outbox_bytes", 0)}),
        "meshmq_peers": ("Peers by state.", {f'state="{s}"': n for s, n in sorted(states.items())}
                         or {'state="alive"': 0}),
        "meshmq_taps_watching": ("Taps this agent mirrors to.", {"": stats.get("taps_watching", 0)}),
    }
