"""``meshmq demo``: the order workflow of the concept documents, one process per service.

The parent (:func:`run_demo`) starts four child processes with
``python -m meshmq._demo ROLE``:

- ``orders`` (blocking :class:`~meshmq.Agent`) waits until the three other
  services subscribe to ``orders.placed``, then places the orders;
- ``inventory`` (blocking Agent) handles them through the type registry:
  ``@agent.on("OrderPlaced")`` and ``agent.subscribe("orders.placed", agent.dispatch)``;
- ``payment`` (:class:`~meshmq.AsyncAgent`) handles them in a coroutine;
- ``notification`` (blocking Agent) iterates its subscription.

Children report to the parent in JSON lines on their stdout (``ready``,
``handled``, ``placed``, ``done``); the parent prints a trace line per event and
a summary table. The report channel is deliberately not meshmq itself, so a
broken mesh cannot hide its own failures.

Process hygiene: children run in sessions of their own (a terminal's Ctrl-C
reaches only the parent, which ends them in order); the parent ends only the
children it started, by PID, on success, failure and interrupt alike. A child
also leaves when its stdin closes (the parent is gone) or its own timeout passes,
so none outlives a parent killed with SIGKILL for long.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ._agent import AsyncAgent
from ._errors import MeshError
from ._message import Message
from ._sync import Agent

TOPIC = "orders.placed"
SUBSCRIBERS = ("inventory", "payment", "notification")
ROLES = ("orders",) + SUBSCRIBERS
SERVICE_NAMES = {
    "orders": "order-service",
    "inventory": "inventory-service",
    "payment": "payment-service",
    "notification": "notification-service",
}
_PRODUCTS = (
    ("SKU-KEYBOARD", 49.99), ("SKU-MOUSE", 19.99), ("SKU-MONITOR", 189.00),
    ("SKU-CABLE", 9.99), ("SKU-HEADSET", 59.95), ("SKU-DOCK", 129.50),
)


# --- the domain: what the services do with an order ------------------------------------


def make_order(number: int) -> dict[str, Any]:
    """The OrderPlaced payload of the concept documents; deterministic per order number."""
    rng = random.Random(number)
    items: list[dict[str, Any]] = [
        {"productId": sku, "quantity": rng.randint(1, 3), "price": price}
        for sku, price in rng.sample(_PRODUCTS, rng.randint(1, 3))
    ]
    total = round(sum(int(i["quantity"]) * float(i["price"]) for i in items), 2)
    return {
        "orderId": f"ORD-{number:04d}",
        "customerId": f"CUST-{rng.randint(1, 42):03d}",
        "items": items,
        "totalAmount": total,
        "currency": "USD",
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_placed(order: dict[str, Any]) -> str:
    return (f"placed {order['orderId']}: {_count(len(order['items']), 'item')}, "
            f"{order['currency']} {order['totalAmount']:.2f}")


def reserve_stock(order: dict[str, Any]) -> str:
    units = sum(item["quantity"] for item in order["items"])
    return f"reserved stock for {order['orderId']} ({_count(len(order['items']), 'item')}, {_count(units, 'unit')})"


def charge_payment(order: dict[str, Any]) -> str:
    return (f"charged {order['currency']} {order['totalAmount']:.2f} to {order['customerId']} "
            f"for {order['orderId']}")


def notify_customer(order: dict[str, Any]) -> str:
    return f"emailed {order['customerId']}: order {order['orderId']} is confirmed"


# --- the child processes ----------------------------------------------------------------


class _Reporter:
    """Writes the JSON-lines report a child gives its parent on stdout (from any thread)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "role": self.role, **fields})
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


class _Tally:
    """The orders a subscriber has handled; ``finished`` is set when all arrived or it must stop."""

    def __init__(self, role: str, expected: int, report: _Reporter, drop: bool) -> None:
        self.role = role
        self.expected = expected
        self.report = report
        self.drop = drop
        self.seen: set[str] = set()
        self.finished = threading.Event()
        self.why = "done"

    def handle(self, msg: Message, action: Callable[[dict[str, Any]], str]) -> None:
        if self.drop:  # test hook (meshmq demo --drop ROLE): lose every order
            return
        order = msg.data
        order_id = order["orderId"]
        duplicate = order_id in self.seen
        self.seen.add(order_id)
        self.report("handled", orderId=order_id, duplicate=duplicate, line=action(order))
        if len(self.seen) >= self.expected:
            self.finish("done")

    def finish(self, why: str) -> None:
        if not self.finished.is_set():
            self.why = why
            self.finished.set()


def _watch_parent(on_gone: Callable[[], object]) -> None:
    """Call ``on_gone`` when stdin closes: the parent ended (or closed it to say 'stop')."""
    def watch() -> None:
        try:
            while sys.stdin.readline():
                pass
        except (OSError, ValueError):
            pass
        on_gone()

    threading.Thread(target=watch, name="demo-parent-watch", daemon=True).start()


def _run_orders(opts: argparse.Namespace, overrides: dict[str, Any], report: _Reporter) -> int:
    with Agent(SERVICE_NAMES["orders"], **overrides) as agent:
        report("ready", pid=os.getpid(), line=f"ready; waiting for {len(SUBSCRIBERS)} subscribers of {TOPIC}")
        wait = max(1.0, opts.timeout * 0.75)
        try:
            found = agent.wait_for_subscribers(TOPIC, count=len(SUBSCRIBERS), timeout=wait)
        except MeshError as exc:
            report("failed", line=f"gave up: {exc}")
            return 1
        report("found", count=found, line=f"{found} subscriber services found; placing {opts.orders} orders")
        # A short pause between orders only makes the live trace readable (2 s in all at most).
        pause = min(0.1, 2.0 / opts.orders)
        for number in range(1, opts.orders + 1):
            if number > 1:
                time.sleep(pause)
            order = make_order(number)
            agent.publish(TOPIC, order, type="OrderPlaced", key=order["customerId"])
            report("placed", orderId=order["orderId"], line=describe_placed(order))
    report("done", placed=opts.orders)
    return 0


def _run_inventory(opts: argparse.Namespace, overrides: dict[str, Any], report: _Reporter) -> int:
    tally = _Tally("inventory", opts.orders, report, opts.drop)
    with Agent(SERVICE_NAMES["inventory"], **overrides) as agent:
        @agent.on("OrderPlaced")
        def reserve(msg: Message) -> None:
            tally.handle(msg, reserve_stock)

        agent.subscribe(TOPIC, agent.dispatch)
        report("ready", pid=os.getpid(), line="ready; OrderPlaced handled through @agent.on and agent.dispatch")
        _watch_parent(lambda: tally.finish("parent gone"))
        tally.finished.wait(opts.timeout)
    report("done", handled=len(tally.seen), why=tally.why)
    return 0 if len(tally.seen) >= opts.orders else 1


def _run_notification(opts: argparse.Namespace, overrides: dict[str, Any], report: _Reporter) -> int:
    tally = _Tally("notification", opts.orders, report, opts.drop)
    deadline = time.monotonic() + opts.timeout
    with Agent(SERVICE_NAMES["notification"], **overrides) as agent:
        orders = agent.subscribe(TOPIC)
        report("ready", pid=os.getpid(), line=f"ready; iterating a subscription to {TOPIC}")
        _watch_parent(lambda: tally.finish("parent gone"))
        while not tally.finished.is_set() and time.monotonic() < deadline:
            msg = orders.get(timeout=0.2)  # short, so a 'parent gone' is noticed soon
            if msg is not None:
                tally.handle(msg, notify_customer)
    report("done", handled=len(tally.seen), why=tally.why)
    return 0 if len(tally.seen) >= opts.orders else 1


async def _run_payment(opts: argparse.Namespace, overrides: dict[str, Any], report: _Reporter) -> int:
    tally = _Tally("payment", opts.orders, report, opts.drop)
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()

    def finish(why: str) -> None:
        tally.finish(why)
        finished.set()

    async with AsyncAgent(SERVICE_NAMES["payment"], **overrides) as agent:
        async def charge(msg: Message) -> None:
            tally.handle(msg, charge_payment)
            if tally.finished.is_set():
                finished.set()

        agent.subscribe(TOPIC, charge)
        loop.add_signal_handler(signal.SIGTERM, finish, "terminated")
        report("ready", pid=os.getpid(), line="ready; AsyncAgent, charging in a coroutine handler")
        def parent_gone() -> None:
            loop.call_soon_threadsafe(finish, "parent gone")

        _watch_parent(parent_gone)
        try:
            await asyncio.wait_for(finished.wait(), opts.timeout)
        except asyncio.TimeoutError:
            tally.finish("timeout")
    report("done", handled=len(tally.seen), why=tally.why)
    return 0 if len(tally.seen) >= opts.orders else 1


def _role_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one demo child: ``python -m meshmq._demo ROLE [options]``."""
    parser = argparse.ArgumentParser(prog="python -m meshmq._demo", description="One service of meshmq demo.")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--mesh")
    parser.add_argument("--seed", action="append", default=[])
    parser.add_argument("--interface", action="append", default=[])
    parser.add_argument("--drop", action="store_true", help="lose every order (to test the failure path)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    opts = parser.parse_args(argv)
    if opts.verbose:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format=f"%(asctime)s {opts.role} %(levelname)s %(name)s: %(message)s")
        logging.getLogger("meshmq").setLevel(logging.INFO if opts.verbose == 1 else logging.DEBUG)
    overrides: dict[str, Any] = {}
    if opts.mesh:
        overrides["mesh"] = opts.mesh
    if opts.seed:
        overrides["seeds"] = opts.seed
    if opts.interface:
        overrides["interfaces"] = opts.interface
    report = _Reporter(opts.role)

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(143)  # unwinds the 'with Agent' blocks: the agent says goodbye

    signal.signal(signal.SIGTERM, terminated)
    try:
        if opts.role == "payment":
            return asyncio.run(_run_payment(opts, overrides, report))
        run = {"orders": _run_orders, "inventory": _run_inventory, "notification": _run_notification}[opts.role]
        return run(opts, overrides, report)
    except KeyboardInterrupt:
        return 130
    except MeshError as exc:
        report("failed", line=f"error: {exc}")
        return 1


# --- the parent -------------------------------------------------------------------------


@dataclass
class _Child:
    role: str
    proc: subprocess.Popen[str]
    open: bool = True  # its stdout has not reached EOF
    handled: set[str] = field(default_factory=set)
    duplicates: int = 0
    failed: str | None = None


def _pump(role: str, stream: IO[str], events: queue.Queue[tuple[str, str | None]]) -> None:
    """Forward a child's stdout lines to the parent's queue; ``None`` marks EOF."""
    try:
        for line in stream:
            events.put((role, line.rstrip("\n")))
    except (OSError, ValueError):
        pass
    events.put((role, None))


def _child_env() -> dict[str, str]:
    """The parent's environment, with this meshmq importable even when it is not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _end_children(children: Sequence[_Child], grace: float = 3.0) -> None:
    """End the children we started, by PID: close stdin (they leave by themselves),
    then SIGTERM, then SIGKILL; wait for each so none is left behind."""
    try:
        _end_gently(children, grace)
    except KeyboardInterrupt:  # impatient second Ctrl-C: no more grace, but still no orphans
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
        for child in children:
            child.proc.wait()
        raise


def _end_gently(children: Sequence[_Child], grace: float) -> None:
    for child in children:
        if child.proc.stdin is not None:
            try:
                child.proc.stdin.close()
            except OSError:
                pass
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.terminate()
    for child in children:
        try:
            child.proc.wait(grace)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def _take(child: _Child, line: str | None, placed: list[str]) -> None:
    """Account for one line of a child's report and print its trace line."""
    if line is None:
        child.open = False
        return
    try:
        event = json.loads(line)
    except ValueError:
        _say(child.role, line)  # not a report: show it as it is
        return
    kind = event.get("event")
    if kind == "handled":
        child.duplicates += event["orderId"] in child.handled
        child.handled.add(event["orderId"])
    elif kind == "placed":
        placed.append(event["orderId"])
    elif kind == "failed":
        child.failed = event.get("line")
    if "line" in event:
        _say(child.role, event["line"])


def _say(role: str, text: str) -> None:
    print(f"{role:<13} {text}", flush=True)


def run_demo(*, orders: int = 20, timeout: float = 20.0, mesh: str | None = None,
             seeds: Sequence[str] = (), interfaces: Sequence[str] = (), verbose: int = 0,
             drop: str | None = None) -> int:
    """Run the demo; return 0 when every service handled every order, else 1 (130 on Ctrl-C)."""
    mesh = mesh or f"demo-{os.urandom(4).hex()}"
    started = time.monotonic()
    deadline = started + timeout
    print(f"meshmq demo: {orders} orders through 4 services in mesh {mesh!r} (one process each, "
          f"mDNS on {', '.join(interfaces) or 'loopback'})", flush=True)
    events: queue.Queue[tuple[str, str | None]] = queue.Queue()
    children: dict[str, _Child] = {}
    placed: list[str] = []
    timed_out = False
    env = _child_env()
    # The services keep their stores in a directory of this run's own, removed at the end, unless
    # MESHMQ_DATA_DIR says where: a demo leaves nothing behind in ~/.meshmq.
    state = None if env.get("MESHMQ_DATA_DIR") else tempfile.TemporaryDirectory(prefix="meshmq-demo-")
    if state is not None:
        env["MESHMQ_DATA_DIR"] = state.name
    with _Interrupts() as interrupt:
        try:
            # Subscribers first only for a readable trace: the order service waits for them anyway.
            for role in SUBSCRIBERS + ("orders",):
                cmd = [sys.executable, "-m", "meshmq._demo", role, "--orders", str(orders),
                       "--timeout", str(timeout), "--mesh", mesh]
                cmd += [arg for s in seeds for arg in ("--seed", s)]
                cmd += [arg for i in interfaces for arg in ("--interface", i)]
                cmd += ["-v"] * verbose + (["--drop"] if drop == role else [])
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env, start_new_session=True)
                children[role] = _Child(role, proc)
                threading.Thread(target=_pump, args=(role, proc.stdout, events), name=f"demo-{role}",
                                 daemon=True).start()
                print(f"  started {role:<13} pid {proc.pid}", flush=True)
            while any(c.open for c in children.values()) and not interrupt.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                try:
                    # Short waits: an interrupt is a flag (see _Interrupts), noticed at the next turn.
                    role, line = events.get(timeout=min(remaining, 0.2))
                except queue.Empty:
                    continue
                _take(children[role], line, placed)
            if interrupt.is_set():
                print("\ninterrupted: ending the services", flush=True)
        finally:
            _end_children(list(children.values()))
    # The children are gone, so their pipes are at EOF: take the reports still in flight.
    drain_until = time.monotonic() + 2.0
    while any(c.open for c in children.values()) and time.monotonic() < drain_until:
        try:
            role, line = events.get(timeout=max(0.0, drain_until - time.monotonic()))
        except queue.Empty:
            break
        _take(children[role], line, placed)
    elapsed = time.monotonic() - started
    if state is not None:
        state.cleanup()
    return _summary(children, orders, placed, elapsed, interrupt.is_set(), timed_out)


class _Interrupts:
    """While active, SIGINT and SIGTERM set a flag instead of raising KeyboardInterrupt,
    so that an interrupt never lands between reading a child's report and counting it.
    Off the main thread (where handlers cannot be installed) it stays a plain flag."""

    def __init__(self) -> None:
        self.flag = False
        self.previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self.flag

    def _handle(self, signum: int, frame: object) -> None:
        self.flag = True

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _summary(children: dict[str, _Child], orders: int, placed: list[str], elapsed: float,
             interrupted: bool, timed_out: bool) -> int:
    expected = {make_order(n)["orderId"] for n in range(1, orders + 1)}
    rows = [("service", "pid", "handled", "missing", "duplicates", "exit")]
    o = children["orders"]
    rows.append(("orders (placed)", str(o.proc.pid), str(len(placed)), str(orders - len(set(placed))), "-",
                 str(o.proc.returncode)))
    total_missing = 0
    for role in SUBSCRIBERS:
        c = children[role]
        missing = len(expected - c.handled)
        total_missing += missing
        rows.append((role, str(c.proc.pid), str(len(c.handled)), str(missing), str(c.duplicates),
                     str(c.proc.returncode)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    ok = not interrupted and len(set(placed)) == orders and total_missing == 0 and all(
        c.proc.returncode == 0 for c in children.values())
    deliveries = sum(len(c.handled) for r, c in children.items() if r != "orders")
    verdict = "OK" if ok else "INTERRUPTED" if interrupted else "FAILED"
    print(f"\n{len(placed)} of {orders} orders placed, {deliveries} deliveries, {total_missing} missing "
          f"in {elapsed:.1f}s: {verdict}", flush=True)
    if not ok and not interrupted:
        reasons = [f"{r}: {c.failed}" for r, c in children.items() if c.failed]
        if timed_out:
            reasons.append("the demo's --timeout passed before every order was handled")
        for reason in reasons:
            print(f"  {reason}", flush=True)
    return 0 if ok else 130 if interrupted else 1


if __name__ == "__main__":
    raise SystemExit(_role_main())
