"""Child processes of the benchmarks: each runs one role of the same script, reports
``@bench {json}`` lines on its stdout, and is ended by its PID."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MARK = "@bench "


def add_role_options(parser: argparse.ArgumentParser) -> None:
    """The hidden options a :class:`Child` is started with (``--role ROLE --args JSON``)."""
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)


def run_role(options: argparse.Namespace, roles: dict[str, Callable[[dict[str, Any]], None]]) -> bool:
    """In a child, run its role with its arguments and say True; in the parent, False."""
    if not options.role:
        return False
    roles[options.role](json.loads(options.args))
    return True


def emit(**obj: Any) -> None:
    """A report to the parent (one line)."""
    print(MARK + json.dumps(obj), flush=True)


class Child:
    """``script --role ROLE --args JSON`` in a process of its own."""

    def __init__(self, script: str, role: str, args: dict[str, Any]) -> None:
        self.proc = subprocess.Popen([sys.executable, script, "--role", role, "--args", json.dumps(args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The child's next report of ``event`` within ``timeout`` seconds; otherwise the child
        is ended and RuntimeError says what it wrote on stderr."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(MARK):
                obj = json.loads(line[len(MARK):])
                if obj["event"] == event:
                    return obj  # type: ignore[no-any-return]
        self.end()
        assert self.proc.stderr is not None
        raise RuntimeError(f"no {event!r} within {timeout}s; stderr: {self.proc.stderr.read()[-2000:]}")

    def end(self) -> None:
        """End it (a stopped one too) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
