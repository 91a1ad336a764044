"""Agents in separate OS processes, real ZeroMQ and mDNS, on loopback only."""

from __future__ import annotations

import os
import signal
import threading
import uuid

import pytest
from aio import wait_until
from children import Child

import meshmq

pytestmark = pytest.mark.integration
@pytest.fixture
def mesh() -> str:
    return "t" + uuid.uuid4().hex[:12]


def test_two_processes_exchange_10000_messages_by_mdns(mesh: str) -> None:
    count = 10_000
    child = Child("exchange", mesh, str(count), "60")
    try:
        received: list[int] = []
        done = threading.Event()

        with meshmq.Agent("parent", mesh=mesh) as agent:
            @agent.subscribe("test.to_parent")
            def on_message(msg: meshmq.Message) -> None:
                received.append(msg.data["i"])
                if len(received) >= count:
                    done.set()

            agent.wait_for_subscribers("test.to_child", timeout=20)
            peers = agent.peers()
            for i in range(count):
                agent.publish("test.to_child", {"i": i}, type="Counted")
            result = child.expect("result", timeout=60)
            assert done.wait(timeout=30)

        assert result["received"] == count and result["unique"] == count and result["in_order"]
        assert received == list(range(count))  # none lost, none duplicated, in order
        assert [p.service for p in peers] == ["child"]
        assert child.proc.wait(timeout=15) == 0
    finally:
        child.close()


def test_sigkilled_peer_does_not_stall_the_others(mesh: str) -> None:
    child = Child("sink", mesh, "orders.>", "60")
    fast = dict(mesh=mesh, probe_interval=0.1, probe_timeout=0.05, suspicion_mult=2.0)
    try:
        with meshmq.Agent("healthy", **fast) as healthy, meshmq.Agent("publisher", **fast) as publisher:
            sub = healthy.subscribe("orders.placed")
            child_node = child.expect("ready", timeout=20)["node"]
            assert publisher.wait_for_subscribers("orders.placed", count=2, timeout=20) == 2

            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait(timeout=10)

            n = 5_000
            for i in range(n):  # never blocks: the dead peer's link absorbs its share
                publisher.publish("orders.placed", {"i": i})
            got = [sub.get(timeout=10) for _ in range(n)]
            assert [m.data["i"] for m in got if m is not None] == list(range(n))

            wait_until(lambda: child_node not in {p.node for p in publisher.peers()},
                       what="the killed peer declared dead")
            stats = publisher.stats()
            assert stats["peers_dead"] >= 1
    finally:
        child.close()


def test_stalled_peer_gets_backpressure_error_while_others_flow(mesh: str) -> None:
    """A peer that stops reading fills only its own queue; publishing to it fails loudly."""
    child = Child("sink", mesh, "slow.>", "60")
    cfg = dict(mesh=mesh, peer_queue_messages=200, publish_timeout=0.5, probe_interval=60.0, socket_hwm=10)
    try:
        with meshmq.Agent("healthy", mesh=mesh) as healthy, meshmq.Agent("publisher", **cfg) as publisher:
            fast_sub = healthy.subscribe("fast.>")
            child.expect("ready", timeout=20)
            publisher.wait_for_subscribers("slow.topic", timeout=20)
            publisher.wait_for_subscribers("fast.topic", timeout=20)
            os.kill(child.proc.pid, signal.SIGSTOP)  # alive but not reading
            payload = b"x" * 4096
            with pytest.raises(meshmq.PeerQueueFull) as info:
                for _ in range(100_000):  # bounded: fills socket buffers and the 200-message queue
                    publisher.publish("slow.topic", payload)
            assert info.value.service == "sink"
            # The healthy peer is unaffected.
            for i in range(100):
                publisher.publish("fast.topic", {"i": i})
            got = [fast_sub.get(timeout=10) for _ in range(100)]
            assert [m.data["i"] for m in got if m is not None] == list(range(100))
            assert publisher.stats()["publish_backpressure_errors"] >= 1
    finally:
        if child.proc.poll() is None:
            os.kill(child.proc.pid, signal.SIGCONT)
        child.close()


def test_seeds_without_mdns(mesh: str) -> None:
    with meshmq.Agent("a", mesh=mesh, discovery=False) as a:
        sub = a.subscribe("seeded.*")
        with meshmq.Agent("b", mesh=mesh, discovery=False, seeds=list(a.endpoints)) as b:
            b.wait_for_subscribers("seeded.x", timeout=10)
            b.publish("seeded.x", "hello")
            msg = sub.get(timeout=10)
            assert msg is not None and msg.data == "hello" and msg.source == "b"
            assert {p.service for p in a.peers()} == {"b"}
