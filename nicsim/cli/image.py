"""``nicsim image build``: a thin wrapper over the guest image builder (``images.cli``)."""

from __future__ import annotations

import argparse
from typing import Any

from images.cli import BUILD_DESCRIPTION, BUILD_HELP, add_build_arguments, run_build
from nicsim.cli import add_logging_options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "image", help="the guest image (kernel + initramfs)", description="The nicsim guest image."
    )
    actions = parser.add_subparsers(dest="image_action", metavar="ACTION")
    build = actions.add_parser(
        "build",
        help=BUILD_HELP,
        description=BUILD_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_build_arguments(build)
    add_logging_options(build, top=False)
    parser.set_defaults(image_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.image_action != "build":
        args.image_parser.print_help()
        return 2
    return run_build(args)
