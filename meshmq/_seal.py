"""The crypto envelope: what a node signs and encrypts before its messages leave it or
rest on its disk. Pure (PyNaCl only): no sockets, no clock.

**On the wire.** Agents send directly to each other, so the end of a data frame's
journey is its one recipient. Every data frame is *sealed*:

    frame = version, SEALED, nonce (24 bytes),
            crypto_box(msgpack [sender, recipient, epoch, first seq, floor, resent, entries])

``crypto_box`` (X25519 + XSalsa20-Poly1305) runs under the sender's and the
recipient's Curve25519 keys, which derive from their certified Ed25519 identities.
Only those two nodes hold the key it opens with, so the frame is readable by its
recipient alone, and its authenticator proves to the recipient that the sender
sealed it: header, addressing and every message in it, unchanged. This is the
sender authentication of the whole batch (the issue's "signature over header,
recipients and ciphertext") in its fastest form: the shared key is computed once per
peer and cached, and a frame costs one pass over its bytes, where an Ed25519
signature and its check cost ~50 + ~120 µs per frame here (7 µs per message in
32-message batches; measured, see docs/security.md). What it does not give is proof
to a third party (non-repudiation): with one recipient per frame, nobody needs it.

**At rest.** Values of the store's outbox and dead-letter databases are encrypted
with a key derived from the node's identity key (XSalsa20-Poly1305, ``secretbox``) and
signed by the node over the database, the record's key (destination and sequence
numbers) and the ciphertext. The store holds no plaintext message, and a record
moved, swapped or altered on disk fails its check when read.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgpack
import nacl.bindings as sodium
import nacl.exceptions

from ._errors import ProtocolError
from ._security import NodeKeys
from ._wire import NORMAL_LANE, check_lane

SIGNATURE_BYTES = 64
NONCE_BYTES = sodium.crypto_box_NONCEBYTES  # 24
_MAC_BYTES = 16  # Poly1305 tag of crypto_box and crypto_secretbox
_STORE_DOMAIN = b"meshmq stored record v1\x00"


def _digest(*parts: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for part in parts:
        h.update(part)
    return h.digest()


class Signer:
    """A node's Ed25519 signing key in the form libsodium signs with fastest."""

    def __init__(self, keys: NodeKeys) -> None:
        self.public = keys.public
        _, self._secret = sodium.crypto_sign_seed_keypair(bytes(keys.signing))
        self._curve_secret = sodium.crypto_sign_ed25519_sk_to_curve25519(self._secret)

    def sign(self, message: bytes) -> bytes:
        return sodium.crypto_sign(message, self._secret)[:SIGNATURE_BYTES]  # type: ignore[no-any-return]

    def shared_key(self, peer_public: bytes) -> bytes:
        """The ``crypto_box`` key this node shares with the node of Ed25519 key ``peer_public``."""
        try:
            curve = sodium.crypto_sign_ed25519_pk_to_curve25519(peer_public)
            return sodium.crypto_box_beforenm(curve, self._curve_secret)  # type: ignore[no-any-return]
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError) as exc:
            raise ProtocolError(f"not a usable public key: {exc}") from None


def check_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        sodium.crypto_sign_open(signature + message, public)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError, ValueError):
        return False


# --- data frames ----------------------------------------------------------------------------


def seal_fields(head: bytes, shared: bytes, fields: list[Any], packer: msgpack.Packer) -> bytes:
    """A sealed frame (``head``: version and kind bytes) whose body is ``fields``, which
    start with the sender's and the recipient's node ids."""
    nonce = os.urandom(NONCE_BYTES)
    return head + nonce + sodium.crypto_box_afternm(packer.pack(fields), nonce, shared)


def open_fields(frame: bytes, limits: Any, shared: bytes, sender: str, recipient: str, count: int) -> list[Any]:
    """The ``count`` fields of a sealed frame from ``sender`` to ``recipient``;
    :class:`ProtocolError` if it is malformed, :class:`ForgedFrame` if it was not sealed by
    ``sender`` for ``recipient`` (or was altered on the way)."""
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError("frame larger than max_frame_bytes")
    if len(frame) < 2 + NONCE_BYTES + _MAC_BYTES:
        raise ProtocolError("sealed frame too short")
    try:
        body = sodium.crypto_box_open_afternm(frame[2 + NONCE_BYTES:], frame[2:2 + NONCE_BYTES], shared)
    except nacl.exceptions.CryptoError:
        raise ForgedFrame("does not open with the key shared with its sender (forged, altered, or not "
                          "for us)") from None
    try:
        fields = msgpack.unpackb(body, **limits.unpack_options)
    except Exception as exc:  # sealed garbage: the sender is broken, not an attacker
        raise ProtocolError(f"undecodable sealed frame: {type(exc).__name__}") from None
    if type(fields) is not list or len(fields) != count:
        raise ProtocolError(f"sealed frame is not a {count}-field array")
    if fields[0] != sender or fields[1] != recipient:
        raise ForgedFrame(f"frame of {fields[0]!r} for {fields[1]!r} came from {sender} to {recipient}")
    return fields  # type: ignore[no-any-return]


def seal_data(head: bytes, signer: Signer, shared: bytes, sender: str, recipient: str, epoch: int,
              first_seq: int, floor: int, resent: bool, entries: list[Any], packer: msgpack.Packer,
              lane: int = NORMAL_LANE) -> bytes:
    """A sealed data frame (``head`` is the version and kind bytes) carrying ``entries`` of
    the stream of ``lane``."""
    return seal_fields(head, shared, [sender, recipient, epoch, first_seq, floor, resent, entries, lane], packer)


def open_data(frame: bytes, limits: Any, sender: str, shared: bytes,
              recipient: str) -> tuple[int, int, int, list[Any], bool, int]:
    """(epoch, first seq, floor, entries, resent, lane) of a sealed data frame from ``sender``
    to ``recipient``; :class:`ProtocolError` if it is malformed, :class:`ForgedFrame` if it was
    not sealed by ``sender`` for ``recipient`` (or was altered on the way)."""
    _, _, epoch, first_seq, floor, resent, entries, lane = open_fields(frame, limits, shared, sender, recipient, 8)
    if (type(epoch) is not int or type(first_seq) is not int or type(floor) is not int or type(resent) is not bool
            or not 0 < epoch < 2**63 or not 0 < first_seq < 2**63 or not 0 <= floor < 2**63):
        raise ProtocolError("bad sealed data frame header")
    if type(entries) is not list or len(entries) > limits.max_batch_messages:
        raise ProtocolError("bad or oversized batch")
    return epoch, first_seq, floor, entries, resent, check_lane(lane, "sealed data frame")


def open_tap(frame: bytes, limits: Any, sender: str, shared: bytes, recipient: str) -> tuple[int, list[Any]]:
    """(items lost before these, items) of a sealed tap frame (see :mod:`meshmq._tap`)."""
    _, _, lost, items = open_fields(frame, limits, shared, sender, recipient, 4)
    if type(lost) is not int or not 0 <= lost < 2**63 or type(items) is not list:
        raise ProtocolError("bad tap frame")
    return lost, items


class ForgedFrame(ProtocolError):
    """A frame that does not prove its sender (bad signature, wrong addressing, or a
    ciphertext that does not open): dropped and counted apart from merely malformed ones."""


# --- at rest --------------------------------------------------------------------------------


class StoreCipher:
    """Encrypts and signs the store's message records with keys of this node."""

    def __init__(self, keys: NodeKeys) -> None:
        self._signer = Signer(keys)
        self._public = keys.public
        self._key = hashlib.blake2b(b"store", key=bytes(keys.signing), person=b"meshmq-at-rest",
                                    digest_size=sodium.crypto_secretbox_KEYBYTES).digest()

    def seal(self, db: bytes, key: bytes, plain: bytes) -> bytes:
        """``nonce + ciphertext + signature`` of a record ``key`` in database ``db``."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + sodium.crypto_secretbox(plain, nonce, self._key)
        return sealed + self._signer.sign(self._signed(db, key, sealed))

    def open(self, db: bytes, key: bytes, value: bytes) -> bytes:
        """The plaintext of a record sealed by :meth:`seal`; ValueError if it fails its checks."""
        if len(value) < NONCE_BYTES + _MAC_BYTES + SIGNATURE_BYTES:
            raise ValueError("sealed record too short")
        sealed, signature = value[:-SIGNATURE_BYTES], value[-SIGNATURE_BYTES:]
        if not check_signature(self._public, self._signed(db, key, sealed), signature):
            raise ValueError("signature does not verify (altered, moved, or written by another node)")
        try:
            return sodium.crypto_secretbox_open(sealed[NONCE_BYTES:], sealed[:NONCE_BYTES], self._key)  # type: ignore[no-any-return]
        except nacl.exceptions.CryptoError:
            raise ValueError("does not decrypt with this node's key") from None

    @staticmethod
    def _signed(db: bytes, key: bytes, sealed: bytes) -> bytes:
        return _STORE_DOMAIN + _digest(len(db).to_bytes(2, "big"), db, len(key).to_bytes(2, "big"), key, sealed)
