"""meshmq: a brokerless messaging mesh for Python services.

Every service embeds an agent; agents find each other by mDNS (or static
seeds), learn who subscribes to what, and send messages directly over ZeroMQ.

    import meshmq

    with meshmq.Agent("inventory") as agent:
        @agent.subscribe("orders.placed")
        def reserve(msg: meshmq.Message) -> None:
            print(msg.data)

See README.md and docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import Config
from ._errors import (
    AgentClosed,
    Backpressure,
    CertificateError,
    ConfigError,
    CorruptStore,
    MeshError,
    MeshTimeout,
    NoResponders,
    NotPermitted,
    OutboxFull,
    PayloadError,
    PeerQueueFull,
    ProtocolError,
    RateLimited,
    RemoteError,
    RequestTimeout,
    SchemaError,
    StoreError,
    SubscriptionFull,
    TopicError,
    UsageError,
)
from ._health import Health, HealthCheck
from ._message import Message
from ._tap import TapEvent

if TYPE_CHECKING:
    from ._agent import AsyncAgent, DeadLetter, PeerInfo, RouteEntry, Subscription
    from ._mirror import Tap
    from ._sync import Agent

__version__ = "0.1.0"

# The agents pull in zmq, zeroconf and asyncio; load them on first use so that
# `import meshmq.testing` (and the pure core) stays free of I/O libraries.
_LAZY = {"Agent": "_sync", "AsyncAgent": "_agent", "DeadLetter": "_agent", "PeerInfo": "_agent",
         "RouteEntry": "_agent", "Subscription": "_agent", "Tap": "_mirror"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshmq' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"meshmq.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Agent",
    "AgentClosed",
    "AsyncAgent",
    "Backpressure",
    "CertificateError",
    "Config",
    "ConfigError",
    "CorruptStore",
    "DeadLetter",
    "Health",
    "HealthCheck",
    "MeshError",
    "MeshTimeout",
    "Message",
    "NoResponders",
    "NotPermitted",
    "OutboxFull",
    "PayloadError",
    "PeerInfo",
    "PeerQueueFull",
    "ProtocolError",
    "RateLimited",
    "RemoteError",
    "RequestTimeout",
    "RouteEntry",
    "SchemaError",
    "StoreError",
    "Subscription",
    "SubscriptionFull",
    "Tap",
    "TapEvent",
    "TopicError",
    "UsageError",
    "__version__",
]
