"""Child processes for the integration tests: peer_process.py roles, read line by line."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PEER = str(Path(__file__).with_name("peer_process.py"))


class Child:
    """A peer_process.py child whose JSON lines are read on a thread (every wait has a deadline)."""

    def __init__(self, *args: str, prefix: Sequence[str] = (),
                 popen: Callable[..., subprocess.Popen[str]] | None = None) -> None:
        argv = [*prefix, sys.executable, PEER, *args]
        opts: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.proc = popen(argv, **opts) if popen is not None else subprocess.Popen(argv, **opts)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def expect(self, event: str, timeout: float, where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The next line of kind ``event`` (and matching ``where``) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
                raise AssertionError(f"child sent no matching {event!r} within {timeout}s; "
                                     f"last lines: {self.seen[-5:]}; stderr: {err[-2000:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.get("event") == event and (where is None or where(line)):
                return line

    def watch(self, event: str, seconds: float) -> list[dict[str, Any]]:
        """Every line of kind ``event`` the child sends during the next ``seconds`` (for claims
        of the form "nothing of this kind happens for that long")."""
        deadline = time.monotonic() + seconds
        seen = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            self.seen.append(line)
            if line.get("event") == event:
                seen.append(line)
        return seen

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by PID
        self.proc.wait(timeout=10)
