"""``TestVM``: one QEMU test guest as an async context manager, from launch to a guaranteed teardown.

This module owns the lifecycle (modelled on qemu/qemu ``python/qemu/machine/machine.py`` with the
asyncio ``qemu.qmp`` client): resolve the accelerator, build the command line, start QEMU (inside a
network namespace if asked) with its console and QMP each on one end of a socketpair, and wait until
QMP answers or QEMU exits — a launch failure is a ``VMLaunchError`` carrying the exit code, the command
line and QEMU's own output. Teardown always leaves no QEMU behind, by error, cancellation or timeout:
QMP ``quit``, then SIGTERM, then SIGKILL, by pid; and if teardown itself is cancelled, a synchronous
SIGKILL in ``finally``. A second ``close()`` is harmless. The runstate is explicit (``Runstate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient, QMPError

from .accel import choose_accel
from .cmdline import (
    DEFAULT_QEMU,
    ConsoleFd,
    Nic,
    QmpFd,
    Route,
    VMSpec,
    build_cmdline,
    in_netns,
)
from .console import ConsoleReader
from .errors import QMPCommandError, VMExitedError, VMLaunchError, VMStateError, VMTimeoutError
from .guestfiles import check_file, disk_format
from .workload import DONE_MARKER, RESULT_MARKER, Workload, WorkloadResult, parse_results

QUIT_TIMEOUT = 3.0  # QMP quit answered and QEMU gone
TERM_TIMEOUT = 3.0  # after SIGTERM
DRAIN_TIMEOUT = 1.0  # console bytes still in flight after QEMU exited


class Runstate(enum.Enum):
    """Where a TestVM is in its life; ``EXITED`` means QEMU ended by itself and ``close()`` is due."""

    IDLE = "idle"
    LAUNCHING = "launching"
    RUNNING = "running"
    EXITED = "exited"
    SHUTTING_DOWN = "shutting-down"
    STOPPED = "stopped"


class TestVM:
    """A QEMU guest booted on ``kernel``/``initrd`` that runs ``workloads`` and reports on its console.

    The built-in guest image (``images.build.build_image()``) is the usual ``kernel``/``initrd``; any
    other works too: a Debian kernel with an initrd built for it (``build_image(kernel_package=...)``),
    or the user's own kernel, initrd and ``disk`` image (virtio-blk, ``snapshot=on``: the guest may
    write to it, the file itself is never modified; ``disk_format`` ``auto`` reads the qcow2 magic,
    else raw). ``extra_append`` is appended to the kernel command line after the ``nicsim.*``
    contract: a string (split on whitespace) or a sequence of words. ``nics`` gives the guest several
    NICs (eth0, eth1, ... in order), each with its own MAC and its own ``guest_ip``/``guest_mtu``;
    ``forward`` makes it route IPv4 between them and ``routes`` adds static routes. The files are checked when
    ``launch()`` starts, before QEMU: a missing, unreadable or empty one is an ``InvalidOptionError``
    that names the parameter.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *,
        kernel: str | Path,
        initrd: str | Path | None = None,
        nic: Nic | None = None,
        nics: Sequence[Nic] = (),
        forward: bool = False,
        routes: Sequence[Route] = (),
        workloads: Sequence[Workload] = (),
        memory_mb: int = 256,
        guest_ip: str | None = "10.0.2.15/24",
        mtu: int | None = 1500,
        log_dir: str | Path | None = None,
        accel: str = "auto",
        netns: str | None = None,
        cpus: int = 1,
        qemu: str = DEFAULT_QEMU,
        extra_append: str | Sequence[str] = (),
        extra_args: Sequence[str] = (),
        disk: str | Path | None = None,
        disk_format: str = "auto",
        launch_timeout: float = 30.0,
        name: str = "testvm",
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self._spec = VMSpec(
            kernel=kernel, initrd=initrd, memory_mb=memory_mb, cpus=cpus, nic=nic, nics=tuple(nics),
            forward=forward, routes=tuple(routes), guest_ip=guest_ip,
            mtu=mtu, workloads=tuple(workloads), qemu=qemu, extra_args=tuple(extra_args), accel="tcg",
            extra_append=extra_append if isinstance(extra_append, str) else tuple(extra_append), disk=disk,
        )  # fmt: skip
        self._disk_format = disk_format
        self._requested_accel = accel
        self._netns = netns
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._launch_timeout = launch_timeout
        self._name = name
        self._echo = echo
        self._state = Runstate.IDLE
        self._accel: str | None = None
        self._argv: list[str] = []
        self._run_dir: Path | None = None
        self._own_run_dir = False
        self._proc: asyncio.subprocess.Process | None = None
        self._console: ConsoleReader | None = None
        self._qmp: QMPClient | None = None
        self._qmp_sock: socket.socket | None = None

    # ---- state --------------------------------------------------------------------------------

    @property
    def runstate(self) -> Runstate:
        if self._state is Runstate.RUNNING and self._proc is not None and self._proc.returncode is not None:
            return Runstate.EXITED
        return self._state

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VMStateError(f"{self._name}: no QEMU process (runstate {self.runstate.value})")
        return self._proc.pid

    @property
    def accel(self) -> str:
        if self._accel is None:
            raise VMStateError(f"{self._name}: accelerator not chosen yet (launch first)")
        return self._accel

    @property
    def argv(self) -> list[str]:
        """The command line QEMU was started with (after launch)."""
        return list(self._argv)

    @property
    def exitcode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def console_text(self) -> str:
        return "" if self._console is None else self._console.text

    @property
    def console_log(self) -> Path | None:
        """QEMU's own copy of the console (kept when ``log_dir`` was given)."""
        return None if self._run_dir is None else self._run_dir / "console.log"

    def _require(self, *states: Runstate) -> None:
        if self.runstate not in states:
            wanted = " or ".join(s.value for s in states)
            raise VMStateError(f"{self._name}: needs runstate {wanted}, is {self.runstate.value}")

    # ---- launch -------------------------------------------------------------------------------

    async def __aenter__(self) -> TestVM:
        await self.launch()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def launch(self) -> None:
        """Start QEMU and wait for its QMP greeting; on any failure nothing is left running."""
        self._require(Runstate.IDLE)
        self._state = Runstate.LAUNCHING
        try:
            await self._launch()
        except BaseException:
            await self.close()
            raise
        self._state = Runstate.RUNNING

    def _check_files(self) -> dict[str, Any]:
        """The guest's files checked (InvalidOptionError naming the parameter); the disk's format."""
        spec = self._spec
        check_file(spec.kernel, "kernel=", "give the path of a kernel image (bzImage/vmlinuz)")
        if spec.initrd is not None:
            check_file(spec.initrd, "initrd=", "give an initramfs image, or initrd=None to boot without")
        if spec.disk is None:
            return {}
        check_file(spec.disk, "disk=", "give a raw or qcow2 disk image, or disk=None for no disk")
        return {"disk_format": disk_format(spec.disk, self._disk_format)}

    async def _launch(self) -> None:
        resolved = self._check_files()
        self._accel = await choose_accel(self._requested_accel, self._spec.kernel, qemu=self._spec.qemu)
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self._run_dir = self._log_dir
        else:
            self._run_dir = Path(tempfile.mkdtemp(prefix=f"nicsim-{self._name}-"))
            self._own_run_dir = True
        console_ours, console_theirs = socket.socketpair()
        qmp_ours, qmp_theirs = socket.socketpair()
        self._qmp_sock = qmp_ours
        self._console = ConsoleReader(console_ours, echo=self._echo)
        spec = VMSpec(
            **{
                **self._spec.__dict__,
                **resolved,
                "accel": self._accel,
                "console": ConsoleFd(fd=console_theirs.fileno(), logfile=self._run_dir / "console.log"),
                "qmp": QmpFd(fd=qmp_theirs.fileno()),
            }
        )
        self._argv = in_netns(build_cmdline(spec), self._netns)
        qemu_log = self._run_dir / "qemu.log"
        try:
            with qemu_log.open("wb") as out:
                self._proc = await asyncio.create_subprocess_exec(
                    *self._argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    pass_fds=(console_theirs.fileno(), qmp_theirs.fileno()),
                    # own session: a terminal's Ctrl-C reaches us, and we decide how QEMU ends.
                    start_new_session=True,
                )  # fmt: skip
        except OSError as err:
            raise VMLaunchError(
                f"cannot start {self._argv[0]}: {err}", exitcode=None, argv=self._argv, log=""
            ) from err
        finally:
            # QEMU holds its own copies now; ours would keep the sockets open after QEMU dies.
            console_theirs.close()
            qmp_theirs.close()
        proc = self._proc
        self._console.exitcode = lambda: proc.returncode
        self._console.start()
        self._qmp = QMPClient(self._name)
        connect = asyncio.ensure_future(self._qmp.connect(qmp_ours))
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait([connect, exited], timeout=self._launch_timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            for fut in (connect, exited):
                fut.cancel()
            await asyncio.wait([connect, exited])
        if connect.cancelled() or connect.exception() is not None:
            cause = None if connect.cancelled() else connect.exception()
            if cause is not None:
                # QMP's EOF usually beats the exit status; give QEMU a moment to be reaped.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), TERM_TIMEOUT)
            why = "QMP did not answer" if cause is None else f"QMP failed: {cause}"
            if proc.returncode is not None:
                why = "QEMU exited during start-up"
            else:
                await self._stop_process()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(self._console.wait_eof(), DRAIN_TIMEOUT)
            log = qemu_log.read_text(errors="replace")
            if self._console.text:
                log += "\n--- console ---\n" + self._console.tail()
            raise VMLaunchError(why, exitcode=proc.returncode, argv=self._argv, log=log) from cause

    # ---- the guest's console --------------------------------------------------------------------

    async def wait_for(self, pattern: str, timeout: float, *, since: int = 0) -> Any:
        """Wait for regex ``pattern`` on the console (from offset ``since``); returns the ``re.Match``."""
        if self._console is None:
            raise VMStateError(f"{self._name}: not launched")
        try:
            return await self._console.wait_for(pattern, timeout, since=since)
        except VMExitedError as err:
            if err.exitcode is None and self._proc is not None:
                # The console's EOF usually beats the exit status; report the code when it comes.
                with contextlib.suppress(TimeoutError):
                    err.exitcode = await asyncio.wait_for(self._proc.wait(), TERM_TIMEOUT)
            raise

    async def results(self, timeout: float, *, since: int = 0) -> list[WorkloadResult]:
        """Every ``NICSIM-RESULT`` line up to ``NICSIM-DONE``, parsed (GuestOutputError if malformed)."""
        done = await self.wait_for(f"(?m)^{DONE_MARKER}", timeout, since=since)
        return parse_results(self.console_text[since : done.end()])

    async def wait_results(self, count: int, timeout: float, *, since: int = 0) -> list[WorkloadResult]:
        """The first ``count`` ``NICSIM-RESULT`` lines from ``since``, parsed, as soon as the guest has
        printed them, while its later workloads still run: a guest whose last workload is a long
        sleep stays up for the others (a peer that powered off as soon as its own pings were done
        would lose theirs)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        end = since
        for _ in range(count):
            line = await self.wait_for(f"(?m)^{RESULT_MARKER} [^\\n]*\\n", max(0.0, deadline - loop.time()),
                                       since=end)  # fmt: skip
            end = line.end()
        return parse_results(self.console_text[since:end])

    async def send_console(self, data: bytes) -> None:
        """Type ``data`` on the guest's serial console (a shell workload reads it)."""
        if self._console is None:
            raise VMStateError(f"{self._name}: not launched")
        await self._console.write(data)

    # ---- QMP ------------------------------------------------------------------------------------

    async def qmp(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run one QMP command; QEMU's refusal or a broken monitor is a QMPCommandError."""
        self._require(Runstate.RUNNING)
        assert self._qmp is not None
        try:
            return await self._qmp.execute(command, arguments)
        except QMPError as err:
            raise QMPCommandError(f"{self._name}: QMP {command} failed: {err}") from err

    async def set_link(self, up: bool, *, nic: int = 0) -> None:
        """Carrier of NIC ``nic`` (0: the first) on or off."""
        await self.qmp("set_link", {"name": f"nic{nic}", "up": up})

    async def system_reset(self, timeout: float = QUIT_TIMEOUT) -> None:
        """Reset the guest: it boots again and reruns its workloads, and QEMU keeps running.

        ``-no-reboot`` turns every reset into an exit, QMP's included, and the re-boot itself does a
        guest reset; so the reboot action becomes ``reset`` for the rest of this VM's life (the guest's
        power-off after ``NICSIM-DONE`` still ends QEMU). Returns once QEMU reports the RESET event.
        """
        self._require(Runstate.RUNNING)
        assert self._qmp is not None
        await self.qmp("set-action", {"reboot": "reset"})
        with self._qmp.listener(("RESET",)) as listener:
            await self.qmp("system_reset")
            try:
                await asyncio.wait_for(listener.get(), timeout)
            except TimeoutError as err:
                message = f"{self._name}: no RESET event within {timeout:g} s"
                raise VMTimeoutError(message, console_tail=self.console_text[-3000:]) from err

    async def quit(self, timeout: float = QUIT_TIMEOUT) -> int:
        """Ask QEMU to quit over QMP and wait for it to exit; returns the exit code."""
        self._require(Runstate.RUNNING)
        assert self._qmp is not None
        # QEMU may drop the connection before its reply arrives: that is success, not an error.
        with contextlib.suppress(QMPError):
            await self._qmp.execute("quit")
        return await self.wait_exit(timeout)

    async def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (the guest powered off); returns its exit code."""
        if self._proc is None:
            raise VMStateError(f"{self._name}: not launched")
        try:
            async with asyncio.timeout(timeout):
                code = await self._proc.wait()
        except TimeoutError as err:
            tail = self._console.tail() if self._console is not None else ""
            message = f"{self._name}: QEMU still running after {timeout:g} s"
            raise VMTimeoutError(message, console_tail=tail) from err
        if self._console is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._console.wait_eof(), DRAIN_TIMEOUT)
        return code

    # ---- teardown -------------------------------------------------------------------------------

    async def _stop_process(self) -> None:
        """QMP quit, then SIGTERM, then SIGKILL, each given a moment; returns once QEMU is reaped."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if self._qmp is not None and self._qmp.runstate.name == "RUNNING":
            with contextlib.suppress(QMPError, TimeoutError):
                await asyncio.wait_for(self._qmp.execute("quit"), QUIT_TIMEOUT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), QUIT_TIMEOUT)
        for sig, grace in ((signal.SIGTERM, TERM_TIMEOUT), (signal.SIGKILL, None)):
            if proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)

    def _kill_now(self) -> None:
        # No await: this runs in `finally` even when teardown itself was cancelled.
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """End QEMU (if running) and release everything; harmless to call again."""
        if self._state in (Runstate.STOPPED, Runstate.SHUTTING_DOWN):
            return
        self._state = Runstate.SHUTTING_DOWN
        try:
            await self._stop_process()
            if self._console is not None and self._proc is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._console.wait_eof(), DRAIN_TIMEOUT)
            if self._qmp is not None:
                # QEMU is gone by now, so the monitor's reader ending in EOF is expected, not news.
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await self._qmp.disconnect()
            if self._console is not None:
                await self._console.close()
        finally:
            self._kill_now()
            if self._console is not None:
                self._console.abort()
            if self._qmp_sock is not None:
                self._qmp_sock.close()
            if self._own_run_dir and self._run_dir is not None:
                shutil.rmtree(self._run_dir, ignore_errors=True)
            self._state = Runstate.STOPPED
