"""Revocation, renewal and several authority keys: a revoked node is cut off by every agent
within two gossip intervals with no restart, and can neither publish nor subscribe; a node
takes a new certificate while running without losing a message; certificates of either of
two authority keys are trusted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import meshmq
from aio import eventually, run, wait_until
from certs import RawPeer
from meshmq._security import (
    Authority, CertificateError, NodeKeys, RevocationList, armor, armor_revocation, check_revocation,
    decode_revocation, load_or_create_key, parse_authorities, unarmor_revocations,
)

NOW = 1_800_000_000.0


# --- the pure parts ------------------------------------------------------------------------


def test_a_revocation_says_what_its_authority_revoked(tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)
    serial = os.urandom(16)
    data = authority.revoke(mesh="shop", serial=serial, at=NOW, forget_after=NOW + 60)
    revocation = check_revocation(data, (authority.public,), "shop")
    assert (revocation.kind, revocation.subject, revocation.at, revocation.forget_after) == (
        "serial", serial, NOW, NOW + 60)
    node = NodeKeys.generate().node_id
    by_node = check_revocation(authority.revoke(mesh="shop", node=node, at=NOW), (authority.public,), "shop")
    assert (by_node.kind, by_node.node, by_node.forget_after) == ("node", node, 0.0)
    assert by_node.describe()["forget_after"] == "never" and by_node.describe()["node"] == node
    assert unarmor_revocations(armor_revocation(data) + "\n" + armor_revocation(data)) == [data, data]


def test_forged_foreign_and_malformed_revocations_are_refused_saying_why(tmp_path: Path) -> None:
    authority, other = Authority.create(tmp_path, "a"), Authority.create(tmp_path, "b")
    serial = os.urandom(16)
    good = authority.revoke(mesh="shop", serial=serial, at=NOW)
    tampered = good.replace(serial, bytes(16))
    cases = [
        (tampered, "signature does not match"),
        (other.revoke(mesh="shop", serial=serial, at=NOW), "does not trust"),
        (authority.revoke(mesh="other", serial=serial, at=NOW), "mesh 'other'"),
        (b"\x92\xc4\x01x", "not a meshmq revocation"),
        (b"x" * 600, "more than 512 bytes"),
        (good[:-5], "not a meshmq revocation"),
    ]
    for data, problem in cases:
        with pytest.raises(CertificateError, match=problem):
            check_revocation(data, (authority.public,), "shop")
    for bad in (dict(serial=b"short"), dict(node="not-a-node-id")):
        with pytest.raises(CertificateError, match="revoked (serial|node id)"):
            authority.revoke(mesh="shop", at=NOW, **bad)  # type: ignore[arg-type]
    with pytest.raises(meshmq.UsageError, match="one certificate serial or one node"):
        authority.revoke(mesh="shop", at=NOW)
    with pytest.raises(meshmq.UsageError, match="cannot sign"):
        Authority(authority.public).revoke(mesh="shop", serial=serial, at=NOW)
    for text, problem in [("garbage\n", "line 1 is not part of a revocation"),
                          ("-----BEGIN MESHMQ REVOCATION-----\nAAAA\n", "no END line"),
                          ("-----BEGIN MESHMQ REVOCATION-----\n!!\n-----END MESHMQ REVOCATION-----\n",
                           "damaged base64")]:
        with pytest.raises(CertificateError, match=problem):
            unarmor_revocations(text)
    with pytest.raises(CertificateError, match="revocation version"):
        import msgpack

        body = msgpack.packb([2, "shop", "serial", serial, NOW, 0.0, authority.public])
        assert authority.key is not None
        decode_revocation(msgpack.packb([body, authority.key.sign(body).signature]))


def test_a_revocation_list_merges_as_a_set_is_bounded_and_forgets_expired_certificates(tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)
    revs = [authority.revoke(mesh="shop", serial=os.urandom(16), at=NOW, forget_after=NOW + 100 * (i + 1))
            for i in range(3)]
    forever = authority.revoke(mesh="shop", node="0123456789abcdef", at=NOW)
    one, two = RevocationList("shop", (authority.public,), 10), RevocationList("shop", (authority.public,), 10)
    assert [one.add(r, NOW)[0] for r in [*revs, forever]] == ["new"] * 4
    assert [two.add(r, NOW)[0] for r in [forever, *reversed(revs), revs[0]]] == ["new"] * 4 + ["known"]
    assert one.digest == two.digest and one.blobs() == two.blobs() and one.digest != bytes(8)
    assert one.node_revoked("0123456789abcdef") and not one.node_revoked("fedcba9876543210")
    # the same serial revoked again for longer: every node keeps the copy kept longest
    serial = check_revocation(revs[0], (authority.public,), "shop").subject
    longer = authority.revoke(mesh="shop", serial=serial, at=NOW + 1, forget_after=NOW + 10_000)
    assert one.add(longer, NOW)[0] == "replaced" and one.add(revs[0], NOW)[0] == "known"
    assert two.add(revs[0], NOW)[0] == "known" and two.add(longer, NOW)[0] == "replaced"
    assert one.digest == two.digest
    assert one.add(authority.revoke(mesh="shop", serial=os.urandom(16), at=NOW, forget_after=NOW - 1), NOW)[0] \
        == "stale"
    gone = one.expire(NOW + 250)  # revs[1] (forget after NOW + 200) goes; revs[2] and the rest stay
    assert [g.forget_after for g in gone] == [NOW + 200] and len(one) == 3
    small = RevocationList("shop", (authority.public,), 2)
    assert [small.add(r, NOW)[0] for r in revs] == ["new", "new", "full"] and len(small) == 2


def test_several_authority_keys_in_one_setting(tmp_path: Path) -> None:
    a, b = Authority.create(tmp_path, "a"), Authority.create(tmp_path, "b")
    files = {str(tmp_path / "b.pub"): (tmp_path / "b.pub").read_text()}
    assert parse_authorities(f"{a.text}, {tmp_path / 'b.pub'}", read=files.__getitem__) == (a.public, b.public)
    assert parse_authorities(f"{a.text},{a.text}") == (a.public,)
    with pytest.raises(meshmq.UsageError, match="is not an authority public key"):
        parse_authorities("nonsense")
    with pytest.raises(meshmq.UsageError, match="holds no authority public key"):
        parse_authorities("empty.pub", read=lambda path: "# nothing\n")


# --- agents ----------------------------------------------------------------------------------


def test_a_revoked_node_is_cut_off_everywhere_within_two_gossip_intervals_and_gets_nothing_in(
        mesh: str) -> None:
    """Three agents on loopback; the authority revokes one (``rogue``) at run time, handing the
    revocation to one agent. Within two gossip intervals both others have dropped it; what it
    publishes afterwards is dropped and counted, a subscription it makes changes no route,
    and it no longer receives; it learns that it is revoked."""
    interval = 1.0

    async def main() -> None:
        cfg = dict(mesh=mesh, durability="memory", gossip_interval=interval)
        names = ("alpha", "beta", "rogue")
        started = [await meshmq.AsyncAgent(n, **cfg).start() for n in names]  # type: ignore[arg-type]
        alpha, beta, rogue = started
        got: dict[str, list[object]] = {n: [] for n in names}
        try:
            for agent in started:
                agent.subscribe("jobs.*", lambda m, n=agent.service: got[n].append(m.data))
            for agent in started:
                await agent.wait_for_subscribers("jobs.x", count=3, timeout=20)
            await rogue.publish("jobs.x", "before")
            await eventually(lambda: all("before" in got[n] for n in names), what="the rogue heard before")

            revocation = Authority.development().revoke(mesh=mesh, node=rogue.node_id, at=time.time())
            t0 = time.monotonic()
            assert alpha.add_revocation(revocation) is True
            assert alpha.add_revocation(revocation) is False  # known: nothing spreads twice
            await eventually(lambda: all(rogue.node_id not in {p.node for p in a.peers()} for a in (alpha, beta)),
                             timeout=2 * interval, what="the rogue dropped by both within two gossip intervals")
            assert time.monotonic() - t0 <= 2 * interval
            for agent in (alpha, beta):
                assert agent.stats()["revocations"] == 1
                assert {r.node for r in agent.routes()} <= {alpha.node_id, beta.node_id}
                departed = {p.node: p.state for p in agent.peers(departed=True)}
                assert departed[rogue.node_id] == "revoked"
            await eventually(lambda: rogue.stats().get("revoked_self", 0) == 1, what="the rogue told it is revoked")

            # Attacks from the revoked node: nothing it sends is acted on.
            routes = {a.service: a.routes() for a in (alpha, beta)}
            received = {a.service: a.stats()["received"] for a in (alpha, beta)}
            dropped = {a.service: a.stats().get("frames_revoked", 0) for a in (alpha, beta)}
            await rogue.publish("jobs.x", "after revocation")
            rogue.subscribe("secrets.*", lambda m: got["rogue"].append(m.data))
            await eventually(lambda: all(a.stats().get("frames_revoked", 0) > dropped[a.service]
                                         for a in (alpha, beta)), what="its frames dropped and counted")
            await alpha.publish("jobs.x", "for the members")
            await alpha.publish("secrets.x", "not for the rogue")
            await eventually(lambda: "for the members" in got["beta"], what="the members still served")
            for agent in (alpha, beta):
                assert "after revocation" not in got[agent.service]
                assert agent.routes() == routes[agent.service]
                assert rogue.node_id not in {p.node for p in agent.peers()}
            assert beta.stats()["received"] == received["beta"] + 1  # "for the members" only
            assert "for the members" not in got["rogue"] and "not for the rogue" not in got["rogue"]
        finally:
            for agent in reversed(started):
                await agent.stop()

    run(main(), timeout=90)


def test_a_record_of_a_revoked_certificate_is_refused_and_counted(mesh: str) -> None:
    """A node revoked by its certificate's serial: its HELLO is refused
    (``rejected_record_revoked``), its data frames are dropped (``frames_revoked``), nothing is
    delivered and it is not routed to."""
    from meshmq._message import FORMAT_BYTES
    from meshmq._wire import encode_envelope

    async def main() -> None:
        agent = await meshmq.AsyncAgent("sink", mesh=mesh, discovery=False, durability="memory").start()
        got: list[bytes] = []
        agent.subscribe(">", lambda m: got.append(m.raw))
        raw = RawPeer(mesh, agent.endpoints[0], "raw")
        try:
            raw.introduce()
            await eventually(lambda: raw.node in {p.node for p in agent.peers()}, what="the raw peer admitted")
            from meshmq._security import decode_certificate

            assert raw.record.cert is not None
            serial = decode_certificate(raw.record.cert).serial
            agent.add_revocation(Authority.development().revoke(mesh=mesh, serial=serial, at=time.time()))
            assert raw.node not in {p.node for p in agent.peers()}
            before = agent.stats()
            raw.introduce(want_reply=True)
            raw.send(raw.data(1, 1, [encode_envelope(os.urandom(16), time.time(), "jobs.x", None, "raw",
                                                     raw.node, 1, None, None, FORMAT_BYTES, b"x")]))
            await eventually(lambda: agent.stats().get("rejected_record_revoked", 0) == 1
                             and agent.stats().get("frames_revoked", 0) == before.get("frames_revoked", 0) + 2,
                             what="the hello and the data frame refused and counted")
            assert got == [] and raw.node not in {p.node for p in agent.peers()}
            assert {r.node for r in agent.routes()} == {agent.node_id}
        finally:
            raw.close()
            await agent.stop()

    run(main())


def test_revocations_survive_a_restart_and_a_revoked_agent_does_not_start(mesh: str) -> None:
    async def main() -> None:
        keeper = await meshmq.AsyncAgent("keeper", mesh=mesh, discovery=False, durability="os").start()
        victim_keys = NodeKeys.generate()
        keeper.add_revocation(Authority.development().revoke(mesh=mesh, node=victim_keys.node_id, at=time.time()))
        await keeper.stop()
        keeper = await meshmq.AsyncAgent("keeper", mesh=mesh, discovery=False, durability="os").start()
        try:
            assert keeper._revocations.node_revoked(victim_keys.node_id)
        finally:
            await keeper.stop()
        # An agent that learns it is revoked refuses to start again.
        data_dir = Path(os.environ["MESHMQ_DATA_DIR"])
        own = NodeKeys(load_or_create_key(data_dir / "keeper" / "0" / "node.key", "node"))
        path = data_dir / "revoked.txt"
        path.write_text(armor_revocation(Authority.development().revoke(mesh=mesh, node=own.node_id,
                                                                        at=time.time())))
        with pytest.raises(meshmq.ConfigError, match="is revoked by the mesh authority"):
            await meshmq.AsyncAgent("keeper", mesh=mesh, discovery=False, durability="os", revocations=path).start()

    run(main())


def _certified(authority: Authority, tmp_path: Path, service: str, mesh: str, name: str | None = None,
               publish: tuple[str, ...] = (">",), subscribe: tuple[str, ...] = (">",), valid: float = 600) -> Path:
    keys = NodeKeys(load_or_create_key(tmp_path / "stores" / service / "0" / "node.key", "node"))
    path = tmp_path / f"{name or service}.cert"
    path.write_text(armor(authority.issue(node_key=keys.public, service=service, mesh=mesh, publish=publish,
                                          subscribe=subscribe, tap=False, not_before=time.time() - 5,
                                          not_after=time.time() + valid)))
    return path


def test_a_node_renews_its_certificate_while_running_and_loses_nothing(mesh: str, tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)

    async def main() -> None:
        cfg = dict(mesh=mesh, discovery=False, authority=authority.text, data_dir=tmp_path / "stores")
        sink_cert = _certified(authority, tmp_path, "sink", mesh)
        sink = await meshmq.AsyncAgent("sink", certificate=sink_cert, **cfg).start()  # type: ignore[arg-type]
        source = await meshmq.AsyncAgent("source", certificate=_certified(authority, tmp_path, "source", mesh),
                                         seeds=list(sink.endpoints), **cfg).start()  # type: ignore[arg-type]
        got: list[int] = []
        try:
            sink.subscribe("jobs.*", lambda m: got.append(m.data))
            await source.wait_for_subscribers("jobs.x", timeout=10)

            def sink_cert_at_source() -> bytes | None:
                peer = source._node.peers.get(sink.node_id)  # type: ignore[union-attr]
                return peer.record.cert if peer is not None else None

            renewed = _certified(authority, tmp_path, "sink", mesh, name="sink-renewed", subscribe=("jobs.*",))
            from_file = _issue_for(authority, sink, mesh)
            for i in range(300):
                await source.publish("jobs.x", i)
                if i == 100:
                    sink.renew_certificate(renewed)  # the API
                if i == 200:  # the file: replaced under the agent
                    sink_cert.write_text(armor(from_file))
            await eventually(lambda: got == list(range(300)), timeout=20, what="every message, in order")
            await eventually(lambda: sink_cert_at_source() == from_file, timeout=10,
                             what="the source holds the sink's certificate from the file")
            assert sink.stats()["certificate_renewals"] == 2
            assert source.stats().get("frames_unauthenticated", 0) == 0
            with pytest.raises(meshmq.NotPermitted, match="jobs"):  # narrower than the subscriptions
                sink.renew_certificate(_certified(authority, tmp_path, "sink", mesh, name="narrow",
                                                  subscribe=("other.*",)))
            with pytest.raises(CertificateError, match="is for node"):
                sink.renew_certificate(_certified(authority, tmp_path, "source", mesh, name="wrong"))
            with pytest.raises(CertificateError, match="for service 'source'"):
                sink.renew_certificate(authority.issue(
                    node_key=sink._keys.public, service="source", mesh=mesh, publish=(), subscribe=(), tap=False,
                    not_before=time.time() - 5, not_after=time.time() + 60))
            with pytest.raises(CertificateError, match="expired"):
                sink.renew_certificate(authority.issue(
                    node_key=sink._keys.public, service="sink", mesh=mesh, publish=(), subscribe=(), tap=False,
                    not_before=time.time() - 50, not_after=time.time() - 5))
            assert sink.stats()["certificate_renewals"] == 2  # nothing refused was taken
        finally:
            await source.stop()
            await sink.stop()

    run(main(), timeout=60)


def _issue_for(authority: Authority, agent: meshmq.AsyncAgent, mesh: str) -> bytes:
    return authority.issue(node_key=agent._keys.public, service=agent.service, mesh=mesh, publish=(">",),
                           subscribe=(">",), tap=False, not_before=time.time() - 5, not_after=time.time() + 900)


def test_certificates_of_a_second_authority_key_are_trusted_after_a_rollover(mesh: str, tmp_path: Path) -> None:
    """Rollover: agents trust the old and the new key (one of them from a file that changes
    while they run); a node certified by the new key is admitted; after the old key is
    removed from the file, a node still certified by it is cut off."""
    old, new = Authority.create(tmp_path, "old"), Authority.create(tmp_path, "new")
    keys_file = tmp_path / "authorities.pub"
    keys_file.write_text(old.text + "\n")

    async def main() -> None:
        base = dict(mesh=mesh, discovery=False, data_dir=tmp_path / "stores")
        first = await meshmq.AsyncAgent("first", authority=str(keys_file),  # type: ignore[arg-type]
                                        certificate=_certified(old, tmp_path, "first", mesh), **base).start()
        second = await meshmq.AsyncAgent("second", authority=f"{old.text},{new.text}",  # type: ignore[arg-type]
                                         certificate=_certified(new, tmp_path, "second", mesh),
                                         seeds=list(first.endpoints), **base).start()
        third = await meshmq.AsyncAgent("third", authority=f"{old.text},{new.text}",  # type: ignore[arg-type]
                                        certificate=_certified(old, tmp_path, "third", mesh),
                                        seeds=list(first.endpoints), **base).start()
        try:
            await eventually(lambda: {p.service for p in first.peers()} == {"third"},
                             what="first admits only the node of the key it trusts")
            # second's card (it greets its seed with one), or its record gossiped by third.
            refused = first.stats()
            assert refused.get("rejected_card_untrusted", 0) + refused.get("rejected_record_untrusted", 0) > 0
            keys_file.write_text(old.text + "\n" + new.text + "\n")  # the new key added, no restart
            await eventually(lambda: {p.service for p in first.peers()} == {"second", "third"}, timeout=15,
                             what="first admits the new key's node")
            await eventually(lambda: {p.service for p in second.peers()} == {"first", "third"}, timeout=15)
            keys_file.write_text(new.text + "\n")  # the old key retired
            await eventually(lambda: {p.service for p in first.peers()} == {"second"}, timeout=15,
                             what="the old key's node cut off")
            assert first.stats()["peers_cut_off_untrusted"] == 1
        finally:
            for agent in (third, second, first):
                await agent.stop()

    run(main(), timeout=60)


def test_the_blocking_agent_takes_revocations_and_certificates(mesh: str) -> None:
    with meshmq.Agent("blocking", mesh=mesh, discovery=False, durability="memory") as agent:
        other = NodeKeys.generate().node_id
        assert agent.add_revocation(armor_revocation(Authority.development().revoke(
            mesh=mesh, node=other, at=time.time()))) is True
        with pytest.raises(CertificateError, match="does not trust"):
            stranger = NodeKeys.generate().signing
            agent.add_revocation(Authority(bytes(stranger.verify_key), stranger).revoke(
                mesh=mesh, node=other, at=time.time()))
        with pytest.raises(CertificateError, match="is for node"):
            agent.renew_certificate(armor(Authority.development().issue(
                node_key=NodeKeys.generate().public, service="blocking", mesh=mesh, publish=(), subscribe=(),
                tap=False, not_before=time.time() - 5, not_after=time.time() + 60)))
        assert agent.stats()["revocations"] == 1 and agent.stats()["revocations_rejected"] == 1
    with pytest.raises(meshmq.AgentClosed):
        agent.add_revocation(b"x")


def test_a_full_revocation_list_refuses_more_with_a_clear_error(mesh: str) -> None:
    async def main() -> None:
        agent = await meshmq.AsyncAgent("small", mesh=mesh, discovery=False, durability="memory",
                                        max_revocations=1).start()
        try:
            dev = Authority.development()
            agent.add_revocation(dev.revoke(mesh=mesh, node=NodeKeys.generate().node_id, at=time.time()))
            with pytest.raises(meshmq.UsageError, match="max_revocations=1"):
                agent.add_revocation(dev.revoke(mesh=mesh, node=NodeKeys.generate().node_id, at=time.time()))
            assert agent.stats()["revocations_refused_full"] == 1
        finally:
            await agent.stop()

    run(main())


def test_a_late_joiner_learns_the_revocations_from_its_peers(mesh: str) -> None:
    async def main() -> None:
        early = await meshmq.AsyncAgent("early", mesh=mesh, discovery=False, durability="memory").start()
        try:
            revoked = NodeKeys.generate().node_id
            early.add_revocation(Authority.development().revoke(mesh=mesh, node=revoked, at=time.time()))
            late = await meshmq.AsyncAgent("late", mesh=mesh, discovery=False, durability="memory",
                                           seeds=list(early.endpoints)).start()
            try:
                await eventually(lambda: late._revocations.node_revoked(revoked), what="the late joiner told")
                assert late._revocations.digest == early._revocations.digest
            finally:
                await late.stop()
        finally:
            await early.stop()

    run(main())



# --- the command line ------------------------------------------------------------------------


def test_meshmq_cert_revoke_cuts_a_running_node_off_with_no_set_up(mesh: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Under the development authority (no configuration): ``meshmq cert revoke NODE`` writes
    the revocation and hands it to the running agents; they drop the node."""
    from meshmq._cli import main

    with meshmq.Agent("witness", mesh=mesh, durability="memory") as witness, \
            meshmq.Agent("victim", mesh=mesh, durability="memory") as victim:
        wait_until(lambda: {p.node for p in witness.peers()} == {victim.node_id}, 20, "the two agents meeting")
        out = tmp_path / "revoked.txt"
        tap = witness.tap(events=["revocation", "revoked"])  # meshmq tap --events control shows them
        code = main(["cert", "revoke", victim.node_id, "--mesh", mesh, "-o", str(out), "--wait", "15"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "taken by all" in err and "development authority" in err
        assert victim.node_id not in {p.node for p in witness.peers()}
        assert witness.stats()["revocations"] == 1
        kinds: dict[str, str | None] = {}
        while len(kinds) < 2:
            event = tap.get(timeout=10)
            assert event is not None, f"control events missing: {kinds}"
            kinds[event.kind] = event.peer
        assert kinds == {"revocation": victim.node_id, "revoked": victim.node_id}
        assert out.read_text().startswith("-----BEGIN MESHMQ REVOCATION-----")
    assert main(["cert", "show", str(out), "--json"]) == 0
    shown = capsys.readouterr().out
    assert f'"node": "{victim.node_id}"' in shown and '"forget_after": "never"' in shown
    # A second one appends; an agent started with the file knows both.
    assert main(["cert", "revoke", "ab" * 16, "--mesh", mesh, "-o", str(out), "--offline"]) == 0
    assert len(unarmor_revocations(out.read_text())) == 2
    with meshmq.Agent("late", mesh=mesh, durability="memory", discovery=False, revocations=out) as late:
        assert late.stats()["revocations"] == 2


@pytest.mark.parametrize(("argv", "expected"), [
    (["cert", "revoke"], "takes what to revoke"),
    (["cert", "revoke", "no-such-file"], "is not a SERIAL"),
    (["cert", "revoke", "ab" * 16, "--authority-key", "/nonexistent/authority.key", "--offline"],
     "cannot read the authority key"),
])
def test_meshmq_cert_revoke_bad_input_exits_2(argv: list[str], expected: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from meshmq._cli import main

    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_meshmq_cert_revoke_with_a_real_authority_revokes_a_certificate_file(
        mesh: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With MESHMQ_AUTHORITY set, the command signs with the authority key and joins the mesh
    with a short-lived certificate it issues itself; revoking by certificate file."""
    from meshmq._cli import main

    authority = Authority.create(tmp_path / "authority")
    monkeypatch.setenv("MESHMQ_AUTHORITY", authority.text)
    base = dict(mesh=mesh, durability="os", data_dir=tmp_path / "stores", authority=authority.text)
    victim_cert = _certified(authority, tmp_path, "victim", mesh)
    with meshmq.Agent("witness", certificate=_certified(authority, tmp_path, "witness", mesh), **base) as witness, \
            meshmq.Agent("victim", certificate=victim_cert, **base) as victim:  # type: ignore[arg-type]
        wait_until(lambda: {p.node for p in witness.peers()} == {victim.node_id}, 20, "the two agents meeting")
        code = main(["cert", "revoke", str(victim_cert), "--mesh", mesh, "--wait", "15",
                     "--authority-key", str(tmp_path / "authority" / "authority.key")])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "-----BEGIN MESHMQ REVOCATION-----" in captured.out
        assert victim.node_id not in {p.node for p in witness.peers()}
        other = Authority.create(tmp_path / "other")
        assert main(["cert", "revoke", "ab" * 16, "--mesh", mesh,
                     "--authority-key", str(tmp_path / "other" / "authority.key")]) == 2
        assert "agents would refuse its revocation" in capsys.readouterr().err
        assert other.public != authority.public
