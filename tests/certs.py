"""Signed records for tests that speak the wire protocol by hand, certified by the test's
development authority (the one its agents trust: same MESHMQ_HOME)."""

from __future__ import annotations

import dataclasses
import time

from meshmq._security import Authority, NodeKeys
from meshmq._wire import NodeRecord


def signed_record(mesh: str, service: str, endpoints: tuple[str, ...], incarnation: int = 1,
                  keys: NodeKeys | None = None) -> NodeRecord:
    """A record of a new node (its id derived from ``keys``), certified and signed."""
    keys = keys or NodeKeys.generate()
    now = time.time()
    cert = Authority.development().issue(node_key=keys.public, service=service, mesh=mesh, publish=(">",),
                                         subscribe=(">",), tap=False, not_before=now - 60, not_after=now + 3600)
    record = NodeRecord(keys.node_id, service, endpoints, (), incarnation, now, cert=cert)
    return dataclasses.replace(record, sig=keys.sign(record.signing_bytes()))
