"""The exception tree of ``qemu.testvm``: every error the harness raises, documented in one place.

.. code-block:: text

    Exception
     +-- TestVMError                 base of all the rest raised here (never wraps cancellation)
          +-- InvalidOptionError     (also ValueError) our caller's mistake: a bad option or workload
          +-- VMLaunchError          QEMU exited at once or QMP never came: exit code, command line, log
          +-- VMStateError           a method was called in the wrong runstate (e.g. QMP after close)
          +-- VMTimeoutError         (also TimeoutError) a wait ran out; carries the console tail
          +-- VMExitedError          the guest/QEMU exited while we waited for console output
          +-- QMPCommandError        QEMU refused or failed a QMP command (wraps qemu.qmp errors)
          +-- GuestOutputError       the guest printed a result line that does not parse

    subprocess.CalledProcessError
     +-- NetnsError                  an ``ip`` command setting up or run in a network namespace failed

``NetnsError`` is the one error raised here outside ``TestVMError``: it is a failed command, so it is
the ``CalledProcessError`` every caller that runs commands already handles (a command line turns it
into one line that names the command, what it said and, without root, that it needs root), and its
message alone says which command failed and what ``ip`` printed.

Errors from the layers below (``OSError``, ``qemu.qmp.QMPError``) are wrapped ``from err`` at the
point where the harness knows what it was trying to do; ``asyncio.CancelledError`` always passes
through untouched, so cancelling a task that holds a VM behaves like cancelling any other task.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence


class TestVMError(Exception):
    """Base of every error raised by ``qemu.testvm``."""

    __test__ = False  # not a pytest test class, despite the name


class InvalidOptionError(TestVMError, ValueError):
    """An option or workload given to the harness cannot be rendered (the caller's mistake)."""


class VMLaunchError(TestVMError):
    """QEMU did not come up: it exited at once, or its QMP monitor never answered."""

    def __init__(self, message: str, *, exitcode: int | None, argv: Sequence[str], log: str) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode
        self.argv = list(argv)
        self.log = log

    def __str__(self) -> str:
        return (
            f"{self.message} (exit code {self.exitcode})\n"
            f"command line: {' '.join(self.argv)}\n"
            f"QEMU output:\n{self.log.rstrip()}"
        )


class VMStateError(TestVMError):
    """A method needs a runstate the VM is not in."""


class VMTimeoutError(TestVMError, TimeoutError):
    """A wait on the console, QMP or process exit ran out of time."""

    def __init__(self, message: str, *, console_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.console_tail = console_tail

    def __str__(self) -> str:
        if not self.console_tail:
            return self.message
        return f"{self.message}\n--- console tail ---\n{self.console_tail.rstrip()}"


class VMExitedError(TestVMError):
    """QEMU exited while the harness was still waiting for something on the console."""

    def __init__(self, message: str, *, exitcode: int | None, console_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode
        self.console_tail = console_tail

    def __str__(self) -> str:
        tail = self.console_tail.rstrip()
        return f"{self.message} (exit code {self.exitcode})\n--- console tail ---\n{tail}"


class QMPCommandError(TestVMError):
    """A QMP command failed (QEMU refused it, or the monitor connection broke)."""


class GuestOutputError(TestVMError):
    """A ``NICSIM-RESULT`` line from the guest is not a JSON object with ``workload`` and ``ok``."""


class NetnsError(subprocess.CalledProcessError):
    """An ``ip`` command (or a command in a namespace) failed; ``cmd``/``returncode``/``stderr`` as
    ``subprocess`` gives them, and a one-line message with the first line ``ip`` printed."""

    def __str__(self) -> str:
        said = next((line.strip() for line in (self.stderr or "").splitlines() if line.strip()), "")
        argv = shlex.join(str(a) for a in self.cmd)
        return f"'{argv}' failed (exit {self.returncode})" + (f": {said}" if said else "")
