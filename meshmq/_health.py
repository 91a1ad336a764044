"""Health: is an agent all right, and if not, what is wrong. ``agent.health()`` and
``meshmq health`` both judge with :func:`assess` (pure: what was measured, and ``now``).

Checks: peers (how many are up, suspected), the outbox (backlog against its limits,
the age of its oldest message, destinations that are down), dead letters (how many
arrived lately), the certificate (time left), the store (records moved to
quarantine), and in the agent's own process its subscriptions (the fullest backlog
against ``subscription_queue_messages``: at the limit the agent stops taking data
until it halves) and its event loop (held past ``probe_timeout`` within
``health_stall_window``). Each is ``ok``, ``warn`` or ``fail``; the worst is the verdict.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}


@dataclasses.dataclass(frozen=True, slots=True)
class HealthCheck:
    name: str
    status: str
    """``ok``, ``warn`` or ``fail``."""
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """What :meth:`AsyncAgent.health` and ``meshmq health`` report."""

    checks: tuple[HealthCheck, ...]

    @property
    def status(self) -> str:
        """The worst of the checks: ``ok``, ``warn`` or ``fail``."""
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=OK)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "checks": [dataclasses.asdict(c) for c in self.checks]}

    def __str__(self) -> str:
        return "\n".join(f"[{c.status:<4}] {c.name:<12} {c.detail}" for c in self.checks)


@dataclasses.dataclass(frozen=True, slots=True)
class WaitingFor:
    """Messages waiting in the outbox for one destination."""

    node: str
    service: str
    messages: int
    bytes: int
    up: bool
    oldest: float | None
    """Publish time (seconds since the epoch) of the oldest one, if known."""


def assess(*, now: float, peers: int, suspects: int, waiting: Iterable[WaitingFor], max_messages: int,
           max_bytes: int, max_age: float, dead_letter_times: Iterable[float], dead_letter_window: float,
           cert_not_after: float | None, cert_warning: float, quarantined: int = 0,
           revoked: bool = False, backlogs: Iterable[tuple[str, int]] | None = None,
           backlog_limit: int = 0, stalls: int | None = None, last_stall: tuple[float, float] | None = None,
           stall_window: float = 0.0) -> Health:
    """The verdict on what was measured (see the module docstring for the rules)."""
    checks = [HealthCheck("peers", OK, f"{peers} up" + (f", {suspects} suspected" if suspects else ""))]
    waiting = list(waiting)
    count, size = sum(w.messages for w in waiting), sum(w.bytes for w in waiting)
    fill = max(count / max_messages, size / max_bytes) if max_messages and max_bytes else 0.0
    status = FAIL if fill >= 0.9 else WARN if fill >= 0.5 else OK
    detail = f"{count} messages ({size} bytes) waiting for {len(waiting)} destination(s), {fill:.0%} of its limit"
    oldest = min((w.oldest for w in waiting if w.oldest is not None), default=None)
    if oldest is not None:
        age = now - oldest
        detail += f"; oldest {age:.1f}s old"
        if age > max_age and status == OK:
            status = WARN
    checks.append(HealthCheck("outbox", status, detail))
    down = [w for w in waiting if not w.up]
    if down:
        names = ", ".join(sorted({w.service or w.node for w in down}))
        checks.append(HealthCheck("reachable", WARN, f"{sum(w.messages for w in down)} messages wait for "
                                                     f"destinations that are down: {names}"))
    else:
        checks.append(HealthCheck("reachable", OK, "every destination with messages waiting is up"))
    times = list(dead_letter_times)
    recent = sum(1 for t in times if now - t <= dead_letter_window)
    checks.append(HealthCheck("dead-letters", WARN if recent else OK,
                              f"{recent} new in the last {dead_letter_window:g}s, {len(times)} in all"))
    if revoked:
        checks.append(HealthCheck("certificate", FAIL, "this node's certificate is revoked"))
    elif cert_not_after is not None:
        left = cert_not_after - now
        until = datetime.datetime.fromtimestamp(cert_not_after, datetime.timezone.utc).isoformat(timespec="seconds")
        if left <= 0:
            checks.append(HealthCheck("certificate", FAIL, f"expired at {until}"))
        else:
            status = WARN if left < cert_warning else OK
            checks.append(HealthCheck("certificate", status, f"valid until {until} ({left / 86400:.1f} days)"))
    if quarantined:
        checks.append(HealthCheck("store", WARN, f"{quarantined} damaged records were moved to quarantine"))
    if backlogs is not None and backlog_limit:  # (name, pending) of each subscription
        subs = list(backlogs)
        name, pending = max(subs, key=lambda b: b[1], default=("", 0))
        fill = pending / backlog_limit
        status = FAIL if fill >= 0.9 else WARN if fill >= 0.5 else OK
        detail = f"{len(subs)} subscription(s)"
        if pending:
            detail += f"; fullest {name}: {pending} of {backlog_limit} pending ({fill:.0%}; data waits at 100%)"
        checks.append(HealthCheck("subscriptions", status, detail))
    if stalls is not None:  # the event loop held past probe_timeout: (when, how long) of the last time
        if last_stall is None:
            checks.append(HealthCheck("event-loop", OK, "never held longer than a probe waits"))
        else:
            at, late = last_stall
            ago = now - at
            checks.append(HealthCheck("event-loop", WARN if ago <= stall_window else OK,
                                      f"held for {late:.2f}s {ago:.0f}s ago ({stalls} time(s) in all), longer "
                                      f"than a probe waits: peers may have suspected this node"))
    return Health(tuple(checks))


def envelope_time(env: bytes) -> float | None:
    """The publish time in envelope bytes without decoding them (see :func:`meshmq._tap.envelope_head`)."""
    if env[:4] != b"\x9c\x01\xc4\x10" or len(env) < 29 or env[20] != 0xCB:
        return None
    import struct

    return float(struct.unpack(">d", env[21:29])[0])


HEALTH_EPILOG = """\
  meshmq health --service orders            is the agent of service orders on this host all right?
  meshmq health --service orders --json     the same as JSON: {"status": ..., "checks": [...]}
  meshmq health --service orders --strict   warnings count as failures too (for scripts)

Reads the agent's store (which may be in use) and joins the mesh for --wait seconds
to see which peers are up. Checks: peers; the outbox (backlog against
max_outbox_messages / max_outbox_bytes: warn at 50 %, fail at 90 %; the oldest message
older than health_max_outbox_age); destinations with messages waiting that are down;
dead letters within health_dead_letter_window; the certificate (MESHMQ_CERTIFICATE:
warn within health_certificate_warning of its end, fail once expired); records in
quarantine. Exit code 0 when healthy (warnings allowed unless --strict), 1 otherwise.
"""


def cmd_health(args: Any) -> int:
    """``meshmq health`` (see :data:`HEALTH_EPILOG`)."""
    import json
    import time
    from pathlib import Path

    from ._cli import _agent_store, _open_store, _overrides
    from ._delivery import split_lane_key
    from ._security import decode_certificate, unarmor
    from ._sync import Agent

    directory, durability = _agent_store(args, "health")
    with _open_store(directory, durability) as store:
        contents = store.load()
        dead_letter_times = [r["at"] for _, r in store.dead_letters()]
        quarantined = store.count(b"quarantine")
    with Agent("meshmq-health", **_overrides(args)) as agent:
        agent.wait_settled(args.wait, quiet_period=args.wait / 3)
        peers = agent.peers()
        cfg = agent.config
    up = {p.node for p in peers if p.state == "alive"}
    kept_for: dict[str, tuple[str, list[bytes]]] = {}  # node -> (service, envelopes of every lane)
    for key, (_epoch, _next, acked, service) in contents.streams.items():
        node = split_lane_key(key)[0]
        envs = kept_for.setdefault(node, (service, []))[1]
        envs += [e if isinstance(e, bytes) else e[0]
                 for seq, (e, _expires) in contents.outbox.get(key, []) if seq > acked]
    waiting = []
    for node, (service, envs) in kept_for.items():
        if not envs:
            continue
        times = [t for t in map(envelope_time, envs) if t is not None]
        waiting.append(WaitingFor(node, service, len(envs), sum(map(len, envs)), node in up,
                                  min(times) if times else None))
    cert_not_after = None
    if cfg.certificate is not None:
        cert_not_after = decode_certificate(unarmor(Path(cfg.certificate).read_text())).not_after
    health = assess(now=time.time(), peers=sum(p.state == "alive" for p in peers),
                    suspects=sum(p.state == "suspect" for p in peers), waiting=waiting,
                    max_messages=cfg.max_outbox_messages, max_bytes=cfg.max_outbox_bytes,
                    max_age=cfg.health_max_outbox_age, dead_letter_times=dead_letter_times,
                    dead_letter_window=cfg.health_dead_letter_window, cert_not_after=cert_not_after,
                    cert_warning=cfg.health_certificate_warning, quarantined=quarantined)
    print(json.dumps(health.to_json(), indent=2) if args.json else f"{args.service}: {health.status}\n{health}")
    bad = (FAIL, WARN) if args.strict else (FAIL,)
    return 1 if health.status in bad else 0
