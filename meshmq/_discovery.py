"""mDNS discovery: announce this node and report peers of the same mesh. A thin shell.

python-zeroconf registers ``_meshmq._tcp.local.`` with TXT properties (mesh,
node id, service, endpoints, the protocol versions it speaks) and browses for the
same type. A node that announces only other protocol versions is reported as such
and never greeted: it could not understand us. What it finds is a
*hint* handed to the core (``Node.discovered``), which says hello over ZeroMQ;
identity and subscriptions come from the peer itself, never from mDNS.

Instance names embed the node's random id, so registration skips conflict
probing (which takes over a second) and announces at once; browsing starts at
the same time, and a new node greets the peers it finds over ZeroMQ, so it is
reachable within a fraction of a second.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ._log import QuietLogger
from ._wire import PROTOCOL_VERSION, speaks

SERVICE_TYPE = "_meshmq._tcp.local."
log = logging.getLogger("meshmq.discovery")
quiet = QuietLogger(log)

Hint = Callable[[str | None, tuple[str, ...], str | None], None]
OtherVersionHint = Callable[[str | None, str, tuple[str, ...]], None]
"""(node id, the protocol versions it announces, its endpoints)"""


class Discovery:
    """Announces one node and reports the others it browses (on the agent's loop)."""

    def __init__(self, *, mesh: str, node: str, service: str, endpoints: tuple[str, ...],
                 interfaces: list[str], on_hint: Hint, on_other_version: OtherVersionHint | None = None) -> None:
        self.mesh = mesh
        self.node = node
        self.service = service
        self.endpoints = endpoints
        self.interfaces = interfaces
        self.on_hint = on_hint
        self.on_other_version = on_other_version
        self.azc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.info: AsyncServiceInfo | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Instance names are at most 63 bytes: a readable prefix and the node id keep them unique.
        self.name = f"{service[:40]}-{node}.{SERVICE_TYPE}"

    async def async_start(self) -> None:
        v6 = any(":" in ip for ip in self.interfaces)
        v4 = any(":" not in ip for ip in self.interfaces)
        version = IPVersion.All if v4 and v6 else (IPVersion.V6Only if v6 else IPVersion.V4Only)
        self.azc = AsyncZeroconf(interfaces=self.interfaces, ip_version=version)
        self.browser = AsyncServiceBrowser(self.azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        addresses = [socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip) for ip in self.interfaces]
        plain = [ep.partition("#")[0] for ep in self.endpoints]
        key = self.endpoints[0].partition("#")[2]
        port = int(plain[0].rsplit(":", 1)[1])
        # The node's key goes once (a TXT string holds at most 255 bytes), not with every endpoint.
        self.info = AsyncServiceInfo(
            SERVICE_TYPE, self.name, addresses=addresses, port=port,
            properties={"mesh": self.mesh, "node": self.node, "service": self.service,
                        "ep": ",".join(plain), "key": key, "v": "2", "proto": str(PROTOCOL_VERSION)},
        )
        self._spawn(self._register())

    async def _register(self) -> None:
        assert self.azc is not None and self.info is not None
        try:
            # The instance name holds our random 64-bit node id, so it is unique by construction:
            # skip the >1 s of conflict probing and announce at once.
            await (await self.azc.async_register_service(self.info, cooperating_responders=True))
        except Exception as exc:  # discovery is best effort: seeds and hellos still work
            quiet.warning("register", "mDNS registration failed: %s", exc)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == self.name or state_change is ServiceStateChange.Removed:
            # Departures are learned from BYE frames and probes, which mDNS cannot forge.
            return
        self._spawn(self._resolve(zeroconf, service_type, name))

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not info.load_from_cache(zeroconf):
            if not await info.async_request(zeroconf, 1500):
                return
        props = info.decoded_properties
        mesh = props.get("mesh")
        if mesh != self.mesh:
            return
        key = props.get("key") or ""
        endpoints = tuple(f"{ep}#{key}" if key else ep for ep in (props.get("ep") or "").split(",") if ep)
        if not endpoints:
            return
        proto = props.get("proto")
        if speaks(proto) is False:
            if self.on_other_version is not None:
                self.on_other_version(props.get("node"), proto or "", endpoints)
            return
        self.on_hint(props.get("node"), endpoints, mesh)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def async_close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.azc is not None:
            try:
                if self.browser is not None:
                    await self.browser.async_cancel()
                await self.azc.async_close()  # unregisters (sends goodbye) and closes sockets
            except Exception as exc:
                log.debug("mDNS close: %s", exc)
            self.azc = None
