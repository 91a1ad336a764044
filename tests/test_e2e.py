"""End-to-end sealing (issue 5, item 4) and the insecure mode (item 8).

Data frames are signed by their sender and encrypted to their one recipient; the
outbox and dead-letter records rest encrypted and signed. An insecure agent and a
secure one never talk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import msgpack
import nacl.bindings
import pytest
from aio import eventually, run
from certs import RawPeer

import meshmq
from meshmq._message import FORMAT_BYTES
from meshmq._seal import ForgedFrame, Signer, StoreCipher, open_data, seal_data
from meshmq._errors import ProtocolError
from meshmq._security import NodeKeys
from meshmq._wire import PROTOCOL_VERSION, SEALED, Limits, encode_envelope

HEAD = bytes((PROTOCOL_VERSION, SEALED))
LIMITS = Limits()


def _envelope(topic: str, node: str, payload: bytes) -> bytes:
    return encode_envelope(os.urandom(16), time.time(), topic, None, "raw", node, 1, None, None, FORMAT_BYTES,
                           payload)


# --- the crypto envelope, pure ------------------------------------------------------------------


def test_a_sealed_frame_opens_only_for_its_recipient_and_proves_its_sender() -> None:
    alice, bob, eve = NodeKeys.generate(), NodeKeys.generate(), NodeKeys.generate()
    a, b, e = Signer(alice), Signer(bob), Signer(eve)
    secret = b"card 4111-1111-1111-1111"
    entries = [_envelope("pay.x", alice.node_id, secret)]
    packer = msgpack.Packer(use_bin_type=True)
    frame = seal_data(HEAD, a, a.shared_key(bob.public), alice.node_id, bob.node_id, 3, 10, 9, False, entries, packer)
    assert secret not in frame  # only ciphertext travels

    epoch, first, floor, got, resent, lane = open_data(frame, LIMITS, alice.node_id, b.shared_key(alice.public),
                                                       bob.node_id)
    assert (epoch, first, floor, got, resent, lane) == (3, 10, 9, entries, False, 1)

    with pytest.raises(ForgedFrame, match="does not open"):  # bob, taking it for eve's, cannot open it
        open_data(frame, LIMITS, eve.node_id, b.shared_key(eve.public), bob.node_id)
    with pytest.raises(ForgedFrame, match="does not open"):  # eve, who is not its recipient, cannot either
        open_data(frame, LIMITS, alice.node_id, e.shared_key(alice.public), eve.node_id)
    for at in (2, 30, len(frame) // 2, len(frame) - 1):  # nonce, authenticator, ciphertext
        tampered = bytearray(frame)
        tampered[at] ^= 0x01
        with pytest.raises(ForgedFrame):
            open_data(bytes(tampered), LIMITS, alice.node_id, b.shared_key(alice.public), bob.node_id)


def test_a_frame_addressed_or_attributed_wrongly_is_refused() -> None:
    """Sealed by alice for bob's key, but naming eve as recipient (or carol as sender): bob
    can open it, and refuses it: what it says must be what the keys say."""
    alice, bob = NodeKeys.generate(), NodeKeys.generate()
    a, b = Signer(alice), Signer(bob)
    packer = msgpack.Packer(use_bin_type=True)
    for sender, recipient in (("e" * 16, bob.node_id), (alice.node_id, "c" * 16)):
        frame = seal_data(HEAD, a, a.shared_key(bob.public), sender, recipient, 1, 1, 0, False, [b"x"], packer)
        with pytest.raises(ForgedFrame, match="came from"):
            open_data(frame, LIMITS, alice.node_id, b.shared_key(alice.public), bob.node_id)


def test_a_stored_record_is_ciphertext_bound_to_its_place_and_its_node() -> None:
    keys = NodeKeys.generate()
    cipher = StoreCipher(keys)
    sealed = cipher.seal(b"out", b"dest-1", b"the plaintext")
    assert b"the plaintext" not in sealed
    assert cipher.open(b"out", b"dest-1", sealed) == b"the plaintext"
    with pytest.raises(ValueError, match="signature"):
        cipher.open(b"out", b"dest-2", sealed)  # moved to another key
    with pytest.raises(ValueError, match="signature"):
        cipher.open(b"dlq", b"dest-1", sealed)  # moved to another database
    with pytest.raises(ValueError, match="signature"):
        StoreCipher(NodeKeys.generate()).open(b"out", b"dest-1", sealed)  # another node's store
    tampered = bytearray(sealed)
    tampered[30] ^= 0x80
    with pytest.raises(ValueError):
        cipher.open(b"out", b"dest-1", bytes(tampered))


# --- agents -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _sink_and_raw_peer(mesh: str) -> AsyncIterator[tuple[meshmq.AsyncAgent, list[bytes], RawPeer]]:
    """A secure agent that collects what it gets on jobs.*, and a certified raw peer that
    has introduced itself to it; both closed afterwards."""
    agent = await meshmq.AsyncAgent("sink", mesh=mesh, discovery=False, durability="memory").start()
    got: list[bytes] = []
    agent.subscribe("jobs.*", lambda m: got.append(m.raw))
    raw = RawPeer(mesh, agent.endpoints[0], "jobs")
    try:
        raw.introduce()
        yield agent, got, raw
    finally:
        raw.close()
        await agent.stop()


def test_a_tampered_ciphertext_is_refused_counted_and_changes_nothing(mesh: str) -> None:
    """Attack test: one byte of a genuine frame's ciphertext flipped on the way."""

    async def main() -> None:
        async with _sink_and_raw_peer(mesh) as (agent, got, raw):
            frame = raw.data(1, 1, [_envelope("jobs.x", raw.node, b"one")])
            tampered = bytearray(frame)
            tampered[-5] ^= 0x01
            raw.send(bytes(tampered))
            await eventually(lambda: agent.stats().get("frames_forged", 0) == 1, what="the tampered frame counted")
            assert got == []
            assert raw.node not in agent._inbox.senders  # type: ignore[union-attr]  # no stream state at all
            raw.send(frame)  # the genuine frame still goes through: nothing was consumed by the forgery
            await eventually(lambda: got == [b"one"], what="the genuine frame delivered")
            assert agent.stats()["frames_forged"] == 1

    run(main())


def test_an_unsealed_data_frame_is_refused_by_a_secure_agent(mesh: str) -> None:
    from meshmq._wire import data_frame

    async def main() -> None:
        async with _sink_and_raw_peer(mesh) as (agent, got, raw):
            raw.send(data_frame(raw.node, 1, 1, [_envelope("jobs.x", raw.node, b"plain")]))
            raw.send(raw.data(1, 1, [_envelope("jobs.x", raw.node, b"sealed")]))
            await eventually(lambda: got == [b"sealed"], what="the sealed frame delivered")
            assert agent.stats()["frames_forged"] == 1

    run(main())


def test_a_message_naming_another_node_inside_a_genuine_frame_is_dropped(mesh: str) -> None:
    """A node signs for itself only: an envelope inside its frame that claims another sender
    is not delivered (nobody relays data), and is counted."""

    async def main() -> None:
        async with _sink_and_raw_peer(mesh) as (agent, got, raw):
            raw.send(raw.data(1, 1, [_envelope("jobs.x", agent.node_id, b"spoofed"),
                                     _envelope("jobs.x", raw.node, b"own")]))
            await eventually(lambda: got == [b"own"], what="its own message delivered")
            assert agent.stats()["rejected_wrong_sender"] == 1

    run(main())


def test_the_frames_between_agents_carry_only_ciphertext(mesh: str) -> None:
    marker = b"wire-marker-" + os.urandom(8).hex().encode()

    async def main() -> None:
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="memory").start()
        frames: list[bytes] = []
        on_frame = sub._on_frame

        def spy(frame: bytes, peer: str) -> None:  # what arrives, under the CurveZMQ layer
            frames.append(frame)
            on_frame(frame, peer)

        sub._transport.on_frame = spy  # type: ignore[union-attr]
        got: list[bytes] = []
        sub.subscribe("wire.*", lambda m: got.append(m.raw))
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="memory").start()
        try:
            await pub.wait_for_subscribers("wire.x", timeout=10)
            for _ in range(20):
                await pub.publish("wire.x", marker)
            await eventually(lambda: len(got) == 20, what="20 delivered")
            assert got == [marker] * 20
            data = [f for f in frames if f[1] == SEALED]
            assert data, "no data frame was seen"
            assert not any(marker in f for f in frames)
        finally:
            await pub.stop()
            await sub.stop()

    run(main())


def _stored_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in store.rglob("*.mdb"))


def test_the_outbox_and_the_dead_letters_rest_encrypted(mesh: str, data_dir: Path) -> None:
    """A durable subscriber is down, so the message waits in the publisher's outbox; a handler
    that fails dead-letters another. Neither payload is anywhere in either store's files,
    and both are still readable through meshmq (the node's key opens them)."""
    waiting = b"outbox-marker-" + os.urandom(8).hex().encode()
    failing = b"dlq-marker-" + os.urandom(8).hex().encode()

    async def main() -> tuple[Path, Path]:
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="os", max_attempts=1).start()

        def fail(msg: meshmq.Message) -> None:
            raise RuntimeError("refused")

        sub.subscribe("jobs.*", fail, queue="workers")
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="os").start()
        await pub.wait_for_subscribers("jobs.x", timeout=10)
        await pub.publish("jobs.x", failing)
        await eventually(lambda: len(sub.dead_letters()) == 1, what="the dead letter")
        assert sub.dead_letters()[0].message.raw == failing
        await sub.stop()
        await eventually(lambda: not any(p.service == "sub" for p in pub.peers()), what="the subscriber gone")
        await pub.publish("jobs.x", waiting)
        assert [e.messages for e in pub.outbox()] == [1]
        await pub.stop()
        assert pub.store_dir is not None and sub.store_dir is not None
        return pub.store_dir, sub.store_dir

    pub_dir, sub_dir = run(main())
    for marker in (waiting, failing):
        assert marker not in _stored_bytes(pub_dir) + _stored_bytes(sub_dir)

    async def reopen() -> None:
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="os", discovery=False).start()
        try:
            assert [e.messages for e in pub.outbox()] == [1]  # opened with the node's key
        finally:
            await pub.stop()

    run(reopen())


def test_a_stored_message_altered_on_disk_is_caught_when_the_store_opens(mesh: str, data_dir: Path) -> None:
    from meshmq._seal import StoreCipher as Cipher
    from meshmq._security import KEY_FILE, read_key
    from meshmq._store import Store

    async def main() -> Path:
        sub = await meshmq.AsyncAgent("sub", mesh=mesh, durability="os").start()
        sub.subscribe("jobs.*", lambda m: None, queue="workers")
        pub = await meshmq.AsyncAgent("pub", mesh=mesh, durability="os").start()
        await pub.wait_for_subscribers("jobs.x", timeout=10)
        await sub.stop()
        await eventually(lambda: not any(p.service == "sub" for p in pub.peers()), what="the subscriber gone")
        await pub.publish("jobs.x", b"kept")
        await pub.stop()
        assert pub.store_dir is not None
        return pub.store_dir

    store_dir = run(main())
    cipher = Cipher(NodeKeys(read_key(store_dir / KEY_FILE, "node")))
    with Store.open(store_dir, durability="os", cipher_for=lambda d: cipher) as store:
        [(key, body)] = list(store._items(b"out"))
    # Rewrite the chunk as another node would: a valid checksum, a signature that is not ours.
    import zlib

    import lmdb

    forged = StoreCipher(NodeKeys.generate()).seal(b"out", key, msgpack.packb(body, use_bin_type=True))
    env = lmdb.open(str(store_dir / "env"), max_dbs=16, subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, zlib.crc32(forged).to_bytes(4, "big") + forged, db=env.open_db(b"out", txn=txn))
    finally:
        env.close()
    with pytest.raises(meshmq.CorruptStore, match="out:"):
        run(meshmq.AsyncAgent("pub", mesh=mesh, durability="os", discovery=False).start())


# --- insecure mode ------------------------------------------------------------------------------


def test_insecure_agents_talk_to_each_other_and_say_they_are_insecure(mesh: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="meshmq"):
            a = await meshmq.AsyncAgent("a", mesh=mesh, insecure=True, durability="memory").start()
            b = await meshmq.AsyncAgent("b", mesh=mesh, insecure=True, durability="memory").start()
        got: list[bytes] = []
        b.subscribe("x.*", lambda m: got.append(m.raw))
        try:
            assert all("#" not in ep for ep in a.endpoints)  # no key: nothing to authenticate with
            await a.wait_for_subscribers("x.y", timeout=10)
            await a.publish("x.y", b"hello")
            await eventually(lambda: got == [b"hello"], what="the message")
        finally:
            await a.stop()
            await b.stop()
        assert sum("runs INSECURE" in r.getMessage() for r in caplog.records) == 2

    run(main())


def test_an_insecure_agent_and_a_secure_one_never_talk(mesh: str) -> None:
    """Both announce themselves by mDNS on loopback in the same mesh. The secure agents meet;
    the insecure one is refused by them and refuses them, and no message crosses."""

    async def main() -> None:
        plain = await meshmq.AsyncAgent("plain", mesh=mesh, insecure=True, durability="memory").start()
        one = await meshmq.AsyncAgent("one", mesh=mesh, durability="memory").start()
        two = await meshmq.AsyncAgent("two", mesh=mesh, durability="memory").start()
        got: dict[str, list[bytes]] = {"plain": [], "one": [], "two": []}
        for agent in (plain, one, two):
            agent.subscribe("news.*", lambda m, name=agent.service: got[name].append(m.raw))
        try:
            await one.wait_for_subscribers("news.x", count=2, timeout=10)  # itself and two
            # Each side saw the other's announcement and would not connect to it.
            await eventually(lambda: plain.stats().get("endpoints_secure", 0) >= 2
                             and one.stats().get("rejected_hint_without_key", 0) >= 1
                             and two.stats().get("rejected_hint_without_key", 0) >= 1, what="the refusals counted")
            await plain.publish("news.x", b"from plain")
            await one.publish("news.x", b"from one")
            await eventually(lambda: got["two"] == [b"from one"], what="secure to secure")
            await eventually(lambda: got["plain"] == [b"from plain"], what="insecure to itself")
            assert got["one"] == [b"from one"]
            assert [p.service for p in plain.peers()] == []
            assert sorted(p.service for p in one.peers()) == ["two"]
        finally:
            for agent in (plain, one, two):
                await agent.stop()

    run(main(), timeout=60)


def test_insecure_is_a_cli_option_and_a_setting() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "meshmq", "pub", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--insecure" in out.stdout
    assert meshmq.Config.load(env={"MESHMQ_INSECURE": "1"}).insecure is True
    assert meshmq.Config.load(env={}).insecure is False
    meshmq.Config(insecure=True, seeds=("tcp://127.0.0.1:7400",))  # no key needed where nothing is checked
    with pytest.raises(meshmq.ConfigError, match="lacks the node's key"):
        meshmq.Config(seeds=("tcp://127.0.0.1:7400",))


# --- hostile input to the opener ------------------------------------------------------------------

_ALICE, _BOB = NodeKeys.generate(), NodeKeys.generate()
_SEND, _RECV = Signer(_ALICE).shared_key(_BOB.public), Signer(_BOB).shared_key(_ALICE.public)


@hypothesis.given(st.binary(max_size=512))
def test_random_bytes_never_open(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_data(HEAD + data, LIMITS, _ALICE.node_id, _RECV, _BOB.node_id)


@hypothesis.given(st.one_of(st.binary(max_size=256), st.builds(
    lambda fields: msgpack.packb(fields, use_bin_type=True),
    st.lists(st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=20), st.binary(max_size=20),
                       st.lists(st.binary(max_size=8), max_size=4)), max_size=10))))
def test_a_genuinely_sealed_body_of_nonsense_is_refused_cleanly(body: bytes) -> None:
    """What a broken (not forging) sender could seal: anything but a valid frame is a
    ProtocolError, never a crash or another exception."""
    nonce = os.urandom(24)
    frame = HEAD + nonce + nacl.bindings.crypto_box_afternm(body, nonce, _SEND)
    try:
        open_data(frame, LIMITS, _ALICE.node_id, _RECV, _BOB.node_id)
    except ProtocolError:
        pass
