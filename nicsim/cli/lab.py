"""``nicsim lab``: guests, switches, impaired links, captures and checks from one topology file.

``run FILE`` boots the lab, runs every guest's workloads and the checks' own, evaluates the checks,
prints a table (and ``--json``), stops everything and exits 0 only if every check passed. ``check
FILE`` reads the file and says what would run, without running it. ``schema`` prints the JSON Schema
of topology files, for editors. The file's format is in :mod:`nicsim.lab.fields` (and the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "lab",
        help="run a lab of guests on switches from a topology file, and check what it does",
        description="Guests on nicsim switches, links with impairments, captures and checks, from a TOML "
        "topology file. 'nicsim lab run FILE' exits 0 only if every check passed.",
        epilog="a topology file:\n\n" + textwrap.indent(EXAMPLE, "  ") + "\nexit codes: 0 every check "
        "passed; 1 a check failed or the lab could not run; 2 the file or the options are wrong",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="boot the lab, run it, check it, tear it down")
    run.add_argument("file", type=Path, metavar="FILE", help="the topology file (TOML)")
    run.add_argument(
        "--json",
        metavar="FILE",
        help="also write the results as JSON to FILE ('-': stdout, and the table goes to stderr)",
    )
    run.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="where sockets, logs and consoles go (default: a directory named after the lab "
        "under the temporary directory, emptied first)",
    )
    check = sub.add_parser("check", help="read a topology file and say what would run, without running it")
    check.add_argument("file", type=Path, metavar="FILE")
    for p_ in (run, check):
        p_.add_argument(
            "--name",
            metavar="NAME",
            help="run the lab under this name instead of the file's (the same file twice at once)",
        )
    sub.add_parser("schema", help="print the JSON Schema of topology files (for editors)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.lab_command == "schema":
        from nicsim.lab.schema import schema

        print(json.dumps(schema(), indent=2))
        return 0
    from nicsim.lab import plan as planning
    from nicsim.lab import topology

    try:
        top = topology.load(args.file)
        if args.name is not None:
            top = topology.renamed(top, args.name)
        where = getattr(args, "dir", None)
        run_dir = (where or Path(tempfile.gettempdir()) / f"nicsim-lab-{top.name}").resolve()
        lab = planning.plan(top, run_dir)
    except TopologyError as err:
        print(f"nicsim lab: {err}", file=sys.stderr)
        return 2
    if args.lab_command == "check":
        return _describe(lab)
    return _run(lab, args)


def _describe(lab: Any) -> int:
    from nicsim.lab.report import render_guests

    top = lab.topology
    print(f"lab {top.name}: {len(top.switches)} switches, {len(top.guests)} guests, {len(top.checks)} checks")
    print(render_guests(lab))
    for g in lab.guests.values():
        print(f"{g.name} runs: " + "; ".join(w.render() for w in g.workloads[: g.expect]))
    for sw in lab.switches.values():
        print(f"switch {sw.name}: " + " ".join(sw.argv[1:]))
    return 0


def _run(lab: Any, args: argparse.Namespace) -> int:
    from nicsim.lab.report import render_table, to_json
    from nicsim.lab.run import run_lab

    owner = _running(lab.run_dir)
    if owner is not None:
        print(
            f"nicsim lab: lab {lab.topology.name} is running (pid {owner}) in {lab.run_dir}: wait for it, or "
            "run this one under another --name",
            file=sys.stderr,
        )
        return 1
    if lab.run_dir.exists():
        shutil.rmtree(lab.run_dir)
    lab.run_dir.mkdir(parents=True)
    (lab.run_dir / "lab.pid").write_text(f"{os.getpid()}\n")
    image = None
    if any(g.spec.kernel is None for g in lab.guests.values()):
        from images.build import build_image

        image = build_image(progress=lambda line: print(f"nicsim lab: image: {line}", file=sys.stderr))
    report = asyncio.run(run_lab(lab, image=image))
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


def _running(run_dir: Path) -> int | None:
    """The pid of a live ``nicsim lab`` that owns ``run_dir``, if there is one."""
    try:
        pid = int((run_dir / "lab.pid").read_text())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    return pid
