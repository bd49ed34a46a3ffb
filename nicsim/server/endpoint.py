"""Socket paths: listening or connecting endpoints, stale socket files, and the ``Server`` over them.

This module owns the life of the sockets around the sessions. A ``Server`` has one ``Endpoint`` per
socket path: it listens there (QEMU connects), or with ``client=True`` connects with retry (QEMU
listens, ``server=on``), runs one :class:`~nicsim.server.session.Session` at a time with a fresh
device from ``make_device``, and after a disconnect waits for the next connection. A socket file
left by a killed server is removed before listening; one a live server listens on, or a file of
another kind, is refused with ``SocketPathError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nicsim.errors import LocalError
from nicsim.server.session import Session
from nicsim.vhost.backend_core import DEFAULT_MAX_QUEUE_SIZE
from nicsim.virtio.device import VirtioNetDevice

SUN_PATH_MAX = 108  # sockaddr_un.sun_path, its terminating NUL included

log = logging.getLogger("nicsim.server")

RETRY_INTERVAL = 0.2

DeviceFactory = Callable[[], VirtioNetDevice]


class Endpoint:
    """One socket path: listens (or connects, ``client=True``) and runs one session at a time.
    ``config_space``: offer VHOST_USER_PROTOCOL_F_CONFIG (off: QEMU's net device never uses it)."""

    def __init__(
        self, path: Path, make_device: DeviceFactory, *, client: bool = False,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE, retry_interval: float = RETRY_INTERVAL,
        config_space: bool = False,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.make_device = make_device
        self.client = client
        self.max_queue_size = max_queue_size
        self.config_space = config_space
        self.retry_interval = retry_interval
        self.session: Session | None = None
        self.last: Session | None = None
        self.connections = 0
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._session_changed = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.client:
            self._task = loop.create_task(self._connect_loop())
            return
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The path appears only once the socket listens: bound under a temporary name, renamed after
        # listen(). A frontend (or a script) that connects as soon as the file exists would otherwise
        # meet a bound socket that does not listen yet, and be refused.
        staging = _staging_path(self.path)
        # The socket hands out guest memory: only our user may connect (0600 from the first moment,
        # hence the umask around bind rather than a chmod after it).
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(staging))
            os.umask(old_umask)
            sock.listen(4)
            sock.setblocking(False)
            if staging != self.path:
                os.rename(staging, self.path)
        except OSError:
            sock.close()
            with contextlib.suppress(OSError):
                if staging != self.path:
                    staging.unlink()
            raise
        finally:
            os.umask(old_umask)
        self._listener = sock
        loop.add_reader(sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("%s: accept failed: %s", self.path, err)
            return
        if self.session is not None:
            log.warning("%s: refused a second frontend while one is connected", self.path)
            conn.close()
            return
        self._start_session(conn)

    def _start_session(self, conn: socket.socket) -> None:
        self.connections += 1
        device = None
        try:
            device = self.make_device()
            self.session = Session(
                conn, device, name=f"{self.path.name}#{self.connections}",
                max_queue_size=self.max_queue_size, on_closed=self._session_closed,
                config_space=self.config_space,
            )  # fmt: skip
        except BaseException:
            if device is not None:
                device.shutdown()
            conn.close()
            raise
        log.info("%s: frontend connected (pid %s)", self.path, self.session.peer_pid)
        self._session_changed.set()

    def _session_closed(self, session: Session) -> None:
        if self.session is session:
            self.session = None
        self.last = session
        self._session_changed.set()

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, str(self.path))
            except (FileNotFoundError, ConnectionRefusedError, OSError):
                sock.close()
                await asyncio.sleep(self.retry_interval)
                continue
            except BaseException:
                sock.close()
                raise
            self._start_session(sock)
            assert self.session is not None
            await self.session.wait_closed()

    async def wait_session(self, *, connections: int = 1) -> Session:
        """Wait until the ``connections``-th frontend is connected (for tests and tools)."""
        while True:
            if self.connections >= connections and self.session is not None:
                return self.session
            self._session_changed.clear()
            await self._session_changed.wait()

    async def wait_idle(self) -> None:
        """Wait until no frontend is connected."""
        while self.session is not None:
            self._session_changed.clear()
            await self._session_changed.wait()

    def snapshot(self) -> dict[str, Any]:
        sess = self.session or self.last
        snap: dict[str, Any] = sess.snapshot() if sess is not None else {"queues": [], "drops_total": 0}
        snap = dict(snap)
        snap.setdefault("pool", {"usage": 0, "high_water": 0, "capacity": 0})
        snap.update(path=str(self.path), connected=self.session is not None, connections=self.connections)
        return snap

    async def close(self) -> None:
        """Stop accepting, close the current session, remove the socket file. Idempotent."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.session is not None:
            self.session.close()


class SocketPathError(LocalError, FileExistsError):
    """The socket path cannot be used: ``reason`` is ``"in_use"`` (a live server listens there) or
    ``"not_a_socket"`` (a file of another kind, never removed). ``path`` is the path."""

    def __init__(self, path: Path, reason: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = reason


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file nobody listens on (left by a killed server); refuse one still in use."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(path, "not_a_socket", "exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        # Nobody listens: a killed server's leftover. Unlink only that same file (not one a
        # concurrently starting server just bound in its place).
        with contextlib.suppress(FileNotFoundError):
            if path.lstat().st_ino == st.st_ino:
                path.unlink()
        return
    except OSError as err:
        raise SocketPathError(path, "unusable", f"cannot probe the existing socket ({err})") from err
    finally:
        probe.close()
    raise SocketPathError(path, "in_use", "another backend is listening on it")


class Server:
    """Serves a vhost-user virtio-net device on each of ``paths`` (``make_device``: one per connection).
    ``config_space``: offer VHOST_USER_PROTOCOL_F_CONFIG on each (see ``Endpoint``)."""

    def __init__(
        self, paths: Sequence[str | Path], make_device: DeviceFactory, *, client: bool = False,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE, retry_interval: float = RETRY_INTERVAL,
        config_space: bool = False,
    ) -> None:  # fmt: skip
        if not paths:
            raise ValueError("the server needs at least one socket path")
        self.endpoints = [
            Endpoint(Path(p), make_device, client=client, max_queue_size=max_queue_size,
                     retry_interval=retry_interval, config_space=config_space)
            for p in paths
        ]  # fmt: skip
        self.started_at = time.monotonic()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            for ep in self.endpoints:
                await ep.start()
        except BaseException:
            await self.close()
            raise

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: the first endpoint's device stats at top level, every endpoint under ``sockets``."""
        eps = [ep.snapshot() for ep in self.endpoints]
        out = {k: v for k, v in eps[0].items() if k not in ("path", "connected", "connections")}
        out["uptime"] = round(time.monotonic() - self.started_at, 3)
        out["sockets"] = eps
        return out

    async def close(self) -> None:
        """Close every endpoint (sessions included); idempotent."""
        if self._closed:
            return
        self._closed = True
        for ep in self.endpoints:
            await ep.close()


_staged = itertools.count()


def _staging_path(path: Path) -> Path:
    """A short temporary name beside ``path`` to bind to (``path`` itself if that would be too long)."""
    staging = path.with_name(f".nicsim-{os.getpid()}-{next(_staged)}")
    return staging if len(os.fsencode(staging)) < SUN_PATH_MAX else path
