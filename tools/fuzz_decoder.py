#!/usr/bin/env python3
"""Coverage-guided fuzzing of what meshmq reads from peers, with atheris (libFuzzer).

Two targets, each a function of one input (bytes):

``decoder``
    The input as a frame, as the agent reads it: ``decode_frame`` (``decode_data`` for
    DATA), then every DATA entry (``split_entry``, ``decode_envelope``); the input as a
    node record (msgpack, ``NodeRecord.from_wire``); the input as an envelope. Only
    ``ProtocolError`` may come out, and a frame that decodes encodes back to a fixed
    point (its canonical form decodes to the same canonical form).
``gossip``
    The input drives a sequence of well-formed but arbitrary gossip frames (HELLO; SYNC
    with up to ``MAX_SYNC_ENTRIES`` claims, with or without records; PING, PING-REQ, ACK,
    BYE; of this mesh or another) into a pure :class:`~meshmq._node.Node` in virtual
    time, with a vouch that refuses some records. After every frame and tick the Node's
    invariants hold, its tables stay within their bounds, and every frame it sends decodes.

The targets need no atheris (``tests/test_hostile.py`` drives them with Hypothesis);
atheris is optional and not a dependency of meshmq (``pip install atheris``: wheels for
CPython 3.11 on x86-64 Linux). Arguments after the target go to libFuzzer; with no corpus
directory given, one is made in the temporary directory from valid frames of every kind
(its path is printed; it is kept, so a later run can go on from it)::

    python tools/fuzz_decoder.py decoder -max_total_time=180 -rss_limit_mb=512
    python tools/fuzz_decoder.py gossip -max_total_time=180 -rss_limit_mb=512

``-rss_limit_mb`` makes bounded memory a checked property: libFuzzer stops with an error
when the process grows past it. A crash leaves ``crash-<sha1>`` with the input; replay it
with ``python tools/fuzz_decoder.py decoder crash-<sha1>``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
import time
from typing import Any

import msgpack

TARGETS = ("decoder", "gossip")


def _instrumented() -> None:
    """Import meshmq's pure modules, instrumented for coverage when atheris runs us."""
    global wire, node_mod, records, security, ProtocolError, LIMITS
    import meshmq._node as node_mod
    import meshmq._records as records
    import meshmq._security as security
    import meshmq._wire as wire
    from meshmq._errors import ProtocolError

    LIMITS = wire.Limits()


wire: Any = None
node_mod: Any = None
records: Any = None
security: Any = None
ProtocolError: Any = None
LIMITS: Any = None


# --- decoder ---------------------------------------------------------------------------------


def _canonical(decoded: Any) -> bytes | None:
    """The frame the encoders make of ``decoded`` (None for DATA: its entries stay raw)."""
    w = wire
    kind = type(decoded)
    if kind is w.Hello:
        if decoded.cert is not None:
            return w.card_frame(decoded.mesh, decoded.entry, decoded.cert, decoded.endpoint)  # type: ignore[no-any-return]
        return w.hello_frame(decoded.mesh, decoded.entry, decoded.want_reply)  # type: ignore[no-any-return]
    if kind is w.Sync:
        return w.sync_frame(decoded.mesh, decoded.node, decoded.endpoint, decoded.phase,  # type: ignore[no-any-return]
                            decoded.digest_hash, decoded.count, [e.to_wire(True) for e in decoded.entries],
                            list(decoded.wants))
    if kind is w.Ping:
        return w.ping_frame(decoded.mesh, decoded.node, decoded.endpoint, decoded.seq,  # type: ignore[no-any-return]
                            decoded.target, decoded.sent_at)
    if kind is w.Ack:
        return w.ack_frame(decoded.mesh, decoded.node, decoded.seq, decoded.nack)  # type: ignore[no-any-return]
    if kind is w.PingReq:
        return w.ping_req_frame(decoded.mesh, decoded.node, decoded.endpoint, decoded.seq,  # type: ignore[no-any-return]
                                decoded.target, decoded.target_endpoint)
    if kind is w.Bye:
        return w.bye_frame(decoded.mesh, decoded.node, decoded.started, decoded.incarnation)  # type: ignore[no-any-return]
    if kind is w.SchemaExchange:
        return w.schemas_frame(decoded.mesh, decoded.node,  # type: ignore[no-any-return]
                               None if decoded.keys is None else list(decoded.keys), list(decoded.documents),
                               decoded.answer)
    if kind is w.Revocations:
        return w.revoke_frame(decoded.mesh, decoded.node, decoded.phase,  # type: ignore[no-any-return]
                              decoded.digest, list(decoded.revocations))
    if kind is w.PolicyOffer:
        return w.policy_frame(decoded.mesh, decoded.node, decoded.version, decoded.document)  # type: ignore[no-any-return]
    if kind is w.Work:
        return w.work_frame(decoded.mesh, decoded.node, decoded.done)  # type: ignore[no-any-return]
    if kind is w.Receipt:
        return w.receipt_frame(decoded.node, decoded.epoch, decoded.committed, decoded.received, decoded.lane)  # type: ignore[no-any-return]
    return None


def decoder_one(data: bytes) -> None:
    """One input for the ``decoder`` target (raises on a finding)."""
    try:
        decoded = wire.decode_frame(data, LIMITS)
    except ProtocolError:
        decoded = None
    if decoded is not None:
        if type(decoded) is wire.Data:
            for i, entry in enumerate(decoded.entries):
                try:
                    env, _ = wire.split_entry(entry)
                    wire.decode_envelope(env, LIMITS, decoded.first_seq + i)
                except ProtocolError:
                    pass
        else:
            again = _canonical(decoded)
            assert again is not None, type(decoded)
            assert _canonical(wire.decode_frame(again, LIMITS)) == again, "re-encoding is not a fixed point"
    try:
        wire.NodeRecord.from_wire(wire._unpack(data, LIMITS), LIMITS)
    except ProtocolError:
        pass
    try:
        wire.decode_envelope(data, LIMITS)
    except ProtocolError:
        pass


def decoder_seeds() -> list[bytes]:
    """Valid frames of every kind, a certified and signed record among them."""
    import nacl.signing

    from meshmq._message import FORMAT_BYTES

    w, sec = wire, security
    key = nacl.signing.SigningKey.generate()
    authority = sec.Authority(bytes(key.verify_key), key)
    keys = sec.NodeKeys.generate()
    ep = f"tcp://127.0.0.1:7400#{sec.b64(keys.public)}"
    now = time.time()
    cert = authority.issue(node_key=keys.public, service="orders", mesh="shop", publish=("orders.>",),
                           subscribe=("payments.*",), tap=False, not_before=now - 60, not_after=now + 3600)
    record = w.NodeRecord(keys.node_id, "orders", (ep,), (w.Subscription("payments.*"), w.Subscription(
        "payments.>", "billing", True)), 3, now, (("OrderPlaced", 2),), cert)
    record = dataclasses.replace(record, sig=keys.sign(record.signing_bytes()))
    me = records.claim(record)
    claims = [w.Entry(f"{i:016x}", now, i, i % 4, None, "").to_wire(False) for i in range(40)]
    env = w.encode_envelope(os.urandom(16), now, "orders.placed", "OrderPlaced", "orders", keys.node_id, 2,
                            {"traceparent": "00-x"}, "k1", FORMAT_BYTES, b"payload")
    return [
        w.hello_frame("shop", me, True),
        w.card_frame("shop", me, cert, ep),
        w.sync_frame("shop", keys.node_id, ep, w.SYNC_OPEN, b"\0" * 8, 41, [me.to_wire(True), *claims],
                     [f"{i:016x}" for i in range(5)]),
        w.ping_frame("shop", keys.node_id, ep, 7, "00000000000000aa", now),
        w.ack_frame("shop", keys.node_id, 7, True),
        w.ping_req_frame("shop", keys.node_id, ep, 8, "00000000000000aa", ep),
        w.bye_frame("shop", keys.node_id, now, 3),
        w.schemas_frame("shop", keys.node_id, [("OrderPlaced", 2, now, b"\1" * 16)], [authority.sign_schema(
            mesh="shop", type="OrderPlaced", version=2, schema_text='{"type": "object"}', at=now)], True),
        w.revoke_frame("shop", keys.node_id, 1, b"\2" * 16, [authority.revoke(
            mesh="shop", serial=b"\3" * 16, node=None, at=now, forget_after=now + 3600)]),
        w.policy_frame("shop", keys.node_id, 3, authority.sign_policy(
            mesh="shop", version=3, text='version = 3\n[[rule]]\nname = "x"\nttl = 5\n', at=now)),
        w.policy_frame("shop", keys.node_id, 2, None),
        w.work_frame("shop", keys.node_id, 12),
        w.receipt_frame(keys.node_id, 5, 10, 12, 0),
        w.data_frame(keys.node_id, 5, 1, [env, [env, ["billing"]]], floor=1, resent=True, lane=2),
        env,
        msgpack.packb(record.to_wire(), use_bin_type=True),
    ]


# --- gossip ----------------------------------------------------------------------------------


class Draws:
    """Choices drawn from fuzz input, deterministic, zeros once it runs out (no atheris
    needed: the same target runs under Hypothesis)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def int(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        n = (span.bit_length() + 7) // 8
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return lo + int.from_bytes(chunk, "big") % (span + 1)

    def pick(self, options: tuple[Any, ...]) -> Any:
        return options[self.int(0, len(options) - 1)]

    def left(self) -> bool:
        return self.pos < len(self.data)


_NODES = ("me", "a", "b", "c", "d", "e", "f", "g")
_PATTERNS = ("orders.*", "orders.>", ">", "a.b.c", "a..b", "*", "x" * 300)
_MESH = "test"


def _gossip_node(max_peers: int) -> Any:
    timing = node_mod.Timing(probe_interval=0.5, probe_timeout=0.2, gossip_interval=0.2, tombstone_ttl=5.0,
                             join_timeout=1.0, rejoin_window=3.0, max_incarnation_jump=1000)
    record = wire.NodeRecord("me", "svc", ("inproc://me",), (wire.Subscription("orders.*"),), 0, 1.0)

    def vouch(r: Any) -> str | None:
        # As the agent's: some records are refused ("evil" stands for a bad signature), and an
        # endpoint must be its node's own (the agent's says: it names the certified key).
        # Without the latter the core admits a record of another node on our endpoint, or two
        # nodes on one endpoint (the fuzzer finds both in seconds; see docs/security.md).
        if r.service == "evil":
            return "forged"
        if any(not ep.startswith(f"inproc://{r.node}") for ep in r.endpoints):
            return "mismatch"
        return None

    return node_mod.Node(_MESH, record, timing=timing, limits=LIMITS, max_peers=max_peers, rng=random.Random(0),
                         vouch=vouch)


def _entry(d: Draws, fresh: list[int]) -> Any:
    w = wire
    if d.int(0, 7) == 0:
        fresh[0] += 1
        node = f"n{fresh[0]}"  # a new node each time: the member table's bound
    else:
        node = d.pick(_NODES)
    started = float(d.pick((0, 1, 2, 3, 1e9)))
    incarnation = d.pick((0, 1, 2, 3, 999, 5000, w.MAX_INCARNATION))
    status = d.int(0, 3)
    by = d.pick(("", "a", "b", "me"))
    record = None
    if d.int(0, 2):
        endpoint = d.pick((f"inproc://{node}", "inproc://shared", "inproc://me", f"inproc://{node}-2"))
        subs = tuple(w.Subscription(d.pick(_PATTERNS), d.pick((None, "g")), bool(d.int(0, 1)))
                     for _ in range(d.int(0, 3)))
        record = w.NodeRecord(node, d.pick(("svc", "evil")), (endpoint,), subs,
                              incarnation - d.int(0, min(incarnation, 1)), started)
    return w.Entry(node, started, incarnation, status, record, by)


def _frame(d: Draws, fresh: list[int]) -> bytes:
    w = wire
    mesh = _MESH if d.int(0, 15) else "other"
    sender = d.pick(_NODES[1:])
    ep = f"inproc://{sender}"
    kind = d.int(0, 5)
    if kind == 0:
        e = _entry(d, fresh)
        if e.record is None:
            e = dataclasses.replace(e, record=w.NodeRecord(e.node, "svc", (f"inproc://{e.node}",), (), e.incarnation,
                                                           e.started))
        return w.hello_frame(mesh, dataclasses.replace(e, status=w.ALIVE), bool(d.int(0, 1)))  # type: ignore[no-any-return]
    if kind == 1:
        many = d.int(0, 1) and d.int(0, 1)
        n = d.int(0, w.MAX_SYNC_ENTRIES if many else 6)
        entries = [_entry(d, fresh).to_wire(True) for _ in range(n)]
        wants = [d.pick(_NODES) for _ in range(d.int(0, 3))]
        return w.sync_frame(mesh, sender, ep, d.int(0, 2), bytes(8), d.int(0, 300), entries, wants)  # type: ignore[no-any-return]
    if kind == 2:
        return w.ping_frame(mesh, sender, ep, d.int(0, 20), d.pick(_NODES), 0.0)  # type: ignore[no-any-return]
    if kind == 3:
        target = d.pick(_NODES)
        return w.ping_req_frame(mesh, sender, ep, d.int(0, 20), target, f"inproc://{target}")  # type: ignore[no-any-return]
    if kind == 4:
        return w.ack_frame(mesh, sender, d.int(0, 20), bool(d.int(0, 1)))  # type: ignore[no-any-return]
    return w.bye_frame(mesh, sender, float(d.pick((0, 1, 2))), d.int(0, 3))  # type: ignore[no-any-return]


def check_node(node: Any, actions: list[Any]) -> None:
    """The Node's invariants (as tests/test_node.py states them) and bounds; every frame it
    would send decodes."""
    for name, member in node.peers.items():
        assert node.members[name] is member
        assert node.routes.records[name] == member.record
        assert member.entry.status in (wire.ALIVE, wire.SUSPECT)
        assert member.endpoint in node.links and node.by_endpoint[member.endpoint] == name
    assert set(node.peers) == set(node.routes.records)
    assert len(node.by_endpoint) == len(node.peers)
    assert all(count > 0 for count in node.links.values())
    assert node.digest_hash == records.table_hash(node.entries())
    assert len(node.members) <= node.max_peers
    assert len(node.pending) <= node.max_pending
    assert len(node.fresh) <= 8 * node.timing.gossip_entries
    assert len(node.lost) <= node.max_peers
    assert len(node.relays) <= node_mod._RELAYS_KEPT
    assert len(node.departed) <= node_mod._DEPARTED_KEPT
    for action in actions:
        if type(action) is node_mod.Send:
            assert len(action.frame) <= LIMITS.max_frame_bytes
            wire.decode_frame(action.frame, LIMITS)  # what we send, we can read


def gossip_one(data: bytes) -> None:
    """One input for the ``gossip`` target (raises on a finding)."""
    d = Draws(data)
    node = _gossip_node(max_peers=d.pick((4, 16)))
    now, fresh = 10.0, [0]
    check_node(node, node.start(now, ()))
    for _ in range(d.int(1, 16)):
        if not d.left():
            break
        frame = _frame(d, fresh)
        try:
            decoded = wire.decode_frame(frame, LIMITS)
        except ProtocolError:
            continue  # built inconsistent (a record newer than its entry): refused, as it should be
        check_node(node, node.receive(decoded, now))
        now += d.int(0, 3000) / 1000
        check_node(node, node.tick(now, now))


# --- running ---------------------------------------------------------------------------------


def seed_corpus(target: str, directory: str) -> None:
    """Write the starting inputs of ``target`` into ``directory`` (which exists)."""
    seeds = decoder_seeds() if target == "decoder" else [os.urandom(64) for _ in range(8)]
    for i, seed in enumerate(seeds):
        with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
            f.write(seed)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dir or input file]")
    import atheris

    with atheris.instrument_imports(include=["meshmq"]):
        _instrumented()
    target = argv[1]
    flags = argv[2:]
    if not any(not f.startswith("-") for f in flags):
        corpus = tempfile.mkdtemp(prefix=f"meshmq-fuzz-{target}-")  # kept: what the run learnt, to go on from
        print(f"corpus: {corpus}", file=sys.stderr)
        seed_corpus(target, corpus)
        flags.append(corpus)
    one = decoder_one if target == "decoder" else gossip_one
    atheris.Setup([argv[0], *flags], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
else:
    _instrumented()
