"""The agent's durable state in LMDB: outbox, stream and inbox positions, dead letters.

This is I/O (it owns an LMDB environment and a writer thread); what goes in is
decided by the pure stream core (:mod:`meshmq._stream`) and the agent.

Layout: one LMDB environment in ``<data_dir>/store`` with named databases

- ``meta``:    format version and the node's identity;
- ``out``:     ``dest + first seq + last seq`` → a chunk: the messages for ``dest`` that one
  group commit added (``[first or [seq, ...], [message, ...]]``), kept until ``dest``
  acknowledged the last of them (one record per commit, not per message: a commit of
  300 publishes writes one value and an ack deletes whole chunks);
- ``streams``: ``dest`` → the send stream's (epoch, next seq, acked, destination service);
- ``inbox``:   ``sender`` → the receive stream's (epoch, committed), the dedup record;
- ``peers``:   ``node`` → the routing record of a peer with durable subscriptions, so
  that messages for it wait while it is down, even across our own restart;
- ``dlq``:     dead-letter id → the dead letter;
- ``replay``:  dead-letter id → a request (from ``meshmq dlq replay``) to hand it over again;
- ``quarantine``: records moved aside because they failed their check.

Every value is ``crc32 (4 bytes, big-endian) + msgpack body``; the check runs on
every read and over the whole store when it opens, so a damaged record is reported
(database and key), never skipped. With a ``cipher`` (an agent's store always has
one: :class:`meshmq._seal.StoreCipher`), the bodies of ``out`` and ``dlq`` are
encrypted and signed with the node's keys, so no message rests on disk in plaintext
and a record altered or moved on disk fails its check like a damaged one. A store that is not a readable LMDB environment
at all is reported the same way. With ``quarantine=True`` damaged records are moved
to ``quarantine`` (an unreadable environment is moved aside whole) and the agent
goes on.

Durability (``Config.durability``):

- ``fsync``: every commit is flushed to the disk before it returns (LMDB's
  synchronous mode). Loses nothing committed, even on power loss.
- ``os``: commits are written to the operating system, which flushes them later.
  Survives a crash of the process; a power loss or kernel crash may lose the
  commits of the last seconds (never corrupting the store: LMDB stays consistent).
- ``memory``: nothing is written; everything is lost when the process ends.

Commits are grouped: callers submit batches to a writer thread, which folds all
batches waiting at that moment into one transaction, so concurrent publishers
share an fsync. A transaction that does not fit (the map is full, the disk is
full) is aborted whole and its callers get :class:`StoreError`; nothing is
half-written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fcntl
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import msgpack

from ._errors import CorruptStore, StoreError

FORMAT = 4
DURABILITY = ("fsync", "os", "memory")
_DBS = (b"meta", b"out", b"streams", b"inbox", b"dlq", b"replay", b"peers", b"quarantine")
_SHOWN = 50  # damaged records named in a CorruptStore
_SEALED_DBS = (b"out", b"dlq")  # message records: encrypted and signed when the store has a cipher


class Cipher(Protocol):
    """What the store needs of :class:`meshmq._seal.StoreCipher` (kept apart: no keys here)."""

    def seal(self, db: bytes, key: bytes, plain: bytes) -> bytes: ...

    def open(self, db: bytes, key: bytes, value: bytes) -> bytes: ...


def seal(body: Any) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return zlib.crc32(raw).to_bytes(4, "big") + raw


def unseal(value: bytes) -> Any:
    """The body of a stored value, or ValueError if it fails its check."""
    if len(value) < 5 or zlib.crc32(value[4:]) != int.from_bytes(value[:4], "big"):
        raise ValueError("checksum mismatch")
    return msgpack.unpackb(value[4:], raw=False, strict_map_key=False)


def out_key(dest: str, first: int, last: int | None = None) -> bytes:
    """The key of the chunk of messages ``first..last`` (default: just ``first``) for ``dest``."""
    return dest.encode() + b"\x00" + first.to_bytes(8, "big") + (first if last is None else last).to_bytes(8, "big")


def split_out_key(key: bytes) -> tuple[str, int, int]:
    """(dest, first seq, last seq) of a chunk key."""
    return key[:-17].decode(), int.from_bytes(key[-16:-8], "big"), int.from_bytes(key[-8:], "big")


def chunk_messages(body: Any) -> list[tuple[int, Any]]:
    """(seq, message) pairs of a stored chunk."""
    seqs, messages = body
    if type(seqs) is int:
        return list(enumerate(messages, seqs))
    return list(zip(seqs, messages))


@dataclasses.dataclass
class Batch:
    """Changes committed together, in one transaction (all or nothing)."""

    puts: list[tuple[bytes, bytes, Any]] = dataclasses.field(default_factory=list)
    deletes: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    ranges: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    """(dest, upto): delete ``out`` chunks of dest whose last seq <= upto (a cumulative ack)."""
    drops: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    """(dest, seq): remove one message from the chunk holding it."""

    def put_chunk(self, dest: str, first: int, messages: list[Any]) -> None:
        """Messages numbered ``first, first + 1, ...`` for ``dest``, as one record."""
        self.puts.append((b"out", out_key(dest, first, first + len(messages) - 1), [first, messages]))

    def put_message(self, dest: str, seq: int, record: Any) -> None:
        self.put_chunk(dest, seq, [record])

    def drop_message(self, dest: str, seq: int) -> None:
        """Forget one message (given up on) out of the chunk that holds it."""
        self.drops.append((dest, seq))

    def drop_upto(self, dest: str, upto: int) -> None:
        """A cumulative ack: forget the chunks of ``dest`` whose messages are all at or below
        ``upto`` (a chunk partly above stays whole; its acked messages are skipped when read)."""
        self.ranges.append((dest, upto))

    def set_stream(self, dest: str, epoch: int, next_seq: int, acked: int, service: str = "") -> None:
        self.puts.append((b"streams", dest.encode(), [epoch, next_seq, acked, service]))

    def drop_stream(self, dest: str) -> None:
        """Forget the stream to ``dest`` and every message waiting on it."""
        self.deletes.append((b"streams", dest.encode()))
        self.ranges.append((dest, 2**63 - 1))

    def put_peer(self, node: str, record: Any) -> None:
        self.puts.append((b"peers", node.encode(), record))

    def drop_peer(self, node: str) -> None:
        self.deletes.append((b"peers", node.encode()))

    def set_inbox(self, sender: str, epoch: int, committed: int) -> None:
        self.puts.append((b"inbox", sender.encode(), [epoch, committed]))

    def put_dead_letter(self, dlq_id: str, record: Any) -> None:
        self.puts.append((b"dlq", dlq_id.encode(), record))

    def drop_dead_letter(self, dlq_id: str) -> None:
        self.deletes.append((b"dlq", dlq_id.encode()))
        self.deletes.append((b"replay", dlq_id.encode()))

    def request_replay(self, dlq_id: str) -> None:
        self.puts.append((b"replay", dlq_id.encode(), True))

    def drop_replay(self, dlq_id: str) -> None:
        self.deletes.append((b"replay", dlq_id.encode()))

    def put_meta(self, key: str, value: Any) -> None:
        self.puts.append((b"meta", key.encode(), value))

    def drop_meta(self, key: str) -> None:
        self.deletes.append((b"meta", key.encode()))

    def extend(self, other: Batch) -> None:
        self.puts += other.puts
        self.deletes += other.deletes
        self.ranges += other.ranges
        self.drops += other.drops

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes or self.ranges or self.drops)


@dataclasses.dataclass
class Contents:
    """Everything an agent needs from its store when it starts."""

    meta: dict[str, Any]
    streams: dict[str, tuple[int, int, int, str]]
    """dest → (epoch, next seq, acked, service)"""
    outbox: dict[str, list[tuple[int, Any]]]
    inbox: dict[str, tuple[int, int]]
    peers: dict[str, Any]
    dead_letters: int
    quarantined: int


class Store:
    """An open store. Use :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path | None, env: Any, dbs: dict[bytes, Any], durability: str,
                 lock_fd: int | None, cipher: Cipher | None = None) -> None:
        self.path = path
        self.cipher = cipher
        self.durability = durability
        self._env = env
        self._dbs = dbs
        self._lock_fd = lock_fd
        self._memory: dict[bytes, dict[bytes, bytes]] = {name: {} for name in _DBS} if env is None else {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._queue: queue.SimpleQueue[tuple[Batch, concurrent.futures.Future[None]] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="meshmq-store", daemon=True)
        self._writer.start()
        self._closed = False

    # --- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str | None, *, durability: str = "fsync", map_size: int = 1 << 30,
             quarantine: bool = False, meta: dict[str, Any] | None = None, shared: bool = False,
             cipher_for: Callable[[Path], Cipher] | None = None) -> Store:
        """Open (or create) the store in directory ``path``; ``durability="memory"`` needs none.
        ``meta`` values are written when the store is created (one commit with its format) and
        any missing ones when it is opened. ``shared`` skips the agent's lock: for tools that
        look at (or ask things of) the store of an agent that may be running; LMDB keeps
        their transactions and the agent's apart. ``cipher_for(directory)`` gives the cipher of
        the node whose store it is (once the directory is locked: its key lives there).

        Raises:
            StoreError: another agent uses the directory, or it cannot be created.
            CorruptStore: the integrity check failed (and ``quarantine`` is off).
        """
        if durability not in DURABILITY:
            raise StoreError(f"durability must be one of {', '.join(DURABILITY)}, not {durability!r}")
        if durability == "memory":
            store = cls(None, None, {}, durability, None)
            store._init_meta(meta or {})
            return store
        import lmdb

        directory = Path(path) if path is not None else None
        if directory is None:
            raise StoreError("a durable store needs a directory (Config.data_dir)")
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot create the store directory {directory}: {exc.strerror}") from None
        lock_fd = None if shared else _lock(directory)
        try:
            cipher = cipher_for(directory) if cipher_for is not None else None
            env = _open_env(lmdb, directory, durability, map_size, quarantine)
            try:
                dbs = {name: env.open_db(name) for name in _DBS}
            except BaseException:
                env.close()
                raise
            store = cls(directory, env, dbs, durability, lock_fd, cipher)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        try:
            store._check(quarantine)
            store._init_meta(meta or {})
        except BaseException:
            store.close()
            raise
        return store

    def _init_meta(self, defaults: dict[str, Any]) -> None:
        meta = self._read_db(b"meta")
        if meta.get("format", FORMAT) != FORMAT:
            raise StoreError(f"store {self.path} has format {meta['format']}, this meshmq reads format {FORMAT}")
        batch = Batch()
        for key, value in {"format": FORMAT, **defaults}.items():
            if key not in meta:
                batch.put_meta(key, value)
        if batch:
            self._commit_now([batch])

    def _check(self, quarantine: bool) -> None:
        """Verify every record; report the damaged ones, or move them aside when told to."""
        damaged: list[tuple[bytes, bytes, bytes]] = []
        with self._env.begin() as txn:
            for name in _DBS:
                if name == b"quarantine":
                    continue
                for key, value in txn.cursor(db=self._dbs[name]):
                    try:
                        self._decode(name, bytes(key), bytes(value))
                    except Exception:
                        damaged.append((name, bytes(key), bytes(value)))
        if not damaged:
            return
        names = [f"{n.decode()}:{_show_key(k)}" for n, k, _ in damaged[:_SHOWN]]
        if not quarantine:
            raise CorruptStore(str(self.path), f"{len(damaged)} record(s) fail their checksum or signature", names,
                               len(damaged))
        with self._env.begin(write=True) as txn:
            for name, key, value in damaged:
                txn.put(name + b"\x00" + key, value, db=self._dbs[b"quarantine"])
                txn.delete(key, db=self._dbs[name])
        self.counters["quarantined"] += len(damaged)

    # --- reading ----------------------------------------------------------------------

    def load(self) -> Contents:
        """Everything the agent needs at start (the integrity check already ran)."""
        outbox: dict[str, list[tuple[int, Any]]] = collections.defaultdict(list)
        for key, body in self._items(b"out"):
            dest, _, _ = split_out_key(key)
            outbox[dest] += chunk_messages(body)
        streams = {k.decode(): (*v, "")[:4] for k, v in self._items(b"streams")}
        inbox = {k.decode(): tuple(v) for k, v in self._items(b"inbox")}
        return Contents(
            meta=self._read_db(b"meta"), streams=streams, outbox=dict(outbox), inbox=inbox,  # type: ignore[arg-type]
            peers=self._read_db(b"peers"),
            dead_letters=self.count(b"dlq"), quarantined=self.count(b"quarantine"),
        )

    def dead_letters(self) -> Iterator[tuple[str, Any]]:
        for key, record in self._items(b"dlq"):
            yield key.decode(), record

    def dead_letter(self, dlq_id: str) -> Any | None:
        key = dlq_id.encode()
        if self._env is None:
            value = self._memory[b"dlq"].get(key)
        else:
            with self._env.begin() as txn:
                found = txn.get(key, db=self._dbs[b"dlq"])
                value = bytes(found) if found is not None else None
        if value is None:
            return None
        try:
            return self._decode(b"dlq", key, value)
        except ValueError:
            raise CorruptStore(str(self.path), "a record failed its checksum while being read",
                               [f"dlq:{dlq_id}"]) from None

    def replay_requests(self) -> list[str]:
        return [key.decode() for key, _ in self._items(b"replay")]

    def count(self, name: bytes) -> int:
        if self._env is None:
            return len(self._memory[name])
        with self._env.begin() as txn:
            return int(txn.stat(self._dbs[name])["entries"])

    def _read_db(self, name: bytes) -> dict[str, Any]:
        return {k.decode(): v for k, v in self._items(name)}

    def _items(self, name: bytes) -> Iterator[tuple[bytes, Any]]:
        if self._env is None:
            rows = sorted(self._memory[name].items())
        else:
            with self._env.begin() as txn:
                rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._dbs[name])]
        for key, value in rows:
            try:
                yield key, self._decode(name, key, value)
            except ValueError:
                raise CorruptStore(str(self.path), "a record failed its checksum while being read",
                                   [f"{name.decode()}:{_show_key(key)}"]) from None

    # --- writing ----------------------------------------------------------------------

    def submit(self, batch: Batch) -> concurrent.futures.Future[None]:
        """Queue ``batch`` for the next group commit; the future completes when it is durable
        (per ``durability``), or fails with :class:`StoreError`."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(StoreError("the store is closed"))
            return future
        self._queue.put((batch, future))
        return future

    def commit(self, batch: Batch, timeout: float = 30.0) -> None:
        """Commit ``batch`` and wait for it (from a thread that is not the writer)."""
        self.submit(batch).result(timeout)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while True:  # everything waiting now goes in the same transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                group.append(more)
            try:
                self._commit_now([b for b, _ in group])
            except StoreError as exc:
                for _, future in group:
                    future.set_exception(exc)
            except Exception as exc:  # an LMDB failure we did not foresee: still nobody waits forever
                error = StoreError(f"commit failed: {type(exc).__name__}: {exc}")
                for _, future in group:
                    future.set_exception(error)
            else:
                for _, future in group:
                    future.set_result(None)

    def _commit_now(self, batches: list[Batch]) -> None:
        self.counters["commits"] += 1
        self.counters["batches"] += len(batches)
        if self._env is None:
            for batch in batches:
                self._apply_memory(batch)
            return
        import lmdb

        try:
            with self._env.begin(write=True) as txn:
                for batch in batches:
                    for name, key, body in batch.puts:
                        txn.put(key, self._encode(name, key, body), db=self._dbs[name])
                    for name, key in batch.deletes:
                        txn.delete(key, db=self._dbs[name])
                    for dest, upto in batch.ranges:
                        self._delete_range(txn, dest, upto)
                    for dest, seq in batch.drops:
                        self._drop_one(txn, dest, seq)
        except lmdb.MapFullError:
            self.counters["commits_failed_full"] += 1
            raise StoreError(f"store {self.path} is full (map size {self._env.info()['map_size']} bytes): "
                             "raise Config.max_store_bytes, or let receivers catch up") from None
        except lmdb.DiskError as exc:
            self.counters["commits_failed_disk"] += 1
            raise StoreError(f"store {self.path}: the disk refused the write ({exc}); nothing was committed") from None
        except lmdb.Error as exc:
            self.counters["commits_failed"] += 1
            raise StoreError(f"store {self.path}: commit failed ({exc}); nothing was committed") from None

    def _delete_range(self, txn: Any, dest: str, upto: int) -> None:
        cursor = txn.cursor(db=self._dbs[b"out"])
        prefix = dest.encode() + b"\x00"
        if not cursor.set_range(prefix):
            return
        while True:
            key = cursor.key()
            if not key.startswith(prefix) or len(key) != len(prefix) + 16:
                return
            if int.from_bytes(key[-16:-8], "big") > upto:
                return
            if int.from_bytes(key[-8:], "big") > upto:  # partly acked: stays until its last message is
                if not cursor.next():
                    return
                continue
            if not cursor.delete():  # moves to the next record; False at the end
                return

    def _drop_one(self, txn: Any, dest: str, seq: int) -> None:
        """Remove message ``seq`` from the chunk of ``dest`` that holds it (rewritten, or deleted
        when it was the last one left)."""
        db = self._dbs[b"out"]
        cursor = txn.cursor(db=db)
        prefix = dest.encode() + b"\x00"
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            key = bytes(key)
            if not key.startswith(prefix):
                return
            _, first, last = split_out_key(key)
            if first > seq:
                return
            if last < seq:
                continue
            kept = [(s, m) for s, m in chunk_messages(self._decode(b"out", key, bytes(value))) if s != seq]
            if kept:
                txn.put(key, self._encode(b"out", key, [[s for s, _ in kept], [m for _, m in kept]]), db=db)
            else:
                txn.delete(key, db=db)
            return

    def _apply_memory(self, batch: Batch) -> None:
        for name, key, body in batch.puts:
            self._memory[name][key] = self._encode(name, key, body)
        for name, key in batch.deletes:
            self._memory[name].pop(key, None)
        out = self._memory[b"out"]
        for dest, upto in batch.ranges:
            for key in sorted(out):
                d, _, last = split_out_key(key)
                if d == dest and last <= upto:
                    del out[key]
        for dest, seq in batch.drops:
            for key in sorted(out):
                d, first, last = split_out_key(key)
                if d == dest and first <= seq <= last:
                    kept = [(s, m) for s, m in chunk_messages(self._decode(b"out", key, out[key])) if s != seq]
                    if kept:
                        out[key] = self._encode(b"out", key, [[s for s, _ in kept], [m for _, m in kept]])
                    else:
                        del out[key]

    def _encode(self, name: bytes, key: bytes, body: Any) -> bytes:
        if self.cipher is None or name not in _SEALED_DBS:
            return seal(body)
        sealed = self.cipher.seal(name, key, msgpack.packb(body, use_bin_type=True))
        return zlib.crc32(sealed).to_bytes(4, "big") + sealed

    def _decode(self, name: bytes, key: bytes, value: bytes) -> Any:
        """The body of a stored value, or ValueError if it fails its checksum or signature."""
        if self.cipher is None or name not in _SEALED_DBS:
            return unseal(value)
        if len(value) < 5 or zlib.crc32(value[4:]) != int.from_bytes(value[:4], "big"):
            raise ValueError("checksum mismatch")
        return msgpack.unpackb(self.cipher.open(name, key, value[4:]), raw=False, strict_map_key=False)

    # --- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Finish pending commits, then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout=60)
        if self._env is not None:
            self._env.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreInUse(StoreError):
    """Another running agent holds this store."""


MAX_INSTANCES = 64


def open_instance(root: Path, service: str, *, durability: str, map_size: int, quarantine: bool,
                  meta: dict[str, Any] | None = None,
                  cipher_for: Callable[[Path], Cipher] | None = None) -> tuple[Store, Path]:
    """The store of the first instance of ``service`` under ``root`` that no running agent
    holds: ``root/service/0``, ``root/service/1``, ... (at most :data:`MAX_INSTANCES`)."""
    for n in range(MAX_INSTANCES):
        directory = root / service / str(n)
        try:
            store = Store.open(directory, durability=durability, map_size=map_size, quarantine=quarantine, meta=meta,
                               cipher_for=cipher_for)
            return store, directory
        except StoreInUse:
            continue
    raise StoreError(f"{MAX_INSTANCES} instances of service {service!r} already run with data_dir {root}")


def _lock(directory: Path) -> int:
    """Hold ``directory/lock`` exclusively: two agents must never share one outbox."""
    path = directory / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StoreInUse(f"store {directory} is in use by another agent (pid {holder}); "
                         "give each agent its own data_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _open_env(lmdb: Any, directory: Path, durability: str, map_size: int, quarantine: bool) -> Any:
    sync = durability == "fsync"
    options = dict(map_size=map_size, max_dbs=len(_DBS), subdir=True, sync=sync, metasync=sync,
                   lock=True, readahead=False)
    try:
        return lmdb.open(str(directory / "env"), **options)
    except lmdb.Error as exc:
        if not quarantine:
            raise CorruptStore(str(directory), f"not a readable LMDB store: {exc}") from None
        aside = directory / f"env.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        (directory / "env").rename(aside)
        try:
            return lmdb.open(str(directory / "env"), **options)
        except lmdb.Error as again:
            raise StoreError(f"cannot create a new store in {directory}: {again}") from None


def _show_key(key: bytes) -> str:
    if len(key) > 17 and key[-17] == 0:
        dest, first, last = split_out_key(key)
        return f"{dest}/{first}" if first == last else f"{dest}/{first}-{last}"
    try:
        return key.decode()
    except UnicodeDecodeError:
        return key.hex()
