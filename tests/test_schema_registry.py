"""Schemas pushed to the mesh: signed schema documents, the registry that keeps the last
signed of each (type, version) (pure, with Hypothesis), the SCHEMAS frame, their spread by
gossip between agents on loopback, what agents check with them, and ``meshmq schema add``,
``show`` and ``ls``."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import msgpack
import pytest
from aio import eventually, run

import meshmq
from meshmq._registry import (
    DISPLACED, FULL, KNOWN, NEW, OLDER, REPLACED, SchemaDocument, SchemaRegistry, digest_of,
)
from meshmq._schema import MAX_SCHEMA_BYTES
from meshmq._security import SCHEMA_DOC, Authority, check_schema_document
from meshmq._wire import (
    MAX_FRAME_SCHEMAS, MAX_SCHEMA_DOCUMENT_BYTES, MAX_SCHEMA_KEYS, PROTOCOL_VERSION, SCHEMAS, Limits, SchemaExchange,
    decode_frame, schemas_frame,
)

ORDER = {"type": "object", "required": ["orderId", "total"], "additionalProperties": False,
         "properties": {"orderId": {"type": "string", "pattern": "^ORD-[0-9]+$"},
                        "total": {"type": "number", "minimum": 0}}}
GOOD = {"orderId": "ORD-1", "total": 10}
BAD = {"orderId": "ORD-2", "total": -1}  # breaks total's minimum


def _other_authority(name: str = "other") -> Authority:
    return Authority.create(Path(os.environ["MESHMQ_HOME"]) / name)


def _sign(mesh: str, type_: str = "OrderPlaced", version: int = 1, schema: Any = ORDER, at: float | None = None,
          authority: Authority | None = None) -> bytes:
    return (authority or Authority.development()).sign_schema(
        mesh=mesh, type=type_, version=version, schema_text=json.dumps(schema), at=time.time() if at is None else at)


def _forge(authority: Authority, fields: list[Any], signature: bytes | None = None) -> bytes:
    """A document with any body fields, signed (or carrying ``signature``) as the authority would."""
    body = msgpack.packb(fields, use_bin_type=True)
    assert authority.key is not None
    return msgpack.packb([body, signature or bytes(authority.key.sign(body).signature)], use_bin_type=True)


# --- signed schema documents ----------------------------------------------------------------------


def test_a_signed_schema_checks_and_names_its_exact_bytes(mesh: str) -> None:
    authority = Authority.development()
    document = _sign(mesh, "OrderPlaced", 2, ORDER, at=1234.5)
    assert check_schema_document(document, (authority.public,), mesh) == (
        "OrderPlaced", 2, ORDER, 1234.5, hashlib.blake2b(document, digest_size=16).digest())
    assert _sign(mesh, "OrderPlaced", 2, ORDER, at=1234.5) == document  # Ed25519 is deterministic


def test_documents_that_are_not_good_are_refused_saying_why(mesh: str) -> None:
    authority = Authority.development()
    trusted = (authority.public,)
    good = ["meshmq-schema-v1", mesh, "OrderPlaced", 1, json.dumps(ORDER), 1.0, authority.public]
    assert check_schema_document(_forge(authority, good), trusted, mesh)[0] == "OrderPlaced"
    signature = msgpack.unpackb(_forge(authority, good))[1]
    tampered = _forge(authority, [*good[:4], json.dumps({"type": "object"}), *good[5:]], signature)
    oversized = json.dumps({"description": "y" * MAX_SCHEMA_BYTES})
    refusals = [
        ("its signature does not verify", tampered),
        ("an authority this agent does not trust", _sign(mesh, authority=_other_authority())),
        (f"a schema of mesh 'elsewhere', not {mesh!r}", _sign("elsewhere")),
        ("not a schema document", b"\x92\xc4\x01x"),
        ("not a schema document (bytes, at most", b"x" * (MAX_SCHEMA_DOCUMENT_BYTES + 1)),
        ("not a schema document", _forge(authority, [*good[:4], oversized, *good[5:]])),  # over 64 KiB of text
        ("message type 'no spaces'", _forge(authority, [*good[:2], "no spaces", *good[3:]])),
        ("a schema version is a whole number from 1, got 0", _forge(authority, [*good[:3], 0, *good[4:]])),
        ("not a schema document", _forge(authority, [*good[:5], 1, *good[6:]])),  # signed at is a float
    ]
    for problem, document in refusals:
        with pytest.raises(meshmq.CertificateError, match=problem.replace("(", r"\(")):
            check_schema_document(document, trusted, mesh)
    # Genuine, but what it holds is not a schema meshmq can check: the schema's own error.
    for schema_text, rule in ((json.dumps({"type": "decimal"}), "type"), ("{oops", "json"),
                              ("[" * 5000 + "]" * 5000, "depth")):
        with pytest.raises(meshmq.SchemaError) as caught:
            check_schema_document(_forge(authority, [*good[:4], schema_text, *good[5:]]), trusted, mesh)
        assert caught.value.rule == rule


def test_the_authority_signs_only_what_agents_would_take(mesh: str) -> None:
    authority = Authority.development()
    with pytest.raises(meshmq.SchemaError, match="line 1 column 2"):
        authority.sign_schema(mesh=mesh, type="T", version=1, schema_text="{oops", at=1.0)
    with pytest.raises(meshmq.SchemaError, match="at most 65536"):
        authority.sign_schema(mesh=mesh, type="T", version=1, schema_text=" " * (MAX_SCHEMA_BYTES + 1), at=1.0)
    with pytest.raises(meshmq.UsageError, match="a whole number from 1"):
        authority.sign_schema(mesh=mesh, type="T", version=0, schema_text="{}", at=1.0)
    with pytest.raises(meshmq.UsageError, match="1-63 characters"):
        authority.sign_schema(mesh=mesh, type="", version=1, schema_text="{}", at=1.0)
    with pytest.raises(meshmq.UsageError, match="only its public key"):
        Authority(authority.public).sign_schema(mesh=mesh, type="T", version=1, schema_text="{}", at=1.0)
    biggest = json.dumps({"description": "d" * (MAX_SCHEMA_BYTES - 20)})
    assert len(authority.sign_schema(mesh=mesh, type="T" * 63, version=2**31 - 1, schema_text=biggest,
                                     at=1.0)) <= MAX_SCHEMA_DOCUMENT_BYTES  # the wire bound holds every good one


# --- the registry, pure -----------------------------------------------------------------------------


def _doc(type_: str, version: int, at: float, digest: bytes) -> SchemaDocument:
    return SchemaDocument(type_, version, {"title": digest.hex()}, at, digest, b"blob-" + digest)


def test_the_last_signed_document_of_a_pair_wins() -> None:
    registry = SchemaRegistry(limit=2)
    first, later = _doc("A", 1, 10.0, b"\x09" * 16), _doc("A", 1, 20.0, b"\x01" * 16)
    same_time_greater = _doc("A", 1, 20.0, b"\x02" * 16)
    assert registry.add(first) == NEW
    assert registry.add(first) == KNOWN
    assert registry.add(later) == REPLACED
    assert registry.add(first) == OLDER  # an earlier one never comes back
    assert registry.add(same_time_greater) == REPLACED  # signed at the same time: the greater digest
    assert registry.entries[("A", 1)] is same_time_greater
    assert registry.add(_doc("A", 2, 1.0, b"\x03" * 16)) == NEW
    assert registry.add(_doc("B", 1, 1.0, b"\x04" * 16)) == FULL  # a third pair is over the limit
    assert registry.add(_doc("A", 2, 5.0, b"\x05" * 16)) == REPLACED  # a held pair still takes later ones
    assert len(registry) == 2 and registry.digest == digest_of(registry.keys())
    assert registry.schemas() == {("A", 1): {"title": ("02" * 16)}, ("A", 2): {"title": ("05" * 16)}}


def test_a_full_registry_keeps_the_smallest_pairs() -> None:
    registry = SchemaRegistry(limit=2)
    assert registry.add(_doc("B", 1, 1.0, b"\x01" * 16)) == NEW
    assert registry.add(_doc("B", 2, 1.0, b"\x02" * 16)) == NEW
    assert registry.add(_doc("C", 1, 1.0, b"\x03" * 16)) == FULL  # greater than every pair held
    assert not registry.wants([("C", 1, 1.0, b"\x03" * 16)])  # so it is not asked for
    assert registry.wants([("A", 7, 1.0, b"\x04" * 16)])
    assert registry.add(_doc("A", 7, 1.0, b"\x04" * 16)) == DISPLACED
    assert registry.displaced is not None and registry.displaced.pair == ("B", 2)
    assert list(registry.entries) == [("B", 1), ("A", 7)] and registry.digest == digest_of(registry.keys())
    assert registry.add(_doc("B", 2, 9.0, b"\x05" * 16)) == FULL  # displaced for good: a later one too
    assert registry.add(_doc("B", 1, 2.0, b"\x06" * 16)) == REPLACED  # a held pair still takes later ones


_SMALL_LIMIT = 3


_documents = st.lists(st.builds(_doc, st.sampled_from(["A", "B", "C"]), st.integers(1, 3),
                                st.sampled_from([1.0, 2.0, 3.0]), st.binary(min_size=16, max_size=16)),
                      max_size=30)


@pytest.mark.parametrize("limit", [100, _SMALL_LIMIT])  # room for every pair, and fewer than exist
@hypothesis.given(_documents, st.randoms(use_true_random=False))
def test_any_order_and_any_repetition_of_merges_converges(limit: int, documents: list[SchemaDocument],
                                                          rng: Any) -> None:
    """Whatever the order, a registry ends with the smallest ``limit`` pairs seen, each with
    its last signed document."""
    one, two = SchemaRegistry(limit=limit), SchemaRegistry(limit=limit)
    for document in documents:
        one.add(document)
    shuffled = documents + documents[: len(documents) // 2]
    rng.shuffle(shuffled)
    for document in shuffled:
        two.add(document)
    assert one.keys() == two.keys() and one.digest == two.digest == digest_of(two.keys())
    assert sorted(one.entries) == sorted({d.pair for d in documents})[:limit]
    for pair, held in one.entries.items():  # and each pair holds the greatest (signed at, digest)
        assert (held.at, held.digest) == max((d.at, d.digest) for d in documents if d.pair == pair)


@pytest.mark.parametrize("limit", [100, _SMALL_LIMIT])  # room for every pair, and fewer than exist
@hypothesis.given(_documents, st.lists(st.booleans(), min_size=30, max_size=30),
                  st.lists(st.booleans(), min_size=30, max_size=30))
def test_one_offer_its_answer_and_the_documents_it_asks_for_make_two_registries_equal(
        limit: int, documents: list[SchemaDocument], at_a: list[bool], at_b: list[bool]) -> None:
    """The exchange of the agents, in virtual form: A offers its keys; B answers with the
    documents A lacks and its keys; A sends the documents B lacks, and it ends there."""
    a, b = SchemaRegistry(limit=limit), SchemaRegistry(limit=limit)
    for document, to_a, to_b in zip(documents, at_a, at_b):
        if to_a:
            a.add(document)
        if to_b:
            b.add(document)
    roomy = limit > len(documents)
    # Only what the receiver lacked is sent; with too little room, it may displace or be refused.
    sent = (NEW, REPLACED) if roomy else (NEW, REPLACED, DISPLACED, FULL)
    offer = a.keys()
    for_a, answer = b.lacking(offer), b.keys()
    if roomy:
        assert b.wants(offer) == bool(a.lacking(answer))  # B lacks something of A's: A has something for B
    for document in for_a:
        assert a.add(document) in sent
    for_b = a.lacking(answer)
    for document in for_b:
        assert b.add(document) in sent
    assert a.keys() == b.keys() and a.digest == b.digest
    assert not a.lacking(b.keys()) and not b.wants(a.keys()) and not a.wants(b.keys())


def test_wants_says_whether_a_peer_holds_something_newer_or_more() -> None:
    registry = SchemaRegistry(limit=10)
    registry.add(_doc("A", 1, 5.0, b"\x05" * 16))
    assert not registry.wants([])
    assert not registry.wants([("A", 1, 5.0, b"\x05" * 16), ("A", 1, 4.0, b"\x09" * 16)])
    assert registry.wants([("A", 1, 6.0, b"\x00" * 16)])
    assert registry.wants([("B", 1, 1.0, b"\x00" * 16)])
    assert [d.type for d in registry.lacking([("A", 1, 4.0, b"\xff" * 16)])] == ["A"]
    assert registry.lacking([("A", 1, 5.0, b"\x05" * 16)]) == []


# --- the SCHEMAS frame --------------------------------------------------------------------------------


def test_schemas_frames_round_trip_and_hostile_ones_are_rejected() -> None:
    limits = Limits()
    key = ("OrderPlaced", 2, 1.5, b"\x01" * 16)
    assert decode_frame(schemas_frame("m", "n", [key], [b"doc"], answer=True), limits) == SchemaExchange(
        "m", "n", (key,), (b"doc",), True)
    assert decode_frame(schemas_frame("m", "n", None, [b"d1", b"d2"]), limits) == SchemaExchange(
        "m", "n", None, (b"d1", b"d2"), False)
    assert decode_frame(schemas_frame("m", "n", [], []), limits).keys == ()  # type: ignore[union-attr]

    def raw(body: list[Any]) -> bytes:
        return bytes((PROTOCOL_VERSION, SCHEMAS)) + msgpack.packb(body, use_bin_type=True)

    hostile = [
        ["m", "n", None, [], True],  # an answer must carry keys
        ["m", "n", None, [b"x"] * (MAX_FRAME_SCHEMAS + 1), False],
        ["m", "n", [list(key)] * (MAX_SCHEMA_KEYS + 1), [], False],
        ["m", "n", None, [b"x" * (MAX_SCHEMA_DOCUMENT_BYTES + 1)], False],
        ["m", "n", None, [b""], False],
        ["m", "n", None, ["text"], False],
        ["m", "n", [["T", 1, 1.0, b"short"]], [], False],
        ["m", "n", [["T", 0, 1.0, b"\x01" * 16]], [], False],
        ["m", "n", [["T", 1, float("nan"), b"\x01" * 16]], [], False],
        ["m", "n", [["T", 1, 1, b"\x01" * 16]], [], False],  # signed at is a float
        ["m", "n", [[{}, 1, 1.0, b"\x01" * 16]], [], False],
        ["m", "n", {}, [], False],
        ["m", "", None, [], False],
        ["m", "n", None, [], "yes"],
        ["m", "n", None, []],
    ]
    for body in hostile:
        with pytest.raises(meshmq.ProtocolError):
            decode_frame(raw(body), limits)


# --- agents on loopback -------------------------------------------------------------------------------


def _envelope(node: str, data: Any, type_: str = "OrderPlaced", version: int = 1) -> bytes:
    from meshmq._message import FORMAT_MSGPACK
    from meshmq._wire import encode_envelope

    return encode_envelope(os.urandom(16), time.time(), "orders.placed", type_, "raw", node, version, None, None,
                           FORMAT_MSGPACK, msgpack.packb(data, use_bin_type=True))


def test_a_pushed_schema_spreads_to_three_agents_and_receivers_check_with_it(mesh: str) -> None:
    """Pushed to one agent, held by all three within two gossip intervals; the receiver, which
    declares nothing in code, dead-letters a bad message from a publisher that has no schema
    at all (a raw peer), and delivers a good one; publishers refuse bad ones themselves."""
    from certs import RawPeer

    async def main() -> None:
        agents = [await meshmq.AsyncAgent(f"svc{i}", mesh=mesh, durability="memory").start() for i in range(3)]
        receiver = agents[2]
        got: list[Any] = []
        receiver.subscribe("orders.*", lambda m: got.append(m.data))
        watcher = receiver.tap(events=["schema"])
        raw = RawPeer(mesh, receiver.endpoints[0], "raw")
        try:
            await eventually(lambda: all(len(a.peers()) == 2 for a in agents), what="all three met")
            interval = agents[0].config.gossip_interval
            start = time.monotonic()
            assert agents[0].push_schema(_sign(mesh))
            await eventually(lambda: all(("OrderPlaced", 1) in a._registry.entries for a in agents), timeout=10,
                             what="all three hold the schema")
            took = time.monotonic() - start
            assert took <= 2 * interval, f"{took:.3f}s for 3 agents, gossip interval {interval}s"
            assert [a.stats()["schemas_adopted"] for a in agents] == [1, 1, 1]
            refused = r"total: must be at least 0, not -1 \(schema rule 'minimum'\)"
            with pytest.raises(meshmq.SchemaError, match=refused):
                await agents[1].publish("orders.placed", BAD, type="OrderPlaced")  # a publisher checks too

            assert receiver._schemas == {}  # nothing declared in code: what it checks with was pushed
            raw.introduce()
            await eventually(lambda: raw.node in receiver._peer_keys, what="the raw peer known")
            raw.send(raw.data(1, 1, [_envelope(raw.node, BAD), _envelope(raw.node, GOOD)]))
            await eventually(lambda: got == [GOOD] and len(receiver.dead_letters()) == 1,
                             what="the good one delivered, the bad one dead-lettered")
            [letter] = receiver.dead_letters()
            assert letter.reason == "schema" and "total" in (letter.error or "") and letter.message.data == BAD
            assert receiver.stats()["rejected_schema"] == 1

            async def schema_event() -> meshmq.TapEvent:
                async for event in watcher:
                    if event.kind == "schema":
                        return event
                raise AssertionError("the tap closed")

            event = await asyncio.wait_for(schema_event(), 5)
            assert "OrderPlaced version 1" in (event.detail or "")
            assert not agents[1].push_schema(_sign(mesh, at=1.0))  # signed before the one held: not taken
        finally:
            raw.close()
            for agent in agents:
                await agent.stop()

    run(main(), timeout=60)


def test_two_documents_for_one_pair_settle_on_the_last_signed_everywhere(mesh: str) -> None:
    async def main() -> None:
        agents = [await meshmq.AsyncAgent(f"svc{i}", mesh=mesh, durability="memory").start() for i in range(3)]
        try:
            await eventually(lambda: all(len(a.peers()) == 2 for a in agents), what="all three met")
            later = _sign(mesh, schema={"type": "object", "required": ["orderId"]}, at=time.time() + 1)
            earlier = _sign(mesh, schema=ORDER, at=time.time())
            assert agents[0].push_schema(later)
            agents[2].push_schema(earlier)  # may be taken for a moment, where it arrives first
            await eventually(lambda: all(a._registry.entries.get(("OrderPlaced", 1)) is not None
                                         and a._registry.entries[("OrderPlaced", 1)].blob == later for a in agents),
                             what="every agent on the later one")
            await agents[2].publish("orders.placed", {"orderId": "x", "total": -5}, type="OrderPlaced")  # its rules
        finally:
            for agent in agents:
                await agent.stop()

    run(main(), timeout=60)


def test_a_newcomer_learns_the_schemas_and_a_restart_keeps_them(mesh: str) -> None:
    async def main() -> None:
        first = await meshmq.AsyncAgent("first", mesh=mesh, durability="memory").start()
        try:
            assert first.push_schema(_sign(mesh))
            newcomer = await meshmq.AsyncAgent("newcomer", mesh=mesh, durability="os").start()
            try:
                await eventually(lambda: len(newcomer.peers()) == 1, what="the newcomer meets its peer")
                met = time.monotonic()
                await eventually(lambda: ("OrderPlaced", 1) in newcomer._registry.entries, timeout=10,
                                 what="the newcomer learns the schema from its peer")
                interval = newcomer.config.gossip_interval  # at once: keys are offered on meeting a peer
                assert time.monotonic() - met <= 2 * interval
            finally:
                await newcomer.stop()
        finally:
            await first.stop()
        # Alone now (no discovery, no peer runs): what it holds comes from its store.
        again = await meshmq.AsyncAgent("newcomer", mesh=mesh, durability="os", discovery=False).start()
        try:
            assert again.node_id == newcomer.node_id  # the same instance and store
            assert list(again._registry.entries) == [("OrderPlaced", 1)]
            with pytest.raises(meshmq.SchemaError, match="orderId: must match"):
                await again.publish("orders.placed", {"orderId": "X", "total": 1}, type="OrderPlaced")
            await again.publish("orders.placed", GOOD, type="OrderPlaced")
        finally:
            await again.stop()

    run(main(), timeout=60)


def test_a_full_agent_keeps_the_smallest_pairs_says_so_and_its_store_follows(mesh: str) -> None:
    """max_schemas=2. From this process a new pair beyond the limit raises (the pusher is
    told); from a peer, a smaller pair displaces the greatest held one, counted and logged,
    and the store drops it, so a restart holds the same two."""
    from certs import RawPeer

    async def main() -> None:
        kw: dict[str, Any] = dict(mesh=mesh, durability="os", discovery=False, max_schemas=2)
        agent = await meshmq.AsyncAgent("svc", **kw).start()
        raw = RawPeer(mesh, agent.endpoints[0], "raw")
        try:
            assert agent.push_schema(_sign(mesh, "B", 1)) and agent.push_schema(_sign(mesh, "B", 2))
            with pytest.raises(meshmq.UsageError, match="max_schemas=2"):
                agent.push_schema(_sign(mesh, "A", 1))
            assert sorted(agent._registry.entries) == [("B", 1), ("B", 2)]
            raw.introduce()
            await eventually(lambda: raw.node in agent._peer_keys, what="the raw peer known")
            raw.send(schemas_frame(mesh, raw.node, None, [_sign(mesh, "C", 1), _sign(mesh, "A", 1)]))
            await eventually(lambda: agent.stats().get("schemas_displaced", 0) == 1, what="B 2 displaced")
            assert agent.stats()["schemas_refused_full"] == 1  # C 1: greater than every pair held
            assert sorted(agent._registry.entries) == [("A", 1), ("B", 1)]
            assert sorted(agent._checked_schemas) == [("A", 1), ("B", 1)]
        finally:
            raw.close()
            await agent.stop()
        again = await meshmq.AsyncAgent("svc", **kw).start()
        try:
            assert again.node_id == agent.node_id  # the same instance and store
            assert sorted(again._registry.entries) == [("A", 1), ("B", 1)]
            # B 2 is no longer in the store: had it been, reading it back would refuse it as full.
            assert again.stats().get("schemas_refused_full", 0) == 0
            assert again.stats().get("schemas_displaced", 0) == 0
        finally:
            await again.stop()

    run(main(), timeout=60)


def test_refused_documents_are_counted_and_change_nothing(mesh: str) -> None:
    """From the API they raise; from a peer's frame they are counted and dropped."""
    from certs import RawPeer

    async def main() -> None:
        agent = await meshmq.AsyncAgent("svc", mesh=mesh, durability="memory", discovery=False).start()
        raw = RawPeer(mesh, agent.endpoints[0], "raw")
        try:
            with pytest.raises(meshmq.CertificateError, match="does not trust"):
                agent.push_schema(_sign(mesh, authority=_other_authority()))
            with pytest.raises(meshmq.CertificateError, match="mesh 'elsewhere'"):
                agent.push_schema(_sign("elsewhere"))
            authority = Authority.development()
            bad_schema = _forge(authority, [SCHEMA_DOC, mesh, "T", 1, '{"type": "decimal"}', 1.0, authority.public])
            with pytest.raises(meshmq.SchemaError, match="unknown type 'decimal'"):
                agent.push_schema(bad_schema)
            raw.introduce()
            await eventually(lambda: raw.node in agent._peer_keys, what="the raw peer known")
            raw.send(schemas_frame(mesh, raw.node, None, [_sign(mesh, authority=_other_authority("third")),
                                                          bad_schema, b"junk"]))
            await eventually(lambda: agent.stats().get("schemas_refused", 0) == 6, what="three more refused")
            assert len(agent._registry) == 0 and agent._checked_schemas == {}
            assert "schemas_adopted" not in agent.stats()
        finally:
            raw.close()
            await agent.stop()

    run(main())


def test_an_exchange_ends_an_offer_is_answered_and_an_answer_only_with_documents(mesh: str) -> None:
    """Bounded gossip: the agent answers an offer with the documents the offerer lacks and its
    keys; it answers an answer with documents only, and a push not at all."""
    from certs import RawPeer

    async def main() -> None:
        agent = await meshmq.AsyncAgent("svc", mesh=mesh, durability="memory", discovery=False).start()
        raw = RawPeer(mesh, agent.endpoints[0], "raw")
        limits = Limits()

        async def next_frame(offers: bool = False) -> SchemaExchange:
            """The agent's next schemas frame; offers it sends on its own now and then (a
            periodic comparison) are passed over unless ``offers``."""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if not raw.pull.poll(0):
                    await asyncio.sleep(0.01)
                    continue
                frame = raw.pull.recv()
                if frame[1] != SCHEMAS:
                    continue
                decoded = decode_frame(frame, limits)
                assert isinstance(decoded, SchemaExchange)
                if offers or decoded.keys is None or decoded.answer:
                    return decoded
            raise AssertionError("no schemas frame from the agent within 5s")

        try:
            mine = _sign(mesh, "Held", 1)
            assert agent.push_schema(mine)
            raw.introduce(want_reply=True)
            opening = await next_frame(offers=True)  # the agent offers its keys to a new peer
            assert opening.keys is not None and not opening.answer and opening.documents == ()
            theirs = _sign(mesh, "Theirs", 1)
            their_key = ("Theirs", 1) + check_schema_document(theirs, (Authority.development().public,), mesh)[3:]
            raw.send(schemas_frame(mesh, raw.node, [their_key], []))  # an offer: we hold Theirs, not Held
            answer = await next_frame()
            assert answer.answer and answer.documents == (mine,) and [k[0] for k in answer.keys or ()] == ["Held"]
            raw.send(schemas_frame(mesh, raw.node, [their_key], [], answer=True))  # an answer: documents only
            documents = await next_frame()
            assert documents.keys is None and not documents.answer and documents.documents == (mine,)
            raw.send(schemas_frame(mesh, raw.node, None, [theirs]))  # a push: taken, not answered
            raw.send(schemas_frame(mesh, raw.node, [], []))  # then an offer, whose answer comes next
            await eventually(lambda: ("Theirs", 1) in agent._registry.entries, what="the pushed one taken")
            after = await next_frame()
            assert after.answer and [k[0] for k in after.keys or ()] == ["Held", "Theirs"]
        finally:
            raw.close()
            await agent.stop()

    run(main())


def test_a_schema_declared_in_code_wins_in_its_agent_and_the_difference_is_counted(mesh: str) -> None:
    async def main() -> None:
        agent = await meshmq.AsyncAgent("svc", mesh=mesh, durability="memory", discovery=False).start()
        try:
            loose = {"type": "object"}
            agent.schema("OrderPlaced", 1, loose)
            assert agent.push_schema(_sign(mesh))  # stricter
            await agent.publish("orders.placed", BAD, type="OrderPlaced")  # the code's schema allows it
            agent.schema("OrderPlaced", 1, loose)  # told once per pushed document
            assert agent.stats()["schema_conflicts"] == 1
            assert agent.push_schema(_sign(mesh, version=2))  # no code for version 2: the pushed one checks
            with pytest.raises(meshmq.SchemaError, match="minimum"):
                await agent.publish("orders.placed", BAD, type="OrderPlaced", schema_version=2)
            assert agent.stats()["schema_conflicts"] == 1
        finally:
            await agent.stop()

    run(main())


def test_an_insecure_agent_refuses_pushed_schemas_saying_why(mesh: str) -> None:
    async def main() -> None:
        agent = await meshmq.AsyncAgent("svc", mesh=mesh, durability="memory", discovery=False,
                                        insecure=True).start()
        try:
            with pytest.raises(meshmq.UsageError, match=r"insecure.*declare the schema in code"):
                agent.push_schema(_sign(mesh))
            assert len(agent._registry) == 0
        finally:
            await agent.stop()

    run(main())


# --- meshmq schema add / show / ls ---------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = importlib.import_module("test_cli").cli_env(tmp_path)
    return subprocess.run([sys.executable, "-m", "meshmq", "schema", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_meshmq_schema_add_then_show_and_ls(mesh: str, tmp_path: Path) -> None:
    schema_file = tmp_path / "order.json"
    schema_file.write_text(json.dumps(ORDER, indent=2))
    with meshmq.Agent("shop", mesh=mesh, durability="memory") as shop, \
            meshmq.Agent("billing", mesh=mesh, durability="memory") as billing:
        billing.schema("InvoiceSent", 1, {"type": "object"})
        added = _cli(tmp_path, "add", "OrderPlaced", "2", str(schema_file), "--mesh", mesh, "--wait", "10")
        assert added.returncode == 0, added.stderr
        assert "schema OrderPlaced version 2 is held by all 2 agents found" in added.stderr
        for agent in (shop, billing):
            assert agent._agent._registry.entries[("OrderPlaced", 2)].schema == ORDER
        with pytest.raises(meshmq.SchemaError, match="total"):
            shop.publish("orders.placed", BAD, type="OrderPlaced", schema_version=2)

        shown = _cli(tmp_path, "show", "OrderPlaced", "--mesh", mesh, "--wait", "5")
        assert shown.returncode == 0, shown.stderr
        header, body = shown.stdout.split("\n", 1)
        assert header.startswith("# OrderPlaced version 2, pushed, signed ") and json.loads(body) == ORDER
        as_json = _cli(tmp_path, "show", "OrderPlaced", "2", "--json", "--mesh", mesh, "--wait", "5")
        [entry] = json.loads(as_json.stdout)
        assert (entry["type"], entry["version"], entry["schema"]) == ("OrderPlaced", 2, ORDER)
        missing = _cli(tmp_path, "show", "OrderPlaced", "7", "--mesh", mesh, "--wait", "2")
        assert missing.returncode == 1 and "no schema of OrderPlaced version 7 is known" in missing.stderr

        listed = _cli(tmp_path, "ls", "--json", "--mesh", mesh, "--wait", "3")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["type"], r["version"], r["services"], r["pushed"] is not None) for r in rows] == [
            ("InvoiceSent", 1, ["billing"], False), ("OrderPlaced", 2, [], True)]
        table = _cli(tmp_path, "ls", "--mesh", mesh, "--wait", "3")
        assert "DECLARED IN CODE BY" in table.stdout and "PUSHED" in table.stdout


@pytest.mark.parametrize(("args", "problem"), [
    (["OrderPlaced", "two", "FILE"], "VERSION 'two' must be a whole number from 1"),
    (["OrderPlaced", "0", "FILE"], "VERSION '0' must be a whole number from 1"),
    (["Order Placed", "1", "FILE"], "message type 'Order Placed' must be 1-63 characters"),
    (["OrderPlaced", "1", "MISSING"], "cannot read"),
    (["OrderPlaced", "1", "NOTJSON"], "not JSON: line 1 column 2"),
    (["OrderPlaced", "1", "BADSCHEMA"], "unsupported keyword(s): oneOf"),
    (["OrderPlaced", "1"], "schema add takes TYPE VERSION FILE"),
    (["OrderPlaced", "1", "FILE", "--insecure"], "insecure agents"),
])
def test_meshmq_schema_add_names_what_is_wrong_with_its_input(tmp_path: Path, args: list[str],
                                                              problem: str) -> None:
    files = {"FILE": json.dumps(ORDER), "NOTJSON": "{oops", "BADSCHEMA": json.dumps({"oneOf": []})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a) if a in files or a == "MISSING" else a for a in args]
    out = _cli(tmp_path, "add", *args)
    assert out.returncode == 2 and problem in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_every_schema_action_is_explained_by_help(tmp_path: Path) -> None:
    out = _cli(tmp_path, "--help")
    assert out.returncode == 0
    for words in ("schema add OrderPlaced 2 order-v2.json", "schema show OrderPlaced", "schema ls",
                  "--authority-key", "--wait", "insecure"):
        assert words in out.stdout, words
