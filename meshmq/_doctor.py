"""``meshmq doctor``: checks why agents do or do not find each other, and says how to fix it.

It starts a short-lived agent with the same settings as the user's, listens to
every meshmq announcement on the configured interfaces (all meshes), waits for
discovery to settle, and reports findings: interfaces, mDNS (multicast), mesh
name mismatches, peers, endpoints and seeds that do not answer, clock skew.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import time
from collections.abc import Sequence
from typing import Any

from ._agent import AsyncAgent, PeerInfo, _expand_interfaces
from ._config import Config
from ._errors import MeshError

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclasses.dataclass(frozen=True)
class Finding:
    level: str
    """``ok``, ``warn`` or ``fail``."""
    check: str
    what: str
    fix: str = ""


def interface_findings(interfaces: Sequence[str], local: Sequence[str]) -> list[Finding]:
    """Every configured interface must be an address of this host."""
    if "all" in interfaces:
        return [Finding(OK, "interfaces", f"all interfaces: {', '.join(local) or 'none found'}")]
    missing = [ip for ip in interfaces if ip not in local]
    if missing:
        return [Finding(FAIL, "interfaces", f"{', '.join(missing)} is not an address of this host",
                        f"set MESHMQ_INTERFACES (or --interface) to addresses of this host: {', '.join(local)}")]
    return [Finding(OK, "interfaces", f"bound to {', '.join(interfaces)}")]


def skew_findings(peers: Sequence[PeerInfo], max_skew: float) -> list[Finding]:
    skewed = [p for p in peers if p.clock_offset is not None and abs(p.clock_offset) > max_skew]
    if not skewed:
        measured = [p for p in peers if p.clock_offset is not None]
        if not measured:
            return []
        worst = max(abs(p.clock_offset or 0.0) for p in measured)
        return [Finding(OK, "clocks", f"{len(measured)} peer clocks within {worst:.3f}s of ours")]
    return [
        Finding(WARN, "clocks",
                f"{p.service} ({p.node}) is {abs(p.clock_offset or 0.0):.1f}s "
                f"{'ahead of' if (p.clock_offset or 0.0) > 0 else 'behind'} this host",
                "synchronise the clocks (chrony or systemd-timesyncd on every host); message timestamps "
                "and TTLs depend on them")
        for p in skewed
    ]


def mesh_findings(mesh: str, announced: dict[str, dict[str, str]], own_name: str) -> list[Finding]:
    """Agents announced in other meshes, when ours has none: a likely name mismatch."""
    others: dict[str, int] = {}
    ours = 0
    for name, props in announced.items():
        if name == own_name:
            continue
        if props.get("mesh") == mesh:
            ours += 1
        else:
            others[props.get("mesh", "?")] = others.get(props.get("mesh", "?"), 0) + 1
    if others and not ours:
        listing = ", ".join(f"{m!r} ({n} agent{'s' if n > 1 else ''})" for m, n in sorted(others.items()))
        # The likeliest mix-up: the name closest to ours (a typo), then the busiest mesh.
        best = max(others, key=lambda m: (difflib.SequenceMatcher(None, mesh, m).ratio() >= 0.6, others[m]))
        return [Finding(WARN, "mesh", f"no agents in mesh {mesh!r}, but found agents in {listing}",
                        f"if they are yours, use the same mesh name: MESHMQ_MESH={best} (or --mesh {best})")]
    return [Finding(OK, "mesh", f"{ours} other agent(s) announce mesh {mesh!r}")] if ours else []


async def diagnose(config: Config, *, wait: float = 2.0, max_skew: float = 1.0) -> list[Finding]:
    import ifaddr
    from zeroconf import IPVersion, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    from ._discovery import SERVICE_TYPE

    local = sorted({ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)})
    findings = interface_findings(config.interfaces, local)
    if any(f.level == FAIL for f in findings):
        return findings  # never bind or multicast on an address that is not ours
    interfaces = _expand_interfaces(config.interfaces)

    announced: dict[str, dict[str, str]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def resolve(zc: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if info.load_from_cache(zc) or await info.async_request(zc, 1500):
            announced[name] = {k: v or "" for k, v in info.decoded_properties.items()}

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            task = asyncio.ensure_future(resolve(zeroconf, service_type, name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    # A second Zeroconf instance, opened first, hears our agent's announcement only if multicast
    # really goes out and comes back; the agent's own instance would know it without the network.
    heard: set[str] = set()
    echo: AsyncZeroconf | None = None
    echo_browser: AsyncServiceBrowser | None = None
    if config.discovery:
        try:
            echo = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            echo_browser = AsyncServiceBrowser(
                echo.zeroconf, SERVICE_TYPE, handlers=[lambda zeroconf, service_type, name, state_change: heard.add(name)])
        except Exception:
            echo = None  # reported below: mDNS could not start
    agent = AsyncAgent("meshmq-doctor", config=config)
    browser: AsyncServiceBrowser | None = None
    try:
        try:
            await agent.start()
        except MeshError as exc:
            findings.append(Finding(FAIL, "bind", str(exc), "choose a free port or another MESHMQ_BIND"))
            return findings
        findings.append(Finding(OK, "bind", f"receiving on {', '.join(agent.endpoints)}"))
        zc = agent._discovery.azc if agent._discovery is not None else None
        if zc is not None:
            # On the agent's own Zeroconf: a second instance in this process would share port 5353
            # and miss the unicast answers that reach only one of the two sockets.
            browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        # Listen for the whole wait: a responder repeats an answer at most once a second
        # (RFC 6762 6), so announcements can trickle in after discovery looks settled.
        started = time.monotonic()
        await agent.wait_settled(wait, quiet_period=min(0.5, wait / 3))
        await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))
        if tasks:  # announcements still being resolved
            await asyncio.wait(set(tasks), timeout=1.5)
        peers = agent.peers()
        own_heard = agent._discovery is not None and agent._discovery.name in heard
        findings += _discovery_findings(agent, echo is not None and own_heard, interfaces)
        findings += mesh_findings(config.mesh, announced, agent._discovery.name if agent._discovery else "")
        findings += _peer_findings(agent, peers, announced)
        findings += skew_findings(peers, max_skew)
    finally:
        for task in tasks:
            task.cancel()
        if browser is not None:
            await browser.async_cancel()
        await agent.stop()
        if echo_browser is not None:
            await echo_browser.async_cancel()
        if echo is not None:
            await echo.async_close()
    return findings


def _discovery_findings(agent: AsyncAgent, own_heard: bool, interfaces: list[str]) -> list[Finding]:
    if not agent.config.discovery:
        return [Finding(OK, "mdns", "mDNS discovery is off; only seeds are used")]
    if agent._discovery is None:
        return [Finding(FAIL, "mdns", f"mDNS could not start on {', '.join(interfaces)}",
                        "use static seeds (MESHMQ_SEEDS) where multicast is not available")]
    if not own_heard:
        return [Finding(WARN, "mdns",
                        f"this host's own mDNS announcement was not heard on {', '.join(interfaces)}: "
                        "multicast looks blocked",
                        "allow UDP 5353 to 224.0.0.251 on this interface, or use static seeds (MESHMQ_SEEDS)")]
    return [Finding(OK, "mdns", f"multicast works on {', '.join(interfaces)}")]


def _peer_findings(agent: AsyncAgent, peers: list[PeerInfo], announced: dict[str, dict[str, str]]) -> list[Finding]:
    findings: list[Finding] = []
    known = {p.node for p in peers}
    mesh = agent.config.mesh
    for props in announced.values():
        node = props.get("node", "")
        if props.get("mesh") == mesh and node and node != agent.node_id and node not in known:
            findings.append(Finding(
                FAIL, "endpoints",
                f"{props.get('service', '?')} ({node}) announces {props.get('ep', '?')} but does not answer there",
                "check that its interface is reachable from here (routes, firewall: TCP to that port)"))
    assert agent._node is not None
    for seed in agent.config.seeds:
        if seed in agent._node.pending:
            findings.append(Finding(FAIL, "seeds", f"seed {seed} does not answer",
                                    "check the address and port, and that an agent of this mesh runs there"))
    if agent.config.discovery and agent._discovery is not None:
        announced_nodes = {props.get("node") for props in announced.values()}
        for p in peers:
            if p.node not in announced_nodes:
                findings.append(Finding(
                    WARN, "multicast",
                    f"{p.service} ({p.endpoint}) answers over TCP but its mDNS announcements never arrived: "
                    "multicast looks blocked between it and this host (or its discovery is off)",
                    "keep it in the seeds (MESHMQ_SEEDS), or allow multicast (UDP 5353 to 224.0.0.251) "
                    "on the network between them"))
    if peers:
        names = ", ".join(sorted({p.service for p in peers}))
        findings.append(Finding(OK, "peers", f"{len(peers)} peer(s): {names}"))
    elif not findings:
        hint = ("start another agent of this mesh, or pass seeds (MESHMQ_SEEDS) if they are on other subnets"
                if agent.config.discovery else "pass seeds (MESHMQ_SEEDS): mDNS discovery is off")
        findings.append(Finding(WARN, "peers", f"no peers seen in mesh {mesh!r}", hint))
    return findings


def render(findings: Sequence[Finding]) -> str:
    marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    lines = []
    for f in findings:
        lines.append(f"[{marks[f.level]}] {f.check:10s} {f.what}")
        if f.fix:
            lines.append(f"{'':18s}fix: {f.fix}")
    return "\n".join(lines)


def as_json(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(f) for f in findings]
