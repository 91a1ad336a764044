"""The socket shell: how reading a backlog shares the event loop with everything else."""

from __future__ import annotations

import asyncio
import time

import zmq
from aio import eventually, run

from meshmq import Config
from meshmq._transport import Transport


def test_reading_a_backlog_yields_to_timers_after_its_time_slice() -> None:
    """A frame may carry hundreds of messages. Reading a backlog of them in one loop turn
    starved the timers, among them the one that sends receipts, for seconds."""
    frames = 40

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[bytes] = []

        def on_frame(frame: bytes, peer: str) -> None:
            seen.append(frame)
            busy_until = time.monotonic() + 0.002  # the work of a frame full of messages
            while time.monotonic() < busy_until:
                pass

        transport = Transport(Config(), "reader", on_frame, lambda link: [], None)
        endpoint = transport.async_bind(loop, ["inproc://backlog"])[0]
        push = transport.ctx.socket(zmq.PUSH)
        try:
            push.connect(endpoint)
            for i in range(frames):  # inproc: queued at the reader before the loop runs again
                push.send(b"%d" % i)
            read_when_the_timer_ran: list[int] = []
            loop.call_later(0, lambda: read_when_the_timer_ran.append(len(seen)))
            await eventually(lambda: len(seen) == frames, what="every frame read")
            assert seen == [b"%d" % i for i in range(frames)]  # in order, none lost
            # Each read goes on at most a slice (and one frame over it). Two reads may come
            # before the timer: the catch-up read queued at bind and the socket's own.
            per_read = int(transport.read_slice / 0.002) + 1
            assert read_when_the_timer_ran and read_when_the_timer_ran[0] <= 2 * per_read, read_when_the_timer_ran
            assert not transport.behind
        finally:
            push.close(0)
            transport.async_close(0)

    run(main(), timeout=30)


def test_a_frame_whose_handling_fails_is_counted_and_the_reading_goes_on() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[bytes] = []

        def on_frame(frame: bytes, peer: str) -> None:
            if frame == b"1":
                raise KeyError("a bug of ours")
            seen.append(frame)

        transport = Transport(Config(), "reader", on_frame, lambda link: [], None)
        endpoint = transport.async_bind(loop, ["inproc://failing"])[0]
        push = transport.ctx.socket(zmq.PUSH)
        try:
            push.connect(endpoint)
            for i in range(4):
                push.send(b"%d" % i)
            await eventually(lambda: len(seen) == 3, what="the other frames read")
            assert seen == [b"0", b"2", b"3"] and transport.counters["frames_failed"] == 1
            assert not transport.behind
        finally:
            push.close(0)
            transport.async_close(0)

    run(main(), timeout=30)
