"""ZeroMQ transport: the shell that moves frames. No protocol decisions here.

Each agent binds one PULL socket (one endpoint per interface) and opens one PUSH
socket per peer endpoint (a :class:`Link`). Every hop runs CurveZMQ: the PULL socket
is a CURVE server with the node's key, each PUSH socket a CURVE client that knows the
peer's key from its endpoint (``tcp://host:port#KEY``). The connecting key reaches
the agent with every frame (ZAP sets it as the frame's User-Id), so the agent acts on
a frame only when it comes from the node it claims to be from; the ZAP handler
refuses keys the agent has banned. (An agent run with ``insecure=True`` uses plain
sockets and reaches only endpoints without a key, so it never talks to a secure one.)
What to send is not kept here: when a
link may send, the transport asks ``produce(link)`` for frames (the outbox builds
them from the destination's stream) and sends them without blocking until the
socket is full; then it waits for the socket to become writable. A slow or
vanished peer fills only its own socket. Everything runs on the agent's loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from ._log import QuietLogger
from ._security import curve_public_of, unb64
from ._wire import split_endpoint

log = logging.getLogger("meshmq.transport")
quiet = QuietLogger(log)
ZAP_DOMAIN = "meshmq"
# Plain ints: ``int & zmq.POLLIN`` would build an enum member on every test (a hot path).
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


class Wakeup:
    """Coroutines waiting (with a timeout) for something that may have changed; :meth:`fire`
    wakes them all, and they look again. Loop thread only."""

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    async def wait(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        try:
            await asyncio.wait_for(fut, max(timeout, 0.0))
        except asyncio.TimeoutError:
            pass

    def fire(self) -> None:
        futures, self._futures = self._futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)


class Link:
    """The socket to one peer endpoint, and the frames built for it that the socket refused."""

    __slots__ = ("endpoint", "socket", "node", "service", "scheduled", "frames", "watching", "closed", "hot_until")

    def __init__(self, endpoint: str, socket: zmq.Socket[bytes] | None) -> None:
        self.endpoint = endpoint
        self.socket = socket
        self.node = ""
        self.service = ""
        self.scheduled = False  # a flush is due on the loop
        self.frames: collections.deque[bytes] = collections.deque()  # built, refused by a full socket
        self.watching = False
        self.closed = False
        self.hot_until = 0.0  # a message left at once just now: batch what follows until then


class Transport:
    """Sockets of one agent. Runs on the agent's event loop thread (``async_`` methods)."""

    def __init__(self, config: Any, node_id: str, on_frame: Callable[[bytes, str], None],
                 produce: Callable[[Link], list[bytes]], curve_keys: tuple[bytes, bytes] | None) -> None:
        self.config = config
        self.node_id = node_id
        self.on_frame = on_frame
        self.produce = produce
        self.secure = curve_keys is not None
        """False for an agent run with ``insecure=True``: plain ZeroMQ, and only to endpoints
        without a key (a keyed endpoint is a secure node's, which must not be reached)."""
        self.curve_public, self.curve_secret = curve_keys or (b"", b"")
        self.banned: set[str] = set()
        """Connecting keys the ZAP handler refuses (read from its thread; replaced, never mutated)."""
        self.authenticator: Any = None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.pull: zmq.Socket[bytes] | None = None
        self.endpoints: tuple[str, ...] = ()
        self.links: dict[str, Link] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reading = False
        self.counters: collections.Counter[str] = collections.Counter()
        self.read_budget = 2000  # frames per loop turn before yielding to other work
        self.read_slice: float = config.read_slice
        """Seconds of reading per loop turn before yielding to other work. A frame may hold
        hundreds of messages: without a time limit, a backlog kept the loop for seconds and
        starved the timers that send receipts, so publishers sent everything again."""
        self.behind = False
        """Frames wait unread after a loop turn's budget (set until a turn empties the socket)."""
        self.frames_sent = 0

    # --- lifecycle ------------------------------------------------------------------

    def async_bind(self, loop: asyncio.AbstractEventLoop, endpoints: list[str]) -> tuple[str, ...]:
        self.loop = loop
        cfg = self.config
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        if self.secure:
            from zmq.auth.thread import ThreadAuthenticator

            self.authenticator = ThreadAuthenticator(self.ctx, log=log)
            self.authenticator.start()
            self.authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)
            pull.setsockopt(zmq.CURVE_SERVER, 1)
            pull.setsockopt(zmq.CURVE_PUBLICKEY, self.curve_public)
            pull.setsockopt(zmq.CURVE_SECRETKEY, self.curve_secret)
            pull.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        pull.setsockopt(zmq.RCVHWM, cfg.socket_hwm)
        pull.setsockopt(zmq.MAXMSGSIZE, cfg.max_frame_bytes)
        if any("[" in ep for ep in endpoints):
            pull.setsockopt(zmq.IPV6, 1)
        bound = []
        try:
            for ep in endpoints:
                pull.bind(ep)
                bound.append(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError:
            pull.close(0)
            raise
        self.pull = pull
        self.endpoints = tuple(bound)
        self.async_resume()
        return self.endpoints

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP (on the authenticator's thread): admit a connecting CURVE key unless banned. Who
        it is is settled per frame: a stranger gets no further than a HELLO whose certificate
        names this very key."""
        if key.decode() in self.banned:
            self.counters["connections_refused"] += 1
            return False
        return True

    def async_close(self, linger: float) -> None:
        if self.pull is not None and self.loop is not None:
            self.async_pause()
            self.pull.close(0)
            self.pull = None
        for link in list(self.links.values()):
            self._close_link(link, linger)
        self.links.clear()
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        self.ctx.term()

    # --- receiving ------------------------------------------------------------------

    def async_pause(self) -> None:
        """Stop reading the network (closing). An agent whose application is behind reads on and
        sets data aside instead (``AsyncAgent._overloaded``), so that it still answers its peers."""
        if self.reading and self.pull is not None and self.loop is not None:
            self.loop.remove_reader(self.pull.FD)
            self.reading = False
            self.behind = False  # nothing more will be read meanwhile: nobody should wait for it

    def async_resume(self) -> None:
        if not self.reading and self.pull is not None and self.loop is not None:
            self.loop.add_reader(self.pull.FD, self._readable)
            self.reading = True
            # The FD is edge-triggered: frames that arrived while paused raise no new edge.
            self.loop.call_soon(self._readable)

    def _readable(self) -> None:
        pull = self.pull
        if pull is None or not self.reading:
            return
        recv = pull.recv
        on_frame = self.on_frame
        secure = self.secure
        clock = time.monotonic
        until = clock() + self.read_slice
        for _ in range(self.read_budget):
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.behind = False
                return
            try:
                # A named property such as User-Id comes back as a str (pyzmq types get as int | str).
                on_frame(frame.bytes, frame.get("User-Id") if secure else "")  # type: ignore[arg-type]
            except Exception:  # a fault of ours with one frame must not end the reading
                self.counters["frames_failed"] += 1
                quiet.log(logging.ERROR, "frame-failed", "handling a received frame failed (a meshmq bug; "
                          "the frame is dropped)", exc_info=True)
            # Asking EVENTS re-arms the edge-triggered FD like a failed recv does, at a third of
            # the cost (no exception): it matters on few cores, where this work competes with
            # ZeroMQ's I/O thread carrying our reply.
            if not self.reading or not pull.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                self.behind = False
                return
            if clock() >= until:
                break
        # Budget used up with frames still waiting: the FD will not signal again, so come back.
        self.behind = True
        assert self.loop is not None
        self.loop.call_soon(self._readable)

    # --- sending --------------------------------------------------------------------

    def async_connect(self, endpoint: str) -> Link | None:
        """The link to ``endpoint#KEY`` (opened now if new); None for an endpoint without the
        node's key, which CurveZMQ cannot reach (counted)."""
        link = self.links.get(endpoint)
        if link is not None:
            return link
        plain, key = split_endpoint(endpoint)
        server_key = b""
        if not self.secure:
            if key is not None:
                self.counters["endpoints_secure"] += 1  # a secure node: insecure ones never reach it
                return None
        elif key is None:
            self.counters["endpoints_without_key"] += 1
            return None
        else:
            try:
                server_key = curve_public_of(unb64(key))
            except Exception:  # not a point on the curve: no node can hold its secret
                self.counters["endpoints_bad_key"] += 1
                return None
        cfg = self.config
        sock = self.ctx.socket(zmq.PUSH)
        if self.secure:
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve_public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve_secret)
        sock.setsockopt(zmq.SNDHWM, cfg.socket_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if plain.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(plain)
        link = Link(endpoint, sock)
        self.links[endpoint] = link
        return link

    def async_disconnect(self, endpoint: str) -> None:
        """Close a link (what it had not sent stays in the outbox)."""
        link = self.links.pop(endpoint, None)
        if link is not None:
            link.frames.clear()
            self._close_link(link, 0.0)

    def async_send_and_close(self, endpoint: str, frame: bytes, linger: float) -> None:
        """Send one last frame on a link and close it, leaving the frame up to ``linger``
        seconds to go out (a revoked peer is told why it is cut off)."""
        link = self.links.pop(endpoint, None)
        if link is None:
            return
        link.frames.clear()
        if link.socket is not None:
            try:
                link.socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                self.counters["control_frames_deferred"] += 1
        self._close_link(link, linger)

    def _close_link(self, link: Link, linger: float) -> None:
        link.closed = True
        if link.socket is not None:
            if link.watching and self.loop is not None:
                self.loop.remove_reader(link.socket.FD)
            link.socket.close(int(linger * 1000))

    def async_send_control(self, endpoint: str, frame: bytes) -> None:
        """Send a control frame; control traffic is small and rare, so a full socket just drops it
        (the protocol repeats hellos and pings on its own)."""
        link = self.links.get(endpoint)
        if link is None or link.socket is None:
            return
        try:
            link.socket.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.counters["control_frames_deferred"] += 1

    def async_send_now(self, endpoint: str, frame: bytes) -> bool:
        """Send ``frame`` if the socket takes it at once; False if it is full (or gone): for
        traffic that is dropped, counted, rather than waited for (a tap's mirror)."""
        link = self.links.get(endpoint)
        if link is None or link.socket is None:
            return False
        try:
            link.socket.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def wake(self, link: Link) -> None:
        """Have ``link`` flushed soon (once, however often it is woken meanwhile)."""
        if not link.scheduled and not link.watching:
            link.scheduled = True
            assert self.loop is not None
            self.loop.call_soon(self.flush, link)

    def flush(self, link: Link) -> None:
        """Send what ``link``'s destination has due, frame by frame, until nothing is due or
        the socket is full; then the writable watcher (or the outbox's timer) comes back."""
        link.scheduled = False
        sock = link.socket
        if link.closed or sock is None:
            return
        frames = link.frames
        while True:
            if not frames:
                more = self.produce(link)
                if not more:
                    return
                frames.extend(more)
            try:
                sock.send(frames[0], zmq.NOBLOCK)
            except zmq.Again:
                self._watch_writable(link)
                return
            frames.popleft()
            self.frames_sent += 1

    def flush_all(self) -> None:
        """Flush every link (timer fallback for a missed writable edge)."""
        for link in list(self.links.values()):
            if not link.watching:
                self.flush(link)

    def _watch_writable(self, link: Link) -> None:
        if link.watching or self.loop is None or link.socket is None:
            return
        link.watching = True
        sock = link.socket

        def writable() -> None:
            if link.closed:
                return
            if sock.getsockopt(_EVENTS) & _POLLOUT:  # type: ignore[operator]
                assert self.loop is not None
                self.loop.remove_reader(sock.FD)
                link.watching = False
                self.flush(link)

        self.loop.add_reader(sock.FD, writable)
        # The socket may have become writable between the failed send and now.
        self.loop.call_soon(writable)


