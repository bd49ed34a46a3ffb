"""The test-guest factory behind the pytest plugin's ``nicsim_vm`` fixture.

This module owns :class:`VMFactory`: it makes ``qemu.testvm.TestVM`` objects booted from one guest
image, each with a unique QEMU name and a unique locally administered MAC (``WorkerIds``), an
address from the worker's own subnet unless the test gives one, and a console log kept under
``out_dir/<name>/`` for the failure report. ``boot`` launches guests one after the other and waits
until each has printed ``NICSIM-READY``, so a guest that pings as soon as it is up finds its peers
(boot the listeners first). ``close`` ends every guest it made (QMP quit, then SIGTERM, SIGKILL, by
pid, as ``TestVM.close`` does); it is harmless on guests that were never launched or already closed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.testvm import Nic, TestVM, VhostUserNic, Workload

from .unique import WorkerIds

BOOT_TIMEOUT = 120.0  # a failure deadline under TCG on a busy machine, not a performance claim
READY = "NICSIM-READY"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Recorder = Callable[[str, Path], None]


class VMFactory:
    """``factory(socket, *workloads, name=..., **TestVM options)`` → a ``TestVM`` (not launched yet)."""

    def __init__(
        self,
        image: Any,
        ids: WorkerIds,
        out_dir: Path,
        *,
        accel: str = "auto",
        record: Recorder | None = None,
    ) -> None:
        self.image = image
        self.ids = ids
        self.out_dir = Path(out_dir)
        self.accel = accel
        self._record = record
        self.vms: list[TestVM] = []
        self._names: dict[TestVM, str] = {}
        self._ips: dict[TestVM, str | None] = {}

    def __call__(
        self,
        socket: str | Path | None = None,
        *workloads: Workload,
        name: str | None = None,
        mac: str | None = None,
        nic: Nic | None = None,
        guest_ip: str | None = "",
        **options: Any,
    ) -> TestVM:
        """A guest on vhost-user ``socket`` (or on ``nic``) running ``workloads``.

        ``name`` (default ``vm1``, ``vm2``, ...) names its log directory; ``mac`` defaults to a fresh
        unique one; ``guest_ip`` to host N of this worker's subnet (``None``: no address); every other
        keyword goes to ``TestVM`` as is (``kernel`` and ``initrd`` of your own, ``memory_mb``, ``cpus``,
        ``netns``, ``extra_append``...).
        """
        if socket is not None and nic is not None:
            raise ValueError("give a socket or a nic, not both")
        number = len(self.vms) + 1
        label = name or f"vm{number}"
        if not _NAME_RE.match(label) or label in self._names.values():
            raise ValueError(f"guest name {label!r} is taken or not letters, digits, '_', '.' or '-'")
        if nic is None and socket is not None:
            nic = VhostUserNic(socket=socket, mac=mac or self.ids.mac())
        if guest_ip == "":
            guest_ip = self.ids.address(number)
        options.setdefault("accel", self.accel)
        options.setdefault("kernel", self.image.kernel)  # a test may boot its own kernel= and initrd=
        options.setdefault("initrd", self.image.initrd)
        log_dir = self.out_dir / label
        vm = TestVM(nic=nic, workloads=workloads, guest_ip=guest_ip, name=self.ids.name(label),
                    log_dir=log_dir, **options)  # fmt: skip
        self.vms.append(vm)
        self._names[vm] = label
        self._ips[vm] = guest_ip
        if self._record is not None:
            self._record(f"console of {label}", log_dir / "console.log")
        return vm

    def ip_of(self, vm: TestVM) -> str:
        """The guest's IPv4 address without its prefix length (for a ping target)."""
        ip = self._ips.get(vm)
        if ip is None:
            raise ValueError(f"{self._names.get(vm, vm)!r} has no address from this factory")
        return ip.split("/")[0]

    def name_of(self, vm: TestVM) -> str:
        return self._names[vm]

    async def boot(self, *vms: TestVM, timeout: float = BOOT_TIMEOUT) -> None:
        """Launch ``vms`` in order, each up (``NICSIM-READY`` on its console) before the next starts."""
        for vm in vms:
            await vm.launch()
            await vm.wait_for(READY, timeout)

    async def close(self) -> None:
        """End every guest this factory made, the last made first."""
        for vm in reversed(self.vms):
            await vm.close()
