"""The package's shape, checked from its source: layers import one way, no cycles, one job per file.

Imports are read with ``ast`` (lazy imports inside functions count; ``if TYPE_CHECKING:`` ones do not),
so the checks cost no import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import neurotwin

PACKAGE = Path(neurotwin.__file__).parent
# Lower layers never import higher ones (ARCHITECTURE.md). Training sits beside runtimes.
LAYERS = {
    **dict.fromkeys(("errors", "card", "store", "imagecodec", "stats", "integrity", "v1", "kserve"), 0),
    "runtimes": 1,
    "training": 1,
    "engines": 2,
    "reports": 3,
    "server": 4,
    "client": 5,
    "commands": 6,
    "cli": 6,
}
SERVING = ("runtimes", "engines", "reports", "server")
MAX_LINES = 650  # "about 600"; generated protobuf code aside
# Commands that start a server in their own process.
SERVER_COMMANDS = {"neurotwin.commands.serve", "neurotwin.commands.rig_sim"}
# Left for later (issue 14): synthesize's in-process mode still drives the servicer's service.
KNOWN_COMMAND_SERVER_IMPORTS = {("neurotwin.commands.synthesize", "neurotwin.server.synthesizer")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imported(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets |= {f"{module}.{alias.name}" for alias in node.names}
    return targets


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for target in _imported(name, path):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # A module importing its own package (for a sibling) is not an edge of the layering.
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    return graph


GRAPH = _graph()


def _layer(name: str) -> tuple[str, int]:
    top = name.split(".")[1] if "." in name else ""
    return top, LAYERS[top]


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index and node != "neurotwin":
            visit(node)
    assert cycles == []


def test_layers_import_downwards_and_serving_never_imports_training() -> None:
    upward = []
    for name, deps in GRAPH.items():
        if name == "neurotwin":
            continue
        top, level = _layer(name)
        for dep in deps:
            dep_top, dep_level = _layer(dep)
            if dep_level > level or (top in SERVING and dep_top == "training"):
                upward.append(f"{name} -> {dep}")
    assert upward == []


def test_errors_module_imports_only_the_standard_library() -> None:
    roots = {target.split(".")[0] for target in _imported("neurotwin.errors", MODULES["neurotwin.errors"])}
    assert roots <= {"__future__", "enum", "typing"}


def test_commands_import_the_server_only_to_serve() -> None:
    found = {
        (name, dep)
        for name, deps in GRAPH.items()
        if name.startswith("neurotwin.commands.") and name not in SERVER_COMMANDS
        for dep in deps
        if dep.startswith("neurotwin.server")
    }
    assert found == KNOWN_COMMAND_SERVER_IMPORTS


def test_no_file_is_longer_than_about_600_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): count
        for path in PACKAGE.rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
        and (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
