"""An agent's identity is the Ed25519 key beside its store: kept across restarts, one per
running instance, its node id derived from the key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import meshmq
from meshmq._store import Store
from tests.aio import run


def test_an_agent_keeps_its_identity_across_restarts(mesh: str, data_dir: Path) -> None:
    with meshmq.Agent("orders", mesh=mesh, discovery=False) as first:
        node, where = first.node_id, first._agent.store_dir
    assert where == data_dir / "orders" / "0"
    with meshmq.Agent("orders", mesh=mesh, discovery=False) as again:
        assert again.node_id == node and again._agent.store_dir == where


def test_instances_of_one_service_running_at_once_get_their_own_store(mesh: str, data_dir: Path) -> None:
    with meshmq.Agent("worker", mesh=mesh, discovery=False) as one, \
            meshmq.Agent("worker", mesh=mesh, discovery=False) as two:
        assert one.node_id != two.node_id
        assert {one._agent.store_dir, two._agent.store_dir} == {data_dir / "worker" / "0", data_dir / "worker" / "1"}


def test_memory_durability_keeps_no_store_and_no_identity(mesh: str, data_dir: Path) -> None:
    with meshmq.Agent("scratch", mesh=mesh, discovery=False, durability="memory") as one:
        first = one.node_id
        assert one._agent.store_dir is None
    with meshmq.Agent("scratch", mesh=mesh, discovery=False, durability="memory") as two:
        assert two.node_id != first
    assert not (data_dir / "scratch").exists()


def test_a_damaged_store_stops_the_start_unless_quarantined(mesh: str, data_dir: Path) -> None:
    import lmdb

    with meshmq.Agent("billing", mesh=mesh, discovery=False) as agent:
        node = agent.node_id
    env = lmdb.open(str(data_dir / "billing" / "0" / "env"), max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"node", b"\x00\x00\x00\x00garbage", db=meta)
    env.close()
    with pytest.raises(meshmq.CorruptStore) as info:
        meshmq.Agent("billing", mesh=mesh, discovery=False).start()
    assert info.value.damaged == ["meta:node"]
    with meshmq.Agent("billing", mesh=mesh, discovery=False, quarantine_store=True) as agent:
        assert agent.node_id == node  # the identity is the key; the damaged record was set aside and written again
    with Store.open(data_dir / "billing" / "0") as store:
        assert store.load().quarantined == 1


def test_the_node_id_is_derived_from_a_key_only_its_owner_can_read(mesh: str, data_dir: Path) -> None:
    from meshmq._security import node_id_of, read_key

    with meshmq.Agent("keys", mesh=mesh, discovery=False) as agent:
        node = agent.node_id
    key_file = data_dir / "keys" / "0" / "node.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert node_id_of(bytes(read_key(key_file, "node").verify_key)) == node
    key_file.chmod(0o644)
    with pytest.raises(meshmq.UsageError, match="readable by others"):
        meshmq.Agent("keys", mesh=mesh, discovery=False).start()
    key_file.unlink()  # a store whose key is gone (or swapped) is refused, not silently re-keyed
    with pytest.raises(meshmq.StoreError, match="belongs to node"):
        meshmq.Agent("keys", mesh=mesh, discovery=False).start()


def test_a_peer_that_restarts_with_its_identity_is_reached_at_its_new_endpoint(mesh: str) -> None:
    async def main() -> None:
        fast = dict(mesh=mesh, discovery=False, probe_interval=0.1, probe_timeout=0.05)
        async with meshmq.AsyncAgent("pub", **fast) as pub:
            sub = await meshmq.AsyncAgent("sub", seeds=[pub.endpoints[0]], **fast).start()
            got: asyncio.Queue[meshmq.Message] = asyncio.Queue()
            sub.subscribe("jobs.*", got.put_nowait)
            await pub.wait_for_subscribers("jobs.x", timeout=10)
            node, old_endpoint = sub.node_id, sub.endpoints[0]
            sub._transport.async_close(0)  # a crash: no goodbye  # type: ignore[union-attr]
            sub._state = "stopped"
            sub._close_store()
            again = await meshmq.AsyncAgent("sub", seeds=[pub.endpoints[0]], **fast).start()
            try:
                assert again.node_id == node and again.endpoints[0] != old_endpoint
                again.subscribe("jobs.*", got.put_nowait)
                for _ in range(100):
                    peers = {p.node: p for p in pub.peers()}
                    if node in peers and peers[node].endpoint == again.endpoints[0] and pub._receivers("jobs.x"):
                        break
                    await pub._routes_changed(0.1)
                await pub.publish("jobs.x", "after the restart")
                msg = await asyncio.wait_for(got.get(), 10)
                assert msg.data == "after the restart"
            finally:
                await again.stop()

    run(main())
