"""How fast is the durable store? Raw LMDB against meshmq's store, in one run.

1. raw LMDB: synced transactions of ``--batch`` put+delete cycles of ``--size``-byte
   values (each message written, then deleted as if acked in a later transaction).
2. meshmq's store (``meshmq._store.Store``), the same work as the outbox will do it:
   each message is its own submitted batch (as a publish is), ``--publishers`` threads
   submit at once and the writer thread folds whatever waits into one transaction
   (group commit); a second pass deletes them by cumulative acks.

Both run with ``fsync`` durability (and ``--durability os`` for the second mode) in a
temporary directory that is removed afterwards. Figures are put+delete cycles per
second; compare them as a ratio measured in one run (the machine is shared).

    python tools/store_bench.py
    python tools/store_bench.py --messages 200000 --publishers 8 --durability os
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshmq._store import Batch, Store, out_key, seal  # noqa: E402


def raw_lmdb(directory: Path, messages: int, batch: int, size: int, sync: bool) -> float:
    import lmdb

    env = lmdb.open(str(directory), map_size=4 << 30, sync=sync, metasync=sync, max_dbs=2)
    db = env.open_db(b"out")
    value = seal({"env": os.urandom(size)})
    start = time.perf_counter()
    for first in range(0, messages, batch):
        keys = [out_key("dest", seq) for seq in range(first, min(first + batch, messages))]
        with env.begin(write=True) as txn:
            for key in keys:
                txn.put(key, value, db=db)
        with env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key, db=db)
    elapsed = time.perf_counter() - start
    env.close()
    return messages / elapsed


def store(directory: Path, messages: int, publishers: int, size: int, durability: str,
          per_submit: int) -> tuple[float, float]:
    """(cycles per second, messages per commit)."""
    st = Store.open(directory, durability=durability, map_size=4 << 30)
    payload = os.urandom(size)
    per = messages // publishers

    def publish(t: int) -> None:
        pending = []
        batch = Batch()
        for i in range(per):
            batch.put_message(f"dest-{t}", i + 1, {"id": i, "env": payload})
            if len(batch.puts) >= per_submit or i == per - 1:
                pending.append(st.submit(batch))
                batch = Batch()
            if len(pending) * per_submit >= 256:  # a publisher waits for its commits, as publish() will
                for f in pending:
                    f.result(60)
                pending.clear()
                ack = Batch()
                ack.drop_upto(f"dest-{t}", i + 1)
                st.submit(ack)
        for f in pending:
            f.result(60)
        ack = Batch()
        ack.drop_upto(f"dest-{t}", per)
        st.commit(ack)

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(publishers)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    commits = st.counters["commits"]
    assert st.load().outbox == {}, "every message was acked"
    st.close()
    return per * publishers / elapsed, per * publishers / max(1, commits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="messages per measurement (default 100000)")
    ap.add_argument("--size", type=int, default=256, help="payload bytes (default 256)")
    ap.add_argument("--batch", type=int, default=100, help="raw LMDB: messages per transaction (default 100)")
    ap.add_argument("--publishers", type=int, default=4, help="store: publishing threads (default 4)")
    ap.add_argument("--per-submit", type=int, default=1,
                    help="store: messages per submitted batch (default 1, as one publish; the agent can "
                         "gather what one loop iteration publishes)")
    ap.add_argument("--durability", choices=["fsync", "os"], default="fsync",
                    help="durability of both measurements (default fsync)")
    args = ap.parse_args()
    if args.messages < 1000 or args.publishers < 1 or args.batch < 1 or args.size < 0 or args.per_submit < 1:
        ap.error("--messages >= 1000, --publishers >= 1, --batch >= 1, --per-submit >= 1, --size >= 0")
    with tempfile.TemporaryDirectory(prefix="meshmq-store-bench-") as tmp:
        raw = raw_lmdb(Path(tmp) / "raw", args.messages, args.batch, args.size, args.durability == "fsync")
        ours, per_commit = store(Path(tmp) / "store", args.messages, args.publishers, args.size, args.durability,
                                 args.per_submit)
    print(f"durability {args.durability}, {args.messages} messages of {args.size} bytes")
    print(f"raw LMDB, {args.batch} put+delete per synced transaction: {raw:>10,.0f} cycles/s")
    print(f"meshmq store, {args.publishers} publishers x {args.per_submit}/submit:  {ours:>10,.0f} cycles/s "
          f"({per_commit:.0f} messages per commit; ratio {ours / raw:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
