"""Kernel modules for the guest: which ``.ko`` files to copy and the order to load them in.

This module owns the dependency closure of the modules the guest needs. Debian's kernel package
ships no ``modules.dep`` (``depmod`` runs at install time), so the dependencies are read where
``depmod`` reads them: the ``depends=`` string in each module's ``.modinfo`` ELF section. The
result is a load order (dependencies first) that ``/init`` follows with plain ``insmod``, which
needs neither ``modprobe`` nor a module index in the initramfs.
"""

from __future__ import annotations

import struct
from pathlib import Path

from images.apt import ImageBuildError

# What the guest needs: the virtio PCI transport, virtio-net (with its failover helpers) and pktgen.
WANTED_MODULES = ("virtio_pci", "virtio_net", "pktgen")


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 little-endian module's ``.modinfo`` section."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = data[str_off : str_off + str_size]
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        if names[name_off : names.index(b"\0", name_off)] != b".modinfo":
            continue
        for item in data[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def module_files(module_root: Path) -> dict[str, Path]:
    """Module name (``-`` folded to ``_``, as the kernel does) -> its uncompressed ``.ko`` file."""
    return {p.name[:-3].replace("-", "_"): p for p in sorted(module_root.rglob("*.ko"))}


def load_order(wanted: tuple[str, ...], module_root: Path) -> list[tuple[str, Path]]:
    """``wanted`` and everything they depend on, each after its dependencies, as (name, file)."""
    files = module_files(module_root)
    order: list[tuple[str, Path]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ImageBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            raise ImageBuildError(
                f"kernel module {name} not found under {module_root.name} (built in, or compressed?)"
            )
        state[name] = "visiting"
        deps = modinfo(files[name].read_bytes()).get("depends", [""])[0]
        for dep in sorted(filter(None, deps.split(","))):
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append((name, files[name]))

    for name in wanted:
        visit(name, ())
    return order
