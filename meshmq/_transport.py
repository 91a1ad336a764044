"""ZeroMQ transport: the shell that moves frames. No protocol decisions here.

Each agent binds one PULL socket (one endpoint per interface) and opens one PUSH
socket per peer endpoint. Every peer has a :class:`Link`: a bounded queue of
envelopes that the loop packs into DATA frames (up to ``max_batch_messages`` /
``max_batch_bytes`` each) and sends without blocking. A slow or vanished peer
fills only its own link; publishing to it then waits (back-pressure) and, after
``publish_timeout``, fails with :class:`PeerQueueFull`, while every other link
keeps flowing.

Links are filled from the loop thread or, by the blocking ``Agent``, from the
caller's thread; the queue and its counters are guarded by a lock, and the loop
is woken once per batch, not once per message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from ._wire import data_frame

log = logging.getLogger("meshmq.transport")


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
    """Everything waiting to go to one endpoint, and the socket it goes on."""

    __slots__ = (
        "endpoint", "socket", "node", "service", "queue", "queued", "queued_bytes", "lock",
        "scheduled", "frame", "next_seq", "watching", "closed", "max_messages", "max_bytes", "hot_until", "shared",
    )

    def __init__(self, endpoint: str, socket: zmq.Socket[bytes] | None, max_messages: int, max_bytes: int) -> None:
        self.endpoint = endpoint
        self.socket = socket
        self.node = ""
        self.service = ""
        self.queue: collections.deque[tuple[Any, int]] = collections.deque()
        self.queued = 0
        self.queued_bytes = 0
        self.lock = threading.Lock()
        self.scheduled = False
        self.frame: bytes | None = None  # built and sequenced, but refused by a full socket
        self.next_seq = 1
        self.watching = False
        self.closed = False
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.hot_until = 0.0  # a message left at once just now: batch what follows until then
        self.shared = True  # filled from several threads (blocking Agent): take() must lock

    def has_room(self) -> bool:
        return self.queued < self.max_messages and self.queued_bytes < self.max_bytes

    def put(self, entry: Any, size: int) -> bool:
        """Append one entry (from any thread); return True if the loop must be woken to flush."""
        with self.lock:
            return self.put_owned(entry, size)

    def put_owned(self, entry: Any, size: int) -> bool:
        """:meth:`put` for links that only the loop thread fills (a plain AsyncAgent): no lock."""
        self.queue.append((entry, size))
        self.queued += 1
        self.queued_bytes += size
        if self.scheduled:
            return False
        self.scheduled = True
        return True

    def take(self, max_messages: int, max_bytes: int) -> list[Any]:
        """Pop one batch: at most ``max_messages``, and ``max_bytes`` unless a single entry is larger."""
        q = self.queue
        if self.queued == 1 and len(q) == 1 and not self.shared:  # an idle link's single message
            entry, n = q.popleft()
            self.queued = 0
            self.queued_bytes -= n
            return [entry]
        with self.lock:
            batch: list[Any] = []
            size = 0
            while q and len(batch) < max_messages:
                entry, n = q[0]
                if batch and size + n > max_bytes:
                    break
                q.popleft()
                batch.append(entry)
                size += n
            self.queued -= len(batch)
            self.queued_bytes -= size
            return batch

    def take_or_idle(self, max_messages: int, max_bytes: int) -> list[Any]:
        """:meth:`take`; when nothing is left, mark the link idle (``scheduled`` cleared) and
        return ``[]``. Checked under the lock, so a concurrent :meth:`put` either lands in a
        batch or sees the link idle and wakes the loop: no wake-up is lost. Until then,
        publishers filling the link while it drains wake nobody."""
        while True:
            entries = self.take(max_messages, max_bytes)
            if entries:
                return entries
            with self.lock:
                if not self.queue:
                    self.scheduled = False
                    return entries

    def clear(self) -> int:
        """Drop everything waiting (the peer is gone); return how many entries were dropped."""
        with self.lock:
            n = self.queued + (1 if self.frame is not None else 0)
            self.queue.clear()
            self.queued = self.queued_bytes = 0
            self.frame = None
            return n


class Transport:
    """Sockets of one agent. Runs on the agent's event loop thread (``async_`` methods)."""

    def __init__(self, config: Any, node_id: str, on_frame: Callable[[bytes], None]) -> None:
        self.config = config
        self.node_id = node_id
        self.on_frame = on_frame
        self.epoch = 1
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.pull: zmq.Socket[bytes] | None = None
        self.endpoints: tuple[str, ...] = ()
        self.links: dict[str, Link] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reading = False
        self.space = threading.Condition()
        self.space_waiters = Wakeup()
        self.counters: collections.Counter[str] = collections.Counter()
        self.read_budget = 2000  # frames per loop turn before yielding to other work
        self.shared_links = True  # the agent clears this when only its loop thread fills links
        self.max_batch_messages = config.max_batch_messages
        self.max_batch_bytes = config.max_batch_bytes
        self.packer = msgpack.Packer(use_bin_type=True)  # used on the loop thread only
        self.frames_sent = 0
        self.messages_sent = 0

    # --- lifecycle ------------------------------------------------------------------

    def async_bind(self, loop: asyncio.AbstractEventLoop, endpoints: list[str]) -> tuple[str, ...]:
        self.loop = loop
        cfg = self.config
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
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

    def async_close(self, linger: float) -> None:
        if self.pull is not None and self.loop is not None:
            self.async_pause()
            self.pull.close(0)
            self.pull = None
        for link in list(self.links.values()):
            self._close_link(link, linger)
        self.links.clear()
        self.ctx.term()
        self._notify_space()

    # --- receiving ------------------------------------------------------------------

    def async_pause(self) -> None:
        """Stop reading the network (the application is behind); peers feel it as back-pressure."""
        if self.reading and self.pull is not None and self.loop is not None:
            self.loop.remove_reader(self.pull.FD)
            self.reading = False

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
        for _ in range(self.read_budget):
            try:
                frame = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            on_frame(frame)
            # Asking EVENTS re-arms the edge-triggered FD like a failed recv does, at a third of
            # the cost (no exception): it matters on few cores, where this work competes with
            # ZeroMQ's I/O thread carrying our reply.
            if not self.reading or not int(pull.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
        # Budget used up with frames still waiting: the FD will not signal again, so come back.
        assert self.loop is not None
        self.loop.call_soon(self._readable)

    # --- sending --------------------------------------------------------------------

    def async_connect(self, endpoint: str) -> Link:
        link = self.links.get(endpoint)
        if link is not None:
            return link
        cfg = self.config
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, cfg.socket_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(endpoint)
        link = Link(endpoint, sock, cfg.peer_queue_messages, cfg.peer_queue_bytes)
        link.shared = self.shared_links
        self.links[endpoint] = link
        return link

    def async_disconnect(self, endpoint: str) -> int:
        """Close a link; return how many queued entries were dropped with it."""
        link = self.links.pop(endpoint, None)
        if link is None:
            return 0
        dropped = link.clear()
        self._close_link(link, 0.0)
        self._notify_space()
        return dropped

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

    def wake(self, link: Link, threadsafe: bool) -> None:
        """Schedule a flush of ``link`` on the loop (from any thread)."""
        assert self.loop is not None
        if threadsafe:
            self.loop.call_soon_threadsafe(self.flush, link)
        else:
            self.loop.call_soon(self.flush, link)

    def flush(self, link: Link) -> None:
        """Send what waits on ``link``, batch by batch, until it is empty or the socket is full.

        While the socket is full the link stays scheduled: the writable watcher (or the
        tick's fallback) calls us again.
        """
        sock = link.socket
        if link.closed or sock is None:
            link.scheduled = False
            return
        was_full = link.queued >= link.max_messages or link.queued_bytes >= link.max_bytes
        while True:
            frame = link.frame
            if frame is None:
                entries = link.take_or_idle(self.max_batch_messages, self.max_batch_bytes)
                if not entries:
                    break
                frame = data_frame(self.node_id, self.epoch, link.next_seq, entries, self.packer)
                link.next_seq += len(entries)
                self.frames_sent += 1
                self.messages_sent += len(entries)
            try:
                sock.send(frame, zmq.NOBLOCK)
                link.frame = None
            except zmq.Again:
                link.frame = frame
                self._watch_writable(link)
                break
        if was_full and link.has_room():
            self._notify_space()

    def send_one(self, link: Link, entry: Any) -> bool:
        """Send one entry at once on an idle link (nothing queued or pending); False if the
        socket would block, and then the caller queues the entry as usual."""
        sock = link.socket
        if sock is None or link.closed:
            return False
        frame = data_frame(self.node_id, self.epoch, link.next_seq, [entry], self.packer)
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        link.next_seq += 1
        self.frames_sent += 1
        self.messages_sent += 1
        return True

    def flush_all(self) -> None:
        """Retry every link that has something waiting (timer fallback for missed wake-ups)."""
        for link in list(self.links.values()):
            if link.queued or link.frame is not None:
                self.flush(link)

    def pending(self) -> int:
        return sum(link.queued + (link.frame is not None) for link in self.links.values())

    def _watch_writable(self, link: Link) -> None:
        if link.watching or self.loop is None or link.socket is None:
            return
        link.watching = True
        sock = link.socket

        def writable() -> None:
            if link.closed:
                return
            if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT:
                assert self.loop is not None
                self.loop.remove_reader(sock.FD)
                link.watching = False
                self.flush(link)

        self.loop.add_reader(sock.FD, writable)
        # The socket may have become writable between the failed send and now.
        self.loop.call_soon(writable)

    # --- back-pressure waiting ---------------------------------------------------------

    def _notify_space(self) -> None:
        with self.space:
            self.space.notify_all()
        self.space_waiters.fire()

    async def async_wait_space(self, timeout: float) -> None:
        await self.space_waiters.wait(timeout)

    def wait_space_blocking(self, timeout: float) -> None:
        with self.space:
            self.space.wait(timeout)
