"""Handlers that fail: retries with backoff in order, nack/ack, dead letters, replay, purge."""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import meshmq
from aio import agents, collect, eventually, run, wait_until

FAST = dict(max_attempts=3, retry_backoff=0.01, retry_backoff_max=0.05)


@pytest.mark.parametrize("kind", ["function", "coroutine"])
def test_a_failing_handler_is_retried_in_order_then_dead_lettered(mesh: str, kind: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", **FAST) as (agent,):
            calls: list[tuple[int, int]] = []

            def work(msg: meshmq.Message) -> None:
                calls.append((msg.data, msg.attempts))
                if msg.data % 2:
                    raise RuntimeError(f"boom {msg.data}")

            async def async_work(msg: meshmq.Message) -> None:
                work(msg)

            agent.subscribe("jobs.x", work if kind == "function" else async_work)
            for i in range(6):
                await agent.publish("jobs.x", i)
            await eventually(lambda: len(agent.dead_letters()) == 3 and len(calls) == 12)
            # Each message's attempts come before the next message: order holds through retries.
            assert calls == [(0, 1), (1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (3, 2), (3, 3),
                             (4, 1), (5, 1), (5, 2), (5, 3)]
            letters = agent.dead_letters()
            assert [d.message.data for d in letters] == [1, 3, 5]
            assert {(d.reason, d.attempts, d.pattern, d.queue) for d in letters} == {
                ("handler failed", 3, "jobs.x", None)}
            assert letters[0].error == "RuntimeError: boom 1" and letters[0].message.topic == "jobs.x"
            stats = agent.stats()
            assert (stats["handler_errors"], stats["handler_retries"], stats["dead_lettered"]) == (9, 6, 3)

    run(main())


def test_a_transient_failure_is_retried_until_it_succeeds(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", **FAST) as (agent,):
            seen: list[tuple[str, int]] = []

            def flaky(msg: meshmq.Message) -> None:
                seen.append((msg.data, msg.attempts))
                if msg.data == "a" and msg.attempts < 3:
                    raise ConnectionError("database busy")

            agent.subscribe("jobs.x", flaky)
            for data in "abc":
                await agent.publish("jobs.x", data)
            await eventually(lambda: len(seen) == 5)
            assert seen == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1)]
            assert agent.dead_letters() == []

    run(main())


def test_nack_asks_for_another_attempt_and_ack_settles(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", **FAST) as (agent,):
            seen: list[int] = []
            loop = asyncio.get_running_loop()
            times: list[float] = []

            def handler(msg: meshmq.Message) -> None:
                seen.append(msg.attempts)
                times.append(loop.time())
                if msg.attempts == 1:
                    msg.nack(delay=0.2)
                elif msg.attempts == 2:
                    msg.nack()
                    msg.ack()  # changed its mind: done

            agent.subscribe("jobs.x", handler)
            await agent.publish("jobs.x", "once")
            await eventually(lambda: len(seen) == 2)
            assert seen == [1, 2] and times[1] - times[0] >= 0.19
            assert agent.stats()["nacked"] == 1 and agent.dead_letters() == []

            always: list[int] = []
            agent.subscribe("jobs.y", lambda m: (always.append(m.attempts), m.nack(0)))
            await agent.publish("jobs.y", "never happy")
            await eventually(lambda: len(agent.dead_letters()) == 1)
            assert always == [1, 2, 3] and agent.dead_letters()[0].reason == "nacked"

    run(main())


def test_ack_and_nack_belong_to_handlers(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo") as (agent,):
            it = agent.subscribe("jobs.x")
            await agent.publish("jobs.x", 1)
            [msg] = await collect(it, 1)
            with pytest.raises(meshmq.UsageError, match="for a subscription's handler"):
                msg.nack()
            with pytest.raises(meshmq.UsageError, match="for a subscription's handler"):
                msg.ack()
            bad: list[Exception] = []

            def handler(m: meshmq.Message) -> None:
                try:
                    m.nack(delay=-1)
                except meshmq.UsageError as exc:
                    bad.append(exc)

            agent.subscribe("jobs.y", handler)
            await agent.publish("jobs.y", 1)
            await eventually(lambda: bool(bad))
            assert "0 to 86400 seconds" in str(bad[0])

    run(main())


def test_dead_letters_can_be_replayed_or_purged(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", **FAST) as (agent,):
            broken = True
            done: list[str] = []

            def handler(msg: meshmq.Message) -> None:
                if broken:
                    raise ValueError("not yet")
                done.append(msg.data)

            agent.subscribe("jobs.*", handler, queue="workers")
            for data in ("a", "b", "c"):
                await agent.publish("jobs.x", data)
            await eventually(lambda: len(agent.dead_letters()) == 3)
            # No key in a queue group: the three were retried side by side, in no set order.
            first, second, third = sorted(agent.dead_letters(), key=lambda d: d.message.data)
            broken = False  # the bug is fixed
            assert await agent.replay_dead_letters([first.id]) == 1
            await eventually(lambda: done == ["a"])
            assert sorted(d.id for d in agent.dead_letters()) == sorted([second.id, third.id])
            assert await agent.purge_dead_letters([second.id]) == 1
            assert await agent.replay_dead_letters() == 1
            await eventually(lambda: done == ["a", "c"])
            assert agent.dead_letters() == []
            with pytest.raises(meshmq.UsageError, match="no dead letter"):
                await agent.purge_dead_letters(["nope"])
            assert agent.stats()["dead_letters_replayed"] == 2

    run(main())


def test_a_letter_waits_for_its_subscription_to_be_replayed(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", **FAST) as (agent,):
            sub = agent.subscribe("jobs.x", lambda m: 1 / 0)
            await agent.publish("jobs.x", 1)
            await eventually(lambda: len(agent.dead_letters()) == 1)
            sub.close()
            assert await agent.replay_dead_letters() == 0  # nobody to hand it to: it stays
            assert len(agent.dead_letters()) == 1

    run(main())


def test_dead_letters_survive_a_restart(mesh: str) -> None:
    with meshmq.Agent("keeper", mesh=mesh, discovery=False, **FAST) as agent:
        agent.subscribe("jobs.x", lambda m: 1 / 0)
        agent.publish("jobs.x", {"order": 7})
        wait_until(agent.dead_letters, what="a dead letter")  # the retries run on the agent's timers
        [letter] = agent.dead_letters()
    with meshmq.Agent("keeper", mesh=mesh, discovery=False) as again:
        [kept] = again.dead_letters()
        assert (kept.id, kept.error, kept.message.data) == (letter.id, "ZeroDivisionError: division by zero",
                                                            {"order": 7})
        assert again.purge_dead_letters() == 1
        assert again.dead_letters() == []


# --- meshmq dlq ----------------------------------------------------------------------


def dlq(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own (one LMDB environment per process), with this test's data dir."""
    env = {**os.environ, "MESHMQ_INTERFACES": "127.0.0.1"}
    return subprocess.run([sys.executable, "-m", "meshmq", "dlq", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def make_letters(mesh: str, n: int) -> list[meshmq.DeadLetter]:
    with meshmq.Agent("billing", mesh=mesh, discovery=False, **FAST) as agent:
        agent.subscribe("invoices.*", lambda m: 1 / 0, queue="billers")
        for i in range(n):  # one customer's: in order, so the letters are too
            agent.publish("invoices.new", {"invoice": i}, key="customer-7")
        wait_until(lambda: len(agent.dead_letters()) >= n, what=f"{n} dead letters")
        return agent.dead_letters()


def test_dlq_lists_and_shows_an_agents_dead_letters(mesh: str) -> None:
    import json

    letters = make_letters(mesh, 2)
    listed = dlq("ls", "--service", "billing", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [d.id for d in letters]
    assert rows[0]["reason"] == "handler failed" and rows[0]["attempts"] == 3
    assert rows[0]["error"] == "ZeroDivisionError: division by zero" and rows[0]["queue"] == "billers"
    table = dlq("ls", "--service", "billing")
    assert table.returncode == 0 and letters[1].id in table.stdout and "invoices.*@billers" in table.stdout
    shown = dlq("show", letters[0].id, "--service", "billing", "--json")
    assert json.loads(shown.stdout)["data"] == {"invoice": 0}
    text = dlq("show", letters[0].id, "--service", "billing")
    assert '{"invoice": 0}' in text.stdout


def test_dlq_purge_and_replay_reach_the_agent(mesh: str) -> None:
    letters = make_letters(mesh, 3)
    purged = dlq("purge", letters[0].id, "--service", "billing")
    assert purged.returncode == 0 and "purged 1" in purged.stderr
    with meshmq.Agent("billing", mesh=mesh, discovery=False, **FAST) as agent:  # running: replay reaches it
        got: list[int] = []
        agent.subscribe("invoices.*", lambda m: got.append(m.data["invoice"]), queue="billers")
        replayed = dlq("replay", "--all", "--service", "billing")
        assert replayed.returncode == 0, replayed.stderr
        # The agent looks for replay requests every second.
        wait_until(lambda: sorted(got) == [1, 2], what="the replayed letters")
        wait_until(lambda: not agent.dead_letters(), what="an empty dead-letter store")
    assert dlq("ls", "--service", "billing", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize(("args", "problem"), [
    (["ls"], "--service NAME"),
    (["ls", "--service", "nobody"], "no store of service 'nobody'"),
    (["show", "--service", "billing"], "exactly one ID"),
    (["purge", "--service", "billing"], "ID... or --all"),
    (["replay", "x", "--all", "--service", "billing"], "ID... or --all"),
    (["show", "nope", "--service", "billing"], "no dead letter 'nope'"),
    (["ls", "x", "--service", "billing"], "takes no ID"),
])
def test_dlq_bad_input_is_a_clear_error(mesh: str, args: list[str], problem: str) -> None:
    make_letters(mesh, 1)
    done = dlq(*args)
    assert done.returncode == 2 and problem in done.stderr and "Traceback" not in done.stderr


# --- time to live ----------------------------------------------------------------------


def test_a_message_past_its_ttl_is_dead_lettered_not_handled(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", max_attempts=10, retry_backoff=0.2, retry_backoff_max=0.2) as (agent,):
            calls: list[float] = []

            def handler(msg: meshmq.Message) -> None:
                calls.append(time.time())
                raise RuntimeError("down")

            agent.subscribe("jobs.x", handler)
            await agent.publish("jobs.x", "short-lived", ttl=0.3)
            await eventually(lambda: len(agent.dead_letters()) == 1)
            [letter] = agent.dead_letters()
            assert letter.reason == "expired" and "time to live ran out" in (letter.error or "")
            expires = letter.message.expires_at
            assert expires is not None and abs(expires - (letter.message.timestamp + 0.3)) < 1e-6
            # Handled until the TTL ran out, never after, and dead-lettered long before max_attempts.
            assert calls and all(t < expires for t in calls)
            assert len(calls) == letter.attempts < 10

    run(main())


def test_an_iterator_never_gives_out_an_expired_message(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", default_ttl=0.05) as (agent,):
            it = agent.subscribe("jobs.x")
            await agent.publish("jobs.x", "stale")  # the default TTL applies
            await agent.publish("jobs.x", "fresh", ttl=60)
            await eventually(lambda: len(it._buffer) == 2)
            stale = it._buffer[0].expires_at
            assert stale is not None
            await eventually(lambda: time.time() > stale)  # its TTL passes while it waits unread
            [msg] = await collect(it, 1)
            assert msg.data == "fresh" and msg.expires_at is not None
            await eventually(lambda: len(agent.dead_letters()) == 1)  # stored by the writer thread
            [letter] = agent.dead_letters()
            assert letter.message.data == "stale" and letter.reason == "expired"

    run(main())


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), "1s", True, 10 ** 9])
def test_a_bad_ttl_is_refused(mesh: str, ttl: Any) -> None:
    async def main() -> None:
        async with agents(mesh, "solo") as (agent,):
            with pytest.raises(meshmq.UsageError, match="ttl must be"):
                await agent.publish("jobs.x", 1, ttl=ttl)

    run(main())
    with pytest.raises(meshmq.ConfigError, match="default_ttl"):
        meshmq.Config(default_ttl=-1)


# --- a blocking Agent's handlers run off the agent's loop ------------------------------


def test_a_slow_blocking_handler_does_not_get_its_node_suspected(mesh: str) -> None:
    """Blocking code in a handler runs on the subscription's own thread: the agent's loop keeps
    answering probes, so peers with a hair-trigger failure detector never suspect it."""
    hair_trigger = dict(discovery=False, probe_interval=0.1, probe_timeout=0.05, suspicion_mult=1.0)
    with meshmq.Agent("watcher", mesh=mesh, **hair_trigger) as watcher, \
            meshmq.Agent("worker", mesh=mesh, seeds=list(watcher.endpoints), **hair_trigger) as worker:
        threads: list[str] = []
        finished = threading.Event()

        def slow(msg: meshmq.Message) -> None:
            threads.append(threading.current_thread().name)
            time.sleep(1.5)  # the handler's own (blocking) work, the subject of this test
            finished.set()

        worker.subscribe("jobs.slow", slow)
        watcher.wait_for_subscribers("jobs.slow", timeout=10)
        watcher.publish("jobs.slow", "take your time")
        assert finished.wait(10)
        assert threads == ["meshmq-handler-jobs.slow"]  # not the agent's loop thread
        assert [p.state for p in watcher.peers()] == ["alive"]
        stats = watcher.stats()
        assert stats.get("suspicions", 0) == 0 and stats.get("peers_dead", 0) == 0
        assert stats.get("probes_answered", 0) > 10  # probes went on during the 1.5 s
        assert worker.stats().get("loop_stalls", 0) == 0


def test_blocking_code_on_the_loop_is_reported(mesh: str, caplog: pytest.LogCaptureFixture) -> None:
    """A plain function handler of an AsyncAgent runs on the agent's loop: when it blocks
    longer than a probe waits for its answer, the agent counts it and says what to do."""
    async def main() -> None:
        async with agents(mesh, "svc", discovery=False, probe_timeout=0.3) as (agent,):
            done = asyncio.Event()

            def blocking(msg: meshmq.Message) -> None:
                time.sleep(0.8)  # blocking the loop is the subject of this test
                done.set()

            agent.subscribe("jobs.x", blocking)
            await agent.publish("jobs.x", 1)
            await asyncio.wait_for(done.wait(), 10)
            await eventually(lambda: agent.stats().get("loop_stalls", 0) >= 1, what="the stall counted")
            check = next(c for c in agent.health().checks if c.name == "event-loop")
            assert check.status == "warn" and "held for 0." in check.detail, check

    run(main())
    said = [r.getMessage() for r in caplog.records if "event loop" in r.getMessage()]
    assert said and "probe_timeout 0.3s" in said[0] and "blocking Agent" in said[0], said


def test_a_blocking_agents_type_handlers_run_on_the_handler_thread(mesh: str) -> None:
    with meshmq.Agent("typed", mesh=mesh, discovery=False) as agent:
        seen: list[tuple[str, str]] = []
        done = threading.Event()

        @agent.on("OrderPlaced")
        def placed(msg: meshmq.Message) -> None:
            seen.append((msg.data["id"], threading.current_thread().name))
            done.set()

        agent.subscribe("orders.*", agent.dispatch)
        agent.publish("orders.new", {"id": "A"}, type="OrderPlaced")
        agent.publish("orders.new", {"id": "B"}, type="Unknown")
        assert done.wait(10)
        assert seen == [("A", "meshmq-handler-orders.*")]
        wait_until(lambda: agent.stats().get("unhandled_type", 0) >= 1, what="the unhandled type counted")


# --- a failing message holds back only its own order key ------------------------------


def _six(queue: str | None) -> list[tuple[str, str, str | None]]:
    """(topic, data, key) of a0 b0 a1 b1 a2 b2: "a" and "b" are two topics, or two keys of
    one topic in a queue group."""
    return [("jobs.x", f"{n}{i}", n) if queue else (f"jobs.{n}", f"{n}{i}", None)
            for i in range(3) for n in "ab"]


class _HoldsA0:
    """A handler that nacks the first attempt of "a0" for ``delay`` seconds, and records
    (order key, data, attempt) of every call."""

    def __init__(self, queue: str | None, delay: float) -> None:
        self.queue, self.delay = queue, delay
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, msg: meshmq.Message) -> None:
        self.calls.append((str(msg.key if self.queue else msg.topic[-1]), msg.data, msg.attempts))
        if msg.data == "a0" and msg.attempts == 1:
            msg.nack(delay=self.delay)

    async def coroutine(self, msg: meshmq.Message) -> None:
        self(msg)

    def of(self, kind: str) -> Any:
        return self.coroutine if kind == "coroutine" else self

    def only_a0_waits(self) -> bool:
        """b0-b2 were handled while a0 waited for its retry, and a1, a2 waited behind it."""
        return self.calls == [("a", "a0", 1), ("b", "b0", 1), ("b", "b1", 1), ("b", "b2", 1)]

    def a_in_order(self) -> bool:
        return [(d, n) for k, d, n in self.calls if k == "a"] == [("a0", 1), ("a0", 2), ("a1", 1), ("a2", 1)]


@pytest.mark.parametrize("kind", ["function", "coroutine", "blocking"])
@pytest.mark.parametrize("queue", [None, "workers"])
def test_a_waiting_retry_holds_back_only_its_own_order_key(mesh: str, kind: str, queue: str | None) -> None:
    """Order is per sender and topic (per key in a queue group): while "a0" waits for its
    retry, the later messages of its topic (key) wait behind it, and the others go on.
    Closing the subscription lets go of the held ones, counted."""
    if kind == "blocking":
        with meshmq.Agent("solo", mesh=mesh, discovery=False) as agent:
            held = _HoldsA0(queue, 60.0)
            sub = agent.subscribe("jobs.*", held.of(kind), queue=queue)
            for topic, data, key in _six(queue):
                agent.publish(topic, data, key=key)
            wait_until(lambda: len(held.calls) == 4, what="b0-b2 handled")
            assert held.only_a0_waits(), held.calls
            wait_until(lambda: sub.pending == 3, what="b2 done with")  # a0 waits, a1 and a2 behind it
            sub.close()
            wait_until(lambda: agent.stats().get("dropped_on_unsubscribe", 0) == 3, what="a0-a2 let go")

            retried = _HoldsA0(queue, 0.05)
            agent.subscribe("jobs.*", retried.of(kind), queue=queue)
            for topic, data, key in _six(queue):
                agent.publish(topic, data, key=key)
            wait_until(lambda: len(retried.calls) == 7, what="every message handled")
            assert retried.a_in_order(), retried.calls
        return

    async def main() -> None:
        async with agents(mesh, "solo", discovery=False) as (agent,):
            held = _HoldsA0(queue, 60.0)
            sub = agent.subscribe("jobs.*", held.of(kind), queue=queue)
            for topic, data, key in _six(queue):
                await agent.publish(topic, data, key=key)
            await eventually(lambda: len(held.calls) == 4, what="b0-b2 handled")
            assert held.only_a0_waits(), held.calls
            await eventually(lambda: sub.pending == 3, what="b2 done with")  # a0 waits, a1 and a2 behind it
            sub.close()
            await eventually(lambda: agent.stats().get("dropped_on_unsubscribe", 0) == 3, what="a0-a2 let go")

            retried = _HoldsA0(queue, 0.05)
            agent.subscribe("jobs.*", retried.of(kind), queue=queue)
            for topic, data, key in _six(queue):
                await agent.publish(topic, data, key=key)
            await eventually(lambda: len(retried.calls) == 7, what="every message handled")
            assert retried.a_in_order(), retried.calls

    run(main())


@pytest.mark.parametrize(("kind", "concurrency"), [
    ("function", 1), ("coroutine", 1), ("blocking", 1), ("coroutine", 3), ("blocking", 3)])
@pytest.mark.parametrize("queue", [None, "workers"])
def test_retries_of_many_keys_keep_each_keys_order(mesh: str, kind: str, concurrency: int, queue: str | None) -> None:
    """Messages of four order keys, each failing 0-3 times at random (3: dead-lettered): every
    message is handled once or dead-lettered, and within a key, all attempts of a message come
    before the next message's first; also with handlers working on three at once."""
    rng = random.Random(f"{kind}-{queue}-{concurrency}")
    count = 160
    fails = [rng.choice([0, 0, 0, 0, 1, 2, 3]) for _ in range(count)]
    names = [f"k{rng.randrange(4)}" for _ in range(count)]
    calls: list[tuple[str, int, int]] = []  # (order key, message, attempt)
    handled: list[int] = []

    def work(msg: meshmq.Message) -> None:
        i = msg.data
        calls.append((names[i], i, msg.attempts))
        if msg.attempts <= fails[i]:
            raise RuntimeError(f"failure {msg.attempts} of {i}")
        handled.append(i)

    async def async_work(msg: meshmq.Message) -> None:
        await asyncio.sleep(0)  # the other workers' turn: calls of several keys interleave
        work(msg)

    def where(i: int) -> tuple[str, str | None]:
        return ("jobs.x", names[i]) if queue else (f"jobs.{names[i]}", None)

    def check(letters: list[meshmq.DeadLetter]) -> None:
        dead = [d.message.data for d in letters]
        assert sorted(handled + dead) == list(range(count))  # each once: handled or dead-lettered
        assert sorted(dead) == [i for i in range(count) if fails[i] >= 3]
        for name in set(names):
            mine = [(i, attempt) for k, i, attempt in calls if k == name]
            expected = [(i, a) for i in range(count) if names[i] == name for a in range(1, min(fails[i], 2) + 2)]
            assert mine == expected, name

    cfg = dict(discovery=False, max_attempts=3, retry_backoff=0.002, retry_backoff_max=0.01)
    if kind == "blocking":
        with meshmq.Agent("solo", mesh=mesh, **cfg) as agent:
            agent.subscribe("jobs.*", work, queue=queue, concurrency=concurrency)
            for i in range(count):
                topic, key = where(i)
                agent.publish(topic, i, key=key)
            wait_until(lambda: len(handled) + len(agent.dead_letters()) == count, what="every message settled")
            check(agent.dead_letters())
        return

    async def main() -> None:
        async with agents(mesh, "solo", **cfg) as (agent,):
            agent.subscribe("jobs.*", async_work if kind == "coroutine" else work, queue=queue,
                            concurrency=concurrency)
            for i in range(count):
                topic, key = where(i)
                await agent.publish(topic, i, key=key)
            await eventually(lambda: len(handled) + len(agent.dead_letters()) == count, what="every message settled")
            check(agent.dead_letters())

    run(main())


def test_messages_held_behind_a_retry_pause_the_network_at_the_subscription_limit(mesh: str) -> None:
    """Messages waiting behind a retry count against subscription_queue_messages: the agent stops
    reading rather than holding without bound, and every message arrives once, in order."""
    async def main() -> None:
        async with agents(mesh, "pub", subscription_queue_messages=50) as (pub,), \
                agents(mesh, "sub", subscription_queue_messages=50) as (sub,):
            got: list[int] = []

            def slow_start(msg: meshmq.Message) -> None:
                if msg.data == 0 and msg.attempts == 1:
                    msg.nack(delay=0.5)  # the other 599 wait behind it
                    return
                got.append(msg.data)

            sub.subscribe("bulk.x", slow_start)
            await pub.wait_for_subscribers("bulk.x", timeout=10)
            for i in range(600):
                await pub.publish("bulk.x", i)
            await eventually(lambda: len(got) == 600, what="every message handled")
            assert got == list(range(600))
            assert sub.stats()["receive_paused"] >= 1

    run(main())


def test_a_handler_that_closes_its_own_subscription_finishes_its_message_once(mesh: str) -> None:
    """A message that went to two subscriptions is acknowledged once both are done with it. A
    coroutine handler that closes its own subscription must not finish the message a second
    time (closing already let go of it): that would acknowledge it while the other
    subscription still works on it."""
    async def main() -> None:
        async with agents(mesh, "pub") as (pub,), agents(mesh, "sub") as (sub,):
            finished: list[bytes] = []
            real = sub._message_finished

            def counted(msg: meshmq.Message, in_group: bool) -> None:
                finished.append(msg._id)
                real(msg, in_group)

            sub._message_finished = counted  # type: ignore[method-assign]
            release = asyncio.Event()
            started = asyncio.Event()

            async def closes_itself(msg: meshmq.Message) -> None:
                first.close()

            async def slow(msg: meshmq.Message) -> None:
                started.set()
                await asyncio.wait_for(release.wait(), 10)

            first = sub.subscribe("jobs.x", closes_itself)
            second = sub.subscribe("jobs.x", slow)
            await pub.wait_for_subscribers("jobs.x", timeout=10)
            await pub.publish("jobs.x", "both")
            await asyncio.wait_for(started.wait(), 10)
            await eventually(lambda: first.closed, what="the first subscription closed")
            assert len(finished) == 1  # by the close; the second subscription still has it
            release.set()
            await eventually(lambda: second.pending == 0, what="the second subscription done")
            assert len(finished) == 2 and len(set(finished)) == 1
            await eventually(lambda: pub.stats()["outbox_messages"] == 0, what="the message acknowledged")

    run(main())


@pytest.mark.parametrize("kind", ["function", "coroutine"])
def test_a_queue_groups_message_without_a_key_holds_back_nothing(mesh: str, kind: str) -> None:
    """A queue group spreads messages without a key over its members by load, in no order, so
    the retry of one holds back none of the others, of its topic or sender either."""
    async def main() -> None:
        async with agents(mesh, "solo", discovery=False) as (agent,):
            held = _HoldsA0("workers", 60.0)
            sub = agent.subscribe("jobs.*", held.of(kind), queue="workers")
            for data in ("a0", "a1", "a2"):
                await agent.publish("jobs.x", data)
            await eventually(lambda: len(held.calls) == 3, what="a1 and a2 handled")
            assert [(d, n) for _, d, n in held.calls] == [("a0", 1), ("a1", 1), ("a2", 1)]
            assert sub.pending == 1  # a0, waiting for its retry on its own

    run(main())


def test_a_message_from_another_node_waiting_for_its_retry_holds_back_only_its_topic(mesh: str) -> None:
    """Across two agents: while a0 waits for its retry, jobs.b goes on and the later jobs.a
    messages wait behind it.
    The acknowledged position waits for a0 (the publisher keeps every message meanwhile);
    once a0 is done with (dead-lettered, or let go by closing), the publisher's outbox
    empties, and nothing was handed over twice."""
    async def main() -> None:
        async with agents(mesh, "pub") as (pub,), agents(mesh, "sub", **FAST) as (sub,):
            for retry in ("waits", "dead-lettered"):
                handled: list[tuple[str, int]] = []
                a0_attempts: list[int] = []

                def work(msg: meshmq.Message) -> None:
                    if msg.topic == "jobs.a" and msg.data == 0:
                        a0_attempts.append(msg.attempts)
                        if retry == "waits":
                            msg.nack(delay=60)
                            return
                        raise ValueError("poison")
                    handled.append((msg.topic, msg.data))

                subscription = sub.subscribe("jobs.*", work)
                await pub.wait_for_subscribers("jobs.a", timeout=10)
                for i in range(200):
                    await pub.publish("jobs.a" if i % 2 == 0 else "jobs.b", i)
                if retry == "waits":
                    await eventually(lambda: len(handled) == 100, what="jobs.b handled")
                    assert handled == [("jobs.b", i) for i in range(1, 200, 2)] and a0_attempts == [1]
                    await eventually(lambda: subscription.pending == 100, what="a0 waiting, a2... behind it")
                    assert pub.stats()["outbox_messages"] == 200  # none acknowledged past a0
                    subscription.close()  # lets go of a0 and the 99 behind it: done with, so acknowledged
                else:
                    await eventually(lambda: len(handled) == 199 and len(sub.dead_letters()) == 1, what="settled")
                    assert [d for t, d in handled if t == "jobs.a"] == list(range(2, 200, 2))  # in order, once each
                    assert [d for t, d in handled if t == "jobs.b"] == list(range(1, 200, 2))
                    assert a0_attempts == [1, 2, 3]
                await eventually(lambda: pub.stats()["outbox_messages"] == 0, what="everything acknowledged")
                assert len(handled) == (100 if retry == "waits" else 199)  # nothing handed over twice
            assert sub.stats()["dropped_on_unsubscribe"] == 100

    run(main())


# --- concurrency: several messages at once, never two of one order key -----------------


class _Gauge:
    """Counts a handler's calls in progress, overall and per order key."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.per_key: dict[str, int] = {}
        self.overlap_in_a_key = False
        self.done: list[tuple[str, int]] = []

    def enter(self, key: str) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        self.per_key[key] = self.per_key.get(key, 0) + 1
        self.overlap_in_a_key |= self.per_key[key] > 1

    def leave(self, key: str, data: int) -> None:
        self.now -= 1
        self.per_key[key] -= 1
        self.done.append((key, data))


@pytest.mark.parametrize("queue", [None, "workers"])
def test_a_coroutine_handler_works_on_up_to_concurrency_messages_at_once(mesh: str, queue: str | None) -> None:
    """With concurrency=4, four messages of four keys are in the handler at once (the gate
    opens only when they are), two of one key never are, and each key keeps its order."""
    async def main() -> None:
        async with agents(mesh, "solo", discovery=False) as (agent,):
            gauge = _Gauge()
            gate = asyncio.Event()

            async def work(msg: meshmq.Message) -> None:
                key = msg.key if queue else msg.topic
                gauge.enter(key)
                if gauge.now == 4:
                    gate.set()
                await asyncio.wait_for(gate.wait(), 10)
                gauge.leave(key, msg.data)

            sub = agent.subscribe("jobs.*", work, queue=queue, concurrency=4)
            assert sub.concurrency == 4
            for i in range(200):
                key = f"k{i % 6}"
                await agent.publish("jobs.x" if queue else f"jobs.{key}", i, key=key if queue else None)
            await eventually(lambda: len(gauge.done) == 200, what="every message handled")
            assert gauge.most == 4 and not gauge.overlap_in_a_key
            for k in range(6):
                key = f"k{k}" if queue else f"jobs.k{k}"
                assert [d for kk, d in gauge.done if kk == key] == list(range(k, 200, 6))
            assert sub.pending == 0

    run(main())


def test_concurrency_never_runs_two_messages_of_one_key_at_once(mesh: str) -> None:
    """At concurrency 8, while the first message of jobs.one is in the handler, the other 29
    stay out, although idle workers take them from the buffer before a message of jobs.two,
    which they do handle. Released, jobs.one goes on in order."""
    async def main() -> None:
        async with agents(mesh, "solo", discovery=False) as (agent,):
            gauge = _Gauge()
            release = asyncio.Event()

            async def work(msg: meshmq.Message) -> None:
                gauge.enter(msg.topic)
                if msg.topic == "jobs.one" and msg.data == 0:
                    await asyncio.wait_for(release.wait(), 10)
                gauge.leave(msg.topic, msg.data)

            sub = agent.subscribe("jobs.*", work, concurrency=8)
            await agent.publish("jobs.one", 0)
            await eventually(lambda: gauge.now == 1, what="jobs.one 0 in the handler")
            for i in range(1, 30):
                await agent.publish("jobs.one", i)
            await agent.publish("jobs.two", 0)
            await eventually(lambda: ("jobs.two", 0) in gauge.done, what="jobs.two handled by an idle worker")
            assert gauge.done == [("jobs.two", 0)] and sub.pending == 30  # one in hand, 29 behind it
            release.set()
            await eventually(lambda: len(gauge.done) == 31, what="every message handled")
            assert gauge.most == 2 and not gauge.overlap_in_a_key
            assert [d for t, d in gauge.done if t == "jobs.one"] == list(range(30))

    run(main())


def test_a_blocking_agents_handler_runs_on_concurrency_threads(mesh: str) -> None:
    """concurrency=3 on the blocking Agent: three handler threads work at once (each waits
    until all three are in), on three keys; each key keeps its order."""
    with meshmq.Agent("solo", mesh=mesh, discovery=False) as agent:
        lock = threading.Lock()
        inside: set[str] = set()
        three_in = threading.Event()
        done: list[tuple[str, int]] = []

        def work(msg: meshmq.Message) -> None:
            with lock:
                inside.add(threading.current_thread().name)
                if len(inside) == 3:
                    three_in.set()
            assert three_in.wait(10)
            with lock:
                done.append((msg.topic, msg.data))

        agent.subscribe("jobs.*", work, concurrency=3)
        for i in range(60):
            agent.publish(f"jobs.k{i % 3}", i)
        wait_until(lambda: len(done) == 60, what="every message handled")
        assert inside == {"meshmq-handler-jobs.*#1", "meshmq-handler-jobs.*#2", "meshmq-handler-jobs.*#3"}
        for k in range(3):
            assert [d for t, d in done if t == f"jobs.k{k}"] == list(range(k, 60, 3))


def test_closing_a_concurrent_subscription_lets_go_of_what_is_in_hand_and_held(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", discovery=False) as (agent,):
            started: list[int] = []
            never = asyncio.Event()

            async def stuck(msg: meshmq.Message) -> None:
                started.append(msg.data)
                await never.wait()  # until the subscription closes (its workers are cancelled)

            sub = agent.subscribe("jobs.*", stuck, concurrency=2)
            for i in range(6):  # jobs.a 0 2 4, jobs.b 1 3 5: two in hand, four behind them
                await agent.publish("jobs.a" if i % 2 == 0 else "jobs.b", i)
            await eventually(lambda: sub.pending == 6 and len(started) == 2, what="two in hand")
            assert sorted(started) == [0, 1]
            sub.close()
            await eventually(lambda: agent.stats().get("dropped_on_unsubscribe", 0) == 6, what="all six let go")
            assert sub.pending == 0

    run(main())


@pytest.mark.parametrize(("concurrency", "words"), [
    (0, "from 1 to subscription_queue_messages (10000), got 0"),
    (-2, "got -2"), (1.5, "got 1.5"), (True, "got True"), ("2", "got '2'"), (10_001, "got 10001"),
])
def test_a_bad_concurrency_is_refused(mesh: str, concurrency: Any, words: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", discovery=False) as (agent,):
            async def work(msg: meshmq.Message) -> None:
                pass

            with pytest.raises(meshmq.UsageError, match=re.escape(words)):
                agent.subscribe("jobs.*", work, concurrency=concurrency)
            assert agent.stats().get("dropped_on_unsubscribe", 0) == 0 and not agent._subs

    run(main())


def test_concurrency_is_for_handlers_that_can_use_it(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "solo", discovery=False) as (agent,):
            with pytest.raises(meshmq.UsageError, match="needs a coroutine handler on AsyncAgent"):
                agent.subscribe("jobs.*", lambda m: None, concurrency=2)
            later = agent.subscribe("jobs.*", concurrency=2)
            with pytest.raises(meshmq.UsageError, match="needs a coroutine handler on AsyncAgent"):
                later(lambda m: None)  # the decorator form checks too
            with pytest.raises(meshmq.UsageError, match="an iterating consumer takes one message at a time"):
                later.__aiter__()
            later.close()

    run(main())
    with meshmq.Agent("solo", mesh=mesh, discovery=False) as agent:
        sub = agent.subscribe("jobs.*", concurrency=2)
        with pytest.raises(meshmq.UsageError, match="an iterating consumer takes one message at a time"):
            sub.get(timeout=0)
