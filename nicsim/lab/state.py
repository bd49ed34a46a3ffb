"""Where a lab that stays up (``nicsim lab up``) says what it is: ``state.json`` in its directory.

The lab's own process writes it (atomically: a reader never sees half a file) as it comes up and goes
down; ``nicsim lab status``, ``console`` and ``down`` read it to find the lab's processes (by pid),
sockets and consoles. A lab is found by its name: its directory is ``nicsim-lab-NAME`` under the
temporary directory, unless ``--dir`` put it elsewhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
PREFIX = "nicsim-lab-"


def default_dir(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{PREFIX}{name}"


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(run_dir / STATE_FILE)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def known_labs() -> Iterator[Path]:
    """The directories of labs under the temporary directory that have a state file."""
    for d in sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}*")):
        if (d / STATE_FILE).is_file():
            yield d


def console_socket(run_dir: Path, guest: str) -> Path:
    return run_dir / f"console-{guest}.sock"
