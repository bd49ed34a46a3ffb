"""Debian packages for the guest image: resolve versions, download into a cache, verify, unpack.

This module owns every call to ``apt-cache``, ``apt-get`` and ``dpkg-deb``. Resolution asks APT for
the candidate version of each package in one ``apt-cache show`` call per dependency level (so a warm
build costs a few short subprocesses, not one per file); the result pins name, version, architecture
and SHA-256, which is what makes the image content-addressed. Downloads land in a shared ``debs/``
cache, are checked against APT's SHA-256 and are reused while that hash still matches.
When APT knows nothing of a package (package lists never fetched, or stale so the pool file is gone),
it runs ``apt-get update`` once if it can, or says which command to run if it cannot.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

Progress = Callable[[str], None]


class ImageBuildError(Exception):
    """The guest image could not be built; the message says why and, where possible, what to do."""


@dataclass(frozen=True, kw_only=True, order=True)
class Package:
    name: str
    version: str
    arch: str
    sha256: str
    size: int

    @property
    def deb_name(self) -> str:
        # apt-get download's file naming: the epoch colon is URL-encoded.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, env=_c_locale())
    except FileNotFoundError as err:
        raise ImageBuildError(
            f"{cmd[0]} not found: the image is built from Debian packages with APT"
        ) from err


def _c_locale() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}


def _apt_update(progress: Progress, why: str) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"{why}; refresh APT's package lists with: sudo apt-get update (then build again)"
        )
    progress(f"{why}: running apt-get update")
    done = _run(["apt-get", "update", "-q"])
    if done.returncode != 0:
        raise ImageBuildError(f"apt-get update failed:\n{done.stderr.strip()}")


def _parse_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            stanzas.append(fields)
    return stanzas


def depends_of(stanza: dict[str, str]) -> list[str]:
    """Package names a stanza depends on (first alternative of each ``|`` group, versions dropped)."""
    names: list[str] = []
    for field in ("Pre-Depends", "Depends"):
        for group in filter(None, (g.strip() for g in stanza.get(field, "").split(","))):
            first = group.split("|")[0].strip()
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def show(names: Iterable[str], progress: Progress) -> dict[str, dict[str, str]]:
    """The candidate stanza of each package, in one ``apt-cache show`` call (after an update if needed)."""
    wanted = sorted(set(names))
    for attempt in range(2):
        done = _run(["apt-cache", "show", "--no-all-versions", *wanted])
        stanzas = {s["Package"]: s for s in _parse_stanzas(done.stdout)}
        missing = [n for n in wanted if n not in stanzas]
        if not missing:
            return stanzas
        why = f"APT knows no candidate for {', '.join(missing)}"
        if attempt == 0:
            _apt_update(progress, why)
    raise ImageBuildError(f"{why} even after apt-get update; is this Debian 12 (bookworm) on amd64?")


def package_of(stanza: dict[str, str]) -> Package:
    return Package(
        name=stanza["Package"],
        version=stanza["Version"],
        arch=stanza["Architecture"],
        sha256=stanza["SHA256"],
        size=int(stanza.get("Size", "0")),
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(packages: list[Package], deb_dir: Path, progress: Progress) -> dict[str, Path]:
    """Make sure each package's .deb is in ``deb_dir`` with the expected SHA-256; return name -> path."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    paths = {p.name: deb_dir / p.deb_name for p in packages}
    todo = [p for p in packages if not paths[p.name].exists()]
    for p in packages:
        state = "downloading" if p in todo else "cached"
        progress(f"  {p.name} {p.version} ({p.size / 1024:,.0f} KiB, {state})")
    if todo:
        specs = [f"{p.name}={p.version}" for p in todo]
        # As root, apt drops privileges to _apt, which usually cannot write into a cache dir we own.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        cmd = ["apt-get", "download", "-q", *sandbox, *specs]
        for attempt in range(2):
            done = subprocess.run(
                cmd, cwd=deb_dir, capture_output=True, text=True, check=False, env=_c_locale()
            )
            if done.returncode == 0:
                break
            if attempt == 0 and ("404" in done.stderr or "Unable to locate" in done.stderr):
                _apt_update(progress, "package download failed (package lists out of date)")
                continue
            raise ImageBuildError(f"apt-get download failed:\n{done.stderr.strip()}")
    for p in packages:
        path = paths[p.name]
        if not path.exists():
            raise ImageBuildError(f"apt-get download did not produce {path.name}")
        if sha256_file(path) != p.sha256:
            # A truncated or foreign file: never build from it, and do not keep it for next time.
            path.unlink()
            raise ImageBuildError(f"{path.name}: SHA-256 does not match APT's; removed it, build again")
    return paths


def extract(deb: Path, dest: Path) -> None:
    done = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if done.returncode != 0:
        raise ImageBuildError(f"dpkg-deb -x {deb.name} failed:\n{done.stderr.strip()}")
