#!/usr/bin/env python3
"""meshmq vs raw pyzmq: throughput and round-trip latency between two processes on loopback.

One run measures, each between two fresh OS processes on 127.0.0.1:

a) raw pyzmq PUSH -> PULL throughput (one ``send``/``recv`` per message, default options);
b) meshmq throughput, :class:`meshmq.AsyncAgent` publisher -> subscriber agent whose plain
   function handler counts;
c) the same with the blocking :class:`meshmq.Agent` publisher;
d) round-trip latency: raw zmq ping-pong (a PUSH/PULL pair each way) vs meshmq ping-pong
   (A publishes on ``bench.ping``; B's handler answers with ``publish_nowait`` on
   ``bench.pong``; A stamps the time in its ``bench.pong`` handler).

Throughput is measured by the receiver, from the first message to the last
((N - 1) / elapsed). Each measurement is repeated ``--repeat`` times, raw and meshmq
interleaved (and rotated) so that they see the same machine conditions; the table shows
the best and the median. Agents use static seeds with mDNS off and a unique mesh name.

Every child process has a hard time limit (``--phase-timeout``, also enforced inside the
child by ``SIGALRM``); on any failure the children this script started are killed by PID.

    python tools/bench.py                      # the table
    python tools/bench.py --check              # exit 1 if a bar is missed
    python tools/bench.py --json               # machine-readable results on stdout
    python tools/bench.py --profile /tmp/prof  # also write cProfile stats of the meshmq children
    python tools/bench.py --profile /tmp/prof --profiler py-spy  # sampled stacks instead

    python tools/bench.py --security both      # also insecure agents, in the same rounds

Bars (``--check``, on the medians): meshmq throughput >= 0.25x raw pyzmq (both
publishers), meshmq p50 round trip <= 1.5x raw zmq; with ``--security both``, security
costs at most 30% of throughput (secure >= 0.70x insecure, both publishers).

Agents are secure by default, as meshmq's are: CurveZMQ on every hop, data frames
signed and encrypted end to end. ``--security insecure`` runs them with
``insecure=True``; ``both`` measures the two side by side, rotated with the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import secrets
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

TOPIC = "bench.tp"
PING, PONG = "bench.ping", "bench.pong"
HOST = "127.0.0.1"  # never another address
THROUGHPUT_BAR = 0.25
LATENCY_BAR = 1.5
SECURITY_BAR = 0.70  # secure throughput / insecure throughput
_MARK = "@bench "
_CPUS: list[int] | None = None  # --cpus: pin every child process to these CPUs


# ======================================================================================
# Child side: each role runs in its own process, talks to the parent by JSON lines on
# stdout ("@bench {...}") and reads commands ("quit") on stdin.
# ======================================================================================


def emit(**obj: Any) -> None:
    sys.stdout.write(_MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_quit() -> None:
    """Block until the parent says quit (or goes away: EOF)."""
    sys.stdin.readline()


async def async_wait_quit() -> None:
    import asyncio

    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def payload(size: int, seq: int = 0) -> bytes:
    head = seq.to_bytes(8, "big")
    return head + b"x" * max(0, size - len(head)) if size >= 8 else b"x" * size


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    n = len(s)

    def pct(p: float) -> float:  # nearest rank
        return s[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] / 1000.0

    return {
        "count": n, "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99),
        "min_us": s[0] / 1000.0, "max_us": s[-1] / 1000.0, "mean_us": sum(s) / n / 1000.0,
    }


# --- raw pyzmq --------------------------------------------------------------------------


def role_raw_pull(a: dict[str, Any]) -> None:
    import zmq

    n, size = a["n"], a["size"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(a["timeout"] * 1000))  # bounds every recv
    port = sock.bind_to_random_port(f"tcp://{HOST}")
    emit(event="ready", endpoint=f"tcp://{HOST}:{port}")
    recv = sock.recv
    first = recv()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        recv()
    t1 = time.perf_counter()
    assert len(first) == size, (len(first), size)
    emit(event="result", count=n, elapsed=t1 - t0, rate=(n - 1) / (t1 - t0))
    wait_quit()
    sock.close(0)
    ctx.term()


def role_raw_push(a: dict[str, Any]) -> None:
    import zmq

    n, data = a["n"], payload(a["size"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a["endpoint"])
    send = sock.send
    t0 = time.perf_counter()
    for _ in range(n):
        send(data)
    t1 = time.perf_counter()
    emit(event="sent", count=n, elapsed=t1 - t0, rate=n / (t1 - t0))
    wait_quit()  # the parent says quit once the receiver has everything
    sock.close(0)
    ctx.term()


def role_raw_echo(a: dict[str, Any]) -> None:
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, int(a["timeout"] * 1000))
    port = pull.bind_to_random_port(f"tcp://{HOST}")
    emit(event="ready", endpoint=f"tcp://{HOST}:{port}")
    back = pull.recv().decode()  # handshake: the pinger's endpoint
    assert back.startswith(f"tcp://{HOST}:"), back
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(back)
    recv, send = pull.recv, push.send
    for _ in range(a["max"]):
        msg = recv()
        if not msg:
            break
        send(msg)
    wait_quit()
    pull.close(0)
    push.close(0)
    ctx.term()


def _raw_pinger_sockets(a: dict[str, Any], echo_endpoint: str) -> tuple[Any, Any, Any]:
    """(context, pull, push) of a raw pinger, after telling the raw echo where to answer."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, int(a["timeout"] * 1000))
    port = pull.bind_to_random_port(f"tcp://{HOST}")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(echo_endpoint)
    push.send(f"tcp://{HOST}:{port}".encode())
    return ctx, pull, push


def role_raw_ping(a: dict[str, Any]) -> None:
    size, rounds, warmup = a["size"], a["rounds"], a["warmup"]
    ctx, pull, push = _raw_pinger_sockets(a, a["endpoint"])
    recv, send, clock = pull.recv, push.send, time.perf_counter_ns
    msgs = [payload(size, i) for i in range(warmup + rounds)]
    samples = []
    for i, msg in enumerate(msgs):
        t0 = clock()
        send(msg)
        got = recv()
        t1 = clock()
        if got != msg:
            raise SystemExit(f"raw ping {i}: wrong answer")
        if i >= warmup:
            samples.append(t1 - t0)
    push.send(b"")  # tells the echo to stop
    emit(event="result", **percentiles(samples))
    wait_quit()
    pull.close(0)
    push.close(0)
    ctx.term()


# --- meshmq -------------------------------------------------------------------------------


def _agent_kwargs(a: dict[str, Any], **more: Any) -> dict[str, Any]:
    # durability "memory": the outbox in memory only (the non-durable path), no state left behind.
    kw: dict[str, Any] = {"mesh": a["mesh"], "discovery": False, "interfaces": [HOST], "durability": "memory",
                          "insecure": bool(a.get("insecure"))}
    kw.update(more)
    return kw


def role_mq_sub(a: dict[str, Any]) -> None:
    import asyncio

    import meshmq

    n, size = a["n"], a["size"]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        state = {"count": 0, "t0": 0.0, "t1": 0.0, "c0": 0.0, "c1": 0.0, "size": -1}
        clock, cpu = time.perf_counter, time.process_time

        def handler(msg: meshmq.Message) -> None:
            c = state["count"] = state["count"] + 1
            if c == 1:
                state["t0"], state["c0"] = clock(), cpu()
                state["size"] = len(msg.raw)
            elif c == n:
                state["t1"], state["c1"] = clock(), cpu()
                done.set_result(None)

        agent = meshmq.AsyncAgent("bench-sub", **_agent_kwargs(a))
        agent.subscribe(TOPIC, handler)
        await agent.start()
        try:
            emit(event="ready", endpoint=agent.endpoints[0])
            try:
                await asyncio.wait_for(done, a["timeout"])
            except asyncio.TimeoutError:
                emit(event="error", error=f"received {state['count']} of {n} messages in {a['timeout']}s",
                     stats=agent.stats())
                return
            assert state["size"] == size, (state["size"], size)
            elapsed = state["t1"] - state["t0"]
            emit(event="result", count=n, elapsed=elapsed, rate=(n - 1) / elapsed, stats=agent.stats(),
                 cpu_us=(state["c1"] - state["c0"]) / (n - 1) * 1e6)
            await async_wait_quit()
        finally:
            await agent.stop()

    _run_profiled(lambda: asyncio.run(main()), a)


def role_mq_pub_async(a: dict[str, Any]) -> None:
    import asyncio

    import meshmq

    n, data = a["n"], payload(a["size"])

    async def main() -> None:
        agent = meshmq.AsyncAgent("bench-pub", **_agent_kwargs(a, seeds=[a["endpoint"]], stop_timeout=30.0))
        await agent.start()
        try:
            await agent.wait_for_subscribers(TOPIC, timeout=15)
            publish = agent.publish
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                await publish(TOPIC, data)
            t1, c1 = time.perf_counter(), time.process_time()
            emit(event="sent", count=n, elapsed=t1 - t0, rate=n / (t1 - t0), cpu_us=(c1 - c0) / n * 1e6)
            await async_wait_quit()
            emit(event="stats", stats=agent.stats())
        finally:
            await agent.stop()

    _run_profiled(lambda: asyncio.run(main()), a)


def role_mq_pub_sync(a: dict[str, Any]) -> None:
    import meshmq

    n, data = a["n"], payload(a["size"])

    def main() -> None:
        agent = meshmq.Agent("bench-pub", **_agent_kwargs(a, seeds=[a["endpoint"]], stop_timeout=30.0))
        agent.start()
        loop_prof = None
        if a.get("profile"):  # cProfile is per thread: profile the agent's loop thread too
            import cProfile
            import threading

            loop_prof = cProfile.Profile()
            started = threading.Event()
            agent._loop.call_soon_threadsafe(lambda: (loop_prof.enable(), started.set()))  # type: ignore[union-attr]
            started.wait(10)
        try:
            agent.wait_for_subscribers(TOPIC, timeout=15)
            publish = agent.publish
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                publish(TOPIC, data)
            t1, c1 = time.perf_counter(), time.process_time()
            emit(event="sent", count=n, elapsed=t1 - t0, rate=n / (t1 - t0), cpu_us=(c1 - c0) / n * 1e6)
            wait_quit()
            emit(event="stats", stats=agent.stats())
        finally:
            if loop_prof is not None:
                import threading

                stopped = threading.Event()
                agent._loop.call_soon_threadsafe(lambda: (loop_prof.disable(), stopped.set()))  # type: ignore[union-attr]
                stopped.wait(10)
                loop_prof.dump_stats(os.path.join(a["profile"], f"{a['tag']}-loopthread.pstats"))
            agent.stop()

    _run_profiled(main, a)


def role_mq_echo(a: dict[str, Any]) -> None:
    import asyncio

    import meshmq

    async def main() -> None:
        agent = meshmq.AsyncAgent("bench-echo", **_agent_kwargs(a))
        publish_nowait = agent.publish_nowait

        def on_ping(msg: meshmq.Message) -> None:
            publish_nowait(PONG, msg.raw)

        agent.subscribe(PING, on_ping)
        await agent.start()
        try:
            emit(event="ready", endpoint=agent.endpoints[0])
            await async_wait_quit()
        finally:
            await agent.stop()

    _run_profiled(lambda: asyncio.run(main()), a)


class MeshPinger:
    """The meshmq side of a latency run: publishes on bench.ping, times the matching bench.pong."""

    def __init__(self, a: dict[str, Any]) -> None:
        import asyncio

        import meshmq

        self.loop = asyncio.get_running_loop()
        self.head: bytes | None = None
        self.fut: Any = None
        self.t1 = 0
        self.agent = meshmq.AsyncAgent("bench-ping", **_agent_kwargs(a, seeds=[a["endpoint"]]))
        self.agent.subscribe(PONG, self._on_pong)

    def _on_pong(self, msg: Any) -> None:
        if self.fut is not None and not self.fut.done() and msg.raw[:8] == self.head:
            self.t1 = time.perf_counter_ns()  # delivered to the application: the round trip is over
            self.fut.set_result(None)

    async def start(self) -> None:
        await self.agent.start()
        await self.agent.wait_for_subscribers(PING, timeout=15)

    async def round(self, msg: bytes, timeout: float | None = None) -> int | None:
        """One round trip in ns; with ``timeout`` (warm-up only) None when no answer came."""
        import asyncio

        self.head, self.fut = msg[:8], self.loop.create_future()
        t0 = time.perf_counter_ns()
        await self.agent.publish(PING, msg)
        if timeout is None:  # measured: no per-ping timer (it would add cost); the phase watchdog bounds it
            await self.fut
        else:
            try:
                await asyncio.wait_for(self.fut, timeout)
            except asyncio.TimeoutError:
                return None  # the echo may not route bench.pong to us yet
        return self.t1 - t0

    async def warm_up(self, size: int, warmup: int, before: Any = None) -> None:
        """``warmup`` answered round trips; a lost answer is retried (bounded)."""
        ok = tries = 0
        while ok < warmup:
            tries += 1
            if tries > warmup + 200:
                raise SystemExit(f"meshmq warm-up: {ok} of {warmup} answers after {tries} pings")
            if before is not None:
                before(tries)
            if await self.round(payload(size, tries), 1.0) is not None:
                ok += 1


def role_mq_ping(a: dict[str, Any]) -> None:
    import asyncio

    size, rounds, warmup = a["size"], a["rounds"], a["warmup"]

    async def main() -> None:
        pinger = MeshPinger(a)
        await pinger.start()
        try:
            await pinger.warm_up(size, warmup)
            task = asyncio.current_task()
            assert task is not None
            watchdog = pinger.loop.call_later(a["timeout"], task.cancel)
            samples = [await pinger.round(payload(size, 1_000_000 + i)) for i in range(rounds)]
            watchdog.cancel()
            emit(event="result", stats=pinger.agent.stats(), **percentiles(samples))  # type: ignore[arg-type]
            await async_wait_quit()
        finally:
            await pinger.agent.stop()

    _run_profiled(lambda: asyncio.run(main()), a)


def role_pair_ping(a: dict[str, Any]) -> None:
    """Raw zmq and meshmq round trips from one process, alternating one by one, so both see
    the same machine conditions (a shared machine drifts between runs seconds apart)."""
    import asyncio

    size, rounds, warmup = a["size"], a["rounds"], a["warmup"]
    ctx, pull, push = _raw_pinger_sockets(a, a["raw_endpoint"])
    clock = time.perf_counter_ns

    def raw_round(msg: bytes) -> int:
        t0 = clock()
        push.send(msg)
        got = pull.recv()
        t1 = clock()
        if got != msg:
            raise SystemExit("raw ping: wrong answer")
        return t1 - t0

    async def main() -> None:
        pinger = MeshPinger(a)
        await pinger.start()
        try:
            await pinger.warm_up(size, warmup, before=lambda tries: raw_round(payload(size, tries)))
            task = asyncio.current_task()
            assert task is not None
            watchdog = pinger.loop.call_later(a["timeout"], task.cancel)
            raw_samples, mq_samples = [], []
            for i in range(rounds):
                msg = payload(size, 1_000_000 + i)
                if i % 2:  # alternate which goes first, so neither always follows the other
                    raw_samples.append(raw_round(msg))
                    mq_samples.append(await pinger.round(msg))  # type: ignore[arg-type]
                else:
                    mq_samples.append(await pinger.round(msg))  # type: ignore[arg-type]
                    raw_samples.append(raw_round(msg))
            watchdog.cancel()
            push.send(b"")  # tells the raw echo to stop
            emit(event="result", raw=percentiles(raw_samples), mq=percentiles(mq_samples))
            await async_wait_quit()
        finally:
            await pinger.agent.stop()
            pull.close(0)
            push.close(0)
            ctx.term()

    _run_profiled(lambda: asyncio.run(main()), a)


def _run_profiled(fn: Any, a: dict[str, Any]) -> None:
    if not a.get("profile"):
        fn()
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
        prof.dump_stats(os.path.join(a["profile"], f"{a['tag']}.pstats"))


ROLES = {
    "raw-pull": role_raw_pull, "raw-push": role_raw_push, "raw-echo": role_raw_echo, "raw-ping": role_raw_ping,
    "mq-sub": role_mq_sub, "mq-pub-async": role_mq_pub_async, "mq-pub-sync": role_mq_pub_sync,
    "mq-echo": role_mq_echo, "mq-ping": role_mq_ping,
    "pair-ping": role_pair_ping,
}


def child_main(role: str, args: dict[str, Any]) -> None:
    # Hard limit inside the child too: SIGALRM's default action ends the process even if it
    # is stuck in a C call, so no child outlives its phase even if the parent is gone.
    signal.alarm(int(args["timeout"]) + 15)
    if args.get("cpus"):  # before any thread starts, so that zmq's and the agent's threads inherit it
        os.sched_setaffinity(0, args["cpus"])
    ROLES[role](args)


# ======================================================================================
# Parent side: start pairs of children, read their reports, kill them on failure.
# ======================================================================================


class PhaseError(RuntimeError):
    pass


class Child:
    def __init__(self, role: str, args: dict[str, Any]) -> None:
        self.role = role
        self.err = tempfile.TemporaryFile()
        args = {**args, "cpus": _CPUS}
        cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--role-args", json.dumps(args)]
        if args.get("spy"):  # sample this child with py-spy (pip install py-spy); idle time is left out
            out = os.path.join(args["spy"], f"{args['tag']}.txt")
            cmd = ["py-spy", "record", "--nonblocking", "--rate", "1000", "--format", "raw", "--threads", "--output", out,
                   "--"] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     close_fds=True)
        self._buf = b""

    def expect(self, event: str, deadline: float) -> dict[str, Any]:
        """The next report of this child; it must be ``event`` and come before ``deadline``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if not text.startswith(_MARK):
                    continue
                msg = json.loads(text[len(_MARK):])
                if msg.get("event") != event:
                    raise PhaseError(f"{self.role}: expected {event!r}, got {msg}")
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PhaseError(f"{self.role}: no {event!r} report in time")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(5)
                    raise PhaseError(f"{self.role} exited ({self.proc.returncode}) before {event!r}: {self.stderr()}")
                self._buf += chunk

    def quit(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def finish(self, deadline: float) -> None:
        self.quit()
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise PhaseError(f"{self.role} did not exit in time") from None
        if self.proc.returncode != 0:
            raise PhaseError(f"{self.role} exited with {self.proc.returncode}: {self.stderr()}")

    def kill(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()  # EOF: a child that waits for "quit" ends on its own
            except OSError:
                pass
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # only the process we started, by its PID
            self.proc.wait(10)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-2000:]


def run_pair(receiver: tuple[str, dict[str, Any]], sender_role: str, sender_args: dict[str, Any],
             timeout: float, sender_result: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the receiver, then the sender pointed at it; return both reports."""
    deadline = time.monotonic() + timeout
    children: list[Child] = []
    try:
        rx = Child(*receiver)
        children.append(rx)
        ready = rx.expect("ready", deadline)
        tx = Child(sender_role, {**sender_args, "endpoint": ready["endpoint"]})
        children.append(tx)
        if sender_result == "sent":  # throughput: the receiver reports last
            sent = tx.expect("sent", deadline)
            got = rx.expect("result", deadline)
        else:  # latency: the sender (pinger) reports
            got = tx.expect("result", deadline)
            sent = {}
        tx.quit()
        if sender_role.startswith("mq-pub"):  # a publisher reports its counters when told to quit
            sent["stats"] = tx.expect("stats", deadline)["stats"]
        rx.quit()
        finish_by = min(deadline, time.monotonic() + 40)
        tx.finish(finish_by)
        rx.finish(finish_by)
        return got, sent
    finally:
        for c in children:
            c.kill()
            c.err.close()


def mesh_name() -> str:
    return f"bench-{os.getpid()}-{secrets.token_hex(4)}"


def profiling(o: argparse.Namespace) -> dict[str, Any]:
    """Child arguments that make a meshmq child profile itself (cProfile) or run under py-spy."""
    if not o.profile:
        return {}
    return {"spy": o.profile} if o.profiler == "py-spy" else {"profile": o.profile}


def measure_raw_tp(o: argparse.Namespace) -> dict[str, Any]:
    common = {"n": o.messages, "size": o.size, "timeout": o.phase_timeout}
    got, sent = run_pair(("raw-pull", common), "raw-push", common, o.phase_timeout, "sent")
    return {"rate": got["rate"], "elapsed": got["elapsed"], "send_rate": sent["rate"]}


def measure_mq_tp(o: argparse.Namespace, kind: str, tag: str, insecure: bool = False) -> dict[str, Any]:
    mesh = mesh_name()
    common = {"n": o.messages, "size": o.size, "timeout": o.phase_timeout, "mesh": mesh, "insecure": insecure,
              **profiling(o)}
    got, sent = run_pair(("mq-sub", {**common, "tag": f"{tag}-sub"}), f"mq-pub-{kind}",
                         {**common, "tag": f"{tag}-pub"}, o.phase_timeout, "sent")
    rx_stats, tx_stats = got.get("stats", {}), sent.get("stats", {})
    frames = tx_stats.get("frames_sent", 0)
    return {"rate": got["rate"], "elapsed": got["elapsed"], "send_rate": sent["rate"],
            "frames_sent": frames, "messages_per_frame": tx_stats.get("messages_sent", 0) / frames if frames else 0,
            "receive_paused": rx_stats.get("receive_paused", 0), "resent": tx_stats.get("messages_resent", 0),
            "pub_cpu_us": sent.get("cpu_us", 0.0), "sub_cpu_us": got.get("cpu_us", 0.0)}


def measure_raw_lat(o: argparse.Namespace) -> dict[str, Any]:
    common = {"size": o.size, "timeout": o.phase_timeout}
    got, _ = run_pair(("raw-echo", {**common, "max": o.roundtrips + o.warmup + 1}), "raw-ping",
                      {**common, "rounds": o.roundtrips, "warmup": o.warmup}, o.phase_timeout, "result")
    got.pop("event", None)
    return got


def measure_mq_lat(o: argparse.Namespace, tag: str, insecure: bool = False) -> dict[str, Any]:
    mesh = mesh_name()
    common = {"size": o.size, "timeout": o.phase_timeout, "mesh": mesh, "insecure": insecure, **profiling(o)}
    got, _ = run_pair(("mq-echo", {**common, "tag": f"{tag}-echo"}), "mq-ping",
                      {**common, "tag": f"{tag}-ping", "rounds": o.roundtrips, "warmup": o.warmup},
                      o.phase_timeout, "result")
    got.pop("event", None)
    got.pop("stats", None)
    return got


def measure_interleaved_lat(o: argparse.Namespace, tag: str,
                            insecure: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(raw, meshmq) latency from one pinger alternating both kinds of round trip."""
    deadline = time.monotonic() + o.phase_timeout
    mesh = mesh_name()
    common = {"size": o.size, "timeout": o.phase_timeout, "mesh": mesh, "insecure": insecure, **profiling(o)}
    children: list[Child] = []
    try:
        raw_echo = Child("raw-echo", {**common, "max": o.roundtrips + o.warmup + 1000})
        children.append(raw_echo)
        mq_echo = Child("mq-echo", {**common, "tag": f"{tag}-echo"})
        children.append(mq_echo)
        raw_ep = raw_echo.expect("ready", deadline)["endpoint"]
        mq_ep = mq_echo.expect("ready", deadline)["endpoint"]
        pinger = Child("pair-ping", {**common, "tag": f"{tag}-ping", "rounds": o.roundtrips, "warmup": o.warmup,
                                     "raw_endpoint": raw_ep, "endpoint": mq_ep})
        children.append(pinger)
        got = pinger.expect("result", deadline)
        finish_by = min(deadline, time.monotonic() + 40)
        for c in (pinger, mq_echo, raw_echo):
            c.finish(finish_by)
        return got["raw"], got["mq"]
    finally:
        for c in children:
            c.kill()
            c.err.close()


def summarize(values: list[float], higher_is_better: bool) -> dict[str, float]:
    return {"best": max(values) if higher_is_better else min(values), "median": statistics.median(values),
            "runs": values}


def machine() -> dict[str, Any]:
    import msgpack
    import zmq

    import meshmq

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "python": platform.python_version(),
        "implementation": platform.python_implementation(), "platform": platform.platform(),
        "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
        "meshmq": meshmq.__version__,
    }


def run_all(o: argparse.Namespace) -> dict[str, Any]:
    def log(text: str) -> None:
        if not o.quiet:
            print(text, file=sys.stderr, flush=True)

    runs: dict[str, list[dict[str, Any]]] = {"raw_tp": [], "mq_async_tp": [], "mq_sync_tp": [],
                                               "raw_lat": [], "mq_lat": [], "mq_async_tp_insecure": [],
                                               "mq_sync_tp_insecure": [], "raw_lat_insecure": [],
                                               "mq_lat_insecure": []}
    secure, insecure = o.security in ("secure", "both"), o.security in ("insecure", "both")
    for r in range(o.repeat):
        # The default agents are secure; with --security insecure they run insecure under the same names.
        plain = o.security == "insecure"
        tp_steps = [("raw_tp", lambda: measure_raw_tp(o))]
        lat_steps: list[tuple[str, Any]] = [("raw_lat", lambda: measure_raw_lat(o))]
        if secure or plain:
            tp_steps += [
                ("mq_async_tp", lambda: measure_mq_tp(o, "async", f"tp-async-{r}", plain)),
                ("mq_sync_tp", lambda: measure_mq_tp(o, "sync", f"tp-sync-{r}", plain)),
            ]
            lat_steps += [("mq_lat", lambda: measure_mq_lat(o, f"lat-{r}", plain))]
        if secure and insecure:
            tp_steps += [
                ("mq_async_tp_insecure", lambda: measure_mq_tp(o, "async", f"tp-async-plain-{r}", True)),
                ("mq_sync_tp_insecure", lambda: measure_mq_tp(o, "sync", f"tp-sync-plain-{r}", True)),
            ]
        if not o.separate_latency:
            lat_steps = [("pair_lat", lambda: measure_interleaved_lat(o, f"lat-{r}", plain))]
            if secure and insecure:
                lat_steps.append(("pair_lat_insecure", lambda: measure_interleaved_lat(o, f"lat-plain-{r}", True)))
        elif secure and insecure:
            lat_steps.append(("mq_lat_insecure", lambda: measure_mq_lat(o, f"lat-plain-{r}", True)))
        # Rotate the order every round so that no measurement always runs first (or last).
        k = r % len(tp_steps)
        steps = tp_steps[k:] + tp_steps[:k] + (lat_steps if r % 2 == 0 else lat_steps[::-1])
        for name, fn in steps:
            if "_tp" in name and o.skip_throughput or "_lat" in name and o.skip_latency:
                continue
            t = time.monotonic()
            res = fn()
            if name.startswith("pair_lat"):
                raw, mq = res
                suffix = name[len("pair_lat"):]
                runs["raw_lat" + suffix].append(raw)
                runs["mq_lat" + suffix].append(mq)
                log(f"  round {r + 1}/{o.repeat} interleaved{suffix}  raw p50 {raw['p50_us']:8.1f} us  meshmq p50 "
                    f"{mq['p50_us']:8.1f} us  ({time.monotonic() - t:.1f}s)")
                continue
            runs[name].append(res)
            if "_tp" in name:
                log(f"  round {r + 1}/{o.repeat} {name:12s} {res['rate']:>12,.0f} msg/s received"
                    f"  (sender's loop {res['send_rate']:>10,.0f} msg/s; {time.monotonic() - t:.1f}s)")
            else:
                log(f"  round {r + 1}/{o.repeat} {name:12s} p50 {res['p50_us']:8.1f} us  p99 {res['p99_us']:8.1f} us"
                    f"  ({time.monotonic() - t:.1f}s)")

    summary: dict[str, Any] = {}
    for name in ("raw_tp", "mq_async_tp", "mq_sync_tp", "mq_async_tp_insecure", "mq_sync_tp_insecure"):
        if runs[name]:
            summary[name] = summarize([x["rate"] for x in runs[name]], True)
            if name != "raw_tp":  # CPU time per message: less at the mercy of other tenants than rates
                for side in ("pub_cpu_us", "sub_cpu_us"):
                    summary[name][side] = statistics.median(x[side] for x in runs[name])
                summary[name]["resent"] = sum(x["resent"] for x in runs[name])
    for name in ("raw_lat", "mq_lat", "raw_lat_insecure", "mq_lat_insecure"):
        if runs[name]:
            summary[name] = {
                "p50_us": summarize([x["p50_us"] for x in runs[name]], False),
                "p99_us": summarize([x["p99_us"] for x in runs[name]], False),
            }

    ratios: dict[str, Any] = {}
    bars: dict[str, Any] = {}
    if "raw_tp" in summary:
        for name, label in (("mq_async_tp", "throughput_async"), ("mq_sync_tp", "throughput_sync")):
            if name in summary:
                ratios[label] = {s: summary[name][s] / summary["raw_tp"][s] for s in ("best", "median")}
                bars[label] = {"ratio": ratios[label]["median"], "bar": f">= {THROUGHPUT_BAR}",
                               "ok": ratios[label]["median"] >= THROUGHPUT_BAR}
    if "raw_lat" in summary and "mq_lat" in summary:
        for q in ("p50_us", "p99_us"):
            ratios[f"latency_{q[:3]}"] = {s: summary["mq_lat"][q][s] / summary["raw_lat"][q][s]
                                          for s in ("best", "median")}
        bars["latency_p50"] = {"ratio": ratios["latency_p50"]["median"], "bar": f"<= {LATENCY_BAR}",
                               "ok": ratios["latency_p50"]["median"] <= LATENCY_BAR}
    for kind in ("async", "sync"):
        name = f"mq_{kind}_tp"
        if name in summary and name + "_insecure" in summary:
            label = f"secure_vs_insecure_{kind}"
            ratios[label] = {s: summary[name][s] / summary[name + "_insecure"][s] for s in ("best", "median")}
            bars[label] = {"ratio": ratios[label]["median"], "bar": f">= {SECURITY_BAR}",
                           "ok": ratios[label]["median"] >= SECURITY_BAR, "what": "secure/insecure"}
    if "mq_lat" in summary and "mq_lat_insecure" in summary:
        ratios["secure_vs_insecure_latency_p50"] = {
            s: summary["mq_lat"]["p50_us"][s] / summary["mq_lat_insecure"]["p50_us"][s] for s in ("best", "median")}
    return {
        "machine": machine(),
        "settings": {"messages": o.messages, "size": o.size, "roundtrips": o.roundtrips, "warmup": o.warmup,
                     "repeat": o.repeat, "cpus": _CPUS, "security": o.security},
        "runs": runs, "summary": summary, "ratios": ratios, "bars": bars,
    }


def table(res: dict[str, Any]) -> str:
    s, ratios, m, st = res["summary"], res["ratios"], res["machine"], res["settings"]
    lines = [
        f"meshmq {m['meshmq']} benchmark  {m['date']}  nproc={m['nproc']}  Python {m['python']}  "
        f"pyzmq {m['pyzmq']} (libzmq {m['libzmq']})  msgpack {m['msgpack']}",
        f"{st['size']}-byte messages; throughput over {st['messages']:,} messages; "
        f"{st['roundtrips']:,} round trips after {st['warmup']:,} warm-up; {st['repeat']} runs each "
        "(best / median); 127.0.0.1",
        "",
        f"{'measurement':40s} {'best':>12s} {'median':>12s}   {'ratio best':>10s} {'ratio median':>12s}",
        "-" * 92,
    ]

    def row(label: str, best: float, median: float, unit: str, ratio: dict[str, float] | None) -> None:
        r = f"{ratio['best']:>10.3f} {ratio['median']:>12.3f}" if ratio else f"{'':>10s} {'':>12s}"
        lines.append(f"{label + ' ' + unit:40s} {best:>12,.0f} {median:>12,.0f}   {r}")

    def cpu(name: str) -> None:
        one = s[name]
        lines.append(f"    CPU a message (median): publisher process {one['pub_cpu_us']:.2f} us, subscriber "
                     f"{one['sub_cpu_us']:.2f} us; {one['resent']:,} messages resent")

    def row_us(label: str, best: float, median: float, ratio: dict[str, float] | None) -> None:
        r = f"{ratio['best']:>10.3f} {ratio['median']:>12.3f}" if ratio else f"{'':>10s} {'':>12s}"
        lines.append(f"{label + ' (us)':40s} {best:>12.1f} {median:>12.1f}   {r}")

    if "raw_tp" in s:
        row("raw pyzmq PUSH->PULL", s["raw_tp"]["best"], s["raw_tp"]["median"], "msg/s", None)
    if "mq_async_tp" in s:
        row("meshmq AsyncAgent publish", s["mq_async_tp"]["best"], s["mq_async_tp"]["median"], "msg/s",
            ratios.get("throughput_async"))
        cpu("mq_async_tp")
    if "mq_sync_tp" in s:
        row("meshmq Agent (blocking) publish", s["mq_sync_tp"]["best"], s["mq_sync_tp"]["median"], "msg/s",
            ratios.get("throughput_sync"))
        cpu("mq_sync_tp")
    if "mq_async_tp_insecure" in s:
        row("insecure AsyncAgent publish", s["mq_async_tp_insecure"]["best"], s["mq_async_tp_insecure"]["median"],
            "msg/s", None)
        cpu("mq_async_tp_insecure")
    if "mq_sync_tp_insecure" in s:
        row("insecure Agent (blocking) publish", s["mq_sync_tp_insecure"]["best"], s["mq_sync_tp_insecure"]["median"],
            "msg/s", None)
        cpu("mq_sync_tp_insecure")
    if "raw_lat" in s:
        row_us("raw zmq round trip p50", s["raw_lat"]["p50_us"]["best"], s["raw_lat"]["p50_us"]["median"], None)
        row_us("raw zmq round trip p99", s["raw_lat"]["p99_us"]["best"], s["raw_lat"]["p99_us"]["median"], None)
    if "mq_lat" in s:
        row_us("meshmq round trip p50", s["mq_lat"]["p50_us"]["best"], s["mq_lat"]["p50_us"]["median"],
               ratios.get("latency_p50"))
        row_us("meshmq round trip p99", s["mq_lat"]["p99_us"]["best"], s["mq_lat"]["p99_us"]["median"],
               ratios.get("latency_p99"))
    if "mq_lat_insecure" in s:
        row_us("insecure meshmq round trip p50", s["mq_lat_insecure"]["p50_us"]["best"],
               s["mq_lat_insecure"]["p50_us"]["median"], None)
        row_us("insecure meshmq round trip p99", s["mq_lat_insecure"]["p99_us"]["best"],
               s["mq_lat_insecure"]["p99_us"]["median"], None)
    lines.append("")
    lines.append("bars (on the medians):")
    for name, b in res["bars"].items():
        lines.append(f"  {name:26s} {b.get('what', 'meshmq/raw')} = {b['ratio']:.3f}  (bar {b['bar']})  "
                     f"{'ok' if b['ok'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=200_000, help="messages per throughput run (default 200000)")
    p.add_argument("--size", type=int, default=256, help="payload bytes (default 256)")
    p.add_argument("--roundtrips", type=int, default=5_000, help="measured round trips per latency run (default 5000)")
    p.add_argument("--warmup", type=int, default=500, help="warm-up round trips before measuring (default 500)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    p.add_argument("--phase-timeout", type=float, default=120.0, help="hard limit of one measurement, s (default 120)")
    p.add_argument("--skip-throughput", action="store_true", help="only the latency runs")
    p.add_argument("--skip-latency", action="store_true", help="only the throughput runs")
    p.add_argument("--separate-latency", action="store_true",
                   help="measure raw and meshmq latency in separate runs (default: one pinger alternates "
                   "raw and meshmq round trips one by one, so both see the same machine conditions)")
    p.add_argument("--security", choices=("secure", "insecure", "both"), default="secure",
                   help="agents as meshmq runs them (secure, the default), insecure=True, or both side by side")
    p.add_argument("--check", action="store_true", help="exit 1 if a bar is missed")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--profile", metavar="DIR", help="profile the meshmq children, writing into DIR")
    p.add_argument("--profiler", choices=("cprofile", "py-spy"), default="cprofile",
                   help="with --profile: cProfile .pstats (default), or py-spy raw stacks (sampling, needs py-spy)")
    p.add_argument("--cpus", help="pin every child process (and its threads) to these CPUs, e.g. '0' or '0,1'; "
                   "default: no pinning")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--role-args", help=argparse.SUPPRESS)
    o = p.parse_args(argv)

    if o.role:
        child_main(o.role, json.loads(o.role_args))
        return 0
    if o.messages < 2 or o.size < 8 or o.roundtrips < 1 or o.warmup < 1 or o.repeat < 1:
        p.error("need --messages >= 2, --size >= 8, --roundtrips >= 1, --warmup >= 1, --repeat >= 1")
    if o.cpus:
        global _CPUS
        try:
            _CPUS = sorted({int(c) for c in o.cpus.split(",")})
        except ValueError:
            p.error(f"--cpus {o.cpus!r}: expected CPU numbers separated by commas")
    if o.profile:
        o.profile = os.path.abspath(o.profile)
        os.makedirs(o.profile, exist_ok=True)
    try:
        res = run_all(o)
    except PhaseError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if o.json else table(res))
    if o.check and not all(b["ok"] for b in res["bars"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
