"""The layer rules of docs/architecture.md, held by a test over every module's imports (the AST: function-level and
TYPE_CHECKING imports included, so a hidden import counts like any other)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge", "cloud_bridge")

#: The pure core: no I/O, no event loop, no hardware, no network. Time is an argument.
CORE = (
    "edge.model",
    "edge.schedule",
    "edge.index",
    "edge.decision",
    "edge.access_state",
    "edge.pin",
    "edge.timetrust",
    "edge.events",
    "edge.errors",
    "edge.readers.formats",
    "edge.readers.keypad",
    "edge.readers.events",
    "edge.readers.wiegand.frame",
    "edge.readers.osdp.frame",
    "edge.readers.osdp.secure",
    "edge.door.logic",
    "cloud_bridge.errors",
    "cloud_bridge.protocol",
    "cloud_bridge.topics",
    "cloud_bridge.permissions",
    "cloud_bridge.fleet.window",
)
#: What the pure core may never import (nor anything below these names).
IO = ("asyncio", "aiosqlite", "sqlite3", "gpiozero", "serial", "serial_asyncio", "aiomqtt", "paho", "socket",
      "subprocess", "threading", "selectors", "lgpio", "urllib", "http")  # fmt: skip
#: The only parts of edge that cloud_bridge may use: the site model, the event record, the exception root.
EDGE_FOR_CLOUD = ("edge.model", "edge.events", "edge.errors", "edge.tasks")
#: Simulator and demo code: never imported by a production module (the CLI picks them by name at run time).
SIM = ("edge.sim", "edge.demo", "gpiozero.pins.mock")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module `name` imports (absolute names), with the line."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield mod, node.lineno
            for a in node.names:  # `from pkg import submodule`
                yield f"{mod}.{a.name}", node.lineno


def under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


MODS = modules()


def internal(mod: str) -> str | None:
    """The project module `mod` names (a `from pkg import name` of a non-module gives the package)."""
    while mod:
        if mod in MODS:
            return mod
        mod = mod.rpartition(".")[0]
    return None


def test_every_core_module_exists() -> None:
    missing = [m for m in CORE if m not in MODS]
    assert not missing, f"core modules named in the layer rules but not in the tree: {missing}"


@pytest.mark.parametrize("core", CORE)
def test_the_pure_core_does_no_io(core: str) -> None:
    bad = [(m, ln) for m, ln in imports_of(core, MODS[core]) if under(m, IO)]
    bad += [(m, ln) for m, ln in imports_of(core, MODS[core])
            if (t := internal(m)) is not None and t not in CORE and under(t, PACKAGES)]  # fmt: skip
    assert not bad, f"{core} (pure core) imports I/O or non-core modules: {bad}"


def test_cloud_bridge_uses_only_the_edge_model_events_and_errors() -> None:
    bad = [(name, m, ln) for name, path in MODS.items() if name.startswith("cloud_bridge")
           for m, ln in imports_of(name, path) if under(m, ("edge",)) and not under(m, EDGE_FOR_CLOUD)]  # fmt: skip
    assert not bad, f"cloud_bridge reaches into edge's services (use the ports in cloud_bridge.link.ports): {bad}"


def test_production_code_never_imports_the_simulator() -> None:
    bad = [(name, m, ln) for name, path in MODS.items() if not under(name, SIM) and name != "edge.cli"
           for m, ln in imports_of(name, path) if under(m, SIM)]  # fmt: skip
    assert not bad, f"production modules import simulator code: {bad}"


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODS}
    for name, path in MODS.items():
        for m, _ln in imports_of(name, path):
            t = internal(m)
            if t is not None and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                graph[name].add(t)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cloud_bridge_has_its_own_exception_root() -> None:
    from cloud_bridge.errors import CloudBridgeError
    from cloud_bridge.protocol import ProtocolError
    from cloud_bridge.signing import CommandRejected

    assert issubclass(ProtocolError, CloudBridgeError) and issubclass(CommandRejected, CloudBridgeError)
