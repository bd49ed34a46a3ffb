"""The asyncio shell: endpoints (listen or connect, stale sockets), one session's socket I/O, the
kick/call pumps, guest memory mapping and the inflight fd. It moves bytes and fds in and out of the
I/O-free layers below (``nicsim.vhost``, ``nicsim.virtio``) and does nothing else."""

from nicsim.server.endpoint import Endpoint, Server, SocketPathError
from nicsim.server.session import MAX_FDS, Session
from nicsim.vhost.backend_core import DEFAULT_MAX_QUEUE_SIZE

__all__ = ["DEFAULT_MAX_QUEUE_SIZE", "MAX_FDS", "Endpoint", "Server", "Session", "SocketPathError"]
