"""The user suite in examples/ passes under ``pytest -n 2``, and its deliberately broken variant fails.

Both run as a user runs them: a pytest of their own in examples/ (its own pytest.ini, so nothing of
this repository's configuration), the plugin coming from nicsim. ``-p nicsim.pytest_plugin`` is
the installed entry point's own name, so it changes nothing where nicsim is installed and loads the
plugin from a checkout that is not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_examples(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest", "-p", "nicsim.pytest_plugin", "-n", "2", "-p", "no:cacheprovider",
            *args]  # fmt: skip
    return subprocess.run(argv, cwd=EXAMPLES, capture_output=True, text=True, timeout=600, check=False)


def test_the_example_suite_passes_on_two_workers(guest_image: object) -> None:
    done = run_examples(".")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 workers [3 items]" in done.stdout, done.stdout
    assert "3 passed" in done.stdout, done.stdout


def test_its_broken_variant_fails_and_the_report_points_to_the_capture_and_consoles(
    guest_image: object,
) -> None:
    done = run_examples("broken_lossy_link.py")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout and "wrong on purpose" in done.stdout, done.stdout
    for artifact in ("capture.pcapng", "console of a:", "console of b:"):
        assert artifact in done.stdout, done.stdout
