"""Kernel modules for the guest: which modules to copy, the order to load them in, and their bytes.

This module owns the dependency closure of the modules the guest needs. Debian's kernel package ships
no ``modules.dep`` (``depmod`` runs at install time), so the builder runs ``depmod -b`` on its own
unpacked tree, as the package's postinst would, and reads the ``modules.dep`` it writes. ``depmod``
reads compressed modules (``.ko.xz``, ``.ko.gz``, ``.ko.zst``) as well as plain ones; the builder then
stores every module decompressed, so that ``/init`` loads them in order with plain ``insmod``, which
needs neither ``modprobe``, a module index, nor a kernel built with in-kernel decompression. The same
code serves any Debian kernel package (the cloud kernel by default, the generic ``linux-image-amd64``
on request): a wanted module that a kernel has built in (listed in its ``modules.builtin``) needs no
file and is left out.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

from images.apt import ImageBuildError

# What the guest needs: the virtio PCI transport, virtio-net (with its failover helpers), pktgen, and
# virtio-blk for a disk image the user attaches (``TestVM(disk=...)``, ``nicsim vm --disk``).
WANTED_MODULES = ("virtio_pci", "virtio_net", "pktgen", "virtio_blk")
SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
DEPMOD_HINT = "depmod not found: install it with 'apt-get install kmod'"


def module_name(path: str) -> str:
    """``kernel/net/virtio_net.ko.xz`` -> ``virtio_net`` (``-`` folded to ``_``, as the kernel does)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    raise ValueError(f"{path!r} is not a kernel module file ({', '.join(SUFFIXES)})")


def _depmod() -> str:
    # depmod lives in /usr/sbin, which a non-root user's PATH often lacks.
    found = shutil.which("depmod") or next(
        (p for p in ("/usr/sbin/depmod", "/sbin/depmod") if Path(p).is_file()), None
    )
    if found is None:
        raise ImageBuildError(DEPMOD_HINT)
    return found


def run_depmod(root: Path, version: str) -> Path:
    """Write ``modules.dep`` for kernel ``version`` of the tree at ``root``; return the modules directory."""
    done = subprocess.run([_depmod(), "-b", str(root), version], capture_output=True, text=True, check=False)
    moddir = root / "lib" / "modules" / version
    if done.returncode != 0 or not (moddir / "modules.dep").is_file():
        raise ImageBuildError(f"depmod -b {root} {version} failed:\n{done.stderr.strip()}")
    return moddir


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` -> module name -> (its path, the names of all it needs, as depmod lists them)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep:
            table[module_name(path)] = (path, [module_name(d) for d in deps.split()])
    return table


def builtin_modules(moddir: Path) -> set[str]:
    """Names of the modules the kernel has built in (its ``modules.builtin``; none if it has no such file)."""
    try:
        text = (moddir / "modules.builtin").read_text()
    except FileNotFoundError:
        return set()
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(wanted: tuple[str, ...], moddir: Path) -> list[tuple[str, Path]]:
    """``wanted`` and everything they depend on, each after its dependencies, as (name, module file).

    A wanted module the kernel has built in is skipped: there is nothing to load.
    """
    table = parse_modules_dep((moddir / "modules.dep").read_text())
    builtin = builtin_modules(moddir)
    order: list[tuple[str, Path]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ImageBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in table:
            raise ImageBuildError(
                f"kernel module {name} not found in {moddir.name}'s modules.dep (built in?)"
            )
        state[name] = "visiting"
        path, deps = table[name]
        for dep in deps:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append((name, moddir / path))

    for name in wanted:
        if name not in builtin or name in table:
            visit(name, ())
    return order


def module_bytes(path: Path) -> bytes:
    """The module's ELF object, decompressed when the package ships it compressed."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise ImageBuildError(f"{path.name} is zstd-compressed: install zstd ('apt-get install zstd')")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data
