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

from ._agent import AsyncAgent, PeerInfo, Subscription
from ._config import Config
from ._errors import (
    AgentClosed,
    Backpressure,
    ConfigError,
    MeshError,
    MeshTimeout,
    NoResponders,
    OutboxFull,
    PayloadError,
    PeerQueueFull,
    ProtocolError,
    RequestTimeout,
    SchemaError,
    TopicError,
    UsageError,
)
from ._message import Message
from ._sync import Agent

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentClosed",
    "AsyncAgent",
    "Backpressure",
    "Config",
    "ConfigError",
    "MeshError",
    "MeshTimeout",
    "Message",
    "NoResponders",
    "OutboxFull",
    "PayloadError",
    "PeerInfo",
    "PeerQueueFull",
    "ProtocolError",
    "RequestTimeout",
    "SchemaError",
    "Subscription",
    "TopicError",
    "UsageError",
    "__version__",
]
