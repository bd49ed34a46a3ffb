"""The exception tree of ``nicsim.vhost``, in one place.

::

    VhostUserError              base of everything raised by nicsim.vhost; fields request, state, reason
    ├── FrontendProtocolError   (a nicsim.errors.RemoteError) the frontend (QEMU) sent something the
    │                           vhost-user spec does not allow;
    │                           ``fatal`` says whether the byte stream itself is lost (bad header
    │                           version, oversize length) or only this one message was refused
    ├── BackendProtocolError    (a RemoteError) the backend sent a reply the spec does not allow
    │                           (raised by the frontend-side codec, ``nicsim.vhost.frontend_codec``)
    └── LocalProtocolError      (a nicsim.errors.LocalError) our own misuse of the connection API
                                (feeding a closed connection, rejecting an event not from it, ...)

A refused frontend message does not raise out of ``BackendConnection.receive_data``: it becomes a
``ProtocolErrorOccurred`` event carrying the same fields, so the server can log it and carry on.
"""

from __future__ import annotations

from nicsim.errors import LocalError, NicsimError, RemoteError


class VhostUserError(NicsimError):
    """Base class. ``request`` is the request name (``"SET_MEM_TABLE"``, ``"UNKNOWN(99)"``) or None."""

    def __init__(self, reason: str, *, request: str | None = None, state: str | None = None) -> None:
        parts = [p for p in (request, f"in state {state}" if state else None) if p]
        super().__init__(f"{' '.join(parts)}: {reason}" if parts else reason)
        self.request = request
        self.state = state
        self.reason = reason


class FrontendProtocolError(VhostUserError, RemoteError):
    """The frontend broke the protocol. ``fatal``: the stream cannot be parsed any further."""

    def __init__(
        self,
        reason: str,
        *,
        request: str | None = None,
        state: str | None = None,
        fatal: bool = False,
        code: int | None = None,
    ) -> None:
        super().__init__(reason, request=request, state=state)
        self.fatal = fatal
        self.code = code  # the request number, when known


class BackendProtocolError(VhostUserError, RemoteError):
    """The backend sent a reply that does not match the request or the spec."""


class LocalProtocolError(VhostUserError, LocalError):
    """Our own code used the connection object wrongly."""
