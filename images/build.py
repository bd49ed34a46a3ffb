"""Build the nicsim guest (kernel + initramfs) from Debian packages into a content-addressed cache.

This module owns the build as a whole: which packages go in, the image key, the initramfs layout and
the cache directory. The key hashes the resolved packages (name, version, architecture, SHA-256) and
the builder's own inputs (``init.sh`` and this package's Python sources), so any change to either
gives a new image directory and an unchanged one is found again without doing any work. An image is
assembled in a private temporary directory and renamed into place in one step, so an interrupted or
failed build never leaves something that looks like an image.

The kernel is Debian's cloud kernel (``linux-image-cloud-amd64``) unless ``kernel_package`` names
another Debian kernel package (``linux-image-amd64``, the generic kernel, or a versioned
``linux-image-6.1.0-NN-amd64``); the initramfs then carries that kernel's own modules. The package
name is part of the key and each one has its own resolution record, so images of different kernels
sit side by side in one cache. Layout of the cache::

    <cache>/debs/*.deb                 downloaded packages, verified against APT's SHA-256
    <cache>/resolved.json              package resolution, reused while APT's lists are unchanged
    <cache>/resolved-<package>.json    the same for another kernel package
    <cache>/<key>/vmlinuz              the kernel of the kernel package
    <cache>/<key>/initrd.img           busybox, /init, modules, iperf3, sockperf, their libraries (cpio newc)
    <cache>/<key>/manifest.json        versions, module order, file hashes, build time
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from images import apt, cpio, kmod
from images.apt import ImageBuildError, Package

Progress = Callable[[str], None]

PACKAGE_DIR = Path(__file__).resolve().parent
INIT_SCRIPT = PACKAGE_DIR / "init.sh"
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
IPERF = "iperf3"
IPERF_LIB = "libiperf0"  # its dependency closure brings the shared libraries iperf3 needs
# UDP request/response (``nicsim bench`` udp-rr); its closure brings libstdc++6 and libgcc-s1.
SOCKPERF = "sockperf"
# The dynamically linked tools the guest runs, with the package whose closure holds their libraries.
TOOLS = (("usr/bin/iperf3", IPERF_LIB), ("usr/bin/sockperf", SOCKPERF))
APT_LISTS = Path("/var/lib/apt/lists")
MULTIARCH = "lib/x86_64-linux-gnu"
LOADER = "lib64/ld-linux-x86-64.so.2"
# glibc dlopen()s the unwinder for thread cancellation; the loader's --list cannot see that.
EXTRA_LIBS = ("libgcc_s.so.1",)
# The modules whose code decides the image's bytes (the command line, for one, does not).
BUILDER_MODULES = ("apt.py", "build.py", "cpio.py", "kmod.py")
FORMAT = 1  # bump when the image layout changes in a way the hashed sources do not capture
# A Debian binary package name (Debian policy 5.6.1), and a kernel image's prefix.
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
KERNEL_PREFIX = "linux-image-"


@dataclass(frozen=True, kw_only=True)
class GuestImage:
    kernel: Path
    initrd: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.manifest["key"])


def default_cache_dir() -> Path:
    """``$NICSIM_CACHE/images`` when set, else ``~/.cache/nicsim/images``."""
    base = os.environ.get("NICSIM_CACHE")
    return Path(base) / "images" if base else Path.home() / ".cache" / "nicsim" / "images"


def builder_inputs(init_script: Path = INIT_SCRIPT) -> dict[str, str]:
    """SHA-256 of each file that decides what the builder produces (init script, builder code)."""
    files = {"init.sh": init_script}
    files.update({name: PACKAGE_DIR / name for name in BUILDER_MODULES})
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sorted(files.items())}


def check_kernel_package(name: str | None) -> str:
    """The kernel package to build for (``None`` is the cloud kernel); a bad name is an ImageBuildError."""
    if name is None:
        return KERNEL_META
    if not _PACKAGE_RE.match(name) or not name.startswith(KERNEL_PREFIX):
        raise ImageBuildError(
            f"kernel package {name!r} is not a Debian kernel image package name: give one such as "
            f"linux-image-amd64 (the generic kernel) or {KERNEL_META} (the default); "
            "'apt-cache search --names-only ^linux-image-' lists them"
        )
    return name


def image_key(packages: list[Package], inputs: dict[str, str], kernel_package: str = KERNEL_META) -> str:
    """The content address: a hash of the kernel package asked for, the resolved packages and the
    builder's inputs."""
    doc = {
        "format": FORMAT,
        "kernel_package": kernel_package,
        "packages": [[p.name, p.version, p.arch, p.sha256] for p in sorted(packages)],
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _lists_fingerprint(kernel_package: str = KERNEL_META) -> str:
    # APT's candidates change only when its package lists (or its configuration) change; the set of
    # packages asked for is part of it, so adding a tool resolves again instead of reusing the record.
    digest = hashlib.sha256(f"format {FORMAT} roots {' '.join(_roots(kernel_package))}".encode())
    for root in (APT_LISTS, Path("/etc/apt")):
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                st = path.stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _roots(kernel_package: str = KERNEL_META) -> list[str]:
    """The packages the image asks for by name (the rest is their dependency closure)."""
    return [kernel_package, BUSYBOX, IPERF, *(closure_of for _, closure_of in TOOLS)]


def _kernel_image_package(kernel_package: str, stanza: dict[str, str]) -> str:
    """The package that holds the kernel: a metapackage's linux-image-* dependency, else itself."""
    kernels = [d for d in apt.depends_of(stanza) if d.startswith(KERNEL_PREFIX)]
    if kernels:
        return kernels[0]
    if kernel_package == KERNEL_META:
        raise ImageBuildError(f"{KERNEL_META} does not depend on a linux-image-* package")
    return kernel_package  # a versioned kernel package, e.g. linux-image-6.1.0-NN-amd64


def _resolve_fresh(progress: Progress, kernel_package: str = KERNEL_META) -> list[Package]:
    try:
        top = apt.show(_roots(kernel_package), progress)
    except ImageBuildError as err:
        if kernel_package == KERNEL_META or kernel_package not in str(err):
            raise
        raise ImageBuildError(
            f"{err}; 'apt-cache search --names-only ^linux-image-' lists the kernel packages APT knows"
        ) from err
    kernel = _kernel_image_package(kernel_package, top[kernel_package])
    closure = subprocess.run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *(closure_of for _, closure_of in TOOLS),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    libs = [ln for ln in closure.stdout.splitlines() if ln and not ln[0].isspace() and not ln.startswith("<")]
    roots = [closure_of for _, closure_of in TOOLS]
    if closure.returncode != 0 or not set(roots) <= set(libs):
        raise ImageBuildError(f"apt-cache depends {' '.join(roots)} failed:\n{closure.stderr.strip()}")
    names = sorted({kernel, BUSYBOX, IPERF, *libs})
    stanzas = apt.show(names, progress)
    return [apt.package_of(stanzas[n]) for n in names]


def resolution_record(cache_dir: Path, kernel_package: str = KERNEL_META) -> Path:
    """Where the resolution for ``kernel_package`` is kept (one file per kernel package)."""
    if kernel_package == KERNEL_META:
        return cache_dir / "resolved.json"
    return cache_dir / f"resolved-{kernel_package}.json"


def resolve(cache_dir: Path, progress: Progress, kernel_package: str = KERNEL_META) -> list[Package]:
    """The packages (candidate versions) of the image; cached until APT's package lists change."""
    record = resolution_record(cache_dir, kernel_package)
    fingerprint = _lists_fingerprint(kernel_package)
    try:
        saved = json.loads(record.read_text())
        if saved["fingerprint"] == fingerprint:
            return [Package(**p) for p in saved["packages"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    progress(f"resolving package versions with apt-cache (kernel from {kernel_package})")
    packages = _resolve_fresh(progress, kernel_package)
    doc = {"fingerprint": _lists_fingerprint(kernel_package), "packages": [vars(p) for p in packages]}
    tmp = record.with_name(f".{record.stem}.{os.getpid()}.json")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(record)
    return packages


def _load_image(directory: Path) -> GuestImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = directory / "vmlinuz", directory / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return GuestImage(kernel=kernel, initrd=initrd, manifest=manifest)


def build_image(
    cache_dir: Path | None = None,
    *,
    progress: Progress = print,
    force: bool = False,
    init_script: Path = INIT_SCRIPT,
    kernel_package: str | None = None,
) -> GuestImage:
    """Return the guest image for the current packages and builder, building it if it is not cached.

    ``force`` rebuilds even when an image with the same key exists (replacing it atomically);
    ``init_script`` swaps in another ``/init`` (it is part of the key, so it gets its own image);
    ``kernel_package`` builds for another Debian kernel package than the cloud kernel, with that
    kernel's own modules (``linux-image-amd64`` is Debian's generic kernel).
    """
    started = time.monotonic()
    kernel_package = check_kernel_package(kernel_package)
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = resolve(cache_dir, progress, kernel_package)
    inputs = builder_inputs(init_script)
    key = image_key(packages, inputs, kernel_package)
    final = cache_dir / key
    existing = _load_image(final)
    if existing is not None and not force:
        progress(f"guest image {key[:12]} ({kernel_package}) is up to date ({final}); nothing to do")
        return existing

    progress(f"building guest image {key[:12]} for {kernel_package} in {final}")
    progress(f"[1/5] packages ({len(packages)})")
    debs = apt.download(packages, cache_dir / "debs", progress)
    staging = Path(os.fspath(cache_dir / f".build-{key[:12]}-{os.getpid()}"))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        root, out = staging / "root", staging / "out"
        root.mkdir(parents=True)
        out.mkdir()
        progress("[2/5] unpacking")
        for p in packages:
            if p.size > 8 << 20:  # a kernel package: seconds of work, so say so
                progress(f"  {p.name} ({p.size / 1e6:.0f} MB)")
            apt.extract(debs[p.name], root)
        progress("[3/5] kernel and modules")
        kernel_version, modules = _kernel(root, out, kernel_package)
        progress(f"  kernel {kernel_version}; modules: {' '.join(name for name, _ in modules)}")
        progress("[4/5] initramfs")
        entries, libs = _initramfs_entries(root, kernel_version, modules, init_script)
        progress(f"  iperf3 and sockperf libraries: {' '.join(libs)}")
        with (out / "initrd.img").open("wb") as f:
            size = cpio.write_archive(f, entries)
        progress(f"  {len(entries)} entries, {size / 1e6:.1f} MB")
        progress("[5/5] manifest")
        manifest = {
            "key": key,
            "format": FORMAT,
            "kernel_package": kernel_package,
            "kernel_version": kernel_version,
            "packages": [vars(p) for p in packages],
            "inputs": inputs,
            "modules": [name for name, _ in modules],
            "libraries": libs,
            "files": {
                name: {"sha256": apt.sha256_file(out / name), "size": (out / name).stat().st_size}
                for name in ("vmlinuz", "initrd.img")
            },
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 2),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(out, final, staging, replace=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    image = _load_image(final)
    if image is None:
        raise ImageBuildError(f"image vanished from {final} right after it was built")
    progress(f"guest image {key[:12]} built in {time.monotonic() - started:.1f} s")
    return image


def _publish(out: Path, final: Path, staging: Path, *, replace: bool) -> None:
    """Move the finished image into place in one rename.

    An image already there under the same key is as good as ours (a concurrent build won the race)
    and someone may be using its paths, so it is kept unless ``replace`` (``--force``) asks otherwise.
    """
    if final.exists():
        if not replace and _load_image(final) is not None:
            return
        final.rename(staging / "old")  # removed with the staging directory
    try:
        out.rename(final)
    except OSError:
        # A concurrent build of the same key won the race; its image is as good as ours.
        if _load_image(final) is None:
            raise


def _kernel(root: Path, out: Path, kernel_package: str) -> tuple[str, list[tuple[str, Path]]]:
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise ImageBuildError(
            f"expected one kernel (boot/vmlinuz-*) from {kernel_package}, found {len(vmlinuz)}: "
            "name a kernel image package such as linux-image-amd64"
        )
    version = vmlinuz[0].name.removeprefix("vmlinuz-")
    shutil.copyfile(vmlinuz[0], out / "vmlinuz")
    modules = kmod.load_order(kmod.WANTED_MODULES, kmod.run_depmod(root, version))
    return version, modules


def _needed_libraries(root: Path, binary: Path) -> dict[str, Path]:
    """Soname -> file inside ``root`` for every library ``binary`` loads (the dynamic loader's view)."""
    lib_dirs = [root / MULTIARCH, root / "usr" / MULTIARCH]
    loader = root / MULTIARCH / PurePosixPath(LOADER).name
    done = subprocess.run(
        [str(loader), "--library-path", ":".join(map(str, lib_dirs)), "--list", str(binary)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ImageBuildError(f"cannot list the libraries of {binary.name}:\n{done.stderr.strip()}")
    found: dict[str, Path] = {}
    for line in done.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if not m:
            continue
        soname, path = m.group(1), Path(m.group(2))
        if "/" in soname:
            continue  # the loader itself, listed under its absolute path; installed separately
        if not path.resolve().is_relative_to(root.resolve()):
            # Found on the build machine, not in the packages: the guest would lack it.
            raise ImageBuildError(f"{binary.name} needs {soname}, which no package of the image provides")
        found[soname] = path
    for soname in EXTRA_LIBS:
        hits = [d / soname for d in lib_dirs if (d / soname).exists()]
        if hits:
            found[soname] = hits[0]
    return found


def _busybox_applets(busybox: Path) -> list[str]:
    done = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageBuildError(f"busybox --list-full failed:\n{done.stderr.strip()}")
    return sorted(line.strip() for line in done.stdout.splitlines() if line.strip())


def _initramfs_entries(
    root: Path, kernel_version: str, modules: list[tuple[str, Path]], init_script: Path
) -> tuple[list[cpio.Entry], list[str]]:
    entries: dict[str, cpio.Entry] = {}

    def add(entry: cpio.Entry) -> None:
        parts = PurePosixPath(entry.path).parts
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, cpio.directory(parent))
        entries[entry.path] = entry

    for d in ("proc", "sys", "dev", "tmp", "run", "etc", "root", "usr/sbin"):
        add(cpio.directory(d, 0o1777 if d == "tmp" else 0o755))
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    add(cpio.char_device("dev/console", 5, 1))
    add(cpio.char_device("dev/null", 1, 3, 0o666))
    add(cpio.regular("init", init_script.read_bytes(), 0o755))
    add(cpio.regular("etc/hostname", b"nicsim-guest\n"))

    busybox = root / "bin" / "busybox"
    add(cpio.regular("bin/busybox", busybox.read_bytes(), 0o755))
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            add(cpio.symlink(applet, "/bin/busybox"))

    mod_dir = f"lib/modules/{kernel_version}"
    order = []
    for name, path in modules:
        target = f"{mod_dir}/{name}.ko"
        add(cpio.regular(target, kmod.module_bytes(path)))
        order.append(f"/{target}\n")
    add(cpio.regular("lib/nicsim/modules.order", "".join(order).encode()))

    libs: dict[str, Path] = {}
    for tool, _ in TOOLS:
        add(cpio.regular(tool, (root / tool).read_bytes(), 0o755))
        libs.update(_needed_libraries(root, root / tool))
    for soname, path in sorted(libs.items()):
        add(cpio.regular(f"{MULTIARCH}/{soname}", path.resolve().read_bytes(), 0o755))
    loader_name = PurePosixPath(LOADER).name
    add(cpio.regular(f"{MULTIARCH}/{loader_name}", (root / MULTIARCH / loader_name).read_bytes(), 0o755))
    add(cpio.symlink(LOADER, f"/{MULTIARCH}/{loader_name}"))
    return list(entries.values()), sorted(libs)
