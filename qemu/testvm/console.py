"""The guest's serial console as the harness sees it: a live transcript one can wait on.

A ``ConsoleReader`` owns the reading end of the console socket: one task appends decoded text
(carriage returns dropped, invalid UTF-8 replaced) to an in-memory transcript and wakes waiters.
``wait_for`` searches the transcript from a position onwards, so a match printed before the call is
still found and a caller can chain waits with ``since=match.end()``. The transcript ends when QEMU
closes its side; a wait that can no longer succeed then fails at once instead of running out its time.
"""

from __future__ import annotations

import asyncio
import codecs
import re
import socket
from collections.abc import Callable

from .errors import VMExitedError, VMTimeoutError

TAIL_CHARS = 3000


class ConsoleReader:
    """Reads a connected socket into a transcript; ``wait_for`` waits for a regex in it."""

    def __init__(self, sock: socket.socket, *, echo: Callable[[str], None] | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._echo = echo
        self._text: list[str] = []
        self._joined = ""
        self._dirty = False
        self._changed = asyncio.Event()
        self._eof = False
        self._task: asyncio.Task[None] | None = None
        self.exitcode: Callable[[], int | None] = lambda: None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump(), name="testvm-console")

    @property
    def text(self) -> str:
        if self._dirty:
            self._joined = "".join(self._text)
            self._text = [self._joined]
            self._dirty = False
        return self._joined

    @property
    def eof(self) -> bool:
        return self._eof

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return self.text[-chars:]

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                try:
                    data = await loop.sock_recv(self._sock, 65536)
                except OSError:
                    data = b""  # a reset console is an ended console: QEMU is gone
                chunk = decoder.decode(data, final=not data).replace("\r", "")
                if chunk:
                    self._text.append(chunk)
                    self._dirty = True
                    if self._echo is not None:
                        self._echo(chunk)
                if not data:
                    self._eof = True
                    return
                self._wake()
        finally:
            self._eof = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float, *, since: int = 0
    ) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = regex.search(self.text, since)
                    if found is not None:
                        return found
                    if self._eof:
                        raise VMExitedError(
                            f"console closed before {regex.pattern!r} appeared",
                            exitcode=self.exitcode(),
                            console_tail=self.tail(),
                        )
                    await self._changed.wait()
        except TimeoutError as err:
            raise VMTimeoutError(
                f"{regex.pattern!r} did not appear on the console within {timeout:g} s",
                console_tail=self.tail(),
            ) from err

    async def write(self, data: bytes) -> None:
        """Type ``data`` on the guest's console (what a person at the serial port would)."""
        await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def wait_eof(self) -> None:
        """Wait until QEMU closed the console (every byte it wrote has been read)."""
        while not self._eof:
            await self._changed.wait()

    def abort(self) -> None:
        """Stop reading at once, without waiting (teardown's last resort; ``close`` is the polite way)."""
        if self._task is not None:
            self._task.cancel()
        self._sock.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait, not `await task`: our own cancellation must still reach the caller.
            await asyncio.wait([self._task])
            self._task = None
        self._sock.close()
