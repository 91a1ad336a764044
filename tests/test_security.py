"""Identity, authority and certificates: what is signed holds, what is forged, expired or of
another authority is refused (and said why), and agents admit only records they can vouch for."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import pytest

import meshmq
from aio import eventually, run
from certs import RawPeer, signed_record
from meshmq._security import (
    Authority, CertificateError, NodeKeys, armor, b64, check_certificate, decode_certificate, load_or_create_key,
    parse_duration, read_key, unarmor, write_key,
)
from meshmq._wire import NodeRecord

NOW = 1_800_000_000.0


def issue(authority: Authority, keys: NodeKeys, **changes: object) -> bytes:
    fields: dict[str, object] = dict(node_key=keys.public, service="orders", mesh="shop", publish=("orders.>",),
                                     subscribe=("payments.*",), tap=False, not_before=NOW - 10, not_after=NOW + 3600)
    fields.update(changes)
    return authority.issue(**fields)  # type: ignore[arg-type]


def test_a_certificate_says_what_its_authority_signed(tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)
    keys = NodeKeys.generate()
    cert = check_certificate(issue(authority, keys), (authority.public,), "shop", NOW)
    assert (cert.node_id, cert.service, cert.publish, cert.subscribe, cert.tap) == (
        keys.node_id, "orders", ("orders.>",), ("payments.*",), False)
    assert decode_certificate(unarmor(armor(issue(authority, keys)))).node_key == keys.public
    assert Authority.from_text(authority.text).public == authority.public


def test_forged_foreign_expired_and_misdirected_certificates_are_refused_saying_why(tmp_path: Path) -> None:
    authority, other = Authority.create(tmp_path, "a"), Authority.create(tmp_path, "b")
    keys = NodeKeys.generate()
    good = issue(authority, keys)
    tampered = good.replace(b"orders.>", b"orders.*")  # same length: only the signature tells
    assert tampered != good
    cases = [
        (tampered, "signature does not match"),
        (issue(other, keys), "does not trust"),
        (issue(authority, keys, mesh="other"), "mesh 'other'"),
        (issue(authority, keys, not_after=NOW - 1), "expired"),
        (issue(authority, keys, not_before=NOW + 60), "not valid yet"),
        (b"\x93garbage", "not a meshmq certificate"),
    ]
    for data, problem in cases:
        with pytest.raises(CertificateError, match=problem):
            check_certificate(data, (authority.public,), "shop", NOW)
    with pytest.raises(CertificateError, match="bad pattern"):
        issue(authority, keys, publish=("orders..x",))
    with pytest.raises(meshmq.UsageError, match="cannot issue"):
        issue(Authority(authority.public), keys)


def test_key_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    keys = NodeKeys.generate()
    path = tmp_path / "node.key"
    write_key(path, "node", keys.signing)
    assert path.stat().st_mode & 0o777 == 0o600
    assert bytes(read_key(path, "node")) == bytes(keys.signing)
    with pytest.raises(meshmq.UsageError, match="never overwritten"):
        write_key(path, "node", NodeKeys.generate().signing)
    with pytest.raises(meshmq.UsageError, match="not a meshmq authority key"):
        read_key(path, "authority")
    path.chmod(0o640)
    with pytest.raises(meshmq.UsageError, match="readable by others"):
        read_key(path, "node")


def test_durations() -> None:
    assert [parse_duration(t) for t in ("30d", "12h", "90m", "45s", "10")] == [2592000, 43200, 5400, 45, 10]
    for bad in ("", "0d", "-1h", "3w", "d"):
        with pytest.raises(meshmq.UsageError):
            parse_duration(bad)


# --- agents --------------------------------------------------------------------------------


def test_an_agent_vouches_only_for_records_signed_by_their_certified_node(mesh: str) -> None:
    async def main() -> None:
        agent = meshmq.AsyncAgent("orders", mesh=mesh, discovery=False, durability="memory")
        await agent.start()
        try:
            peer = NodeKeys.generate()
            authority = Authority.development()  # the one the agent trusts (the test's MESHMQ_HOME)
            cert = authority.issue(node_key=peer.public, service="billing", mesh=mesh, publish=(">",),
                                   subscribe=(">",), tap=False, not_before=time.time() - 5,
                                   not_after=time.time() + 60)
            record = NodeRecord(peer.node_id, "billing", (f"tcp://127.0.0.1:1#{b64(peer.public)}",), (), 0, 1.0,
                                cert=cert)

            def signed(r: NodeRecord, by: NodeKeys = peer) -> NodeRecord:
                return dataclasses.replace(r, sig=by.sign(r.signing_bytes()))

            assert agent._vouch(signed(record)) is None
            assert agent._vouch(record) == "unsigned"
            assert agent._vouch(signed(record, NodeKeys.generate())) == "forged"
            assert agent._vouch(signed(dataclasses.replace(record, service="payments"))) == "mismatch"
            assert agent._vouch(signed(dataclasses.replace(record, node="0123456789abcdef"))) == "mismatch"
            elsewhere = f"tcp://127.0.0.1:1#{b64(NodeKeys.generate().public)}"  # an endpoint naming another key
            assert agent._vouch(signed(dataclasses.replace(record, endpoints=(elsewhere,)))) == "mismatch"
            stranger = Authority(NodeKeys.generate().public, NodeKeys.generate().signing)
            foreign = stranger.issue(node_key=peer.public, service="billing", mesh=mesh, publish=(), subscribe=(),
                                     tap=False, not_before=time.time() - 5, not_after=time.time() + 60)
            assert agent._vouch(signed(dataclasses.replace(record, cert=foreign))) == "untrusted"
        finally:
            await agent.stop()

    run(main())


def test_agents_of_another_authority_are_not_admitted(mesh: str, tmp_path: Path) -> None:
    """Two agents of a mesh authority (configured, with issued certificates) and one of the
    user's development authority: the authority's agents route to each other only."""
    authority = Authority.create(tmp_path)

    def certified(service: str) -> dict[str, object]:
        # The certificate names the node key: made where the agent will find it, beside its store.
        keys = NodeKeys(load_or_create_key(tmp_path / "stores" / service / "0" / "node.key", "node"))
        path = tmp_path / f"{service}.cert"
        path.write_text(armor(authority.issue(node_key=keys.public, service=service, mesh=mesh, publish=(">",),
                                              subscribe=(">",), tap=False, not_before=time.time() - 5,
                                              not_after=time.time() + 600)))
        return dict(authority=authority.text, certificate=path, data_dir=tmp_path / "stores")

    async def main() -> None:
        cfg = {s: certified(s) for s in ("orders", "billing")}
        orders = await meshmq.AsyncAgent("orders", mesh=mesh, discovery=False, **cfg["orders"]).start()
        billing = await meshmq.AsyncAgent("billing", mesh=mesh, discovery=False, seeds=list(orders.endpoints),
                                          **cfg["billing"]).start()
        intruder = await meshmq.AsyncAgent("intruder", mesh=mesh, discovery=False, durability="memory",
                                           seeds=list(orders.endpoints)).start()
        try:
            got: asyncio.Queue[meshmq.Message] = asyncio.Queue()
            billing.subscribe("invoices.*", got.put_nowait)
            intruder.subscribe("invoices.*", lambda m: pytest.fail("the intruder got a message"))
            await orders.wait_for_subscribers("invoices.new", timeout=10)
            await orders.publish("invoices.new", {"n": 1})
            assert (await asyncio.wait_for(got.get(), 10)).data == {"n": 1}
            # The intruder knows orders only as a seed, which has proved nothing: it greets with
            # a card (no record), whose certificate orders refuses.
            await eventually(lambda: orders.stats().get("rejected_card_untrusted", 0) > 0,
                             what="the intruder's card refused")
            assert {p.service for p in orders.peers()} == {"billing"}
            assert {r.service for r in orders.routes("invoices.new")} == {"billing"}
        finally:
            for agent in (intruder, billing, orders):
                await agent.stop()

    run(main(), timeout=60)


def test_a_misconfigured_certificate_stops_the_start_naming_the_problem(mesh: str, tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)
    with pytest.raises(meshmq.ConfigError, match="needs its certificate"):
        meshmq.Agent("orders", mesh=mesh, discovery=False, authority=authority.text).start()
    other = NodeKeys.generate()
    path = tmp_path / "other.cert"
    path.write_text(armor(authority.issue(node_key=other.public, service="orders", mesh=mesh, publish=(),
                                          subscribe=(), tap=False, not_before=time.time() - 5,
                                          not_after=time.time() + 60)))
    with pytest.raises(meshmq.ConfigError, match="is for node"):
        meshmq.Agent("orders", mesh=mesh, discovery=False, authority=authority.text, certificate=path).start()
    with pytest.raises(meshmq.ConfigError, match="cannot read"):
        meshmq.Agent("orders", mesh=mesh, discovery=False, authority=authority.text,
                     certificate=tmp_path / "missing.cert").start()


# --- rights ----------------------------------------------------------------------------------


def test_an_agent_may_publish_and_subscribe_only_what_its_certificate_allows(mesh: str, tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)
    keys = NodeKeys(load_or_create_key(tmp_path / "stores" / "orders" / "0" / "node.key", "node"))
    cert = tmp_path / "orders.cert"
    cert.write_text(armor(authority.issue(node_key=keys.public, service="orders", mesh=mesh, publish=("orders.>",),
                                          subscribe=("payments.*",), tap=False, not_before=time.time() - 5,
                                          not_after=time.time() + 600)))
    with meshmq.Agent("orders", mesh=mesh, discovery=False, authority=authority.text, certificate=cert,
                      data_dir=tmp_path / "stores") as agent:
        agent.subscribe("payments.*")
        agent.subscribe("payments.received")
        with pytest.raises(meshmq.NotPermitted, match="subscribing to 'payments.>'"):
            agent.subscribe("payments.>")
        with pytest.raises(meshmq.NotPermitted, match="inventory"):
            agent.subscribe("inventory.*")
        agent.publish("orders.placed", {"ok": True})
        with pytest.raises(meshmq.NotPermitted, match="publishing on 'payments.received'"):
            agent.publish("payments.received", {})


def test_a_message_from_a_node_not_allowed_to_publish_on_its_topic_is_dropped(mesh: str) -> None:
    from meshmq._message import FORMAT_BYTES
    from meshmq._wire import encode_envelope

    async def main() -> None:
        agent = await meshmq.AsyncAgent("sink", mesh=mesh, discovery=False, durability="memory").start()
        got: list[str] = []
        agent.subscribe(">", lambda m: got.append(m.topic))
        raw = RawPeer(mesh, agent.endpoints[0], "orders", publish=("orders.>",))
        try:
            raw.introduce()

            def env(topic: str) -> bytes:
                return encode_envelope(os.urandom(16), time.time(), topic, None, "orders", raw.node, 1, None,
                                       None, FORMAT_BYTES, b"x")

            raw.send(raw.data(1, 1, [env("payments.received"), env("orders.placed")]))
            await eventually(lambda: got == ["orders.placed"], what="the allowed one delivered")
            assert agent.stats()["rejected_not_permitted"] == 1
        finally:
            raw.close()
            await agent.stop()

    run(main())


def test_a_record_subscribing_beyond_its_certificate_is_refused(mesh: str) -> None:
    from meshmq._wire import Subscription

    async def main() -> None:
        agent = await meshmq.AsyncAgent("orders", mesh=mesh, discovery=False, durability="memory").start()
        try:
            peer = NodeKeys.generate()
            record = signed_record(mesh, "billing", (f"tcp://127.0.0.1:1#{b64(peer.public)}",), keys=peer,
                                   subscribe=("invoices.*",))
            wider = dataclasses.replace(record, subscriptions=(Subscription("invoices.>"),), sig=None)
            assert agent._vouch(dataclasses.replace(wider, sig=peer.sign(wider.signing_bytes()))) == "not_permitted"
            inside = dataclasses.replace(record, subscriptions=(Subscription("invoices.new"),), sig=None)
            assert agent._vouch(dataclasses.replace(inside, sig=peer.sign(inside.signing_bytes()))) is None
        finally:
            await agent.stop()

    run(main())


def test_replayed_and_stale_frames_are_dropped_also_after_the_receiver_restarts(mesh: str) -> None:
    """Replay protection: per (sender, epoch) the receiver keeps how far it got, in its store,
    so a sender's old frames sent again (by it, or replayed from a capture over its own
    connection) hand nothing over twice, across a restart of the receiver too. Frames in
    another node's name do not get that far (per-connection authentication, tested above)."""
    from meshmq._message import FORMAT_BYTES
    from meshmq._wire import encode_envelope

    async def main() -> None:
        got: list[bytes] = []
        sink = await meshmq.AsyncAgent("sink", mesh=mesh, discovery=False, durability="os").start()
        sink.subscribe("jobs.*", lambda m: got.append(m.raw))
        keys = NodeKeys.generate()
        raw = RawPeer(mesh, sink.endpoints[0], "jobs", keys=keys)

        def env(i: int) -> bytes:
            return encode_envelope(os.urandom(16), time.time(), "jobs.x", None, "jobs", raw.node, 1, None, None,
                                   FORMAT_BYTES, str(i).encode())

        frames = [raw.data(7, 1, [env(1), env(2)]), raw.data(7, 3, [env(3)])]
        try:
            raw.introduce()
            for frame in frames:
                raw.send(frame)
            await eventually(lambda: got == [b"1", b"2", b"3"], what="the first delivery")
            await eventually(lambda: sink._inbox.senders[raw.node].stored == 3,  # type: ignore[union-attr]
                             what="the position stored")
            for frame in frames:
                raw.send(frame)  # replayed at once
            await eventually(lambda: sink.stats().get("duplicates", 0) == 3, what="the replay dropped")
        finally:
            raw.close()
            await sink.stop()
        sink = await meshmq.AsyncAgent("sink", mesh=mesh, discovery=False, durability="os").start()
        sink.subscribe("jobs.*", lambda m: got.append(m.raw))
        raw = RawPeer(mesh, sink.endpoints[0], "jobs", keys=keys)  # the same sender, after the restart
        try:
            raw.introduce()
            for frame in frames:
                raw.send(frame)  # replayed after the restart
            raw.send(raw.data(6, 4, [env(99)]))  # an older epoch
            raw.send(raw.data(7, 4, [env(4)]))  # what is new goes through
            await eventually(lambda: got == [b"1", b"2", b"3", b"4"], what="only the new one delivered")
            await eventually(lambda: sink.stats().get("duplicates", 0) == 3
                             and sink.stats().get("stale_epoch_frames", 0) == 1, what="the replay counted")
        finally:
            raw.close()
            await sink.stop()

    run(main(), timeout=60)
