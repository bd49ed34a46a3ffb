"""Launch and drive QEMU test guests (``qemu.testvm``), beside ``qemu.qmp`` in the ``qemu`` namespace.

``qemu/`` itself has no ``__init__.py`` on purpose: ``qemu.qmp`` is a namespace package, and an
``__init__.py`` here would shadow it and ``import qemu.qmp`` would fail. This package imports
neither ``nicsim`` nor ``rings`` nor ``images``: it knows QEMU, the guest's console and the kernel
command line contract of docs/ARCHITECTURE.md, nothing else. Modules: ``cmdline`` (pure ``argv``
building), ``workload`` (``nicsim.run=`` and result lines), ``accel`` (KVM probe), ``console``
(live transcript), ``machine`` (``TestVM`` lifecycle), ``netns`` (throwaway network namespaces
holding a TAP), ``guestfiles`` (checking the user's own kernel, initrd and disk image),
``errors`` (the exception tree).
"""

from .accel import choose_accel, probe_kvm
from .cmdline import (
    DEFAULT_MAC,
    ConsoleFd,
    ConsoleFile,
    ConsoleStdio,
    Nic,
    QmpFd,
    QmpPath,
    Route,
    TapNic,
    UserNic,
    VhostUserNic,
    VMSpec,
    append_words,
    build_cmdline,
    disk_args,
    in_netns,
    kernel_cmdline,
    nic_list,
)
from .errors import (
    GuestOutputError,
    InvalidOptionError,
    NetnsError,
    QMPCommandError,
    TestVMError,
    VMExitedError,
    VMLaunchError,
    VMStateError,
    VMTimeoutError,
)
from .guestfiles import check_file, disk_format
from .machine import Runstate, TestVM
from .netns import Netns
from .workload import Workload, WorkloadResult, parse_result_line, parse_results, render_run

__all__ = [
    "DEFAULT_MAC",
    "ConsoleFd",
    "ConsoleFile",
    "ConsoleStdio",
    "GuestOutputError",
    "InvalidOptionError",
    "Netns",
    "NetnsError",
    "Nic",
    "QMPCommandError",
    "QmpFd",
    "QmpPath",
    "Route",
    "Runstate",
    "TapNic",
    "TestVM",
    "TestVMError",
    "UserNic",
    "VMExitedError",
    "VMLaunchError",
    "VMSpec",
    "VMStateError",
    "VMTimeoutError",
    "VhostUserNic",
    "Workload",
    "WorkloadResult",
    "append_words",
    "build_cmdline",
    "check_file",
    "choose_accel",
    "disk_args",
    "disk_format",
    "in_netns",
    "kernel_cmdline",
    "nic_list",
    "parse_result_line",
    "parse_results",
    "probe_kvm",
    "render_run",
]
