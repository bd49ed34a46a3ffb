"""The guest image's command line, shared by ``python -m images`` and ``nicsim image``.

This module owns the ``build`` subcommand's options and its output: progress lines while it works,
then the kernel and initramfs paths (or, with ``--json``, one JSON object a script can read).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from images.apt import ImageBuildError
from images.build import build_image, default_cache_dir

BUILD_HELP = "build the guest kernel + initramfs from Debian packages (cached; a no-op when up to date)"
BUILD_DESCRIPTION = """\
Build the nicsim test guest: the Debian cloud kernel, its virtio-net and pktgen modules, busybox,
iperf3 with its libraries and nicsim's /init, all taken from Debian packages through APT
(apt-get download, dpkg-deb -x). The result lands in CACHE/<key>/ as vmlinuz, initrd.img and
manifest.json, where <key> hashes the package versions and the builder's own files: building again
with the same inputs does nothing and says so. Needs apt-get, apt-cache and dpkg-deb; runs
apt-get update once when APT's package lists are missing or stale (as root; otherwise it tells you).

--kernel-package builds the same guest for another Debian kernel package, with that kernel's own
modules: --kernel-package linux-image-amd64 is Debian's generic kernel. Each kernel package gets
its own image in the cache; boot it with 'nicsim vm --kernel-package PKG' or with the printed
kernel and initrd paths ('nicsim vm --kernel K --initrd I', TestVM(kernel=K, initrd=I)).
"""


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        default=None,
        help=f"image cache directory (default: $NICSIM_CACHE/images or {default_cache_dir()})",
    )
    parser.add_argument(
        "--kernel-package",
        metavar="PKG",
        default=None,
        help="build for this Debian kernel package instead of the cloud kernel, with its own modules, "
        "e.g. linux-image-amd64 (the generic kernel); cached separately",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the result")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run_build(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        # Progress goes to stderr so that stdout carries only the result.
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        image = build_image(
            args.cache, progress=progress, force=args.force, kernel_package=args.kernel_package
        )
    except ImageBuildError as err:
        # One line that says what failed; the tool's own output (apt's, depmod's) only when asked for.
        first, _, rest = str(err).partition("\n")
        verbose: bool = bool(getattr(args, "verbose", False))
        if rest.strip() and not verbose:
            first += " (-v shows the failing command's output)"
        print(f"error: {first}", file=sys.stderr)
        if rest.strip() and verbose:
            print(rest.strip(), file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "key": image.key,
                    "kernel_package": image.manifest.get("kernel_package"),
                    "kernel_version": image.manifest.get("kernel_version"),
                    "kernel": str(image.kernel),
                    "initrd": str(image.initrd),
                    "manifest": str(image.kernel.parent / "manifest.json"),
                }
            )
        )
    else:
        print(f"kernel: {image.kernel}\ninitrd: {image.initrd}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m images", description="The nicsim guest image (kernel + initramfs)."
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    build = sub.add_parser(
        "build",
        help=BUILD_HELP,
        description=BUILD_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_build_arguments(build)
    build.add_argument("-v", "--verbose", action="count", default=0, help="on failure, the command's output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action != "build":
        parser.print_help()
        return 2
    return run_build(args)
