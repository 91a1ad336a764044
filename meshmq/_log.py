"""Logging helpers: one logger per module, quiet by default, peer-caused warnings rate-limited."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

logging.getLogger("meshmq").addHandler(logging.NullHandler())


class QuietLogger:
    """Logs each kind of event at most once per ``interval`` seconds, with bounded memory.

    A hostile or broken peer can cause a warning per frame; this keeps the log
    readable and the memory flat, and says how many were suppressed.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 256) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        if suppressed:
            msg += f" ({suppressed} similar suppressed)"
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)
