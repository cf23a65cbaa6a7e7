"""The rooms of the code and which may import which (docs/architecture.md), read from the source.

Every import counts, the lazy ones inside functions and those under `TYPE_CHECKING` too: a cycle
dodged by a late import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ensemble", "router", "serving")
ENGINE_KINDS = ("transformers", "vllm", "openai")

_ENGINE_BASE = {"ensemble", "serving.config", "serving.models", "serving.engines.common"}
# A room may import itself and the rooms listed here, nothing else of the project.
ALLOWED: dict[str, set[str]] = {
    "ensemble": set(),
    "router": {"ensemble"},
    "serving.models": {"ensemble", "router"},
    "serving.config": {"ensemble", "router", "serving.models"},
    "serving.engines.common": {"ensemble", "serving.config", "serving.models"},
    **{f"serving.engines.{kind}": _ENGINE_BASE for kind in ENGINE_KINDS},
    "serving.engines": _ENGINE_BASE | {f"serving.engines.{k}" for k in ENGINE_KINDS},
    "serving.api": {"ensemble", "serving.config"},
    "serving.gateway": {
        "ensemble",
        "router",
        "serving.api",
        "serving.config",
        "serving.models",
        "serving.engines",
        "serving.engines.common",
    },
    "serving.http": {"ensemble", "router", "serving.api", "serving.config", "serving.gateway"},
    "serving.evaluation": {
        "ensemble",
        "router",
        "serving.api",
        "serving.config",
        "serving.models",
        "serving.engines",
        "serving.gateway",
        "serving.http",
    },
    "serving.cli": {"*"},
    "serving": {"serving.cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    """The longest room name that `module` is, or is inside."""
    candidates = [r for r in ALLOWED if module == r or module.startswith(r + ".")]
    return max(candidates, key=len)


def project_imports(path: Path, module: str) -> set[str]:
    """Every project module `path` imports, anywhere in the file."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` may name a module `a.b` or a name in `a`: keep the module.
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in project_imports(path, module):
            while name and name not in modules:  # `pkg.module.Name` -> `pkg.module`
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        own = room(module)
        allowed = ALLOWED[own]
        for target in sorted(targets):
            other = room(target)
            if other != own and "*" not in allowed and other not in allowed:
                out.append(f"{module} ({own}) imports {target} ({other})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_every_module_is_in_a_room() -> None:
    assert all(room(m) for m in import_graph())


def test_rooms_import_only_what_the_layering_allows() -> None:
    assert forbidden_imports(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_engines_do_not_import_the_http_layer_or_the_gateway() -> None:
    graph = import_graph()
    engine_modules = [m for m in graph if m.startswith("serving.engines")]
    assert engine_modules
    for module in engine_modules:
        upward = {
            t
            for t in graph[module]
            if room(t) in ("serving.api", "serving.http", "serving.gateway")
        }
        assert not upward, f"{module} imports {upward}"


def test_the_checks_catch_what_they_are_for() -> None:
    graph = {
        "serving.engines.vllm.engine": {"serving.http.app"},
        "serving.http.app": {"serving.gateway.pools"},
        "serving.gateway.pools": {"serving.http.app"},
    }
    engine = "serving.engines.vllm.engine (serving.engines.vllm)"
    assert forbidden_imports(graph) == [
        f"{engine} imports serving.http.app (serving.http)",
        "serving.gateway.pools (serving.gateway) imports serving.http.app (serving.http)",
    ]
    assert cycles(graph) == [["serving.gateway.pools", "serving.http.app"]]
