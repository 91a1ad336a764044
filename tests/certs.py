"""Signed records for tests that speak the wire protocol by hand, certified by the test's
development authority (the one its agents trust: same MESHMQ_HOME)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from meshmq._security import Authority, NodeKeys
from meshmq._wire import NodeRecord


def signed_record(mesh: str, service: str, endpoints: tuple[str, ...], incarnation: int = 1,
                  keys: NodeKeys | None = None, publish: tuple[str, ...] = (">",),
                  subscribe: tuple[str, ...] = (">",)) -> NodeRecord:
    """A record of a new node (its id derived from ``keys``), certified and signed."""
    keys = keys or NodeKeys.generate()
    now = time.time()
    cert = Authority.development().issue(node_key=keys.public, service=service, mesh=mesh, publish=publish,
                                         subscribe=subscribe, tap=False, not_before=now - 60, not_after=now + 3600)
    record = NodeRecord(keys.node_id, service, endpoints, (), incarnation, now, cert=cert)
    return dataclasses.replace(record, sig=keys.sign(record.signing_bytes()))


class RawPeer:
    """A peer driven by hand over the real protocol: its own certified key, a CURVE connection
    to ``endpoint`` (an agent's, with its key), and a PULL socket of its own that the agent
    can answer to. ``introduce()`` sends the HELLO that makes the agent act on its frames."""

    def __init__(self, mesh: str, endpoint: str, service: str = "raw", publish: tuple[str, ...] = (">",),
                 keys: NodeKeys | None = None) -> None:
        import zmq

        from meshmq._security import b64, curve_public_of, unb64
        from meshmq._wire import split_endpoint

        self.mesh = mesh
        self.keys = keys or NodeKeys.generate()
        public, secret = self.keys.curve_keys()
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.CURVE_SERVER, 1)
        self.pull.setsockopt(zmq.CURVE_PUBLICKEY, public)
        self.pull.setsockopt(zmq.CURVE_SECRETKEY, secret)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}#{b64(self.keys.public)}"
        self.record = signed_record(mesh, service, (self.endpoint,), keys=self.keys, publish=publish)
        self.node = self.record.node
        plain, key = split_endpoint(endpoint)
        assert key is not None, "an agent's endpoint carries its key"
        self.agent_key = unb64(key)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.setsockopt(zmq.CURVE_SERVERKEY, curve_public_of(unb64(key)))
        self.push.setsockopt(zmq.CURVE_PUBLICKEY, public)
        self.push.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self.push.connect(plain)

    def introduce(self, record: NodeRecord | None = None, want_reply: bool = False) -> None:
        from meshmq._records import claim
        from meshmq._wire import hello_frame

        self.send(hello_frame(self.mesh, claim(record or self.record), want_reply))

    def data(self, epoch: int, first_seq: int, entries: list[Any], *, floor: int = 0, resent: bool = False,
             sender: str | None = None) -> bytes:
        """A data frame to the agent, sealed as an agent seals it: signed with our key, encrypted
        to the agent's. ``sender`` names another node in it (still signed with our key)."""
        import msgpack

        from meshmq._seal import Signer, seal_data
        from meshmq._security import node_id_of
        from meshmq._wire import PROTOCOL_VERSION, SEALED

        signer = Signer(self.keys)
        return seal_data(bytes((PROTOCOL_VERSION, SEALED)), signer, signer.shared_key(self.agent_key),
                         sender or self.node, node_id_of(self.agent_key), epoch, first_seq, floor, resent, entries,
                         msgpack.Packer(use_bin_type=True))

    def send(self, frame: bytes) -> None:
        self.push.send(frame)

    def close(self) -> None:
        self.push.close()
        self.pull.close(0)
        self.ctx.term()
