"""The package layout keeps its promises: ``qemu`` stays a namespace shared with ``qemu.qmp``."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_qemu_qmp_and_our_qemu_subpackage_import_together() -> None:
    # A fresh interpreter, so no import done by another test can hide a shadowing __init__.py.
    code = "import qemu.qmp, qemu.testvm; print(qemu.qmp.QMPClient.__name__, qemu.testvm.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["QMPClient", "qemu.testvm"]


def test_qemu_folder_has_no_init_py() -> None:
    assert not (ROOT / "qemu" / "__init__.py").exists()


def test_cli_help_lists_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nicsim", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "usage: nicsim" in out.stdout
