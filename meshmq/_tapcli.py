"""``meshmq tap`` and ``meshmq replay``: watch the mesh's traffic live, record it, show
it again, republish it. The command-line face of :meth:`meshmq.AsyncAgent.tap`."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from ._errors import UsageError
from ._tap import CONTROL_EVENTS, DELIVERY_EVENTS, LOST, MESSAGE, TapEvent
from ._topics import check_pattern, matches

RECORD_FORMAT = "meshmq-tap-record/1"
DEFAULT_EVENTS = ("retried", "expired", "failed", "dead-lettered", "rejected", "limited", "rerouted")
"""Delivery events shown without --events: the ones that mean something went wrong."""
_DATA_LIMIT = 400  # characters of payload per table line
_REMEMBERED_IDS = 100_000  # message ids kept to filter their events by the message's fields

TAP_EPILOG = """\
  meshmq tap                                    everything, as it happens (Ctrl-C stops)
  meshmq tap 'orders.>' --events all            orders' messages and every delivery event
  meshmq tap --service billing --count 20       20 lines about billing, then exit
  meshmq tap --json | jq .topic                 one JSON object per line
  meshmq tap --duration 60 --record today.tap   a minute of traffic, saved (meshmq replay today.tap)

Each line is a message (time, topic, type, source -> destinations, size, id, payload),
a delivery event about messages (sent, acked, retried, expired, failed: a handler
raised or nacked it and it will be tried again, dead-lettered, rejected), or a control event the tap saw (joined, left, dead, replaced, revoked,
routes). --events picks which events: 'all', 'none', 'control' or a comma list;
default: the delivery events that mean trouble. Payloads are shown only for topics this tap's certificate lets it
subscribe to; the header alone otherwise. A tap that falls behind says how many
items it did not show; it never slows the mesh down. The tap joins the mesh as an
agent (service meshmq-tap) whose certificate needs the tap right: nothing to set up
under the development authority; with a real one, 'meshmq cert issue --service
meshmq-tap --tap ...' and MESHMQ_CERTIFICATE. Exit code 0; 1 if --count was not
reached within --duration.
"""

REPLAY_EPILOG = """\
  meshmq replay today.tap                       show a recording as meshmq tap showed it
  meshmq replay today.tap --json --events all   every recorded item as JSON lines
  meshmq replay today.tap 'orders.>' --to-mesh  publish the recorded orders messages again

--to-mesh publishes each recorded message (with its payload) again, as this
command's own agent, with its own identity and rights: topic, type, key-less,
headers and payload as recorded; a new message id. Messages recorded without their
payload (the tap could not read them) cannot be republished: they are counted.
"""


def add_commands(command: Any, add_mesh_options: Any, positive_int: Any, seconds: Any) -> None:
    tap = command("tap", "Watch the mesh's messages and delivery events live.", TAP_EPILOG, cmd_tap)
    tap.add_argument("patterns", nargs="*", metavar="PATTERN", help="topic patterns to watch (default: '>', all)")
    _add_filters(tap)
    tap.add_argument("--count", type=positive_int, metavar="N", help="exit after showing N lines")
    tap.add_argument("--duration", type=seconds, metavar="S", help="exit after S seconds")
    tap.add_argument("--record", metavar="FILE", help="also save what is shown to FILE (meshmq replay FILE)")
    add_mesh_options(tap, service=False)

    top = command("top", "A live picture of the mesh: busiest topics, each agent's rates, outbox, dead letters, "
                         "latency.", TOP_EPILOG, cmd_top)
    top.add_argument("patterns", nargs="*", metavar="PATTERN", help="topic patterns to count (default: '>', all)")
    top.add_argument("--interval", type=seconds, default=2.0, metavar="S", help="seconds between pictures (default 2)")
    top.add_argument("--duration", type=seconds, metavar="S", help="exit after S seconds")
    top.add_argument("--count", type=positive_int, metavar="N", help="exit after N pictures")
    top.add_argument("--once", action="store_true", help="one picture (after --duration, default --interval), then exit")
    top.add_argument("--json", action="store_true", help="each picture as one JSON object per line")
    add_mesh_options(top)

    replay = command("replay", "Show a recording of meshmq tap again, or publish its messages again.",
                     REPLAY_EPILOG, cmd_replay)
    replay.add_argument("file", metavar="FILE", help="a file written by meshmq tap --record")
    replay.add_argument("patterns", nargs="*", metavar="PATTERN", help="only these topics (default: all)")
    _add_filters(replay)
    replay.add_argument("--to-mesh", action="store_true", help="publish the recorded messages again")
    add_mesh_options(replay, service=False)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", dest="services", action="append", default=[], metavar="S",
                        help="only what service S published, sent, received or reported (repeatable)")
    parser.add_argument("--type", dest="types", action="append", default=[], metavar="T",
                        help="only messages of event type T, and events about them (repeatable)")
    parser.add_argument("--node", dest="nodes", action="append", default=[], metavar="N",
                        help="only what node N (an id or its first digits) published or reported (repeatable)")
    parser.add_argument("--events", default=",".join(DEFAULT_EVENTS), metavar="KINDS",
                        help="events to show: 'all', 'none', 'control', or a comma list of delivery events "
                             f"({', '.join(DELIVERY_EVENTS)}) and control events ({', '.join(CONTROL_EVENTS)}); "
                             f"default: {','.join(DEFAULT_EVENTS)}")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (for jq and pipes)")
    parser.add_argument("--headers-only", action="store_true", help="never show payloads")
    parser.add_argument("--no-color", action="store_true", help="no colors, even in a terminal (also NO_COLOR=1)")


class Filter:
    """What the command shows: topic patterns, services, types, nodes and event kinds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.patterns = tuple(check_pattern(p) for p in (args.patterns or [">"]))  # TopicError names the fault
        self.events: set[str] = set()
        for word in (e.strip() for e in args.events.split(",")):
            if word == "all":
                self.events |= set(DELIVERY_EVENTS + CONTROL_EVENTS)
            elif word == "control":
                self.events |= set(CONTROL_EVENTS)
            elif word in DELIVERY_EVENTS or word in CONTROL_EVENTS:
                self.events.add(word)
            elif word not in ("none", ""):
                raise UsageError(f"--events: unknown kind {word}; choose from all, none, control, "
                                 f"{', '.join(DELIVERY_EVENTS + CONTROL_EVENTS)}")
        self.services = set(args.services)
        self.types = set(args.types)
        self.nodes = tuple(args.nodes)
        self._shown: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __call__(self, event: TapEvent) -> bool:
        if event.kind == LOST:
            return True
        if event.topic is not None and not any(matches(p, event.topic) for p in self.patterns):
            return False
        if event.kind == MESSAGE:
            if self.types and event.type not in self.types:
                return False
            if self.services and event.source not in self.services and not self.services & set(event.destinations):
                return False
            if self.nodes and not any(event.node.startswith(n) for n in self.nodes):
                return False
            if self.types or self.services or self.nodes:
                self._remember(event.ids)
            return True
        if event.kind not in self.events:
            return False
        if event.kind in CONTROL_EVENTS:
            if self.services and event.peer_service not in self.services:
                return False
            return not self.nodes or any((event.peer or "").startswith(n) for n in self.nodes)
        if self.types or self.services or self.nodes:
            # An event passes with the messages it is about, or by its own reporter / peer.
            if any(i in self._shown for i in event.ids):
                return True
            if self.types:
                return False
            by_service = bool(self.services) and (event.service in self.services or event.peer_service in self.services)
            by_node = bool(self.nodes) and any(event.node.startswith(n) or (event.peer or "").startswith(n)
                                                for n in self.nodes)
            return by_service or by_node
        return True

    def _remember(self, ids: Iterable[str]) -> None:
        for i in ids:
            self._shown[i] = None
        while len(self._shown) > _REMEMBERED_IDS:
            self._shown.popitem(last=False)


class Printer:
    """Lines on ``out``: a readable, colored table in a terminal, or JSON lines."""

    COLORS = {MESSAGE: "", "sent": "\033[2m", "acked": "\033[32m", "retried": "\033[33m", "expired": "\033[31m",
              "failed": "\033[33m", "dead-lettered": "\033[1;31m", "rejected": "\033[1;31m", "limited": "\033[33m", "rerouted": "\033[36m", LOST: "\033[1;33m", "joined": "\033[36m",
              "left": "\033[36m", "suspected": "\033[35m", "outbox-warning": "\033[1;33m", "breaker": "\033[1;33m", "dead": "\033[1;35m", "replaced": "\033[36m", "revoked": "\033[1;35m",
              "routes": "\033[36m"}

    def __init__(self, out: TextIO, as_json: bool, headers_only: bool, color: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.headers_only = headers_only
        self.color = color

    def __call__(self, event: TapEvent) -> None:
        self.out.write(self.line(event) + "\n")
        self.out.flush()

    def line(self, event: TapEvent) -> str:
        if self.as_json:
            obj = event.to_json()
            if self.headers_only:
                obj.pop("data", None)
                obj.pop("raw_hex", None)
            return json.dumps(obj, ensure_ascii=False)
        when = datetime.datetime.fromtimestamp(event.at).strftime("%H:%M:%S.%f")[:-3]
        if event.kind == MESSAGE:
            dests = ",".join(event.destinations) or "(no subscriber)"
            fields = [when, event.topic or "?", event.type or "-", f"{event.source} -> {dests}", _size(event.size),
                      _short(event.ids[0]) if event.ids else "?"]
            if not self.headers_only:
                fields.append(_payload(event))
        elif event.kind == LOST:
            fields = [when, "LOST", f"{event.count} items not shown", f"({event.detail})" if event.detail else ""]
        elif event.kind in ("outbox-warning", "breaker"):
            fields = [when, event.kind, event.service, event.detail or ""]
        elif event.kind in CONTROL_EVENTS:
            who = f"{event.peer_service} ({event.peer})" if event.peer else ""
            fields = [when, event.kind, who, event.detail or ""]
        else:
            n = len(event.ids)
            about = _short(event.ids[0]) if n == 1 else f"{n} messages"
            peer = event.peer_service or event.peer or "-"
            arrow = "<-" if event.kind == "rejected" else "->"
            fields = [when, event.kind, f"{event.service} {arrow} {peer}", event.topic or "", about]
            if event.detail:
                fields.append(event.detail)
        text = "  ".join(f for f in fields if f)
        if self.color:
            start = self.COLORS.get(event.kind, "")
            return f"{start}{text}\033[0m" if start else text
        return text


def _short(message_id: str) -> str:
    """A message id as a line shows it: its life's prefix and its number, shortened (the
    prefix is shared by everything one agent published in one life)."""
    return f"{message_id[:6]}..{message_id[-6:]}" if len(message_id) > 14 else message_id


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    return f"{size} B" if size < 10_000 else f"{size / 1024:.1f} KiB"


def _payload(event: TapEvent) -> str:
    if event.raw is None:
        return "(payload not readable by this tap)"
    try:
        data = event.data
        shown = repr(data) if isinstance(data, bytes) else json.dumps(data, ensure_ascii=False, default=repr)
    except Exception as exc:  # a payload that does not decode: say so, never crash the tap
        shown = f"<undecodable: {exc}>"
    return shown if len(shown) <= _DATA_LIMIT else f"{shown[:_DATA_LIMIT]}... (--json shows all)"


def _use_color(args: argparse.Namespace, out: TextIO) -> bool:
    return not args.json and not args.no_color and not os.environ.get("NO_COLOR") and out.isatty()


class Recorder:
    """``--record FILE``: a header line, then each shown event as a JSON line."""

    def __init__(self, path: str, patterns: tuple[str, ...], mesh: str) -> None:
        try:
            self.file = open(path, "x", encoding="utf-8")  # never overwrite a recording
        except FileExistsError:
            raise UsageError(f"--record: {path} exists already; it is never overwritten") from None
        except OSError as exc:
            raise UsageError(f"--record: cannot create {path}: {exc.strerror}") from None
        self.file.write(json.dumps({"format": RECORD_FORMAT, "patterns": list(patterns), "mesh": mesh,
                                    "started": time.time()}) + "\n")

    def __call__(self, event: TapEvent) -> None:
        self.file.write(json.dumps(event.to_json(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.file.close()


def read_recording(path: str) -> Iterator[TapEvent]:
    """The events of a recording; BadInput naming the line of anything that is not one."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        first = f.readline()
        try:
            header = json.loads(first)
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != RECORD_FORMAT:
            raise UsageError(f"{path} is not a recording of meshmq tap (its first line should name {RECORD_FORMAT})")
        for number, line in enumerate(f, 2):
            if not line.strip():
                continue
            try:
                yield TapEvent.from_json(json.loads(line))
            except (json.JSONDecodeError, ValueError) as exc:
                raise UsageError(f"{path}, line {number}: not a tap event ({exc})") from None


# --- the commands --------------------------------------------------------------------------


def cmd_tap(args: argparse.Namespace) -> int:
    from ._sync import Agent
    from ._cli import _arrivals, _note, _overrides, _until

    shown_filter = Filter(args)
    printer = Printer(sys.stdout, args.json, args.headers_only, _use_color(args, sys.stdout))
    patterns = tuple(args.patterns or [">"])
    with Agent(_service(args, "meshmq-tap"), **_overrides(args)) as agent:
        recorder = Recorder(args.record, patterns, agent.config.mesh) if args.record else None
        try:
            tap = agent.tap(*patterns, events=shown_filter.events)
            _note(f"tapping {' '.join(patterns)} in mesh {agent.config.mesh!r} until "
                  f"{_until(args.count, 'line', args.duration)}")
            shown = 0
            for event in _arrivals(tap, args.duration):
                if not shown_filter(event):
                    continue
                shown += 1
                printer(event)
                if recorder is not None:
                    recorder(event)
                if shown == args.count:
                    break
        finally:
            if recorder is not None:
                recorder.close()
    if args.count is not None and shown < args.count:
        _note(f"{shown} of {args.count} lines within {args.duration:g}s")
        return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from ._cli import _note

    shown_filter = Filter(args)
    events = [e for e in read_recording(args.file) if shown_filter(e)]
    if not args.to_mesh:
        printer = Printer(sys.stdout, args.json, args.headers_only, _use_color(args, sys.stdout))
        for event in events:
            printer(event)
        return 0
    return _republish(args, [e for e in events if e.kind == MESSAGE], _note)


def _service(args: argparse.Namespace, default: str) -> str:
    """The agent's service name: --service before the command, else ``default``."""
    return args.service if args.service not in (None, "meshmq-cli") else default


def _republish(args: argparse.Namespace, messages: list[TapEvent], note: Any) -> int:
    from ._sync import Agent
    from ._cli import _overrides

    readable = [m for m in messages if m.raw is not None and m.topic is not None]
    if len(readable) < len(messages):
        note(f"{len(messages) - len(readable)} recorded messages have no payload (the tap could not read them): "
             "not republished")
    if not readable:
        note("nothing to republish")
        return 1 if messages else 0
    with Agent(_service(args, "meshmq-replay"), **_overrides(args)) as agent:
        agent.wait_settled(timeout=2.0)
        for m in readable:
            data: Any = m.data if m.format == 1 else m.raw
            agent.publish(m.topic, data, type=m.type,  # type: ignore[arg-type]
                          headers={k: v for k, v in (m.headers or {}).items() if not k.startswith("meshmq-")} or None)
    note(f"republished {len(readable)} messages as {agent.service}")
    return 0



# --- meshmq top -------------------------------------------------------------------------------

TOP_EPILOG = """\
  meshmq top                          the mesh live: busiest topics, and each agent's figures
  meshmq top 'orders.>' --interval 5  only orders' topics, refreshed every 5 s
  meshmq top --once --duration 10     watch 10 s, print one picture, exit (for scripts and docs)
  meshmq top --json --count 3         three pictures as JSON lines

Topics: messages per second seen by this tap over the last interval, and in all.
Agents (each reports every tap_stats_interval to taps that ask): messages published and
received per second, outbox depth (messages, bytes), dead letters, messages sent again,
and delivery latency (publish to hand-over) p50 / p99 over the last report, from the
histogram's bucket bounds. Needs the tap right, like meshmq tap.
"""


class TopView:
    """What ``meshmq top`` shows, from the events of one tap (pure: times are given)."""

    def __init__(self, now: float) -> None:
        self.topics: collections.Counter[str] = collections.Counter()  # in all
        self._window: collections.Counter[str] = collections.Counter()  # since the last picture
        self.agents: dict[str, dict[str, Any]] = {}  # node -> service, figures, rates
        self.lost = 0
        self._since = now

    def add(self, event: TapEvent) -> None:
        if event.kind == MESSAGE and event.topic is not None:
            self.topics[event.topic] += 1
            self._window[event.topic] += 1
        elif event.kind == LOST:
            self.lost += event.count or 0
        elif event.kind == "stats" and event.stats is not None:
            agent = self.agents.setdefault(event.node, {"service": event.service})
            previous, at = agent.get("figures"), agent.get("at")
            if previous is not None and at is not None and event.at > at:
                span = event.at - at
                agent["pub_rate"] = max(0.0, (event.stats.get("published", 0) - previous.get("published", 0)) / span)
                agent["recv_rate"] = max(0.0, (event.stats.get("received", 0) - previous.get("received", 0)) / span)
            agent["figures"], agent["at"] = event.stats, event.at

    def picture(self, now: float, rows: int = 15) -> dict[str, Any]:
        """One picture: topic rates since the last one, and the agents' latest figures."""
        span = max(now - self._since, 1e-9)
        topics = [{"topic": t, "rate": self._window[t] / span, "total": n}
                  for t, n in sorted(self.topics.items(), key=lambda kv: (-self._window[kv[0]], -kv[1], kv[0]))][:rows]
        self._window = collections.Counter()
        self._since = now
        agents = []
        for node, a in sorted(self.agents.items(), key=lambda kv: (kv[1]["service"], kv[0])):
            f = a.get("figures", {})
            agents.append({"service": a["service"], "node": node, "pub_rate": a.get("pub_rate"),
                           "recv_rate": a.get("recv_rate"), "outbox_messages": f.get("outbox_messages"),
                           "outbox_bytes": f.get("outbox_bytes"), "dead_letters": f.get("dead_letters"),
                           "retried": f.get("retried"), "latency_p50": f.get("latency_p50"),
                           "latency_p99": f.get("latency_p99")})
        return {"at": now, "topics": topics, "agents": agents, "lost": self.lost}


def render_picture(p: dict[str, Any], mesh: str) -> str:
    def num(v: Any, fmt: str = "{:,.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    when = datetime.datetime.fromtimestamp(p["at"]).strftime("%H:%M:%S")
    lines = [f"meshmq top — mesh {mesh!r} — {when}" + (f" — {p['lost']} items not shown (fell behind)"
                                                       if p["lost"] else ""), ""]
    rows = [("TOPIC", "MSG/S", "MESSAGES")] + [(t["topic"], num(t["rate"], "{:,.1f}"), num(t["total"]))
                                               for t in p["topics"]]
    lines += _columns(rows) + [""]
    rows = [("SERVICE", "NODE", "PUB/S", "RECV/S", "OUTBOX", "BYTES", "DLQ", "RETRIED", "P50 MS", "P99 MS")]
    rows += [(a["service"], a["node"][:8], num(a["pub_rate"], "{:,.1f}"), num(a["recv_rate"], "{:,.1f}"),
              num(a["outbox_messages"]), num(a["outbox_bytes"]), num(a["dead_letters"]), num(a["retried"]),
              ms(a["latency_p50"]), ms(a["latency_p99"])) for a in p["agents"]]
    lines += _columns(rows)
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def cmd_top(args: argparse.Namespace) -> int:
    from ._cli import _overrides
    from ._sync import Agent

    patterns = tuple(args.patterns or [">"])
    for p in patterns:
        check_pattern(p)
    if args.interval <= 0:
        raise UsageError("--interval must be more than 0 seconds")
    tty = sys.stdout.isatty() and not args.json and not args.once
    with Agent(_service(args, "meshmq-top"), **_overrides(args)) as agent:
        tap = agent.tap(*patterns, events=["stats"])
        view = TopView(time.time())
        end = None if args.duration is None else time.monotonic() + args.duration
        shown = 0
        next_picture = time.monotonic() + (args.duration if args.once and args.duration else args.interval)
        while True:
            now = time.monotonic()
            if now >= next_picture or (end is not None and now >= end):
                picture = view.picture(time.time())
                if args.json:
                    print(json.dumps(picture), flush=True)
                else:
                    text = render_picture(picture, agent.config.mesh)
                    print(("\033[H\033[2J" + text) if tty else text + "\n", flush=True)
                shown += 1
                next_picture = now + args.interval
                if args.once or (args.count is not None and shown >= args.count) or (end is not None and now >= end):
                    return 0
            event = tap.get(max(0.0, min(next_picture, end if end is not None else next_picture) - now))
            if event is not None:
                view.add(event)
