"""The ``nicsim`` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module (``nicsim/cmd_<name>.py``) exposing ``add_parser(subparsers)``
and ``run(args) -> int``; this module only wires them together, so a subcommand's imports (QEMU
harness, asyncio server, benchmark) are paid only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> module; kept as strings so `nicsim --help` imports nothing heavy.
SUBCOMMANDS: dict[str, str] = {
    "vm": "nicsim.cli.vm",
    "serve": "nicsim.cli.serve",
    "bench": "nicsim.cli.bench",
    "image": "nicsim.cli.image",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nicsim",
        description="A user-space NIC for QEMU guests: boot a test VM on a Python vhost-user "
        "virtio-net backend and measure its network throughput.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # subcommand not built yet
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command])
    try:
        return int(module.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
