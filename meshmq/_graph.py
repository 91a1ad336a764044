"""``meshmq graph``: the mesh's topology as Graphviz DOT or Mermaid, so a user can see it.

Services are boxes (with how many nodes run them); topic patterns are ellipses; an
arrow from a pattern to a service is a subscription (labelled with its queue group);
an arrow from a service to a topic is traffic a tap saw during ``--observe`` seconds
(labelled with the message count). The rendering is pure: :class:`Topology` in,
text out.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable


@dataclasses.dataclass
class Topology:
    services: dict[str, set[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    """service -> its node ids"""
    subscriptions: set[tuple[str, str, str | None]] = dataclasses.field(default_factory=set)
    """(pattern, service, queue group)"""
    flows: collections.Counter[tuple[str, str]] = dataclasses.field(default_factory=collections.Counter)
    """(publishing service, topic) -> messages seen"""

    def add_node(self, service: str, node: str) -> None:
        self.services[service].add(node)

    def add_subscription(self, pattern: str, service: str, group: str | None) -> None:
        self.subscriptions.add((pattern, service, group))

    def add_flow(self, service: str, topic: str, count: int = 1) -> None:
        self.flows[(service, topic)] += count


def _topics(t: Topology) -> list[str]:
    return sorted({p for p, _, _ in t.subscriptions} | {topic for _, topic in t.flows})


def _ids(names: Iterable[str], prefix: str) -> dict[str, str]:
    """Stable identifiers that DOT and Mermaid accept, one per name."""
    return {name: f"{prefix}{i}" for i, name in enumerate(sorted(set(names)))}


def _quote(text: str) -> str:
    """A DOT string: backslashes and quotes escaped, line breaks as DOT's \\n."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _nodes_label(service: str, nodes: set[str]) -> str:
    return f"{service}\n{len(nodes)} node{'s' if len(nodes) != 1 else ''}" if nodes else service


def to_dot(t: Topology, mesh: str) -> str:
    svc = _ids(list(t.services) + [s for _, s, _ in t.subscriptions] + [s for s, _ in t.flows], "s")
    top = _ids(_topics(t), "t")
    lines = [f"digraph {_quote('mesh ' + mesh)} {{", "  rankdir=LR;", "  node [fontname=Helvetica];"]
    for name, ident in svc.items():
        label = _quote(_nodes_label(name, t.services.get(name, set())))
        lines.append(f"  {ident} [shape=box, style=rounded, label={label}];")
    for name, ident in top.items():
        lines.append(f"  {ident} [shape=ellipse, label={_quote(name)}];")
    for service, topic in sorted(t.flows):
        lines.append(f"  {svc[service]} -> {top[topic]} [label={_quote(str(t.flows[(service, topic)]))}];")
    for pattern, service, group in sorted(t.subscriptions, key=lambda x: (x[0], x[1], x[2] or "")):
        label = f" [label={_quote('queue ' + group)}, style=dashed]" if group else ""
        lines.append(f"  {top[pattern]} -> {svc[service]}{label};")
    lines.append("}")
    return "\n".join(lines)


_MERMAID_UNSAFE = re.compile(r'["\[\]{}()<>|#;]')


def _mermaid_text(text: str) -> str:
    return _MERMAID_UNSAFE.sub("_", text)


def to_mermaid(t: Topology, mesh: str) -> str:
    svc = _ids(list(t.services) + [s for _, s, _ in t.subscriptions] + [s for s, _ in t.flows], "s")
    top = _ids(_topics(t), "t")
    lines = ["flowchart LR", f"  %% mesh {_mermaid_text(mesh)}"]
    for name, ident in svc.items():
        nodes = t.services.get(name, set())
        count = f"<br/>{len(nodes)} node{'s' if len(nodes) != 1 else ''}" if nodes else ""
        lines.append(f'  {ident}["{_mermaid_text(name)}{count}"]')
    for name, ident in top.items():
        lines.append(f'  {ident}(["{_mermaid_text(name)}"])')
    for service, topic in sorted(t.flows):
        lines.append(f"  {svc[service]} -->|{t.flows[(service, topic)]}| {top[topic]}")
    for pattern, service, group in sorted(t.subscriptions, key=lambda x: (x[0], x[1], x[2] or "")):
        arrow = f" -.->|queue {_mermaid_text(group)}| " if group else " --> "
        lines.append(f"  {top[pattern]}{arrow}{svc[service]}")
    return "\n".join(lines)


GRAPH_EPILOG = """\
  meshmq graph                          the mesh as Graphviz DOT (| dot -Tsvg > mesh.svg)
  meshmq graph --mermaid                as Mermaid (paste into a Markdown file)
  meshmq graph --observe 10             also the traffic a tap sees for 10 s: who publishes what

Boxes are services (with their node count), ellipses topic patterns; pattern ->
service is a subscription (dashed: a queue group), service -> topic is traffic seen
while observing, labelled with the message count. Publishers appear only with
--observe (the mesh knows who subscribes, not who will publish); observing needs the
tap right (see meshmq tap --help).
"""


def cmd_graph(args: object) -> int:
    """The ``meshmq graph`` command (see :data:`GRAPH_EPILOG`)."""
    import time

    from ._cli import _agent

    t = Topology()
    with _agent(args) as agent:  # type: ignore[arg-type]
        tap = agent.tap(events=False) if args.observe else None  # type: ignore[attr-defined]
        agent.wait_settled(args.wait, quiet_period=args.wait / 3)  # type: ignore[attr-defined]
        if tap is not None:
            deadline = time.monotonic() + args.observe  # type: ignore[attr-defined]
            while (remaining := deadline - time.monotonic()) > 0:
                event = tap.get(min(remaining, 0.5))
                if event is not None and event.kind == "message" and event.topic is not None:
                    t.add_flow(event.source or event.service, event.topic)
        for peer in agent.peers():
            t.add_node(peer.service, peer.node)
        for route in agent.routes():
            if route.node != agent.node_id:
                t.add_subscription(route.pattern, route.service, route.group)
        mesh = agent.config.mesh
    print(to_mermaid(t, mesh) if args.mermaid else to_dot(t, mesh))  # type: ignore[attr-defined]
    return 0
