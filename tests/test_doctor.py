"""meshmq doctor: each check, as a pure function and through the command on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import zmq
from aio import wait_until
from certs import RawPeer

import meshmq
from meshmq._agent import PeerInfo
from meshmq._doctor import FAIL, OK, WARN, interface_findings, mesh_findings, skew_findings
from meshmq._security import NodeKeys, b64
from meshmq._wire import ping_frame


def peer(offset: float | None, service: str = "svc") -> PeerInfo:
    return PeerInfo("n-" + service, service, "tcp://127.0.0.1:1", (), 0.1, offset)


def test_interface_findings() -> None:
    assert [f.level for f in interface_findings(["127.0.0.1"], ["127.0.0.1", "10.0.0.5"])] == [OK]
    [bad] = interface_findings(["10.9.9.9"], ["127.0.0.1", "10.0.0.5"])
    assert bad.level == FAIL and "10.9.9.9 is not an address" in bad.what and "127.0.0.1, 10.0.0.5" in bad.fix


def test_skew_findings() -> None:
    assert skew_findings([peer(None)], 1.0) == []
    [ok] = skew_findings([peer(0.002), peer(-0.01, "b")], 1.0)
    assert ok.level == OK and "within 0.010s" in ok.what
    [ahead, behind] = skew_findings([peer(3.2, "fast"), peer(-5.0, "slow"), peer(0.1, "fine")], 1.0)
    assert ahead.level == WARN and "fast" in ahead.what and "3.2s ahead" in ahead.what and "chrony" in ahead.fix
    assert "slow" in behind.what and "5.0s behind" in behind.what


def test_mesh_findings() -> None:
    own = "me._meshmq._tcp.local."
    others = {own: {"mesh": "shop"}, "a": {"mesh": "prod"}, "b": {"mesh": "prod"}, "c": {"mesh": "dev"}}
    [warn] = mesh_findings("shop", others, own)
    assert warn.level == WARN and "'prod' (2 agents)" in warn.what and "MESHMQ_MESH=prod" in warn.fix
    assert [f.level for f in mesh_findings("prod", others, own)] == [OK]
    [typo] = mesh_findings("prdo", {"a": {"mesh": "prod"}, "b": {"mesh": "test"}, "c": {"mesh": "test"}}, own)
    assert "MESHMQ_MESH=prod" in typo.fix  # the near name beats the busier one
    assert mesh_findings("shop", {own: {"mesh": "shop"}}, own) == []


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshmq", "doctor", "--wait", "2.5", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_doctor_on_a_healthy_mesh_and_on_a_mistyped_mesh_name() -> None:
    mesh = "doc" + uuid.uuid4().hex[:8]
    with meshmq.Agent("inventory", mesh=mesh) as agent:
        agent.subscribe("stock.>")
        healthy = doctor("--mesh", mesh)
        mistyped = doctor("--mesh", mesh + "x")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "[ok  ] mdns" in healthy.stdout and "1 peer(s): inventory" in healthy.stdout
    assert mistyped.returncode == 1
    # Agents of other meshes may be on this machine too (other test runs): ours is listed, and
    # suggested as the near name.
    assert f"'{mesh}' (1 agent)" in mistyped.stdout and f"MESHMQ_MESH={mesh}" in mistyped.stdout


@pytest.mark.integration
def test_doctor_names_a_missing_interface_and_a_silent_seed() -> None:
    missing = doctor("--interface", "10.255.255.254")
    assert missing.returncode == 1 and "[FAIL] interfaces" in missing.stdout
    assert "bind" not in missing.stdout  # nothing was bound or announced on a foreign address
    ctx = zmq.Context.instance()
    closed = ctx.socket(zmq.PULL)
    port = closed.bind_to_random_port("tcp://127.0.0.1")
    closed.close(0)  # a port where nothing listens any more
    seed = f"tcp://127.0.0.1:{port}#{b64(NodeKeys.generate().public)}"
    silent = doctor("--mesh", "doc" + uuid.uuid4().hex[:8], "--seed", seed)
    assert silent.returncode == 1 and f"[FAIL] seeds      seed {seed} does not answer" in silent.stdout


@pytest.mark.integration
def test_a_peer_with_a_skewed_clock_is_measured() -> None:
    mesh = "doc" + uuid.uuid4().hex[:8]
    with meshmq.Agent("victim", mesh=mesh, discovery=False) as agent:
        raw = RawPeer(mesh, agent.endpoints[0], "skewed")
        raw.introduce()
        wait_until(agent.peers, what="the peer known")
        raw.send(ping_frame(mesh, raw.node, raw.endpoint, 1, agent.node_id, time.time() + 10.0))
        wait_until(lambda: agent.peers()[0].clock_offset is not None, what="the clock offset measured")
        offset = agent.peers()[0].clock_offset
        raw.close()
    assert offset is not None and 9.5 < offset < 10.5
    [finding] = skew_findings([PeerInfo(raw.node, "skewed", raw.endpoint, (), 0.0, offset)], 1.0)
    assert finding.level == WARN and "10.0s ahead" in finding.what
