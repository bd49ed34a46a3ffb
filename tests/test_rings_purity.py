"""rings/ does no I/O: no module in it imports asyncio, socket, os or mmap (protocol logic does no
I/O; only the asyncio shell touches sockets and fds)."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"asyncio", "socket", "os", "mmap"}


def imported_top_level_names(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.add("__import__")  # a dynamic import would dodge this check: refuse it too
    return names


def test_rings_sources_import_no_io_modules() -> None:
    modules = sorted((ROOT / "rings").glob("*.py"))
    assert len(modules) >= 5
    offenders = {
        p.name: sorted(imported_top_level_names(p) & (FORBIDDEN | {"__import__", "importlib"}))
        for p in modules
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_rings_pulls_in_no_io_module() -> None:
    # A fresh interpreter: note what the interpreter and numpy load by themselves (numpy itself
    # imports os, which is why the AST check above exists too), then import every rings module and
    # check that none of the forbidden modules appeared because of rings.
    names = sorted(p.stem for p in (ROOT / "rings").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys, numpy, numpy.typing\n"
        "before = set(sys.modules)\n"
        "import rings\n"
        + "".join(f"import rings.{n}\n" for n in names)
        + f"new = (set(sys.modules) - before) & set({sorted(FORBIDDEN)!r})\n"
        "print(sorted(new))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_checker_catches_a_forbidden_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os.path\nfrom asyncio import sleep\nimport numpy as np\n")
    assert imported_top_level_names(bad) & FORBIDDEN == {"os", "asyncio"}


def rings_imports(path: pathlib.Path) -> set[str]:
    """The rings modules ``path`` imports, wherever the import stands (a TYPE_CHECKING block too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rings."):
            names.add((node.module or "").split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("rings."))
    return names


def test_rings_modules_import_each_other_without_a_cycle() -> None:
    graph = {p.stem: rings_imports(p) for p in (ROOT / "rings").glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for dep in sorted(graph.get(module, ())):
                visit(dep, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
