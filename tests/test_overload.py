"""A full subscription stops its agent taking data, not hearing the mesh.

When a subscription's backlog reaches ``subscription_queue_messages`` the agent takes no
more data until it halves. Probes, gossip and receipts are still read and answered
meanwhile: a consumer that falls behind for longer than the failure detector waits must
not declare its peers dead, and its own outbox must still hear its receipts. Messages
that arrive meanwhile are received and wait aside, up to ``paused_data_bytes``; beyond that
data frames are dropped unread and their senders send them again.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from aio import agents, collect, eventually, run

import meshmq

# A failure detector that declares a silent peer dead within about a second.
QUICK = dict(probe_interval=0.2, probe_timeout=0.1, suspicion_mult=2.0, suspicion_max_mult=2.0)


async def fill_and_stay_full(pub: meshmq.AsyncAgent, sub: meshmq.AsyncAgent, probes: int) -> None:
    """Publish 200 messages to sub's (unread) subscription on bulk.x, then wait while it stays
    full for ``probes`` probes answered by sub: far longer than the detector needs to declare a
    silent peer dead."""
    for i in range(200):
        await pub.publish("bulk.x", i)
    await eventually(lambda: sub.stats().get("receive_paused", 0) >= 1, what="the subscription full")
    first = sub.stats().get("probes_answered", 0)
    await eventually(lambda: sub.stats().get("probes_answered", 0) >= first + probes,
                     what=f"{probes} probes answered while the subscription is full")


def test_a_full_subscription_keeps_its_agent_answering_the_mesh(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "pub", **QUICK) as (pub,), \
                agents(mesh, "sub", subscription_queue_messages=20, **QUICK) as (sub,):
            it = sub.subscribe("bulk.x")  # read only at the end: it stays full meanwhile
            back: list[Any] = []
            pub.subscribe("back.x", lambda msg: back.append(msg.data))
            await pub.wait_for_subscribers("bulk.x", timeout=10)
            await sub.wait_for_subscribers("back.x", timeout=10)
            await fill_and_stay_full(pub, sub, probes=15)
            # Its own publishing goes on: receipts are read, so its outbox empties.
            for i in range(5):
                await sub.publish("back.x", i)
            await eventually(lambda: back == list(range(5)) and sub.stats()["outbox_messages"] == 0,
                             what="the full agent's own messages delivered and acknowledged")
            assert sub.stats().get("receive_paused") == 1  # still the one pause: no data was taken
            for agent in (pub, sub):
                stats = agent.stats()
                assert stats.get("suspicions", 0) == 0 and stats.get("peers_dead", 0) == 0, stats
                assert len(agent.peers()) == 1

            assert [m.data for m in await collect(it, 200)] == list(range(200))

    run(main(), timeout=60)


def test_messages_set_aside_count_as_received_so_they_are_not_sent_again(mesh: str) -> None:
    """What arrives while the subscription is full is received, just not handed over yet: the
    publisher's receipts say so, and it keeps the messages (not acknowledged as handled)
    without sending them again."""
    async def main() -> None:
        async with agents(mesh, "pub", retransmit_initial=0.3, retransmit_max=60.0, **QUICK) as (pub,), \
                agents(mesh, "sub", subscription_queue_messages=20, **QUICK) as (sub,):
            it = sub.subscribe("bulk.x")
            await pub.wait_for_subscribers("bulk.x", timeout=10)
            await fill_and_stay_full(pub, sub, probes=10)  # 2 s and more
            assert pub.stats().get("retransmitted", 0) == 0  # frames held unread went again after 0.3 s
            assert pub.stats()["outbox_messages"] == 200

            assert [m.data for m in await collect(it, 200)] == list(range(200))
            await eventually(lambda: pub.stats()["outbox_messages"] == 0, what="every message acknowledged")
            assert pub.stats().get("retransmitted", 0) == 0

    run(main(), timeout=60)


def test_data_beyond_paused_data_bytes_is_sent_again_not_lost(mesh: str) -> None:
    """Past ``paused_data_bytes`` data frames are refused unacknowledged: the publisher keeps
    their messages and sends them again, so each arrives once, in order."""
    n = 2000

    async def main() -> None:
        async with agents(mesh, "pub", retransmit_initial=0.05, retransmit_max=0.3) as (pub,), \
                agents(mesh, "sub", subscription_queue_messages=20, paused_data_bytes=4096) as (sub,):
            it = sub.subscribe("bulk.x")
            await pub.wait_for_subscribers("bulk.x", timeout=10)
            for i in range(n):
                await pub.publish("bulk.x", i)
            await eventually(lambda: sub.stats().get("data_frames_refused_paused", 0) >= 1,
                             what="a data frame refused while the subscription is full")
            assert pub.stats()["outbox_messages"] > 0  # what was refused is kept

            assert [m.data for m in await collect(it, n)] == list(range(n))
            await eventually(lambda: pub.stats()["outbox_messages"] == 0, what="every message acknowledged")
            assert sub.stats()["receive_paused"] >= 1
            assert it.pending == 0  # nothing handed over twice is left over either

    run(main(), timeout=60)


@pytest.mark.parametrize("bad", [0, -1])
def test_paused_data_bytes_is_validated(bad: int) -> None:
    with pytest.raises(meshmq.ConfigError, match="paused_data_bytes"):
        meshmq.Config(paused_data_bytes=bad)


# --- an agent publishing to its own subscriptions ----------------------------------------


def test_publishing_to_a_full_own_subscription_waits_then_raises_subscription_full(mesh: str) -> None:
    """A message an agent publishes to itself is handed over in-process, with no outbox to
    hold it: the subscription's limit holds the publisher back. Nothing is half-done when it
    gives up: the refused message reaches neither the full subscription nor another agent."""
    async def main() -> None:
        async with agents(mesh, "svc", subscription_queue_messages=50, publish_timeout=1.0) as (svc,), \
                agents(mesh, "other") as (other,):
            gate = asyncio.Event()
            got: list[int] = []
            elsewhere: list[int] = []

            async def slow(msg: meshmq.Message) -> None:
                await gate.wait()
                got.append(msg.data)

            sub = svc.subscribe("jobs.x", slow)
            other.subscribe("jobs.x", lambda msg: elsewhere.append(msg.data))
            await svc.wait_for_subscribers("jobs.x", count=2, timeout=10)  # itself and the other
            published = []
            with pytest.raises(meshmq.SubscriptionFull, match=r"'jobs.x' of this agent has \d+ messages waiting") as info:
                for i in range(1000):
                    await svc.publish("jobs.x", i)
                    published.append(i)
            assert isinstance(info.value, meshmq.Backpressure)
            n = len(published)  # the limit, and maybe one more taken by the handler at once
            assert published == list(range(n)) and n in (50, 51) and sub.pending == n
            with pytest.raises(meshmq.SubscriptionFull):
                svc.publish_nowait("jobs.x", -1)  # at once, without waiting

            waiting = asyncio.ensure_future(svc.publish("jobs.x", n))  # waits for room ...
            finished, _ = await asyncio.wait({waiting}, timeout=0.05)
            assert not finished
            gate.set()
            await asyncio.wait_for(waiting, 10)  # ... which comes as the handler catches up
            await eventually(lambda: got == list(range(n + 1)) and elsewhere == list(range(n + 1)),
                             what="every accepted message handled, here and there")
            assert svc.stats()["publish_backpressure_errors"] == 2

    run(main(), timeout=60)


def test_a_publisher_that_never_yields_is_held_to_the_limit_too(mesh: str) -> None:
    """Messages an agent publishes to itself wait to be handed over until its loop runs: a
    publisher that never yields meets the limit there."""
    async def main() -> None:
        async with agents(mesh, "svc", discovery=False, subscription_queue_messages=100) as (svc,):
            it = svc.subscribe("jobs.x")
            with pytest.raises(meshmq.SubscriptionFull):
                for i in range(1000):
                    svc.publish_nowait("jobs.x", b"%d" % i)  # bytes: the plainest path
            assert i == 100
            assert [m.raw for m in await collect(it, 100)] == [b"%d" % i for i in range(100)]

    run(main())


def test_a_blocking_agent_publishing_to_its_own_full_subscription_gets_subscription_full(mesh: str) -> None:
    with meshmq.Agent("svc", mesh=mesh, discovery=False, subscription_queue_messages=20,
                      publish_timeout=0.3) as svc:
        gate = threading.Event()
        svc.subscribe("jobs.x", lambda msg: gate.wait(10))
        try:
            with pytest.raises(meshmq.SubscriptionFull, match="jobs.x"):
                for i in range(1000):
                    svc.publish("jobs.x", i)
            assert 20 <= i <= 22  # the limit, plus what the handler thread holds
        finally:
            gate.set()


def test_handlers_publishing_to_their_own_agent_let_the_loop_run_between_hops(mesh: str) -> None:
    """A chain of plain handlers publishing to the same agent goes hop by hop through the
    loop: probes, timers and I/O get their turn in between, however long the chain."""
    async def main() -> None:
        async with agents(mesh, "svc", discovery=False) as (svc,):
            loop = asyncio.get_running_loop()
            others_ran = asyncio.Event()
            seen_at: dict[int, bool] = {}
            done = asyncio.Event()

            def hop(msg: meshmq.Message) -> None:
                seen_at[msg.data] = others_ran.is_set()
                if msg.data < 2000:
                    svc.publish_nowait("chain.x", msg.data + 1)
                else:
                    done.set()

            svc.subscribe("chain.x", hop)
            await svc.publish("chain.x", 1)
            loop.call_soon(others_ran.set)  # queued behind the first hop
            await asyncio.wait_for(done.wait(), 20)
            assert len(seen_at) == 2000
            assert seen_at[1000]  # it ran long before the chain ended

    run(main())
