"""``meshmq demo`` and examples/orders: the order workflow across real processes on loopback.

The demo makes a fresh mesh of its own each run. The tests check what it
promises: every order reaches every service, a missing order makes it fail,
and it never leaves a process behind (on success, failure or Ctrl-C).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmq._demo import (
    SUBSCRIBERS, charge_payment, describe_placed, make_order, notify_customer, reserve_stock,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "orders"
STARTED = re.compile(r"started (\w+)\s+pid (\d+)")


def loopback_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHMQ_")}
    env.update(MESHMQ_INTERFACES="127.0.0.1", MESHMQ_HOME=str(home), MESHMQ_DATA_DIR=str(home / "data"), PYTHONUNBUFFERED="1", **extra)
    return env


def demo_pids(output: str) -> dict[str, int]:
    return {role: int(pid) for role, pid in STARTED.findall(output)}


def running_demo_children(pids: dict[str, int]) -> list[int]:
    """Those of the demo's child processes that still exist (checked by command line, not just PID)."""
    alive = []
    for pid in pids.values():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"meshmq._demo" in cmdline:
            alive.append(pid)
    return alive


class LineReader:
    """A process's merged output, line by line, with a deadline on every wait."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no line matching {pattern!r} within {timeout}s; output so far:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def rest(self, timeout: float) -> str:
        """Everything until EOF (the process exited and closed its output)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                pytest.fail(f"output did not end within {timeout}s")
            if line is None:
                return "\n".join(self.lines)
            self.lines.append(line)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; the ones still running at teardown are ended by PID."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --- the domain helpers ----------------------------------------------------------------------


def test_orders_have_the_concept_documents_shape() -> None:
    order = make_order(7)
    assert order == make_order(7)  # deterministic, so the parent knows what to expect
    assert order["orderId"] == "ORD-0007" and order["currency"] == "USD"
    assert re.match(r"^CUST-\d{3}$", order["customerId"])
    assert order["items"] and all(set(i) == {"productId", "quantity", "price"} for i in order["items"])
    assert order["totalAmount"] == round(sum(i["quantity"] * i["price"] for i in order["items"]), 2)
    for describe in (describe_placed, reserve_stock, charge_payment, notify_customer):
        assert "ORD-0007" in describe(order)


# --- the demo across processes -----------------------------------------------------------------


@pytest.mark.integration
def test_demo_delivers_every_order_to_every_service(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "meshmq", "demo", "--orders", "10"], capture_output=True,
                            text=True, timeout=60, env=loopback_env(tmp_path))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "10 of 10 orders placed, 30 deliveries, 0 missing" in out and out.rstrip().endswith(": OK")
    for role in SUBSCRIBERS:
        assert re.search(rf"^  {role} +\d+ +10 +0 +0 +0$", out, re.M), out
    assert re.search(r"^inventory +reserved stock for ORD-0007 ", out, re.M)
    assert re.search(r"^payment +charged USD [\d.]+ to CUST-\d+ for ORD-0010$", out, re.M)
    assert re.search(r"^notification +emailed CUST-\d+: order ORD-0001 is confirmed$", out, re.M)
    pids = demo_pids(out)
    assert set(pids) == {"orders", *SUBSCRIBERS}
    assert running_demo_children(pids) == []
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_demo_fails_when_a_service_misses_orders(tmp_path: Path) -> None:
    # --drop (hidden, for tests) makes the payment service lose every order it receives.
    result = subprocess.run([sys.executable, "-m", "meshmq", "demo", "--orders", "3", "--timeout", "6",
                             "--drop", "payment"], capture_output=True, text=True, timeout=60,
                            env=loopback_env(tmp_path))
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "3 of 3 orders placed, 6 deliveries, 3 missing" in out and "FAILED" in out
    assert re.search(r"^  payment +\d+ +0 +3 ", out, re.M), out
    assert running_demo_children(demo_pids(out)) == []


def start_stalled_demo(tmp_path: Path, processes: list[subprocess.Popen[str]]) -> LineReader:
    """A demo that cannot finish (payment drops every order), once it has placed its first order."""
    proc = subprocess.Popen([sys.executable, "-m", "meshmq", "demo", "--orders", "3", "--timeout", "60",
                             "--drop", "payment"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=loopback_env(tmp_path))
    processes.append(proc)
    reader = LineReader(proc)
    reader.wait_for(r"placed ORD-0001", 30)
    return reader


@pytest.mark.integration
def test_demo_interrupted_ends_every_process(tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    reader = start_stalled_demo(tmp_path, processes)
    proc = reader.proc
    os.kill(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal, sent to the demo's own process only
    assert proc.wait(20) == 130
    out = reader.rest(10)
    assert "interrupted: ending the services" in out and "INTERRUPTED" in out
    pids = demo_pids(out)
    assert len(pids) == 4 and running_demo_children(pids) == []
    assert "Traceback" not in out


# --- the examples ----------------------------------------------------------------------------


@pytest.mark.integration
def test_examples_run_one_process_per_service(tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    env = loopback_env(tmp_path, MESHMQ_MESH="ex-" + uuid.uuid4().hex[:12])
    readers = {}
    for name in ("inventory", "payment", "notification", "review"):
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / f"{name}_service.py")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        processes.append(proc)
        readers[name] = LineReader(proc)
        readers[name].wait_for(r"ready", 20)
    orders = subprocess.run([sys.executable, str(EXAMPLES / "order_service.py"), "6"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert orders.returncode == 0, orders.stdout + orders.stderr
    placed = re.findall(r"^placed (ORD-000\d): USD ([\d.]+)$", orders.stdout, re.M)
    assert len(placed) == 6
    for number in range(1, 7):
        readers["inventory"].wait_for(rf"reserved stock for ORD-000{number} \(\d+ pcs\)", 20)
        readers["payment"].wait_for(rf"charged USD [\d.]+ to CUST-\d+ for ORD-000{number}", 20)
        readers["notification"].wait_for(rf"emailed CUST-\d+: order ORD-000{number} confirmed", 20)
    # The policy's content rule: the big orders reach review too (the orders are the same every run).
    assert any(float(total) > 300 for _, total in placed)
    for order_id, total in placed:
        if float(total) > 300:
            readers["review"].wait_for(rf"review {order_id}: USD {total}", 20)
    for name, reader in readers.items():
        os.kill(reader.proc.pid, signal.SIGINT)  # the way a user stops them: Ctrl-C
        assert reader.proc.wait(15) == 0, name
        assert "Traceback" not in reader.rest(10), name


@pytest.mark.integration
def test_demo_children_leave_when_the_demo_is_killed(tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    reader = start_stalled_demo(tmp_path, processes)
    proc = reader.proc
    pids = demo_pids("\n".join(reader.lines))
    assert len(pids) == 4
    try:
        proc.kill()  # no chance to clean up: the children must notice that their parent is gone
        proc.wait(10)
        deadline = time.monotonic() + 15
        while running_demo_children(pids) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling processes we cannot wait for (they are not our children)
        assert running_demo_children(pids) == []
    finally:
        for pid in running_demo_children(pids):  # only if the assertion failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)
