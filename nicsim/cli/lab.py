"""``nicsim lab``: guests, switches, impaired links, captures and checks from one topology file.

``run FILE`` boots the lab, runs every guest's workloads and the checks' own, evaluates the checks,
prints a table (and ``--json``), stops everything and exits 0 only if every check passed. ``up FILE``
leaves the lab running (its own process, in its own session); ``console NAME`` attaches to a guest's
console, ``status`` lists the labs that are up, and ``down`` stops one and removes what it made.
``check FILE`` reads the file and says what would run; ``schema`` prints the JSON Schema of topology
files, for editors. The file's format is in :mod:`nicsim.lab.fields` (and the README); the lab's
life outside one command is in :mod:`nicsim.lab.control`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from nicsim.lab.topology import TopologyError

EXAMPLE = textwrap.dedent("""\
    name = "demo"

    [switches.lan]
    capture = "lan.pcapng"

    [guests.h1]
    switch = "lan"

    [guests.h2]
    switch = "lan"

    [[links]]
    guest = "h2"
    rx = "loss=10% seed=1"

    [[checks]]
    kind = "ping"
    from = "h1"
    to = "h2"
    count = 20
    max_loss_pct = 30
""")
DIR_HELP = (
    "the lab's directory: sockets, logs, consoles, captures (default: nicsim-lab-NAME in the temporary "
    "directory)"
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "lab",
        help="run a lab of guests on switches from a topology file, and check what it does",
        description="Guests on nicsim switches, links with impairments, captures and checks, from a TOML "
        "topology file. 'nicsim lab run FILE' exits 0 only if every check passed.",
        epilog="a topology file:\n\n" + textwrap.indent(EXAMPLE, "  ") + "\nexamples:\n"
        "  nicsim lab run lab.toml --json result.json\n"
        "  nicsim lab up lab.toml; nicsim lab console h1 --lab demo; nicsim lab down demo\n\n"
        "exit codes: 0 every check passed; 1 a check failed or the lab could not run; "
        "2 the file or the options are wrong",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="boot the lab, run it, check it, tear it down")
    up = sub.add_parser("up", help="boot the lab and leave it running (nicsim lab down stops it)")
    check = sub.add_parser("check", help="read a topology file and say what would run, without running it")
    supervise = sub.add_parser("_supervise")  # what `up` starts: the process that keeps the lab up
    for q in (run, up, check, supervise):
        q.add_argument("file", type=Path, metavar="FILE", help="the topology file (TOML)")
        q.add_argument(
            "--name",
            metavar="NAME",
            help="the lab's name instead of the file's (the same file twice at once)",
        )
        q.add_argument("--dir", type=Path, metavar="DIR", help=DIR_HELP)
    run.add_argument(
        "--json",
        metavar="FILE",
        help="also write the results as JSON to FILE ('-': stdout; the table goes to stderr)",
    )
    console = sub.add_parser(
        "console", help="attach to a guest's console in a lab that is up (Ctrl-] detaches)"
    )
    console.add_argument("guest", metavar="GUEST")
    console.add_argument("--lab", metavar="NAME", help="the lab (default: the only one that is up)")
    console.add_argument("--dir", type=Path, metavar="DIR", help=DIR_HELP)
    console.add_argument(
        "--for",
        dest="seconds",
        type=float,
        default=2.0,
        metavar="S",
        help="without a terminal: send standard input, show the output for S more seconds, detach "
        "(default 2)",
    )
    status = sub.add_parser("status", help="the labs that are up, their guests and processes")
    status.add_argument("name", nargs="?", metavar="NAME")
    status.add_argument("--dir", type=Path, metavar="DIR", help=DIR_HELP)
    status.add_argument("--json", action="store_true", help="as JSON")
    down = sub.add_parser("down", help="stop a lab that is up: every process it started, its sockets")
    down.add_argument("name", nargs="?", metavar="NAME", help="the lab (default: the only one that is up)")
    down.add_argument("--dir", type=Path, metavar="DIR", help=DIR_HELP)
    sub.add_parser("schema", help="print the JSON Schema of topology files (for editors)")
    return p


def run(args: argparse.Namespace) -> int:
    cmd = args.lab_command
    if cmd == "schema":
        from nicsim.lab.schema import schema

        print(json.dumps(schema(), indent=2))
        return 0
    from nicsim.lab import control

    if cmd == "status":
        return control.status(args.name, args.dir, as_json=args.json)
    if cmd == "down":
        return control.down(args.name, args.dir)
    if cmd == "console":
        return control.console(args.guest, args.lab, args.dir, seconds=args.seconds)
    try:
        lab = control.load_plan(args.file, args.name, args.dir, interactive=cmd in ("up", "_supervise"))
    except TopologyError as err:
        print(f"nicsim lab: {err}", file=sys.stderr)
        return 2
    if cmd == "check":
        return _describe(lab)
    if cmd == "up":
        return control.up(lab, args.file, args.name)
    if cmd == "_supervise":
        from nicsim.lab.supervise import supervise

        return asyncio.run(supervise(lab, image=control.image_for(lab, quiet=True)))
    return _run(lab, args)


def _describe(lab: Any) -> int:
    from nicsim.lab.report import render_guests

    top = lab.topology
    print(f"lab {top.name}: {len(top.switches)} switches, {len(top.guests)} guests, {len(top.checks)} checks")
    print(render_guests(lab))
    for g in lab.guests.values():
        if g.spec.forward or g.routes:
            routes = ", ".join(f"{r.to} via {r.via}" for r in g.routes) or "none"
            print(f"{g.name} {'forwards IPv4; ' if g.spec.forward else ''}routes: {routes}")
        print(f"{g.name} runs: " + "; ".join(w.render() for w in g.workloads[: g.expect]))
    for sw in lab.switches.values():
        print(f"switch {sw.name}: " + " ".join(sw.argv[1:]))
    return 0


def _run(lab: Any, args: argparse.Namespace) -> int:
    from nicsim.lab import control
    from nicsim.lab.report import render_table, to_json
    from nicsim.lab.run import run_lab

    refused = control.claim(lab)
    if refused:
        print(f"nicsim lab: {refused}", file=sys.stderr)
        return 1
    report = asyncio.run(run_lab(lab, image=control.image_for(lab)))
    doc = to_json(report)
    table = render_table(report)
    if args.json == "-":
        print(table, file=sys.stderr)
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if report.passed else 1
