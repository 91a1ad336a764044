"""Identity, the mesh authority and certificates (Ed25519, PyNaCl). No sockets, no clock:
the time is a parameter.

- **Node identity.** Every node has an Ed25519 key pair; its node id is derived from
  the public key (the first 8 bytes of its BLAKE2b hash, in hex), so an id cannot be
  claimed without the key. Its Curve25519 keys (for CurveZMQ and for sealing
  payloads) are derived from the same key pair.
- **Authority.** One Ed25519 key pair per mesh signs certificates and revocations (and,
  later, policies). With no authority configured, a *development
  authority* is created once per user in ``MESHMQ_HOME`` (default ``~/.meshmq``), as
  mkcert's local CA: every agent of that user on this machine issues itself a
  certificate from it and the agents trust each other with no set-up, while agents of
  other users or machines do not. Several hosts need a real authority
  (``meshmq authority init``) whose public key every agent is given.
- **Certificate.** The authority's signature over: serial, mesh, the node's public
  key, service, the topic patterns it may publish and subscribe to, the tap right,
  and the validity window. Decoding checks the signature, the issuer, the window and
  every field's type and size; anything else raises :class:`CertificateError`.
- **Schema document.** The authority's signature over: mesh, a message type and
  schema version, the JSON Schema's text, and when it was signed. Agents keep the newest
  document of each (type, version) (:mod:`meshmq._registry`) and check messages with it.
- **Revocation.** The authority's signature over: mesh, what is revoked (one
  certificate serial, or one node for good), when, and when it may be forgotten
  (the revoked certificate's end of validity, or never). A :class:`RevocationList`
  holds the checked revocations of a mesh, bounded in number, and merges those that
  peers send (a set union: order and repetition do not matter).

Key files hold a key's 32-byte seed in base64 behind a ``kind:`` line, and are
created with mode 0600 (never readable by others).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from ._errors import CertificateError, MeshError, UsageError
from ._errors import NotPermitted
from ._schema import MAX_SCHEMA_BYTES, parse_schema
from ._topics import check_pattern, covers, matches
from ._wire import MAX_REVOCATION_BYTES, MAX_SCHEMA_DOCUMENT_BYTES

CERT_VERSION = 1
REVOCATION_VERSION = 1
MAX_PATTERNS = 256
_KEY_LINE = re.compile(r"^meshmq-(node|authority)-key: ([A-Za-z0-9_-]{43}=?)$")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def node_id_of(public_key: bytes) -> str:
    """The node id belonging to an Ed25519 public key."""
    return hashlib.blake2b(public_key, digest_size=8).hexdigest()


def home() -> Path:
    """Where the user's keys live: ``MESHMQ_HOME``, default ``~/.meshmq``."""
    configured = os.environ.get("MESHMQ_HOME")
    return Path(configured) if configured else Path.home() / ".meshmq"


# --- keys ----------------------------------------------------------------------------------


def write_key(path: Path, kind: str, key: nacl.signing.SigningKey) -> None:
    """Write a key file, mode 0600, never replacing one (raises UsageError if it exists).
    It appears whole or not at all (written aside, then linked into place), so a process
    racing to create the same key reads a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"meshmq-{kind}-key: {b64(bytes(key))}\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(aside, path)
        except FileExistsError:
            raise UsageError(f"{path} exists already; it is never overwritten") from None
    finally:
        os.unlink(aside)


def read_key(path: Path, kind: str) -> nacl.signing.SigningKey:
    """Read a key file written by :func:`write_key`, refusing one that others may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {kind} key {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise UsageError(f"the {kind} key {path} is readable by others (mode {mode & 0o777:o}); "
                         f"run 'chmod 600 {path}'")
    m = _KEY_LINE.match(text)
    if m is None or m.group(1) != kind:
        raise UsageError(f"{path} is not a meshmq {kind} key")
    return nacl.signing.SigningKey(unb64(m.group(2)))


def load_or_create_key(path: Path, kind: str) -> nacl.signing.SigningKey:
    if path.exists():
        return read_key(path, kind)
    key = nacl.signing.SigningKey.generate()
    try:
        write_key(path, kind, key)
    except UsageError:  # created meanwhile by another process: take that one
        return read_key(path, kind)
    return key


KEY_FILE = "node.key"
"""The node key's file, beside the agent's store (``<data_dir>/<service>/<instance>/``)."""


def instance_keys(data_dir: Path, service: str, instance: int = 0) -> NodeKeys:
    """The key of an agent instance, created if it never ran: so that a certificate can be
    issued for it, or its endpoint given as a seed (with its key), before it starts."""
    return NodeKeys(load_or_create_key(data_dir / service / str(instance) / KEY_FILE, "node"))


class NodeKeys:
    """A node's key pair and what derives from it."""

    def __init__(self, signing: nacl.signing.SigningKey) -> None:
        self.signing = signing
        self.public = bytes(signing.verify_key)
        self.node_id = node_id_of(self.public)

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(nacl.signing.SigningKey.generate())

    def sign(self, data: bytes) -> bytes:
        return bytes(self.signing.sign(data).signature)

    def curve_keys(self) -> tuple[bytes, bytes]:
        """(public, secret) Curve25519 keys, Z85-encoded as ZeroMQ wants them."""
        import zmq.utils.z85 as z85

        secret = self.signing.to_curve25519_private_key()
        return z85.encode(bytes(secret.public_key)), z85.encode(bytes(secret))


def curve_public_of(public_key: bytes) -> bytes:
    """The Z85 Curve25519 public key of a node with this Ed25519 public key (to connect to it)."""
    import zmq.utils.z85 as z85

    return z85.encode(bytes(nacl.signing.VerifyKey(public_key).to_curve25519_public_key()))


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError, ValueError):
        return False


# --- the authority ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Authority:
    """An authority's key pair (``key``) or, to verify only, its public key."""

    public: bytes
    key: nacl.signing.SigningKey | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        """The public key as agents are given it (``Config.authority``)."""
        return b64(self.public)

    @classmethod
    def from_text(cls, text: str) -> Authority:
        try:
            public = unb64(text.strip())
        except (ValueError, TypeError):
            public = b""
        if len(public) != 32:
            raise UsageError(f"{text[:60]!r} is not an authority public key (43 base64url characters)")
        return cls(public)

    @classmethod
    def create(cls, directory: Path, name: str = "authority") -> Authority:
        """A new authority: ``<name>.key`` (0600) and ``<name>.pub`` in ``directory``."""
        key = nacl.signing.SigningKey.generate()
        write_key(directory / f"{name}.key", "authority", key)
        authority = cls(bytes(key.verify_key), key)
        (directory / f"{name}.pub").write_text(authority.text + "\n")
        return authority

    @classmethod
    def load(cls, path: Path) -> Authority:
        key = read_key(path, "authority")
        return cls(bytes(key.verify_key), key)

    @classmethod
    def development(cls) -> Authority:
        """This user's development authority, created on first use."""
        path = home() / "dev-authority.key"
        key = load_or_create_key(path, "authority")
        public_path = path.with_suffix(".pub")
        if not public_path.exists():
            aside = public_path.with_name(f".{public_path.name}.{os.getpid()}")
            aside.write_text(b64(bytes(key.verify_key)) + "\n")
            aside.replace(public_path)  # whole, whoever writes it
        return cls(bytes(key.verify_key), key)

    def revoke(self, *, mesh: str, serial: bytes | None = None, node: str | None = None, at: float,
               forget_after: float = 0.0) -> bytes:
        """A signed revocation (its wire bytes) of one certificate (``serial``) or, for good, of
        one node (``node``: its id). ``forget_after``: when peers may forget it (the revoked
        certificate's ``not_after``; 0: never)."""
        if self.key is None:
            raise UsageError("this authority has only its public key: it cannot sign revocations")
        if (serial is None) == (node is None):
            raise UsageError("a revocation names one certificate serial or one node")
        if serial is not None:
            revocation = Revocation(mesh, SERIAL, serial, float(at), float(forget_after), self.public)
        else:
            assert node is not None
            revocation = Revocation(mesh, NODE, node.encode(), float(at), float(forget_after), self.public)
        revocation.check_fields()
        body = revocation.body()
        return msgpack.packb([body, bytes(self.key.sign(body).signature)], use_bin_type=True)

    def sign_policy(self, *, mesh: str, version: int, text: str, at: float) -> bytes:
        """A signed policy document (its wire bytes): the policy file's ``text`` as ``version``
        of this mesh's policy. Agents take the highest version they can verify."""
        if self.key is None:
            raise UsageError("this authority has only its public key: it cannot sign policies")
        if len(text.encode()) > MAX_POLICY_BYTES:
            raise UsageError(f"the policy is {len(text.encode())} bytes; at most {MAX_POLICY_BYTES}")
        body = msgpack.packb([POLICY_DOC, mesh, version, text, float(at), self.public], use_bin_type=True)
        return msgpack.packb([body, bytes(self.key.sign(body).signature)], use_bin_type=True)

    def sign_schema(self, *, mesh: str, type: str, version: int, schema_text: str, at: float) -> bytes:
        """A signed schema document (its wire bytes): ``schema_text`` (JSON) as the schema of
        messages of ``type`` at ``version`` in this mesh. Of several documents for one (type,
        version), agents keep the one signed last (``at``).

        Raises:
            UsageError: a bad type name or version, or no private key.
            SchemaError: the text is not JSON, too long, or not a schema meshmq can check.
        """
        if self.key is None:
            raise UsageError("this authority has only its public key: it cannot sign schemas")
        check_schema_name(type, version)
        parse_schema(schema_text)
        body = msgpack.packb([SCHEMA_DOC, mesh, type, version, schema_text, float(at), self.public],
                             use_bin_type=True)
        blob: bytes = msgpack.packb([body, bytes(self.key.sign(body).signature)], use_bin_type=True)
        if len(blob) > MAX_SCHEMA_DOCUMENT_BYTES:
            raise UsageError(f"the signed schema is {len(blob)} bytes; at most {MAX_SCHEMA_DOCUMENT_BYTES}")
        return blob

    def issue(self, *, node_key: bytes, service: str, mesh: str, publish: tuple[str, ...],
              subscribe: tuple[str, ...], tap: bool, not_before: float, not_after: float,
              serial: bytes | None = None) -> bytes:
        """A signed certificate (its wire bytes)."""
        if self.key is None:
            raise UsageError("this authority has only its public key: it cannot issue certificates")
        cert = Certificate(serial or os.urandom(16), mesh, node_key, service, tuple(publish), tuple(subscribe),
                           tap, float(not_before), float(not_after), self.public)
        cert.check_fields()
        body = cert.body()
        return msgpack.packb([body, bytes(self.key.sign(body).signature)], use_bin_type=True)


POLICY_DOC = "meshmq-policy-v1"
MAX_POLICY_BYTES = 256 * 1024


def check_policy_document(blob: bytes, authorities: tuple[bytes, ...], mesh: str) -> tuple[int, str, float]:
    """(version, text, signed at) of a policy document signed by one of ``authorities`` for
    ``mesh``; :class:`CertificateError` saying why not."""
    try:
        outer = msgpack.unpackb(blob, raw=False, max_bin_len=MAX_POLICY_BYTES + 4096,
                                max_str_len=MAX_POLICY_BYTES + 4096, max_array_len=8, max_map_len=0)
        body, signature = outer
        fields = msgpack.unpackb(body, raw=False, max_str_len=MAX_POLICY_BYTES, max_array_len=8, max_map_len=0)
        kind, doc_mesh, version, text, at, issuer = fields
    except Exception:
        raise CertificateError("not a policy document") from None
    if kind != POLICY_DOC or type(version) is not int or version < 1 or type(text) is not str or type(at) is not float:
        raise CertificateError("not a policy document")
    if doc_mesh != mesh:
        raise CertificateError(f"a policy of mesh {doc_mesh!r}, not {mesh!r}")
    if issuer not in authorities:
        raise CertificateError("signed by an authority this agent does not trust")
    if type(signature) is not bytes or not verify(issuer, body, signature):
        raise CertificateError("its signature does not verify")
    return version, text, at


SCHEMA_DOC = "meshmq-schema-v1"
_TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # as agent.schema() takes them


def check_schema_name(type_: object, version: object) -> None:
    """Raise :class:`UsageError` unless ``type_`` is a message type name (1-63 letters, digits,
    '.', '-', '_') and ``version`` a whole number from 1."""
    if type(type_) is not str or not _TYPE_NAME.match(type_):
        raise UsageError(f"message type {type_!r} must be 1-63 characters: letters, digits, '.', '-', '_'")
    if type(version) is not int or not 1 <= version < 2**31:
        raise UsageError(f"a schema version is a whole number from 1, got {version!r}")


def check_schema_document(blob: bytes, authorities: tuple[bytes, ...],
                          mesh: str) -> tuple[str, int, dict[str, Any], float, bytes]:
    """(type, version, schema, signed at, digest) of a schema document signed by one of
    ``authorities`` for ``mesh``. The digest (16 bytes) names the document's exact bytes.

    Raises:
        CertificateError: not a schema document, of another mesh, of an authority not trusted,
            or its signature does not verify.
        SchemaError: genuine, but what it holds is not a schema meshmq can check.
    """
    if type(blob) is not bytes or len(blob) > MAX_SCHEMA_DOCUMENT_BYTES:
        raise CertificateError(f"not a schema document (bytes, at most {MAX_SCHEMA_DOCUMENT_BYTES})")
    try:
        body, signature = msgpack.unpackb(blob, raw=False, max_bin_len=MAX_SCHEMA_DOCUMENT_BYTES, max_str_len=0,
                                          max_array_len=2, max_map_len=0)
        kind, doc_mesh, type_, version, text, at, issuer = msgpack.unpackb(
            body, raw=False, max_bin_len=64, max_str_len=MAX_SCHEMA_BYTES, max_array_len=7, max_map_len=0)
    except Exception:
        raise CertificateError("not a schema document") from None
    if (kind != SCHEMA_DOC or type(doc_mesh) is not str or type(text) is not str or type(at) is not float
            or not 0.0 <= at < float("inf") or type(issuer) is not bytes or type(signature) is not bytes):
        raise CertificateError("not a schema document")
    try:
        check_schema_name(type_, version)
    except UsageError as exc:
        raise CertificateError(f"not a schema document: {exc}") from None
    if doc_mesh != mesh:
        raise CertificateError(f"a schema of mesh {doc_mesh!r}, not {mesh!r}")
    if issuer not in authorities:
        raise CertificateError("signed by an authority this agent does not trust")
    if not verify(issuer, body, signature):
        raise CertificateError("its signature does not verify")
    schema = parse_schema(text)
    return type_, version, schema, at, hashlib.blake2b(blob, digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class Certificate:
    serial: bytes
    mesh: str
    node_key: bytes
    service: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    tap: bool
    not_before: float
    not_after: float
    issuer: bytes

    @property
    def node_id(self) -> str:
        return node_id_of(self.node_key)

    def body(self) -> bytes:
        return msgpack.packb([CERT_VERSION, self.serial, self.mesh, self.node_key, self.service,
                              list(self.publish), list(self.subscribe), self.tap, self.not_before,
                              self.not_after, self.issuer], use_bin_type=True)

    def check_fields(self) -> None:
        if len(self.serial) != 16 or len(self.node_key) != 32 or len(self.issuer) != 32:
            raise CertificateError("bad key or serial length")
        if not self.service or len(self.service) > 255 or not self.mesh or len(self.mesh) > 63:
            raise CertificateError("bad service or mesh name")
        if len(self.publish) > MAX_PATTERNS or len(self.subscribe) > MAX_PATTERNS:
            raise CertificateError(f"more than {MAX_PATTERNS} patterns")
        for pattern in self.publish + self.subscribe:
            try:
                check_pattern(pattern, 256, 32)
            except MeshError as exc:
                raise CertificateError(f"bad pattern {pattern!r}: {exc}") from None
        if not self.not_before < self.not_after:
            raise CertificateError("the validity window is empty")

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.not_after

    def describe(self) -> dict[str, Any]:
        import datetime

        def iso(t: float) -> str:
            return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")

        return {"serial": self.serial.hex(), "mesh": self.mesh, "service": self.service, "node": self.node_id,
                "node_key": b64(self.node_key), "publish": list(self.publish), "subscribe": list(self.subscribe),
                "tap": self.tap, "not_before": iso(self.not_before), "not_after": iso(self.not_after),
                "issuer": b64(self.issuer)}


def decode_certificate(data: bytes) -> Certificate:
    """Parse a certificate and check its own signature (not yet whom it is from, nor when)."""
    try:
        outer = msgpack.unpackb(data, raw=False, max_bin_len=4096, max_str_len=4096, max_array_len=8)
        body, signature = outer
        fields = msgpack.unpackb(body, raw=False, max_bin_len=64, max_str_len=1024, max_array_len=MAX_PATTERNS)
        version, serial, mesh, node_key, service, publish, subscribe, tap, not_before, not_after, issuer = fields
    except Exception:
        raise CertificateError("not a meshmq certificate") from None
    if version != CERT_VERSION:
        raise CertificateError(f"certificate version {version!r} is not {CERT_VERSION}")
    if not (type(serial) is bytes and type(mesh) is str and type(node_key) is bytes and type(service) is str
            and type(publish) is list and type(subscribe) is list and type(tap) is bool
            and type(not_before) is float and type(not_after) is float and type(issuer) is bytes
            and type(signature) is bytes and all(type(p) is str for p in publish + subscribe)):
        raise CertificateError("a certificate field has the wrong type")
    cert = Certificate(serial, mesh, node_key, service, tuple(publish), tuple(subscribe), tap,
                       not_before, not_after, issuer)
    cert.check_fields()
    if not verify(issuer, body, signature):
        raise CertificateError("the certificate's signature does not match its content")
    return cert


def check_certificate(data: bytes, authorities: tuple[bytes, ...], mesh: str, now: float) -> Certificate:
    """A certificate that a trusted authority issued for this mesh and that is valid now."""
    cert = decode_certificate(data)
    if cert.issuer not in authorities:
        raise CertificateError(f"issued by {b64(cert.issuer)[:12]}…, an authority this node does not trust")
    if cert.mesh != mesh:
        raise CertificateError(f"issued for mesh {cert.mesh!r}, not {mesh!r}")
    if not cert.valid_at(now):
        raise CertificateError("expired" if now > cert.not_after else "not valid yet")
    return cert


# --- revocations ---------------------------------------------------------------------

SERIAL = "serial"
NODE = "node"
_NODE_ID = re.compile(rb"^[0-9a-f]{16}$")


@dataclasses.dataclass(frozen=True)
class Revocation:
    """What the authority revoked: one certificate (``kind`` ``serial``: ``subject`` is its
    serial) or one node for good (``kind`` ``node``: ``subject`` is its node id, ASCII),
    whatever certificates it holds now or later."""

    mesh: str
    kind: str
    subject: bytes
    at: float
    """When it was revoked (seconds since the epoch; for display)."""
    forget_after: float
    """When it may be forgotten: the revoked certificate's ``not_after``, after which the
    certificate is refused anyway (0: never)."""
    issuer: bytes

    @property
    def key(self) -> tuple[str, bytes]:
        return (self.kind, self.subject)

    @property
    def node(self) -> str | None:
        """The revoked node's id (node revocations only)."""
        return self.subject.decode() if self.kind == NODE else None

    def body(self) -> bytes:
        return msgpack.packb([REVOCATION_VERSION, self.mesh, self.kind, self.subject, self.at, self.forget_after,
                              self.issuer], use_bin_type=True)

    def check_fields(self) -> None:
        if not self.mesh or len(self.mesh) > 63 or len(self.issuer) != 32:
            raise CertificateError("bad mesh name or issuer in revocation")
        if self.kind == SERIAL:
            if len(self.subject) != 16:
                raise CertificateError("a revoked serial is 16 bytes (32 hex digits)")
        elif self.kind == NODE:
            if not _NODE_ID.match(self.subject):
                raise CertificateError("a revoked node id is 16 hex digits")
        else:
            raise CertificateError(f"unknown revocation kind {self.kind!r}")
        if not (0 <= self.at < float("inf") and 0 <= self.forget_after < float("inf")):
            raise CertificateError("bad time in revocation")

    def revokes(self, cert: Certificate) -> bool:
        return self.subject == (cert.serial if self.kind == SERIAL else cert.node_id.encode())

    def describe(self) -> dict[str, Any]:
        import datetime

        def iso(t: float) -> str:
            return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")

        return {"mesh": self.mesh, "revokes": self.kind,
                self.kind: self.subject.hex() if self.kind == SERIAL else self.subject.decode(),
                "revoked_at": iso(self.at), "forget_after": iso(self.forget_after) if self.forget_after else "never",
                "issuer": b64(self.issuer)}


def decode_revocation(data: bytes) -> Revocation:
    """Parse a revocation and check its own signature (not yet whom it is from)."""
    if type(data) is not bytes or len(data) > MAX_REVOCATION_BYTES:
        raise CertificateError(f"not a meshmq revocation (more than {MAX_REVOCATION_BYTES} bytes)")
    try:
        body, signature = msgpack.unpackb(data, raw=False, max_bin_len=MAX_REVOCATION_BYTES, max_str_len=64,
                                          max_array_len=2, max_map_len=0)
        version, mesh, kind, subject, at, forget_after, issuer = msgpack.unpackb(
            body, raw=False, max_bin_len=64, max_str_len=64, max_array_len=7, max_map_len=0)
    except Exception:
        raise CertificateError("not a meshmq revocation") from None
    if version != REVOCATION_VERSION:
        raise CertificateError(f"revocation version {version!r} is not {REVOCATION_VERSION}")
    if not (type(mesh) is str and type(kind) is str and type(subject) is bytes and type(at) is float
            and type(forget_after) is float and type(issuer) is bytes and type(signature) is bytes):
        raise CertificateError("a revocation field has the wrong type")
    revocation = Revocation(mesh, kind, subject, at, forget_after, issuer)
    revocation.check_fields()
    if not verify(issuer, body, signature):
        raise CertificateError("the revocation's signature does not match its content")
    return revocation


def check_revocation(data: bytes, authorities: tuple[bytes, ...], mesh: str) -> Revocation:
    """A revocation that a trusted authority signed for this mesh."""
    revocation = decode_revocation(data)
    if revocation.issuer not in authorities:
        raise CertificateError(f"revocation signed by {b64(revocation.issuer)[:12]}…, an authority this node "
                               "does not trust")
    if revocation.mesh != mesh:
        raise CertificateError(f"revocation for mesh {revocation.mesh!r}, not {mesh!r}")
    return revocation


def _entry_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class RevocationList:
    """The checked revocations of one mesh that a node holds: one per subject, at most
    ``limit``. Merging is a set union (the same revocations in any order and any number of
    times give the same list), and ``digest`` (order-free) lets two nodes see cheaply whether
    their lists differ. Pure: the time is a parameter.

    Verdicts of :meth:`add`: ``new`` (cut off what it names), ``replaced`` (a better copy of a
    known subject: one that is kept longer), ``known``, ``stale`` (it may be forgotten already),
    ``full`` (``limit`` reached: refused)."""

    def __init__(self, mesh: str, authorities: tuple[bytes, ...], limit: int) -> None:
        self.mesh = mesh
        self.authorities = authorities
        self.limit = limit
        self.entries: dict[tuple[str, bytes], tuple[Revocation, bytes]] = {}
        self._hash = 0
        self._serials: set[bytes] = set()
        self._nodes: set[str] = set()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def digest(self) -> bytes:
        return self._hash.to_bytes(8, "big")

    def add(self, data: bytes, now: float) -> tuple[str, Revocation]:
        """Take one revocation (raises :class:`CertificateError` if it is not valid here)."""
        revocation = check_revocation(data, self.authorities, self.mesh)
        if 0 < revocation.forget_after < now:
            return "stale", revocation
        known = self.entries.get(revocation.key)
        if known is not None:
            if not _better(revocation, data, *known):
                return "known", revocation
            self._hash ^= _entry_hash(known[1])
            verdict = "replaced"
        elif len(self.entries) >= self.limit:
            return "full", revocation
        else:
            verdict = "new"
        self.entries[revocation.key] = (revocation, data)
        self._hash ^= _entry_hash(data)
        if revocation.kind == SERIAL:
            self._serials.add(revocation.subject)
        else:
            self._nodes.add(revocation.subject.decode())
        return verdict, revocation

    def expire(self, now: float) -> list[Revocation]:
        """Forget revocations whose certificate has expired (refused as expired anyway)."""
        gone = [r for r, _ in self.entries.values() if 0 < r.forget_after < now]
        for revocation in gone:
            _, data = self.entries.pop(revocation.key)
            self._hash ^= _entry_hash(data)
            if revocation.kind == SERIAL:
                self._serials.discard(revocation.subject)
            else:
                self._nodes.discard(revocation.subject.decode())
        return gone

    def revoked(self, cert: Certificate) -> bool:
        return cert.serial in self._serials or cert.node_id in self._nodes

    def node_revoked(self, node: str) -> bool:
        return node in self._nodes

    def blobs(self) -> list[bytes]:
        """Every revocation's bytes, in a stable order."""
        return sorted(data for _, data in self.entries.values())


def _better(new: Revocation, new_data: bytes, old: Revocation, old_data: bytes) -> bool:
    """Of two revocations of one subject, the one every node keeps: kept longest (0 is
    forever), then the smaller bytes, so that all nodes settle on the same copy."""
    def rank(r: Revocation) -> float:
        return float("inf") if r.forget_after == 0 else r.forget_after

    if rank(new) != rank(old):
        return rank(new) > rank(old)
    return new_data < old_data


def parse_authorities(text: str, read: Any = None) -> tuple[bytes, ...]:
    """The public keys of ``Config.authority``: keys (43 base64url characters) and files holding
    keys one per line (``authority.pub``; ``#`` starts a comment), separated by commas.
    ``read(path) -> str`` reads a file (injected: this module does no I/O of its own)."""
    keys: list[bytes] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if _AUTHORITY_KEY.match(item):
            keys.append(Authority.from_text(item).public)
            continue
        if read is None:
            raise UsageError(f"{item[:60]!r} is not an authority public key (43 base64url characters)")
        content = read(item)
        found = [line.split("#", 1)[0].strip() for line in content.splitlines()]
        found = [line for line in found if line]
        if not found:
            raise UsageError(f"{item} holds no authority public key")
        for line in found:
            if not _AUTHORITY_KEY.match(line):
                raise UsageError(f"{item}: {line[:60]!r} is not an authority public key (43 base64url characters)")
            keys.append(Authority.from_text(line).public)
    if not keys:
        raise UsageError("no authority public key given")
    return tuple(dict.fromkeys(keys))


_AUTHORITY_KEY = re.compile(r"^[A-Za-z0-9_-]{43}=?$")

REVOCATION_ARMOR = ("-----BEGIN MESHMQ REVOCATION-----", "-----END MESHMQ REVOCATION-----")


def armor_revocation(data: bytes) -> str:
    text = base64.b64encode(data).decode()
    return "\n".join([REVOCATION_ARMOR[0], *(text[i:i + 64] for i in range(0, len(text), 64)),
                      REVOCATION_ARMOR[1]]) + "\n"


def unarmor_revocations(text: str, limit: int = 1 << 20) -> list[bytes]:
    """Every revocation in a revocation file (blocks as :func:`armor_revocation` writes them,
    one after another), at most ``limit``."""
    out: list[bytes] = []
    block: list[str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line == REVOCATION_ARMOR[0] and block is None:
            block = []
        elif line == REVOCATION_ARMOR[1] and block is not None:
            try:
                out.append(base64.b64decode("".join(block), validate=True))
            except ValueError:
                raise CertificateError(f"the revocation ending on line {number} has damaged base64") from None
            if len(out) > limit:
                raise CertificateError(f"more than {limit} revocations")
            block = None
        elif block is not None and len(block) < 64:
            block.append(line)
        else:
            raise CertificateError(f"line {number} is not part of a revocation (BEGIN/END MESHMQ REVOCATION "
                                   "lines missing or misplaced)")
    if block is not None:
        raise CertificateError("the last revocation has no END line")
    return out


ARMOR = ("-----BEGIN MESHMQ CERTIFICATE-----", "-----END MESHMQ CERTIFICATE-----")


def armor(cert: bytes) -> str:
    text = base64.b64encode(cert).decode()
    return "\n".join([ARMOR[0], *(text[i:i + 64] for i in range(0, len(text), 64)), ARMOR[1]]) + "\n"


def unarmor(text: str) -> bytes:
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != ARMOR[0] or lines[-1] != ARMOR[1]:
        raise CertificateError("not a meshmq certificate file (BEGIN/END MESHMQ CERTIFICATE lines missing)")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except ValueError:
        raise CertificateError("the certificate file's base64 is damaged") from None


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` (or plain seconds) as seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"{text!r} is not a duration like 30d, 12h, 90m or 45s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class Rights:
    """What a certificate allows, with the answers cached (checked on every publish and every
    received message). ``Rights(None)`` allows everything (an agent before its start)."""

    _cache: dict[bytes, Rights] = {}

    def __init__(self, cert: Certificate | None) -> None:
        self.cert = cert
        self._publish = None if cert is None else [tuple(p.split(".")) for p in cert.publish]
        self._subscribe = None if cert is None else [tuple(p.split(".")) for p in cert.subscribe]
        self._topics: dict[str, bool] = {}

    @classmethod
    def of(cls, cert: Certificate) -> Rights:
        rights = cls._cache.get(cert.serial)
        if rights is None or rights.cert != cert:
            if len(cls._cache) >= 4096:
                cls._cache.clear()
            rights = cls._cache[cert.serial] = cls(cert)
        return rights

    def may_publish(self, topic: str) -> bool:
        allowed = self._topics.get(topic)  # the cached answer first: this runs per message
        if allowed is None:
            allowed = self._publish is None or topic.startswith("_reply.")  # replies go only to their requester
            if not allowed:
                allowed = any(matches(p, topic) for p in self._publish)  # type: ignore[union-attr]
            if len(self._topics) >= 4096:
                self._topics.clear()
            self._topics[topic] = allowed
        return allowed

    def may_subscribe(self, tokens: tuple[str, ...]) -> bool:
        return self._subscribe is None or any(covers(p, tokens) for p in self._subscribe)

    def may_subscribe_all(self, subscriptions: Any) -> bool:
        return all(self.may_subscribe(tuple(s.pattern.split("."))) for s in subscriptions)

    def check_subscribe(self, pattern: str, tokens: tuple[str, ...]) -> None:
        if not self.may_subscribe(tokens):
            assert self.cert is not None
            raise NotPermitted(f"this agent's certificate does not allow subscribing to {pattern!r} "
                               f"(it allows: {', '.join(self.cert.subscribe) or 'nothing'})")
