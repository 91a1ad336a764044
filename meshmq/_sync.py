"""The blocking face: :class:`Agent` runs an :class:`AsyncAgent` on its own thread.

One implementation, two faces (as python-zeroconf does). Control calls
(subscribe, stop, ...) hop to the loop thread and wait. ``publish`` does not pay
a hop per message: it checks and encodes in the caller's thread, puts the
envelope on the destination links (thread-safe), and wakes the loop once per
batch. Handlers run on the agent's thread; keep them short or hand work off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._agent import AsyncAgent, DeadLetter, Handler, PeerInfo, RouteEntry, Subscription, _check_seconds, _Full
from ._config import Config
from ._message import Message
from ._errors import AgentClosed, MeshTimeout

T = TypeVar("T")


class Agent:
    """The meshmq agent for ordinary (blocking) Python code. Same API as :class:`AsyncAgent`.

    >>> with Agent("orders") as agent:
    ...     agent.publish("orders.placed", {"orderId": "ORD-1"}, type="OrderPlaced")
    """

    def __init__(self, service: str, *, config: Config | None = None, **overrides: Any) -> None:
        self._agent = AsyncAgent(service, config=config, **overrides)
        self._agent._shared_links = True  # our callers' threads publish too
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
        """See :meth:`AsyncAgent.publish`. Blocks up to ``publish_timeout`` while a destination is full.

        From a handler (the agent's own thread) it cannot wait: a full destination raises at once.
        """
        agent = self._agent
        prepared = agent._prepare(topic, data, type, key, headers, schema_version, ttl)
        on_loop = threading.get_ident() == agent._loop_thread
        try:
            return agent._enqueue(prepared, threadsafe=not on_loop)
        except _Full as full:
            if on_loop:
                raise agent._full_error(full.link) from None
        deadline = time.monotonic() + agent.config.publish_timeout
        while True:  # back-pressure: wait for room, bounded by publish_timeout
            remaining = deadline - time.monotonic()
            assert agent._transport is not None
            agent._transport.wait_space_blocking(min(remaining, 0.05))
            try:
                return agent._enqueue(prepared, threadsafe=True)
            except _Full as full:
                if deadline - time.monotonic() <= 0:
                    raise agent._full_error(full.link) from None

    def request(self, topic: str, data: Any, *, timeout: float = 5.0, type: str | None = None,
                key: str | None = None, headers: dict[str, str] | None = None, schema_version: int = 1) -> Message:
        """See :meth:`AsyncAgent.request`. Not from a handler (it would wait on its own thread)."""
        wait = _check_seconds("timeout", timeout)  # before the coroutine exists, so none is left unawaited
        coro = self._agent.request(topic, data, timeout=timeout, type=type, key=key, headers=headers,
                                   schema_version=schema_version)
        return self._run(coro, timeout=wait + 10)

    def subscribe(self, pattern: str, handler: Handler | None = None, *, queue: str | None = None) -> Subscription:
        """See :meth:`AsyncAgent.subscribe`. Without a handler, iterate the subscription
        (``for msg in sub``) or call ``sub.get(timeout)``."""
        return self._call(self._agent._subscribe, pattern, handler, queue, handler is None, True)

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

    def __repr__(self) -> str:
        return f"Agent({self.service!r}, node={self.node_id!r}, running={self.running})"
