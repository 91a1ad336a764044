"""Hostile input: the frame decoder and the gossip merge under fuzzing (Hypothesis), and attacks
on a running agent over the network. Each attack asserts its rejection, a counter, and that
nothing changed."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq
from aio import agents, eventually, run
from certs import RawPeer
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmq import ProtocolError
from meshmq._records import merge
from meshmq._wire import (
    KINDS, PROTOCOL_VERSION, Entry, Limits, decode_data, decode_envelope, decode_frame, ping_frame, split_entry,
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
        _, _, first, _, entries, _ = decode_data(frame, LIMITS)
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
