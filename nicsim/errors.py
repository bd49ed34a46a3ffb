"""The exception tree of ``nicsim``, in one place: catch ``NicsimError`` for everything nicsim raises on
purpose, or one of its two branches to tell whose fault it was.

::

    NicsimError
    ├── RemoteError                the other side broke the rules: the frontend (QEMU) or the guest
    │   ├── FrontendProtocolError  a vhost-user message the spec does not allow    (nicsim.vhost.errors)
    │   ├── BackendProtocolError   a reply the spec does not allow (frontend side)  (nicsim.vhost.errors)
    │   ├── MemoryMapError         guest memory that cannot be mapped or shared     (nicsim.server.guestmem)
    │   ├── InflightError          an inflight-buffer request that cannot be met    (nicsim.vhost.actions)
    │   ├── FrameError             a frame that does not parse (also a ValueError)  (nicsim.ports.frames)
    │   └── FrontendError          the backend that nicsim.frontend drives refused  (nicsim.frontend)
    │       └── CompletionTimeout  a wait_used that gave up (also a TimeoutError)   (nicsim.frontend)
    └── LocalError                 this side is at fault: an API used wrongly, or a request that cannot
        │                          be carried out here (options, privileges, programs, files)
        ├── LocalProtocolError     the connection API used wrongly                  (nicsim.vhost.errors)
        ├── DeviceStateError       a device call in the wrong state                 (nicsim.virtio.device)
        ├── SocketPathError        a socket path in use (also a FileExistsError)    (nicsim.server.endpoint)
        ├── TapError               a TAP that cannot be opened (also an OSError)    (nicsim.ports.tap)
        ├── VxlanError             a tunnel socket that cannot be bound (OSError)   (nicsim.ports.vxlan)
        ├── CaptureError           a capture file that cannot be written (OSError)  (nicsim.ports.capture)
        ├── BenchError             a benchmark run that cannot go on                (nicsim.bench.backend)
        └── ServerError            a test's `nicsim serve` child that did not come up (nicsim.testing.server)

The guest's own mistakes inside rings (a bad descriptor chain, an address outside its memory) are
``rings.errors.GuestError``: ``rings`` is a package of its own, with its own root, and a bad chain is
marked and returned, not raised. Exceptions carry structured fields (request, queue, path, ...) beside
the message; nothing is re-wrapped, and cancellation is never caught.
"""

from __future__ import annotations


class NicsimError(Exception):
    """Base of every exception nicsim raises on purpose."""


class RemoteError(NicsimError):
    """The frontend (QEMU) or the guest broke the rules; nicsim refused it and carries on where it can."""


class LocalError(NicsimError):
    """This side is at fault: the caller misused an API, or asked for what cannot be done here."""
