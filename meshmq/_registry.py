"""The schema registry: the message schemas of the mesh, as documents the authority signed
(:meth:`~meshmq._security.Authority.sign_schema`), spread by gossip. Pure: documents come in
checked (:func:`~meshmq._security.check_schema_document`), nothing here does I/O.

Invariants:

1. One document per (type, version): the greatest by (signed at, digest). Taking a
   document is a maximum per pair, so it is commutative, associative and idempotent:
   nodes that saw the same documents, in any order and any number of times, hold the same
   ones, even when two were pushed for one pair.
2. At most ``limit`` pairs: the smallest ones by (type, version) of every pair seen. A
   document for a pair not held, when ``limit`` are held, displaces the greatest held
   pair if its own is smaller, and is refused (``full``) if not; one for a held pair is
   always weighed. Registries that saw the same documents thus hold the same pairs even
   when more pairs exist than they keep: full registries converge too.
3. :attr:`SchemaRegistry.digest` is order-free and computed from the keys alone
   (:func:`digest_of`), so the digest of what a peer holds follows from the keys it offers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any

import msgpack

from ._wire import SchemaKey

NEW = "new"
"""A pair not held before."""
REPLACED = "replaced"
"""A later document for a held pair."""
KNOWN = "known"
"""The very document held."""
OLDER = "older"
"""An earlier document for a held pair: the held one stays."""
FULL = "full"
"""A pair not held, greater than every pair held, and ``limit`` pairs are held already: refused."""
DISPLACED = "displaced"
"""A pair not held, taken in place of the greatest pair held (``limit`` were held); that
one's document is :attr:`SchemaRegistry.displaced`."""


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaDocument:
    """A checked schema document: what it says and its signed bytes (to pass on)."""

    type: str
    version: int
    schema: dict[str, Any] = dataclasses.field(compare=False, repr=False)
    at: float
    """When the authority signed it (seconds since the epoch, the signer's clock)."""
    digest: bytes
    """16 bytes naming the document's exact bytes."""
    blob: bytes = dataclasses.field(compare=False, repr=False)

    @property
    def pair(self) -> tuple[str, int]:
        return (self.type, self.version)

    @property
    def key(self) -> SchemaKey:
        return (self.type, self.version, self.at, self.digest)


def _rank(at: float, digest: bytes) -> tuple[float, bytes]:
    return (at, digest)


def _key_hash(key: SchemaKey) -> int:
    packed = msgpack.packb(list(key), use_bin_type=True)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "big")


def digest_of(keys: Iterable[SchemaKey]) -> bytes:
    """The digest of a set of documents, from their keys (order-free)."""
    value = 0
    for key in keys:
        value ^= _key_hash(key)
    return value.to_bytes(8, "big")


class SchemaRegistry:
    """The schema documents a node holds, one per (type, version), at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[tuple[str, int], SchemaDocument] = {}
        self._hash = 0
        self.displaced: SchemaDocument | None = None
        """The document the last DISPLACED verdict pushed out."""

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def digest(self) -> bytes:
        return self._hash.to_bytes(8, "big")

    def add(self, document: SchemaDocument) -> str:
        """Weigh one checked document; the verdict says what changed (NEW, REPLACED) or not."""
        held = self.entries.get(document.pair)
        if held is not None:
            new, old = _rank(document.at, document.digest), _rank(held.at, held.digest)
            if new == old:
                return KNOWN
            if new < old:
                return OLDER
            self._hash ^= _key_hash(held.key)
            verdict = REPLACED
        elif len(self.entries) >= self.limit:
            greatest = max(self.entries)
            if document.pair > greatest:
                return FULL
            self.displaced = self.entries.pop(greatest)
            self._hash ^= _key_hash(self.displaced.key)
            verdict = DISPLACED
        else:
            verdict = NEW
        self.entries[document.pair] = document
        self._hash ^= _key_hash(document.key)
        return verdict

    def keys(self) -> list[SchemaKey]:
        """Every held document's key, in a stable order (what an offer carries)."""
        return [self.entries[pair].key for pair in sorted(self.entries)]

    def lacking(self, peer_keys: Iterable[SchemaKey]) -> list[SchemaDocument]:
        """The documents held here that a peer holding ``peer_keys`` lacks: a pair it does not
        hold, or holds in an earlier document."""
        theirs = {(t, v): _rank(at, d) for t, v, at, d in peer_keys}
        out = []
        for pair in sorted(self.entries):
            mine = self.entries[pair]
            rank = theirs.get(pair)
            if rank is None or rank < _rank(mine.at, mine.digest):
                out.append(mine)
        return out

    def wants(self, peer_keys: Iterable[SchemaKey]) -> bool:
        """Whether a peer holding ``peer_keys`` has a document this registry would take."""
        greatest = max(self.entries) if len(self.entries) >= self.limit else None
        for t, v, at, d in peer_keys:
            mine = self.entries.get((t, v))
            if mine is None:
                if greatest is None or (t, v) < greatest:
                    return True
            elif _rank(mine.at, mine.digest) < _rank(at, d):
                return True
        return False

    def schemas(self) -> dict[tuple[str, int], dict[str, Any]]:
        """(type, version) -> schema, a new dict (callers may keep it as a snapshot)."""
        return {pair: doc.schema for pair, doc in self.entries.items()}

    def blobs(self) -> list[bytes]:
        """Every held document's bytes, in a stable order (what the store keeps)."""
        return [self.entries[pair].blob for pair in sorted(self.entries)]
