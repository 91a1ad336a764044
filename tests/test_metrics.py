"""The Prometheus endpoint (Config.metrics_port): counters, gauges, the latency histogram."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from aio import eventually, run

import meshmq
from meshmq._metrics import LatencyHistogram


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:  # loopback only
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def _value(text: str, prefix: str) -> float:
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])


def test_an_agent_serves_its_counters_gauges_and_latency(mesh: str) -> None:
    pub_port, sub_port = _free_port(), _free_port()

    async def main() -> None:
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="memory", metrics_port=sub_port).start()
        got: list[bytes] = []
        sub.subscribe("m.*", lambda m: got.append(m.raw))
        held = sub.subscribe("h.*", lambda m: m.nack(delay=60), queue="workers")  # keeps its one message
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory", metrics_port=pub_port).start()
        try:
            assert pub.metrics_port == pub_port
            await pub.wait_for_subscribers("m.x", timeout=10)
            for i in range(30):
                await pub.publish("m.x", b"%d" % i)
            await eventually(lambda: len(got) == 30 and pub.stats()["outbox_messages"] == 0, what="all acked")
            loop = asyncio.get_running_loop()
            pub_text = await loop.run_in_executor(None, _scrape, pub_port)
            sub_text = await loop.run_in_executor(None, _scrape, sub_port)
            labels = f'{{mesh="{mesh}",node="{pub.node_id}",service="pub"}}'
            assert _value(pub_text, f"meshmq_published_total{labels}") == 30
            assert _value(pub_text, f"meshmq_acked_total{labels}") == 30
            assert _value(pub_text, f"meshmq_outbox_messages{labels}") == 0
            assert "# TYPE meshmq_delivery_latency_seconds histogram" in sub_text
            sub_labels = f'mesh="{mesh}",node="{sub.node_id}",service="sub"'
            assert _value(sub_text, f"meshmq_delivery_latency_seconds_count{{{sub_labels}}}") == 30
            assert _value(sub_text, f'meshmq_delivery_latency_seconds_bucket{{{sub_labels},le="+Inf"}}') == 30
            assert _value(sub_text, f"meshmq_delivered_total{{{sub_labels}}}") == 30
            assert _value(sub_text, f'meshmq_peers{{{sub_labels},state="alive"}}') >= 1
            with pytest.raises(urllib.error.HTTPError) as missing:
                await loop.run_in_executor(None, _scrape, pub_port, "/other")
            assert missing.value.code == 404
            await pub.publish("h.x", b"wait")
            await eventually(lambda: held.pending == 1, what="the held message")
            sub_text = await loop.run_in_executor(None, _scrape, sub_port)
            assert _value(sub_text, f'meshmq_subscription_pending{{{sub_labels},pattern="m.*",queue=""}}') == 0
            assert _value(sub_text, f'meshmq_subscription_pending{{{sub_labels},pattern="h.*",queue="workers"}}') == 1
        finally:
            await pub.stop()
            await sub.stop()
        with pytest.raises(OSError):  # stopped: the port is closed
            _scrape(pub_port)

    run(main(), timeout=60)


def test_metrics_settings_are_checked(mesh: str) -> None:
    with pytest.raises(meshmq.ConfigError, match="metrics_port"):
        meshmq.Config(metrics_port=70000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            with pytest.raises(meshmq.ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                await meshmq.AsyncAgent("x", mesh=mesh, durability="memory", metrics_port=port).start()

        run(main())


def test_the_latency_histogram_is_cumulative() -> None:
    h = LatencyHistogram((0.01, 0.1, 1.0))
    for seconds in (0.005, 0.05, 0.05, 5.0, -1.0):
        h.observe(seconds)
    lines = h.lines("x", 'a="b"')
    assert 'x_bucket{a="b",le="0.01"} 2' in lines and 'x_bucket{a="b",le="0.1"} 4' in lines
    assert 'x_bucket{a="b",le="1"} 4' in lines and 'x_bucket{a="b",le="+Inf"} 5' in lines
    assert 'x_count{a="b"} 5' in lines
