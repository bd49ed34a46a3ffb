"""The layers import downward only, and no module imports itself back through others.

Every import statement of every module is read from its source (the AST, so imports inside functions and
under ``TYPE_CHECKING`` count as much as top-level ones): a layer may import its own layer and those
below it, never one above; ``qemu.testvm`` and ``images`` stand alone; and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rings", "nicsim", "qemu/testvm", "images")

# Bottom to top. A module belongs to the longest prefix listed; the root package modules of nicsim
# (``nicsim``, ``nicsim.errors``) are the base every nicsim layer may use.
LAYERS = (
    ("rings",),
    ("nicsim", "nicsim.errors", "nicsim.__main__"),
    ("nicsim.virtio",),
    ("nicsim.ports",),
    ("nicsim.vhost",),
    ("nicsim.server", "nicsim.frontend"),
    ("nicsim.bench", "nicsim.lab"),
    ("nicsim.cli",),
    ("nicsim.testing", "nicsim.pytest_plugin"),
)
STANDALONE = ("qemu.testvm", "images")
# Who may use a standalone package, besides itself.
USERS = ("nicsim.bench", "nicsim.lab", "nicsim.cli", "nicsim.testing", "nicsim.pytest_plugin")
STANDALONE_USERS = {"qemu.testvm": USERS, "images": USERS}
# nicsim.__main__ only runs the CLI; it is the program's entry, not a layer's module.
ENTRY_POINTS = {"nicsim.__main__": ("nicsim.cli",)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ours(name: str) -> bool:
    return name.split(".")[0] in ("rings", "nicsim", "images") or name.startswith("qemu.testvm")


def imports_of(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {f for f in found if ours(f)}


def all_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def layer_of(name: str) -> int | str:
    for standalone in STANDALONE:
        if name == standalone or name.startswith(standalone + "."):
            return standalone
    best: tuple[int, int] | None = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS"
    return best[0]


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module an import names (``from pkg import name`` may name a module or an attribute)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {resolve(t, modules) for t in imports_of(path, name)}
        edges[name] = {t for t in targets if t is not None and t != name}
    return edges


def test_every_import_points_down_or_sideways() -> None:
    upward = []
    for source, targets in graph().items():
        src = layer_of(source)
        for target in targets:
            dst = layer_of(target)
            if source in ENTRY_POINTS and any(target.startswith(p) for p in ENTRY_POINTS[source]):
                continue
            if isinstance(dst, str):  # a standalone package: only itself and its listed users
                if src != dst and not any(source.startswith(u) for u in STANDALONE_USERS[dst]):
                    upward.append(f"{source} -> {target}")
            elif isinstance(src, str) or dst > src:
                upward.append(f"{source} -> {target}")
    assert upward == []


def test_no_module_imports_itself_back() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # A package's __init__ re-exporting its own submodules is not a cycle through other code.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_checker_sees_lazy_and_relative_imports_and_ranks_the_layers(tmp_path: Path) -> None:
    # The two tests above can fail: imports inside functions and relative ones are read, layers ordered.
    init = tmp_path / "__init__.py"
    init.write_text("def f() -> None:\n    from .session import Server\n    import rings.pool\n")
    assert imports_of(init, "nicsim.server") >= {"nicsim.server.session", "rings.pool"}
    assert layer_of("rings.pool") < layer_of("nicsim.virtio.device") < layer_of("nicsim.server.session")
    assert layer_of("nicsim.vhost.backend_core") > layer_of("nicsim.ports.tap")
    assert layer_of("qemu.testvm.machine") == "qemu.testvm"
