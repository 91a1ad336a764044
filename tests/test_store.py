"""The LMDB store: round trips, group commit, locking, integrity checks, full maps, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from meshmq import CorruptStore, StoreError
from meshmq._store import FORMAT, Batch, Store, seal, unseal


def filled(store: Store) -> None:
    batch = Batch()
    for seq in (1, 2, 3):
        batch.put_message("node-b", seq, {"id": f"m{seq}", "env": b"x" * 10})
    batch.put_message("node-c", 1, {"id": "c1", "env": b"y"})
    batch.set_stream("node-b", 7, 4, 0)
    batch.set_inbox("node-z", 3, 41)
    batch.put_dead_letter("dl-1", {"reason": "expired", "attempts": 5})
    store.commit(batch)


@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_what_was_committed_is_there_after_reopening(tmp_path: Path, durability: str) -> None:
    with Store.open(tmp_path, durability=durability) as store:
        filled(store)
    with Store.open(tmp_path, durability=durability) as store:
        got = store.load()
        assert got.outbox == {"node-b": [(1, {"id": "m1", "env": b"x" * 10}), (2, {"id": "m2", "env": b"x" * 10}),
                                         (3, {"id": "m3", "env": b"x" * 10})],
                              "node-c": [(1, {"id": "c1", "env": b"y"})]}
        assert got.streams == {"node-b": (7, 4, 0, "")} and got.inbox == {"node-z": (3, 41)}
        assert got.dead_letters == 1 and store.dead_letter("dl-1") == {"reason": "expired", "attempts": 5}
        assert store.dead_letter("nope") is None
        assert got.meta["format"] == FORMAT


@pytest.mark.parametrize("durability", ["fsync", "memory"])
def test_a_chunk_goes_when_its_last_message_is_acked_and_loses_single_messages_given_up(
        tmp_path: Path, durability: str) -> None:
    with Store.open(tmp_path, durability=durability) as store:
        batch = Batch()
        batch.put_chunk("node-b", 1, [f"m{i}" for i in range(1, 6)])
        batch.put_chunk("node-b", 6, ["m6", "m7"])
        batch.put_chunk("node-c", 1, ["c1"])
        store.commit(batch)
        ack = Batch()
        ack.drop_upto("node-b", 3)  # the first chunk is only partly acked: it stays whole
        ack.drop_message("node-b", 4)  # given up on
        store.commit(ack)
        assert store.load().outbox["node-b"] == [(1, "m1"), (2, "m2"), (3, "m3"), (5, "m5"), (6, "m6"), (7, "m7")]
        ack = Batch()
        ack.drop_upto("node-b", 5)
        ack.drop_message("node-b", 7)
        store.commit(ack)
        assert store.load().outbox == {"node-b": [(6, "m6")], "node-c": [(1, "c1")]}
        ack = Batch()
        ack.drop_message("node-b", 6)  # its last message: the chunk goes
        ack.drop_upto("node-c", 1)
        store.commit(ack)
        assert store.load().outbox == {} and store.count(b"out") == 0


def test_memory_durability_keeps_nothing_on_disk(tmp_path: Path) -> None:
    with Store.open(None, durability="memory") as store:
        filled(store)
        assert store.load().outbox["node-b"][0][0] == 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError, match="durability must be one of"):
        Store.open(tmp_path, durability="eventually")
    with pytest.raises(StoreError, match="needs a directory"):
        Store.open(None, durability="fsync")


@pytest.mark.parametrize("durability", ["fsync", "memory"])
def test_a_cumulative_ack_deletes_only_that_destinations_messages_up_to_it(tmp_path: Path, durability: str) -> None:
    with Store.open(tmp_path, durability=durability) as store:
        filled(store)
        batch = Batch()
        batch.drop_upto("node-b", 2)
        batch.drop_message("node-c", 1)
        store.commit(batch)
        assert store.load().outbox == {"node-b": [(3, {"id": "m3", "env": b"x" * 10})]}
        batch = Batch()
        batch.drop_upto("node-b", 99)
        batch.drop_dead_letter("dl-1")
        store.commit(batch)
        assert store.load().outbox == {} and store.load().dead_letters == 0


def test_concurrent_submissions_share_commits(tmp_path: Path) -> None:
    with Store.open(tmp_path, durability="fsync") as store:
        def publisher(t: int) -> None:
            futures = []
            for i in range(300):
                batch = Batch()
                batch.put_message(f"dest-{t}", i + 1, {"i": i})
                futures.append(store.submit(batch))
            for f in futures:
                f.result(30)

        threads = [threading.Thread(target=publisher, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert store.counters["batches"] == 6 * 300 + 1  # + the format record written at creation
        assert store.counters["commits"] < store.counters["batches"] / 5  # group commit: many per fsync
    with Store.open(tmp_path) as store:
        assert {dest: len(rows) for dest, rows in store.load().outbox.items()} == {f"dest-{t}": 300 for t in range(6)}


def test_two_agents_cannot_share_a_store(tmp_path: Path) -> None:
    with Store.open(tmp_path):
        with pytest.raises(StoreError, match=rf"in use by another agent \(pid {os.getpid()}\)"):
            Store.open(tmp_path)
    Store.open(tmp_path).close()  # released on close


def _damage(tmp_path: Path, db: bytes, key: bytes) -> None:
    import lmdb

    env = lmdb.open(str(tmp_path / "env"), max_dbs=8)
    with env.begin(write=True) as txn:
        handle = env.open_db(db, txn=txn)
        value = bytearray(txn.get(key, db=handle))
        value[-1] ^= 0xFF  # one flipped byte in the body
        txn.put(key, bytes(value), db=handle)
    env.close()


def test_a_damaged_record_is_reported_when_opened_and_can_be_quarantined(tmp_path: Path) -> None:
    from meshmq._store import out_key

    with Store.open(tmp_path) as store:
        filled(store)
    _damage(tmp_path, b"out", out_key("node-b", 2))
    _damage(tmp_path, b"inbox", b"node-z")
    with pytest.raises(CorruptStore) as info:
        Store.open(tmp_path)
    assert info.value.count == 2
    assert sorted(info.value.damaged) == ["inbox:node-z", "out:node-b/2"]
    with Store.open(tmp_path, quarantine=True) as store:
        got = store.load()
        assert [seq for seq, _ in got.outbox["node-b"]] == [1, 3]  # the rest is intact
        assert got.inbox == {} and got.quarantined == 2
        assert store.counters["quarantined"] == 2
    with Store.open(tmp_path) as store:  # clean now; the damaged records stay aside
        assert store.load().quarantined == 2


def test_an_unreadable_store_is_refused_or_moved_aside(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        filled(store)
    data = tmp_path / "env" / "data.mdb"
    data.write_bytes(b"\x00" * 100)  # truncated to garbage
    with pytest.raises(CorruptStore, match="not a readable LMDB store"):
        Store.open(tmp_path)
    with Store.open(tmp_path, quarantine=True) as store:
        assert store.load().outbox == {}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("env.damaged-")]


def test_a_full_store_refuses_the_whole_commit_and_keeps_working(tmp_path: Path) -> None:
    with Store.open(tmp_path, map_size=256 * 1024) as store:
        big = Batch()
        for seq in range(1, 200):
            big.put_message("node-b", seq, {"env": os.urandom(2000)})
        with pytest.raises(StoreError, match="is full"):
            store.commit(big)
        assert store.load().outbox == {}  # all or nothing
        small = Batch()
        small.put_message("node-b", 1, {"env": b"ok"})
        store.commit(small)
        assert store.load().outbox == {"node-b": [(1, {"env": b"ok"})]}
        assert store.counters["commits_failed_full"] == 1


def test_values_carry_a_checksum() -> None:
    value = seal({"a": 1})
    assert unseal(value) == {"a": 1}
    for broken in (value[:-1], value[:3], b"\x00" * 4 + value[4:], value[:4] + b"\x81"):
        with pytest.raises(ValueError):
            unseal(broken)


WRITER = r"""
import sys
from meshmq._store import Batch, Store
store = Store.open(sys.argv[1], durability=sys.argv[2])
seq = 0
while True:
    batch = Batch()
    for _ in range(50):
        seq += 1
        batch.put_message("dest", seq, {"n": seq})
    batch.set_stream("dest", 1, seq + 1, 0)
    store.commit(batch)
    print(seq, flush=True)  # committed: from here on it must survive a kill
"""


@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_every_commit_survives_kill_9(tmp_path: Path, durability: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), durability],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        committed = 0
        for line in proc.stdout:  # bounded: we kill it after 40 commits
            committed = int(line)
            if committed >= 40 * 50:
                break
        os.kill(proc.pid, signal.SIGKILL)  # our own child, in the middle of its next commits
    finally:
        proc.kill()
        proc.wait(timeout=10)
    with Store.open(tmp_path, durability=durability) as store:
        got = store.load()
        seqs = [seq for seq, _ in got.outbox["dest"]]
        assert seqs == list(range(1, len(seqs) + 1))  # no holes, nothing torn
        assert len(seqs) >= committed
        assert got.streams["dest"][1] == len(seqs) + 1  # the stream position matches its messages
