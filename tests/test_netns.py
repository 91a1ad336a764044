"""Agents on separate hosts: network namespaces joined by a switch, made and removed by each test.

Only the lab's private addresses are used; nothing leaves the namespaces.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from children import Child

pytestmark = [pytest.mark.integration, pytest.mark.netns]


def member(lab: Any, i: int, mesh: str, *, seed: str = "", bind: str | None = None) -> Child:
    """The agent of lab host i (named h<i+1>), mDNS on; ``bind`` fixes its endpoint."""
    host = lab.hosts[i]
    prefix = ["ip", "netns", "exec", host.name] + (["env", f"MESHMQ_BIND={bind}"] if bind else [])
    return Child("member", mesh, f"h{i + 1}", host.address, seed, "1", "60", prefix=prefix)


def start_members(lab: Any, mesh: str) -> list[Child]:
    members = [member(lab, i, mesh) for i in range(len(lab.hosts))]
    for m in members:
        m.expect("ready", timeout=20)
    return members


def wait_peers(member: Child, expected: list[str], timeout: float = 15) -> None:
    member.expect("peers", timeout, where=lambda line: line["peers"] == expected)


def close_all(members: list[Child]) -> None:
    for m in members:
        m.close()


def test_mdns_discovery_across_hosts_and_a_message_between_them(make_lab: Callable[[int], Any]) -> None:
    lab = make_lab(3)
    members = start_members(lab, "lab" + uuid.uuid4().hex[:8])
    try:
        wait_peers(members[0], ["h2", "h3"])
        wait_peers(members[1], ["h1", "h3"])
        wait_peers(members[2], ["h1", "h2"])
        members[0].send("pub lab.h3 across-the-switch")
        msg = members[2].expect("msg", timeout=10)
        assert msg["data"] == "across-the-switch" and msg["source"] == "h1"
    finally:
        close_all(members)


def test_a_host_cut_off_is_declared_dead_and_rejoins_when_healed(make_lab: Callable[[int], Any]) -> None:
    lab = make_lab(3)
    members = start_members(lab, "lab" + uuid.uuid4().hex[:8])
    try:
        for m, others in zip(members, (["h2", "h3"], ["h1", "h3"], ["h1", "h2"])):
            wait_peers(m, others)
        lab.cut(lab.hosts[2])
        wait_peers(members[0], ["h2"])  # suspicions last 0.4-2.4 s in these members
        wait_peers(members[1], ["h1"])
        wait_peers(members[2], [])
        lab.heal(lab.hosts[2])
        # mDNS announces nothing new here: the nodes greet the endpoints they lost.
        wait_peers(members[0], ["h2", "h3"], timeout=20)
        wait_peers(members[2], ["h1", "h2"], timeout=20)
        members[2].send("pub lab.h1 back")
        assert members[0].expect("msg", timeout=10)["data"] == "back"
    finally:
        close_all(members)


def test_seeds_plus_gossip_build_the_full_mesh_where_multicast_is_blocked(make_lab: Callable[[int], Any]) -> None:
    lab = make_lab(3)
    for host in lab.hosts:
        lab.block_multicast(host)
    h1 = f"tcp://{lab.hosts[0].address}:7400"
    mesh = "lab" + uuid.uuid4().hex[:8]
    # h1 binds a known port so that h2 and h3 can name it as their only seed; mDNS stays on and
    # finds nothing; h2 and h3 can only learn of each other through h1's gossip.
    first = member(lab, 0, mesh, bind=h1)
    members = [first]
    try:
        seed = first.expect("ready", timeout=20)["endpoint"]  # h1's endpoint, with its key
        assert seed.startswith(h1 + "#")
        for i in (1, 2):
            members.append(member(lab, i, mesh, seed=seed))
            members[-1].expect("ready", timeout=20)
        wait_peers(members[0], ["h2", "h3"])
        wait_peers(members[1], ["h1", "h3"])
        wait_peers(members[2], ["h1", "h2"])
        members[1].send("pub lab.h3 introduced-by-gossip")
        assert members[2].expect("msg", timeout=10)["data"] == "introduced-by-gossip"
    finally:
        close_all(members)


def test_an_agent_binds_and_advertises_only_its_configured_interface(make_lab: Callable[[int], Any]) -> None:
    lab = make_lab(2)
    second = lab.add_interface(lab.hosts[0])  # h1 has eth0 and eth1; only eth0 is configured
    members = start_members(lab, "lab" + uuid.uuid4().hex[:8])
    try:
        ready_h1 = members[0].seen[0]
        assert ready_h1["event"] == "ready" and ready_h1["endpoint"].startswith(f"tcp://{lab.hosts[0].address}:")
        wait_peers(members[1], ["h1"])
        listening = lab.run(lab.hosts[0], ["ss", "-ltnH"]).stdout
        port = ready_h1["endpoint"].partition("#")[0].rsplit(":", 1)[1]
        bound = {line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")}
        assert bound == {f"{lab.hosts[0].address}:{port}"}  # not eth1's address, not 0.0.0.0
        assert second not in listening
    finally:
        close_all(members)


def test_doctor_says_multicast_is_blocked_between_hosts(make_lab: Callable[[int], Any]) -> None:
    lab = make_lab(2)
    for host in lab.hosts:
        lab.block_multicast(host)
    h2 = f"tcp://{lab.hosts[1].address}:7400"
    mesh = "lab" + uuid.uuid4().hex[:8]
    second = member(lab, 1, mesh, bind=h2)
    try:
        seed = second.expect("ready", timeout=20)["endpoint"]  # h2's endpoint, with its key
        result = lab.run(lab.hosts[0], [sys.executable, "-m", "meshmq", "doctor", "--interface",
                                        lab.hosts[0].address, "--mesh", mesh, "--seed", seed, "--wait", "2.5"],
                         timeout=60)
    finally:
        second.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 peer(s): h2" in result.stdout  # the seed works...
    assert "multicast looks blocked between it and this host" in result.stdout  # ...mDNS does not
    assert "MESHMQ_SEEDS" in result.stdout


def test_two_hosts_that_cannot_reach_each_other_stay_alive_through_a_third(
        make_lab: Callable[[int], Any], loss_rules: Any) -> None:
    """SWIM's indirect probes across real hosts: h1 and h2 lose every packet between them but
    both reach h3, so each keeps the other (probed through h3). Cut h3 off too, and only then
    do they declare each other dead."""
    lab = make_lab(3)
    members = start_members(lab, "lab" + uuid.uuid4().hex[:8])
    try:
        for m, others in zip(members, (["h2", "h3"], ["h1", "h3"], ["h1", "h2"])):
            wait_peers(m, others)
        lab.separate(lab.hosts[0], lab.hosts[1])
        # Suspicions in these members last 0.4-2.4 s: 6 s without a change is several of them.
        changes = members[0].watch("peers", 6.0) + members[1].watch("peers", 0.1)
        assert changes == [], changes  # nobody left anybody's routing
        members[0].send("stats")
        stats = members[0].expect("stats", timeout=10)
        members[2].send("stats")
        helper = members[2].expect("stats", timeout=10)
        assert stats["indirect_probes"] > 0 and helper["probes_relayed"] > 0
        assert stats.get("peers_dead", 0) == 0
        lab.cut(lab.hosts[2])  # now no path is left between h1 and h2
        wait_peers(members[0], [], timeout=20)
        wait_peers(members[1], [], timeout=20)
    finally:
        close_all(members)
