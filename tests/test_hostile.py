"""Hostile input: the frame decoder and the gossip merge under fuzzing (Hypothesis), and attacks
on a running agent over the network. Each attack asserts its rejection, a counter, and that
nothing changed."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import zmq
from aio import agents, eventually, run
from certs import RawPeer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

import meshmq
from meshmq import ProtocolError
from meshmq._discovery import SERVICE_TYPE
from meshmq._records import claim, merge
from meshmq._security import Authority, NodeKeys
from meshmq._wire import (
    KINDS, PROTOCOL_VERSION, Entry, Hello, Limits, NodeRecord, decode_data, decode_envelope, decode_frame,
    Subscription, card_frame, hello_frame, ping_frame, split_endpoint, split_entry,
)

LIMITS = Limits()

_ATOMS = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=40) | st.binary(
    max_size=80)
_VALUES = st.recursive(_ATOMS, lambda inner: st.lists(inner, max_size=8) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=40)


def _decode_everything(frame: bytes) -> None:
    """What the agent does with a frame from the network: the outer layer, then, for data,
    every entry and envelope. Only ProtocolError may come out."""
    try:
        decoded = decode_frame(frame, LIMITS)
    except ProtocolError:
        return
    if frame[1:2] == bytes((4,)):
        _, _, first, _, entries, _, _ = decode_data(frame, LIMITS)
        for i, entry in enumerate(entries):
            try:
                env, _ = split_entry(entry)
                decode_envelope(env, LIMITS, first + i)
            except ProtocolError:
                pass
    assert decoded is not None


@settings(max_examples=2000)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(frame: bytes) -> None:
    _decode_everything(frame)


@settings(max_examples=2000)
@given(kind=st.sampled_from(sorted(KINDS) + [0, 99]), body=_VALUES)
def test_well_framed_nonsense_never_crashes_the_decoder(kind: int, body: Any) -> None:
    _decode_everything(bytes((PROTOCOL_VERSION, kind)) + msgpack.packb(body, use_bin_type=True))


@settings(max_examples=500)
@given(st.integers(1, 200_000))
def test_a_huge_declared_collection_is_refused_without_allocating_it(n: int) -> None:
    # msgpack array/map/bin headers that announce n items with nothing behind them
    for head in (b"\xdd" + n.to_bytes(4, "big"), b"\xdf" + n.to_bytes(4, "big"), b"\xc6" + n.to_bytes(4, "big")):
        _decode_everything(bytes((PROTOCOL_VERSION, 1)) + head)


_ENTRIES = st.builds(Entry, node=st.sampled_from(["a", "b"]), started=st.floats(0, 10, allow_nan=False),
                     incarnation=st.integers(0, 5), status=st.integers(0, 3), record=st.none(),
                     by=st.sampled_from(["", "a", "b"]))


@settings(max_examples=2000)
@given(_ENTRIES, _ENTRIES, _ENTRIES)
def test_gossip_merge_of_arbitrary_claims_stays_a_lattice(x: Entry, y: Entry, z: Entry) -> None:
    if not (x.node == y.node == z.node):
        return
    assert merge(x, y) == merge(y, x)
    assert merge(merge(x, y), z) == merge(x, merge(y, z))
    assert merge(x, x) == x



# --- the fuzz targets of tools/fuzz_decoder.py (coverage-guided with atheris, where it installs) ---

_TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _fuzz_targets() -> Any:
    spec = importlib.util.spec_from_file_location("meshmq_tools_fuzz_decoder", _TOOLS / "fuzz_decoder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = _fuzz_targets()


def test_the_fuzz_targets_hold_on_valid_frames_of_every_kind() -> None:
    for seed in FUZZ.decoder_seeds():
        FUZZ.decoder_one(seed)
        for cut in (1, 2, len(seed) // 2, len(seed) - 1):
            FUZZ.decoder_one(seed[:cut])


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_the_decoder_target_holds_on_random_input(data: bytes) -> None:
    """The atheris harness's decoder target, driven by Hypothesis (runs where atheris does not)."""
    FUZZ.decoder_one(data)


@settings(max_examples=300)
@given(st.binary(min_size=16, max_size=1024))
def test_the_gossip_target_holds_on_random_input(data: bytes) -> None:
    """The harness's gossip target (arbitrary SYNC, HELLO, PING, ... into a pure Node, up to
    MAX_SYNC_ENTRIES claims a frame), driven by Hypothesis: invariants and bounds hold."""
    FUZZ.gossip_one(data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris not installed (optional: pip install atheris); "
                           "the same fuzz targets ran above under Hypothesis")
@pytest.mark.parametrize("target", ["decoder", "gossip"])
def test_atheris_finds_nothing_in_a_few_seconds(target: str, tmp_path: Path) -> None:
    """Coverage-guided fuzzing for 5 s per target; memory is bounded (libFuzzer's rss limit).
    Longer runs: see docs/security.md."""
    corpus = tmp_path / "corpus"  # in the test's own directory: nothing is left behind
    corpus.mkdir()
    FUZZ.seed_corpus(target, str(corpus))
    out = subprocess.run(
        [sys.executable, str(_TOOLS / "fuzz_decoder.py"), target, "-max_total_time=5", "-rss_limit_mb=512",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_TOOLS.parent),
                                                                      os.environ.get("PYTHONPATH")]))})
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Done " in out.stderr and not list(tmp_path.glob("crash-*")), out.stderr[-2000:]

# --- attacks on a running agent ------------------------------------------------------------


def test_a_plain_connection_gets_nothing_in(mesh: str) -> None:
    """An attacker without CurveZMQ: the handshake fails, no frame reaches the agent."""
    async def main() -> None:
        async with agents(mesh, "target", durability="memory") as (target,):
            before = target.stats()
            ctx = zmq.Context()
            plain = ctx.socket(zmq.PUSH)
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(target.endpoints[0].partition("#")[0])
            for _ in range(10):  # a frame the agent would count as rejected, were it let in
                if plain.poll(10, zmq.POLLOUT):
                    plain.send(b"\x04\x02garbage", zmq.NOBLOCK)
            plain.close(0)
            ctx.term()
            after = target.stats()
            for counter in ("frames_rejected", "frames_unauthenticated", "received"):
                assert after.get(counter, 0) == before.get(counter, 0), counter
            assert target.peers() == []

    run(main())


def test_an_unknown_curve_key_gets_no_frame_acted_on(mesh: str) -> None:
    """A CURVE client whose key no certificate names: its frames are dropped and counted, and
    a HELLO carrying somebody else's certificate does not adopt it."""
    async def main() -> None:
        async with agents(mesh, "target", "friend", durability="memory") as (target, friend):
            await eventually(lambda: len(target.peers()) == 1, what="the friend known")
            stranger = RawPeer(mesh, target.endpoints[0])
            try:
                stranger.send(ping_frame(mesh, stranger.node, stranger.endpoint, 1, target.node_id, time.time()))
                stranger.send(ping_frame(mesh, friend.node_id, stranger.endpoint, 2, target.node_id, time.time()))
                victim = RawPeer(mesh, target.endpoints[0], "victim")
                stranger.introduce(victim.record)  # a valid record, but of another key than this connection's
                victim.close()
                await eventually(lambda: target.stats().get("frames_unauthenticated", 0) >= 3,
                                 what="the stranger's frames dropped")
                assert {p.service for p in target.peers()} == {"friend"}
            finally:
                stranger.close()

    run(main())


# --- rogue mDNS announcements --------------------------------------------------------------


@asynccontextmanager
async def announcing(mesh: str, *claims: tuple[str, str | None, str], proto: str = str(PROTOCOL_VERSION)
                     ) -> AsyncIterator[None]:
    """What anyone on the link can do: announce ``_meshmq._tcp`` services over real mDNS, on
    loopback only, each ``(instance name, node id or None, endpoint#KEY)``. The TXT properties
    are the ones meshmq's own announcements carry (``proto``: the protocol versions spoken)."""
    azc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        for name, node, endpoint in claims:
            plain, key = split_endpoint(endpoint)
            props = {"mesh": mesh, "service": "rogue", "ep": plain, "key": key or "", "v": "2", "proto": proto}
            if node is not None:
                props["node"] = node
            info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", addresses=[socket.inet_aton("127.0.0.1")],
                                    port=int(plain.rsplit(":", 1)[1]), properties=props)
            await (await azc.async_register_service(info, cooperating_responders=True))
        yield
    finally:
        await azc.async_close()


def drain(sock: zmq.Socket[bytes]) -> list[Any]:
    """Every frame waiting on ``sock``, decoded (without blocking the agent's loop)."""
    out = []
    while sock.poll(0):
        out.append(decode_frame(sock.recv(zmq.NOBLOCK), Limits()))
    return out


def assert_routes_only(agent: meshmq.AsyncAgent, *peers: meshmq.AsyncAgent) -> None:
    """The agent's routing state holds these peers, at their real endpoints, and nobody else."""
    assert {p.node for p in agent.peers()} == {p.node_id for p in peers}
    assert {p.endpoint for p in agent.peers()} == {p.endpoints[0] for p in peers}
    assert {r.node for r in agent.routes()} <= {agent.node_id} | {p.node_id for p in peers}
    assert agent._node is not None
    assert set(agent._node.members) == {p.node_id for p in peers}


def test_a_rogue_mdns_announcement_in_a_real_nodes_name_is_refused(mesh: str) -> None:
    """Real mDNS on loopback: an announcement that says it is the friend but names the
    attacker's endpoint and key is refused before it is greeted (``rejected_hint_mismatch``);
    one that names a real node's key (a node the target does not know yet) at the attacker's
    address is greeted, but the CurveZMQ handshake fails, nothing reaches the attacker, and
    the greeting is given up (``greetings_unanswered``). The friend stays routed and gets its
    message; the real node, announced for real, is found at its real endpoint."""
    async def main() -> None:
        late = await meshmq.AsyncAgent("late", mesh=mesh, discovery=False, durability="memory").start()
        async with agents(mesh, "target", "friend", durability="memory", join_timeout=1.0) as (target, friend):
            got: asyncio.Queue[meshmq.Message] = asyncio.Queue()
            friend.subscribe("orders.*", got.put_nowait)
            await eventually(lambda: len(target.routes("orders.x")) == 1, what="the friend routed")
            attacker = RawPeer(mesh, target.endpoints[0], "attacker")  # its PULL socket is the trap
            trap = split_endpoint(attacker.endpoint)[0]
            late_key = split_endpoint(late.endpoints[0])[1]
            try:
                before = target.stats()
                async with announcing(mesh, ("impostor", friend.node_id, attacker.endpoint),
                                      ("stolen-key", late.node_id, f"{trap}#{late_key}")):
                    await eventually(lambda: target.stats().get("rejected_hint_mismatch", 0) >= 1,
                                     what="the impostor's hint refused")
                    await eventually(lambda: target.stats().get("greetings_unanswered", 0)
                                     > before.get("greetings_unanswered", 0), what="the stolen key's greeting given up")
                assert drain(attacker.pull) == []  # not even our record: refused, or the handshake failed
                assert_routes_only(target, friend)
                await target.publish("orders.x", {"n": 1})
                assert (await asyncio.wait_for(got.get(), 10)).data == {"n": 1}
                # The real node, announced for real, is met where it really is.
                async with announcing(mesh, ("late-real", late.node_id, late.endpoints[0])):
                    await eventually(lambda: late.node_id in {p.node for p in target.peers()}, what="late found")
                assert_routes_only(target, friend, late)
                assert drain(attacker.pull) == []
            finally:
                attacker.close()
        await late.stop()

    run(main(), timeout=60)


def test_a_node_announcing_only_another_protocol_version_is_named_and_never_greeted(
        mesh: str, caplog: pytest.LogCaptureFixture) -> None:
    """Not an attack, a node of another meshmq release: its announcement says which protocol
    versions it speaks. The agent warns, counts it, and sends it nothing (it would drop all
    of it); the same node announcing our version is greeted."""
    async def main() -> None:
        async with agents(mesh, "target", durability="memory") as (target,):
            other = RawPeer(mesh, target.endpoints[0], "other")  # its PULL socket shows any greeting
            try:
                async with announcing(mesh, ("other-release", None, other.endpoint), proto=str(PROTOCOL_VERSION + 1)):
                    await eventually(lambda: target.stats().get("peers_other_version", 0) >= 1,
                                     what="the other release noticed")
                assert drain(other.pull) == []
                async with announcing(mesh, ("same-release", None, other.endpoint)):
                    await eventually(lambda: other.pull.poll(0), what="the same release greeted")
            finally:
                other.close()

    run(main(), timeout=60)
    said = [r.getMessage() for r in caplog.records if "announces meshmq protocol version" in r.getMessage()]
    assert said and f"version {PROTOCOL_VERSION + 1}; this agent speaks {PROTOCOL_VERSION}" in said[0]


def test_a_rogue_mdns_announcement_of_the_attackers_own_key_gets_in_nowhere(mesh: str, tmp_path: Path) -> None:
    """Real mDNS on loopback: the attacker announces its own endpoint and key, consistently.
    The agents greet it with a card (claim and certificate, no routing record: its key has
    proved nothing) and send it nothing else: no record, no gossip, no data. The attacker's
    answer, a record certified by an authority of its own, is refused and counted, and
    changes nothing."""
    async def main() -> None:
        async with agents(mesh, "target", "friend", durability="memory", join_timeout=1.0) as (target, friend):
            got: asyncio.Queue[meshmq.Message] = asyncio.Queue()
            friend.subscribe("orders.*", got.put_nowait)
            await eventually(lambda: len(target.routes("orders.x")) == 1, what="the friend routed")
            keys = NodeKeys.generate()
            attacker = RawPeer(mesh, target.endpoints[0], "attacker", keys=keys)
            own = Authority.create(tmp_path, "rogue")
            now = time.time()
            cert = own.issue(node_key=keys.public, service="orders", mesh=mesh, publish=(">",), subscribe=(">",),
                             tap=True, not_before=now - 60, not_after=now + 3600)
            record = NodeRecord(keys.node_id, "orders", (attacker.endpoint,), (Subscription(">"),), 1,
                                now, cert=cert)
            record = dataclasses.replace(record, sig=keys.sign(record.signing_bytes()))
            heard: list[Any] = []
            try:
                before = target.stats()
                async with announcing(mesh, ("rogue", keys.node_id, attacker.endpoint)):
                    await eventually(lambda: bool(heard.extend(drain(attacker.pull)) or heard),
                                     what="the target's greeting")
                    attacker.send(hello_frame(mesh, claim(record), True))
                    await eventually(lambda: target.stats().get("rejected_record_untrusted", 0) >= 1,
                                     what="the attacker's record refused")
                    await target.publish("orders.x", {"n": 1})
                    assert (await asyncio.wait_for(got.get(), 10)).data == {"n": 1}
                    await eventually(lambda: target.stats().get("greetings_unanswered", 0)
                                     > before.get("greetings_unanswered", 0), what="the greeting given up")
                heard += drain(attacker.pull)
                after = target.stats()
                assert after["frames_unauthenticated"] > before.get("frames_unauthenticated", 0)
                # Only cards (the friend, browsing the same mDNS, greets it too): no record, no
                # gossip, no data.
                assert heard and all(type(f) is Hello and f.entry.node in (target.node_id, friend.node_id)
                                     and f.entry.record is None and f.cert is not None for f in heard), heard
                assert_routes_only(target, friend)
                assert {r.service for r in target.routes("orders.x")} == {"friend"}
                assert keys.node_id not in target._curve_nodes.values()  # its key names no node to us
                assert after.get("received", 0) == before.get("received", 0)
            finally:
                attacker.close()

    run(main(), timeout=60)


def test_a_card_gets_the_agents_record_only_when_its_certificate_holds(mesh: str, tmp_path: Path) -> None:
    """Cards (a greeting without a record) from three raw peers: one certified by the mesh's
    authority, answered with the agent's record; one certified by an authority of its own,
    refused; one showing the first's certificate over its own key, refused. The refused ones
    are sent nothing at all."""
    async def main() -> None:
        async with agents(mesh, "target", durability="memory", discovery=False) as (target,):
            good = RawPeer(mesh, target.endpoints[0], "good")
            rogue = RawPeer(mesh, target.endpoints[0], "rogue")
            thief = RawPeer(mesh, target.endpoints[0], "thief")
            try:
                now = time.time()
                own_cert = Authority.create(tmp_path, "rogue").issue(
                    node_key=rogue.keys.public, service="rogue", mesh=mesh, publish=(">",), subscribe=(">",),
                    tap=False, not_before=now - 60, not_after=now + 3600)
                assert good.record.cert is not None
                rogue.send(card_frame(mesh, claim(dataclasses.replace(rogue.record, cert=own_cert)), own_cert,
                                      rogue.endpoint))
                thief.send(card_frame(mesh, claim(good.record), good.record.cert, thief.endpoint))
                await eventually(lambda: target.stats().get("rejected_card_untrusted", 0) == 1
                                 and target.stats().get("rejected_card_mismatch", 0) == 1, what="two cards refused")
                good.send(card_frame(mesh, claim(good.record), good.record.cert, good.endpoint))
                heard: list[Any] = []
                await eventually(lambda: bool(heard.extend(drain(good.pull)) or any(
                    type(f) is Hello and f.entry.record is not None for f in heard)), what="the target's record")
                answer = next(f for f in heard if type(f) is Hello and f.entry.record is not None)
                assert answer.entry.node == target.node_id and answer.entry.record.endpoints == target.endpoints
                assert drain(rogue.pull) == [] and drain(thief.pull) == []
                # good has not shown its record yet: it is answered, not routed to.
                assert good.node not in {p.node for p in target.peers()}
                good.introduce()
                await eventually(lambda: good.node in {p.node for p in target.peers()}, what="good admitted")
                assert rogue.node not in {p.node for p in target.peers()}
            finally:
                for peer in (good, rogue, thief):
                    peer.close()

    run(main(), timeout=60)


def test_an_envelope_with_a_topic_of_the_wrong_type_is_dropped_and_the_rest_delivered(mesh: str) -> None:
    """Found by atheris (tools/fuzz_decoder.py): an envelope whose topic is a map or a list
    raised TypeError out of the decoder, through the receive path, ahead of the rest of its
    batch. From a certified peer, it is now dropped and counted like any malformed message."""
    from meshmq._message import FORMAT_BYTES
    from meshmq._wire import encode_envelope

    async def main() -> None:
        async with agents(mesh, "sink", durability="memory", discovery=False) as (sink,):
            got: list[bytes] = []
            sink.subscribe("jobs.*", lambda m: got.append(m.raw))
            raw = RawPeer(mesh, sink.endpoints[0], "jobs")
            try:
                raw.introduce()

                def env(topic: Any, body: bytes) -> bytes:
                    return encode_envelope(os.urandom(16), time.time(), topic, None, "jobs", raw.node, 1, None, None,
                                           FORMAT_BYTES, body)

                raw.send(raw.data(1, 1, [env({"a": 1}, b"map"), env(["jobs", "x"], b"list"),
                                                     env(7, b"int"), env("jobs.x", b"ok")]))
                await eventually(lambda: got == [b"ok"], what="the well-formed one delivered")
                assert sink.stats()["messages_rejected"] == 3
            finally:
                raw.close()

    run(main())
