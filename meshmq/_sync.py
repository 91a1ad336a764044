"""The blocking face: :class:`Agent` runs an :class:`AsyncAgent` on its own thread.

One implementation, two faces (as python-zeroconf does). Control calls
(subscribe, stop, ...) hop to the loop thread and wait. ``publish`` checks and
encodes in the caller's thread and hands the envelope to the loop, which takes
what all threads handed over once per loop turn. With a durable store it then
waits for the commit; with ``durability="memory"`` it returns at once (nothing is
committed), waiting only when the loop is more than ``Config.blocking_intake_messages`` behind.
Plain handlers run on a thread of their subscription's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from ._agent import (
    AsyncAgent, DeadLetter, Handler, OutboxEntry, PeerInfo, RouteEntry, Subscription, _check_seconds, _Full,
)
from ._config import Config
from ._message import Message
from ._health import Health
from ._mirror import Tap
from ._errors import AgentClosed, MeshTimeout

T = TypeVar("T")


class Agent:
    """The meshmq agent for ordinary (blocking) Python code. Same API as :class:`AsyncAgent`.

    >>> with Agent("orders") as agent:
    ...     agent.publish("orders.placed", {"orderId": "ORD-1"}, type="OrderPlaced")
    """

    def __init__(self, service: str, *, config: Config | None = None, **overrides: Any) -> None:
        self._agent = AsyncAgent(service, config=config, **overrides)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Agent:
        if self._thread is not None:
            raise AgentClosed(f"agent {self.service!r} was already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"meshmq-{self.service}", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._run(self._agent.start(), timeout=30)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        """Say goodbye, flush (up to ``stop_timeout``), close, and end the agent's thread. Idempotent."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        if threading.get_ident() == self._thread.ident:
            raise AgentClosed("stop() cannot be called from a handler running on the agent's own thread")
        try:
            self._run(self._agent.stop(), timeout=self.config.stop_timeout + 10)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the agent's loop and wait for it (never from the loop itself)."""
        if self._loop is None or not self._loop.is_running():
            coro.close()
            raise AgentClosed(f"agent {self.service!r} is not started (use 'with' or call start())")
        if threading.get_ident() == self._thread.ident:  # type: ignore[union-attr]
            coro.close()
            raise AgentClosed("this blocking call cannot be made from the agent's own thread (inside a handler)")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise MeshTimeout(f"agent {self.service!r} did not answer within {timeout}s") from None

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the agent's loop and return its result."""
        async def call() -> T:
            return fn(*args)

        if self._loop is not None and self._thread is not None and threading.get_ident() == self._thread.ident:
            return fn(*args)
        if self._loop is None:
            return fn(*args)  # not started: nothing runs concurrently yet
        return self._run(call(), timeout=30)

    # --- the API --------------------------------------------------------------------

    @property
    def service(self) -> str:
        return self._agent.service

    @property
    def node_id(self) -> str:
        return self._agent.node_id

    @property
    def config(self) -> Config:
        return self._agent.config

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._agent.endpoints

    @property
    def running(self) -> bool:
        return self._agent.running

    def publish(self, topic: str, data: Any, *, type: str | None = None, key: str | None = None,
                headers: dict[str, str] | None = None, schema_version: int = 1, ttl: float | None = None) -> str:
        """See :meth:`AsyncAgent.publish`: returns once the message is committed to the outbox,
        waiting up to ``publish_timeout`` while the outbox is full. Concurrent publishes from
        several threads share commits; one thread publishing in a loop waits for one commit
        per message (use several threads, or :class:`AsyncAgent`, for throughput).

        With ``durability="memory"`` there is nothing to commit and it returns at once; an
        error found afterwards (the outbox stayed full) is raised by the next ``publish``.
        From a coroutine handler on the agent's loop it cannot wait: a full outbox raises at once.
        """
        agent = self._agent
        prepared = agent._prepare(topic, data, type, key, headers, schema_version, ttl)
        if agent._policy is not None:
            return self._publish_by_policy(prepared, data, type, key, headers, schema_version, ttl)
        if threading.get_ident() == agent._loop_thread:
            try:
                agent._enqueue(prepared)  # a commit cannot be waited for on the loop itself
            except _Full as full:
                raise agent._full_error(full.dest) from None
            return prepared[2].hex()
        # The intake limit (Config.blocking_intake_messages) keeps a batch small enough to be in
        # the CPU's caches when the loop thread takes it: at 10,000 the publishing process used
        # 5.6-6.1 us of CPU a message, at 1,000 4.7-5.0 (docs/benchmarks.md).
        cfg = agent.config
        if cfg.durability != "memory" or len(agent._intake) > cfg.blocking_intake_messages:
            future = agent._publish_threadsafe(prepared)
            assert future is not None
            return self._wait_published(future)
        error, agent._intake_error = agent._intake_error, None
        if error is not None:
            raise error
        agent._publish_threadsafe(prepared, wait=False)
        return prepared[2].hex()

    def _publish_by_policy(self, prepared: Any, data: Any, type_: str | None, key: str | None,
                           headers: dict[str, str] | None, schema_version: int, ttl: float | None) -> str:
        """:meth:`publish` under a policy: this thread waits out the rate limit (never the
        agent's loop), then the message and its content routes go as usual."""
        agent = self._agent
        topic = prepared[0]
        on_loop = threading.get_ident() == agent._loop_thread
        while (wait := agent._pace(topic, can_wait=not on_loop, mid=prepared[2])) > 0:
            time.sleep(wait)
        if wait < 0:
            agent._policy_dead_letter(prepared, topic)
            return str(prepared[2].hex())
        batch = [prepared] + [agent._prepare(to, data, type_, key, headers, schema_version, ttl)
                              for to in agent._routes_for(topic, data, type_, key, headers)]
        for one in batch:
            if on_loop:
                try:
                    agent._enqueue(one)
                except _Full as full:
                    raise agent._full_error(full.dest) from None
                continue
            future = agent._publish_threadsafe(one)
            assert future is not None
            self._wait_published(future)
        return str(prepared[2].hex())

    def _wait_published(self, future: concurrent.futures.Future[str]) -> str:
        try:
            return future.result(self.config.publish_timeout + 30)
        except concurrent.futures.TimeoutError:
            raise MeshTimeout(f"agent {self.service!r} did not take the message within "
                              f"{self.config.publish_timeout + 30:g}s") from None

    def outbox(self) -> list[OutboxEntry]:
        """See :meth:`AsyncAgent.outbox`."""
        return self._call(self._agent.outbox)

    def request(self, topic: str, data: Any, *, timeout: float = 5.0, type: str | None = None,
                key: str | None = None, headers: dict[str, str] | None = None, schema_version: int = 1) -> Message:
        """See :meth:`AsyncAgent.request`. Not from a handler (it would wait on its own thread)."""
        wait = _check_seconds("timeout", timeout)  # before the coroutine exists, so none is left unawaited
        coro = self._agent.request(topic, data, timeout=timeout, type=type, key=key, headers=headers,
                                   schema_version=schema_version)
        return self._run(coro, timeout=wait + 10)

    def subscribe(self, pattern: str, handler: Handler | None = None, *, queue: str | None = None,
                  durable: bool | None = None, concurrency: int = 1) -> Subscription:
        """See :meth:`AsyncAgent.subscribe`. Without a handler, iterate the subscription
        (``for msg in sub``) or call ``sub.get(timeout)``. A plain handler runs on threads of
        its own, ``concurrency`` of them."""
        return self._call(self._agent._subscribe, pattern, handler, queue, handler is None, True, durable,
                          concurrency)

    def tap(self, *patterns: str, events: bool | Iterable[str] = True) -> Tap:
        """See :meth:`AsyncAgent.tap`. Iterate the tap (``for event in tap``) or call
        ``tap.get(timeout)``."""
        return self._call(self._agent._tap, patterns, events, True)

    def on(self, type: str) -> Callable[[Handler], Handler]:
        """See :meth:`AsyncAgent.on`."""
        return self._agent.on(type)

    @property
    def dispatch(self) -> Callable[[Any], Any]:
        """Pass as a subscription's handler to dispatch by type (see :meth:`on`); the type
        handlers then run on the subscription's handler thread, like any of its handlers."""
        return self._agent._dispatch_blocking

    @property
    def subscriptions(self) -> list[Subscription]:
        return self._agent.subscriptions

    def peers(self, *, departed: bool = False) -> list[PeerInfo]:
        """See :meth:`AsyncAgent.peers`."""
        return self._call(lambda: self._agent.peers(departed=departed))

    def routes(self, topic: str | None = None) -> list[RouteEntry]:
        """See :meth:`AsyncAgent.routes`."""
        return self._call(self._agent.routes, topic)

    def schema(self, type: str, version: int, schema: dict[str, Any]) -> None:
        """See :meth:`AsyncAgent.schema`."""
        self._agent.schema(type, version, schema)

    def upcast(self, type: str, from_version: int, to_version: int) -> Callable[[Callable[[Any], Any]], Any]:
        """See :meth:`AsyncAgent.upcast`."""
        return self._agent.upcast(type, from_version, to_version)

    def push_policy(self, document: bytes) -> bool:
        """See :meth:`AsyncAgent.push_policy`."""
        return self._call(self._agent.push_policy, document)

    @property
    def policy_version(self) -> int:
        return self._agent.policy_version

    def push_schema(self, document: bytes) -> bool:
        """See :meth:`AsyncAgent.push_schema`."""
        return self._call(self._agent.push_schema, document)

    def health(self) -> Health:
        """See :meth:`AsyncAgent.health`."""
        return self._call(self._agent.health)

    def stats(self) -> dict[str, int]:
        return self._call(self._agent.stats)

    def dead_letters(self) -> list[DeadLetter]:
        """See :meth:`AsyncAgent.dead_letters`."""
        return self._call(self._agent.dead_letters)

    def replay_dead_letters(self, ids: list[str] | None = None) -> int:
        """See :meth:`AsyncAgent.replay_dead_letters`."""
        return self._run(self._agent.replay_dead_letters(ids), timeout=60)

    def purge_dead_letters(self, ids: list[str] | None = None) -> int:
        """See :meth:`AsyncAgent.purge_dead_letters`."""
        return self._run(self._agent.purge_dead_letters(ids), timeout=60)

    def wait_for_subscribers(self, topic: str, count: int = 1, timeout: float = 5.0) -> int:
        """See :meth:`AsyncAgent.wait_for_subscribers`."""
        wait = _check_seconds("timeout", timeout, zero=True)
        return self._run(self._agent.wait_for_subscribers(topic, count, wait), timeout=wait + 5)

    def wait_settled(self, timeout: float = 2.0, quiet_period: float = 0.3) -> int:
        """See :meth:`AsyncAgent.wait_settled`."""
        wait = _check_seconds("timeout", timeout, zero=True)
        return self._run(self._agent.wait_settled(wait, quiet_period), timeout=wait + 5)

    def add_revocation(self, revocation: bytes | str) -> bool:
        """See :meth:`AsyncAgent.add_revocation`."""
        return self._call(self._agent.add_revocation, revocation)

    def renew_certificate(self, certificate: bytes | str | os.PathLike[str]) -> None:
        """See :meth:`AsyncAgent.renew_certificate`."""
        self._call(self._agent.renew_certificate, certificate)

    def __repr__(self) -> str:
        return f"Agent({self.service!r}, node={self.node_id!r}, running={self.running})"
