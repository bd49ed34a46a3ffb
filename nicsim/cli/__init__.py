"""The ``nicsim`` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module (``nicsim/cli/<name>.py``) exposing ``add_parser(subparsers)``
and ``run(args) -> int``; this module only wires them together, so a subcommand's imports (QEMU
harness, asyncio server, benchmark) are paid only when that subcommand runs. It also owns the
conventions every subcommand shares: ``--version``, ``-v`` / ``--log-level``, and the exit codes
(0 success, 1 a failure the run found or an expected error, 2 a usage error, 130 interrupted). An
expected failure (:mod:`nicsim.cli.failures`) prints one line saying what to do, never a traceback;
``-v`` adds the traceback for a bug report.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from nicsim import __version__
from nicsim.interrupts import Terminated, terminated

# name -> module; kept as strings so `nicsim --help` imports nothing heavy.
SUBCOMMANDS: dict[str, str] = {
    "vm": "nicsim.cli.vm",
    "serve": "nicsim.cli.serve",
    "bench": "nicsim.cli.bench",
    "image": "nicsim.cli.image",
    "lab": "nicsim.cli.lab",
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v`` / ``--log-level``, accepted before or after the subcommand (the subcommand's copy does not
    reset what was given before it)."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
        help="more output: the guest's console, info messages; -vv debug messages and tracebacks",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.lower, default=default, metavar="LEVEL",
        help=f"log messages at LEVEL and above: {', '.join(LOG_LEVELS)} (default: warning; info for serve)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nicsim",
        description="A user-space NIC for QEMU guests: boot a test VM on a Python vhost-user "
        "virtio-net backend and measure its network throughput.",
        epilog="exit codes: 0 success; 1 a workload, check or run failed, or an expected error; "
        "2 bad usage; 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"nicsim {__version__}")
    add_logging_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        module = importlib.import_module(module_name)
        sub = module.add_parser(subparsers)
        add_logging_options(sub, top=False)
    return parser


def log_level(args: argparse.Namespace, default: int) -> int:
    if args.log_level is not None:
        return int(getattr(logging, args.log_level.upper()))
    if args.verbose >= 2:
        return logging.DEBUG
    return logging.INFO if args.verbose == 1 else default


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command])
    level = log_level(args, getattr(module, "DEFAULT_LOG_LEVEL", logging.WARNING))
    logging.basicConfig(level=level, format=f"nicsim {args.command}: %(message)s")
    from nicsim.cli.failures import explain

    # SIGTERM (a script's timeout, `kill PID`) unwinds like Ctrl-C, so a bench, a VM or a lab cleans
    # up its guests, servers and namespaces on the way out instead of leaving them running; `serve`
    # installs its own handler for a clean shutdown.
    in_main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, terminated) if in_main else None
    try:
        return int(module.run(args))
    except KeyboardInterrupt as exc:
        by_sigterm = isinstance(exc, Terminated)
        print("terminated" if by_sigterm else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if by_sigterm else signal.SIGINT)
    except Exception as err:
        line = explain(err)
        if line is None:
            raise  # not an expected failure: a bug, and its traceback is what a report needs
        print(f"nicsim {args.command}: {line}", file=sys.stderr)
        if args.verbose >= 2:
            logging.exception("the failure in full")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
