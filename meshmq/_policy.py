"""Policies as code: the rules of a policy file, checked with precise errors, and the
pure machinery that enforces them (token buckets, circuit breakers). No I/O, no clock:
times are arguments.

A policy file is TOML: a ``version`` and ``[[rule]]`` tables. A rule matches messages by
``topic`` pattern and/or publishing ``service`` and says any of::

    [[rule]]
    name = "orders"                      # shown in errors, metrics and meshmq tap
    topic = "orders.>"                   # pattern (default: every topic)
    service = "orders"                   # publishing service (default: any)
    rate = { per_second = 100, burst = 200, per = "publisher", on_excess = "delay" }
    retry = { max_attempts = 5, backoff = 0.2, backoff_max = 10 }
    ttl = 3600                           # seconds
    priority = "high"                    # high, normal or low
    breaker = { failures = 5, window = 30, open_for = 10, probes = 1 }
    route = [{ when = "data.totalAmount > 1000", to = "orders.review" }]
    schema = { type = "OrderPlaced", version = 2 }

``rate.per`` is ``publisher`` (a bucket per publishing node) or ``topic`` (one per
topic); ``on_excess`` is ``delay`` (publish waits for a token), ``reject`` (publish
raises) or ``dead-letter``. The first rule that matches a message and says a thing
decides that thing for it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterable
from typing import Any

from ._expr import Expression, ExpressionError, parse as parse_expression
from ._topics import check_pattern, check_user_topic, matches

PRIORITIES = ("high", "normal", "low")
ON_EXCESS = ("delay", "reject", "dead-letter")
MAX_RULES = 1000
MAX_ROUTES = 16


class PolicyError(ValueError):
    """A policy file that cannot be used: where (line, rule) and what is wrong."""

    def __init__(self, source: str, line: int | None, rule: str | None, problem: str) -> None:
        where = source + (f":{line}" if line else "")
        super().__init__(f"{where}: {f'rule {rule!r}: ' if rule else ''}{problem}")
        self.source = source
        self.line = line
        self.rule = rule
        self.problem = problem


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: int
    per: str = "publisher"
    on_excess: str = "delay"


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int
    backoff: float = 0.1
    backoff_max: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Breaker:
    failures: int
    window: float
    open_for: float
    probes: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    when: Expression
    to: str


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int
    topic: tuple[str, ...] | None = None
    service: str | None = None
    rate: Rate | None = None
    retry: Retry | None = None
    ttl: float | None = None
    priority: str | None = None
    breaker: Breaker | None = None
    routes: tuple[Route, ...] = ()
    schema: tuple[str, int] | None = None

    def applies(self, topic: str, service: str) -> bool:
        return (self.topic is None or matches(self.topic, topic)) and (self.service is None or self.service == service)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    version: int
    rules: tuple[Rule, ...]

    def first(self, what: str, topic: str, service: str) -> Rule | None:
        """The first rule for (topic, service) that says ``what`` (``rate``, ``ttl``, ...)."""
        for rule in self.rules:
            value = getattr(rule, what)
            if value not in (None, ()) and rule.applies(topic, service):
                return rule
        return None

    def routes(self, topic: str, service: str) -> list[Route]:
        """Every extra route of every rule for (topic, service), in file order."""
        return [r for rule in self.rules if rule.routes and rule.applies(topic, service) for r in rule.routes]


def load(text: str, source: str = "policy") -> Policy:
    """Parse and check a policy file; :class:`PolicyError` names the first problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise PolicyError(source, int(m.group(1)) if m else None, None, f"not valid TOML: {exc}") from None
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if re.match(r"\s*\[\[\s*rule\s*\]\]", line)]
    unknown = set(doc) - {"version", "rule"}
    if unknown:
        raise PolicyError(source, None, None, f"unknown top-level key(s): {', '.join(sorted(unknown))} "
                                              "(a policy has 'version' and [[rule]] tables)")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise PolicyError(source, _line_of(text, "version"), None, f"version must be a whole number from 1, got {version!r}")
    rules_doc = doc.get("rule", [])
    if not isinstance(rules_doc, list):
        raise PolicyError(source, _line_of(text, "rule"), None, "rules are [[rule]] tables")
    if len(rules_doc) > MAX_RULES:
        raise PolicyError(source, None, None, f"{len(rules_doc)} rules; at most {MAX_RULES}")
    rules = []
    names: set[str] = set()
    for i, raw in enumerate(rules_doc):
        line = lines[i] if i < len(lines) else None
        end = lines[i + 1] if i + 1 < len(lines) else None
        rule = _rule(raw, i, line, source, text.splitlines()[(line or 1) - 1:(end or 0) - 1 if end else None])
        if rule.name in names:
            raise PolicyError(source, line, rule.name, "another rule has this name")
        names.add(rule.name)
        rules.append(rule)
    return Policy(version, tuple(rules))


def _line_of(text: str, key: str) -> int | None:
    for i, line in enumerate(text.splitlines()):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return i + 1
    return None


_FIELDS = {"name", "topic", "service", "rate", "retry", "ttl", "priority", "breaker", "route", "schema"}


def _rule(raw: Any, index: int, line: int | None, source: str, block: list[str]) -> Rule:
    name = raw.get("name", f"#{index + 1}") if isinstance(raw, dict) else f"#{index + 1}"

    def fail(problem: str) -> PolicyError:
        # The line of the key the problem is about, when the rule's block names it.
        key = problem.split(":")[0].split(".")[0].split(" ")[0]
        for offset, text in enumerate(block):
            if line is not None and re.match(rf"\s*{re.escape(key)}\s*=", text):
                return PolicyError(source, line + offset, str(name), problem)
        return PolicyError(source, line, str(name), problem)

    if not isinstance(raw, dict):
        raise fail("a rule is a table")
    if not isinstance(name, str) or not 0 < len(name) <= 100:
        raise fail("name must be a string of 1 to 100 characters")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}; a rule has {', '.join(sorted(_FIELDS))}")
    fields: dict[str, Any] = {"name": name, "line": line or 0}
    if "topic" in raw:
        try:
            fields["topic"] = check_pattern(raw["topic"])
        except ValueError as exc:
            raise fail(f"topic: {exc}") from None
    if "service" in raw:
        if not isinstance(raw["service"], str) or not raw["service"]:
            raise fail("service must be a service name")
        fields["service"] = raw["service"]
    if "rate" in raw:
        r = _table(raw["rate"], "rate", {"per_second", "burst", "per", "on_excess"}, fail)
        per_second = _number(r, "per_second", "rate", fail, required=True)
        burst = r.get("burst", max(1, int(per_second)))
        if type(burst) is not int or burst < 1:
            raise fail(f"rate.burst must be a whole number from 1, got {burst!r}")
        per = r.get("per", "publisher")
        if per not in ("publisher", "topic"):
            raise fail(f"rate.per must be 'publisher' or 'topic', got {per!r}")
        on_excess = r.get("on_excess", "delay")
        if on_excess not in ON_EXCESS:
            raise fail(f"rate.on_excess must be one of {', '.join(ON_EXCESS)}, got {on_excess!r}")
        fields["rate"] = Rate(per_second, burst, per, on_excess)
    if "retry" in raw:
        r = _table(raw["retry"], "retry", {"max_attempts", "backoff", "backoff_max"}, fail)
        attempts = r.get("max_attempts")
        if type(attempts) is not int or not 1 <= attempts <= 1000:
            raise fail(f"retry.max_attempts must be a whole number from 1 to 1000, got {attempts!r}")
        backoff = _number(r, "backoff", "retry", fail, default=0.1)
        backoff_max = _number(r, "backoff_max", "retry", fail, default=max(10.0, backoff))
        if backoff_max < backoff:
            raise fail("retry.backoff_max must be at least retry.backoff")
        fields["retry"] = Retry(attempts, backoff, backoff_max)
    if "ttl" in raw:
        fields["ttl"] = _number(raw, "ttl", "", fail, required=True)
    if "priority" in raw:
        if raw["priority"] not in PRIORITIES:
            raise fail(f"priority must be one of {', '.join(PRIORITIES)}, got {raw['priority']!r}")
        fields["priority"] = raw["priority"]
    if "breaker" in raw:
        b = _table(raw["breaker"], "breaker", {"failures", "window", "open_for", "probes"}, fail)
        failures, probes = b.get("failures"), b.get("probes", 1)
        if type(failures) is not int or failures < 1:
            raise fail(f"breaker.failures must be a whole number from 1, got {failures!r}")
        if type(probes) is not int or probes < 1:
            raise fail(f"breaker.probes must be a whole number from 1, got {probes!r}")
        fields["breaker"] = Breaker(failures, _number(b, "window", "breaker", fail, required=True),
                                    _number(b, "open_for", "breaker", fail, required=True), probes)
    if "route" in raw:
        routes = raw["route"]
        if not isinstance(routes, list) or not 0 < len(routes) <= MAX_ROUTES:
            raise fail(f"route is a list of 1 to {MAX_ROUTES} {{ when = ..., to = ... }}")
        parsed = []
        for n, r in enumerate(routes, 1):
            r = _table(r, f"route {n}", {"when", "to"}, fail)
            try:
                when = parse_expression(r.get("when", ""))
            except ExpressionError as exc:
                raise fail(f"route {n}: when: {exc}") from None
            try:
                check_user_topic(r.get("to"))  # type: ignore[arg-type]  # checked: a str, or TopicError
            except (ValueError, TypeError) as exc:
                raise fail(f"route {n}: to: {exc}") from None
            parsed.append(Route(when, r["to"]))
        fields["routes"] = tuple(parsed)
    if "schema" in raw:
        s = _table(raw["schema"], "schema", {"type", "version"}, fail)
        if not isinstance(s.get("type"), str) or type(s.get("version")) is not int or s["version"] < 1:
            raise fail("schema needs a type (string) and a version (whole number from 1)")
        fields["schema"] = (s["type"], s["version"])
    return Rule(**fields)


def _table(value: Any, what: str, keys: set[str], fail: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(f"{what} must be a table like {{ {', '.join(sorted(keys))} }}")
    unknown = set(value) - keys
    if unknown:
        raise fail(f"{what}: unknown key(s) {', '.join(sorted(unknown))}; it has {', '.join(sorted(keys))}")
    return value


def _number(table: dict[str, Any], key: str, within: str, fail: Any, *, required: bool = False,
            default: float | None = None) -> float:
    name = f"{within}.{key}" if within else key
    if key not in table:
        if required or default is None:
            raise fail(f"{name} is missing")
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e12:
        raise fail(f"{name} must be a positive number, got {value!r}")
    return float(value)


# --- enforcement machinery ------------------------------------------------------------------


class TokenBucket:
    """``per_second`` tokens a second, at most ``burst`` saved up. Exact to the token."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, per_second: float, burst: int, now: float) -> None:
        self.rate = per_second
        self.burst = burst
        self.tokens = float(burst)
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
            self.at = now

    def take(self, now: float, n: int = 1) -> float:
        """0.0 and ``n`` tokens taken, or the seconds to wait until there are ``n`` (none taken)."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
_BREAKER = {
    # state -> event -> next state (h11-style table; anything else is a no-op)
    CLOSED: {"trip": OPEN},
    OPEN: {"cool": HALF_OPEN},
    HALF_OPEN: {"success": CLOSED, "failure": OPEN},
}


class CircuitBreaker:
    """Per destination: ``closed`` lets everything through; ``failures`` failures (or
    timeouts) within ``window`` seconds open it: nothing goes (messages wait in the
    outbox) for ``open_for`` seconds; then ``half-open`` lets ``probes`` through, and one
    success closes it again, one failure opens it again."""

    def __init__(self, spec: Breaker) -> None:
        self.spec = spec
        self.state = CLOSED
        self._failures: list[float] = []
        self._opened_at = 0.0
        self._probing = 0

    def _to(self, event: str) -> None:
        self.state = _BREAKER[self.state].get(event, self.state)

    def allow(self, now: float) -> bool:
        """Whether one more message may be sent now."""
        if self.state == OPEN and now - self._opened_at >= self.spec.open_for:
            self._to("cool")
            self._probing = 0
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and self._probing < self.spec.probes:
            self._probing += 1
            return True
        return False

    def record(self, now: float, ok: bool) -> None:
        """The outcome of something sent (acknowledged, or failed / timed out)."""
        if self.state == HALF_OPEN:
            self._to("success" if ok else "failure")
            if self.state == OPEN:
                self._opened_at = now
            self._failures.clear()
            return
        if ok or self.state != CLOSED:
            return
        self._failures = [t for t in self._failures if now - t < self.spec.window] + [now]
        if len(self._failures) >= self.spec.failures:
            self._to("trip")
            self._opened_at = now
            self._failures.clear()


def lane(priority: str | None) -> int:
    """The send lane of a priority: 0 (high) before 1 (normal) before 2 (low)."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else 1


def pick_lane(waiting: Iterable[int], served: list[int], starve_after: int = 8) -> int | None:
    """Which lane (0 high, 1 normal, 2 low) sends next: the highest with messages, except
    that a lane passed over ``starve_after`` times in a row goes first (no starvation).
    ``served`` counts, per lane, how often it was passed over; updated in place."""
    ready = sorted(set(waiting))
    if not ready:
        return None
    starving = [lane_ for lane_ in ready if served[lane_] >= starve_after]
    chosen = starving[-1] if starving else ready[0]  # the lowest lane starved longest
    for lane_ in ready:
        served[lane_] = 0 if lane_ == chosen else served[lane_] + 1
    return chosen
