"""The vhost-user protocol, I/O-free: codec, transition tables, connections, and the backend core.

This package owns everything about vhost-user that does not touch a socket: the wire format
(``protocol``, ``payloads``), framing with attached fds (``reader``), what is legal when
(``state``), the backend side of a connection (``connection.BackendConnection``: bytes + fds in,
``events`` and replies (``replies``) out, fds handed over explicitly), what the backend asks its
device (``queries.DeviceQueries``), the vhost-user feature bits (``features``), the error tree
(``errors``), the frontend side (``frontend_codec.FrontendConnection``, what QEMU does) for tests and
tools, and the backend core (``backend_core.BackendCore``) that applies events to guest memory and
the device and says, as ``actions``, what only the shell can do (map, pump, close). The asyncio
server (``nicsim.server``) moves bytes and fds between a socket and these objects and does all the I/O.
"""

from nicsim.vhost.connection import BackendConnection, Outgoing, RingStatus
from nicsim.vhost.errors import (
    BackendProtocolError,
    FrontendProtocolError,
    LocalProtocolError,
    VhostUserError,
)
from nicsim.vhost.events import (
    BackendReqFdSet,
    ConfigSet,
    Event,
    FeaturesSet,
    InflightFdSet,
    IotlbMsgReceived,
    LogBaseSet,
    LogFdSet,
    MemoryRegion,
    MemoryRegionAdded,
    MemoryRegionRemoved,
    MemoryTableSet,
    MtuSet,
    OwnerReset,
    OwnerSet,
    ProtocolErrorOccurred,
    ProtocolFeaturesSet,
    RarpRequested,
    StatusSet,
    VringAddrSet,
    VringBaseSet,
    VringCallSet,
    VringEnabled,
    VringEndianSet,
    VringErrSet,
    VringKickSet,
    VringNumSet,
    VringStarted,
    VringStopped,
)
from nicsim.vhost.frontend_codec import FrontendConnection, Reply
from nicsim.vhost.protocol import Request
from nicsim.vhost.queries import DeviceQueries, IdleDevice, InflightBuffer
from nicsim.vhost.state import ConnectionState, RingPhase

__all__ = [
    "BackendConnection",
    "BackendProtocolError",
    "BackendReqFdSet",
    "ConfigSet",
    "ConnectionState",
    "DeviceQueries",
    "Event",
    "FeaturesSet",
    "FrontendConnection",
    "FrontendProtocolError",
    "IdleDevice",
    "InflightBuffer",
    "InflightFdSet",
    "IotlbMsgReceived",
    "LocalProtocolError",
    "LogBaseSet",
    "LogFdSet",
    "MemoryRegion",
    "MemoryRegionAdded",
    "MemoryRegionRemoved",
    "MemoryTableSet",
    "MtuSet",
    "Outgoing",
    "OwnerReset",
    "OwnerSet",
    "ProtocolErrorOccurred",
    "ProtocolFeaturesSet",
    "RarpRequested",
    "Reply",
    "Request",
    "RingPhase",
    "RingStatus",
    "StatusSet",
    "VhostUserError",
    "VringAddrSet",
    "VringBaseSet",
    "VringCallSet",
    "VringEnabled",
    "VringEndianSet",
    "VringErrSet",
    "VringKickSet",
    "VringNumSet",
    "VringStarted",
    "VringStopped",
]
