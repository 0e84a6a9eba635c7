"""The folder tree is the architecture: these tests hold the code to it.

Read statically (every import statement, also those inside functions), so a
rule holds whatever code path runs:
- no import cycles between modules, nor between packages (imports made only
  for the type checker, under ``if TYPE_CHECKING:``, never run and are left out
  of this one rule);
- each package depends only on the packages below it (``LAYERS``);
- ``parsers`` is a library of its own: no ``l7proxy``, no I/O modules;
- only ``l7proxy.datapath`` imports bcc;
- nothing private (``_name``) is imported from another package.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO

# Package -> the packages it may import. Read top-down: a package may use
# only what is listed for it, so the arrows all point one way.
LAYERS: dict[str, set[str]] = {
    "parsers": set(),
    "l7proxy.observe": {"parsers"},
    "l7proxy.policy": {"parsers"},
    "l7proxy.datapath": {"l7proxy.policy"},
    "l7proxy.node": {"l7proxy.policy"},
    "l7proxy.cluster": {"l7proxy.policy"},
    "l7proxy.kube": {"l7proxy.policy", "l7proxy.cluster"},
    "l7proxy.ui": {"parsers", "l7proxy.policy", "l7proxy.observe"},
    "l7proxy.proxy": {"parsers", "l7proxy.policy", "l7proxy.observe", "l7proxy.ui"},
    "l7proxy.agent": {
        "parsers",
        "l7proxy",
        "l7proxy.policy",
        "l7proxy.observe",
        "l7proxy.datapath",
        "l7proxy.node",
        "l7proxy.proxy",
        "l7proxy.kube",
        "l7proxy.ui",
        "l7proxy.cluster",
    },
    "l7proxy.demo": {"l7proxy.datapath", "l7proxy.node", "l7proxy.observe"},
    "l7proxy.cli": {
        "parsers",
        "l7proxy.policy",
        "l7proxy.observe",
        "l7proxy.datapath",
        "l7proxy.node",
        "l7proxy.proxy",
        "l7proxy.agent",
        "l7proxy.kube",
        "l7proxy.ui",
        "l7proxy.cluster",
        "l7proxy",
    },
    "l7proxy": set(),  # l7proxy/__init__.py: the version
    "l7proxy.__main__": {"l7proxy.cli"},
}

IO_MODULES = {"socket", "asyncio", "select", "selectors", "threading", "time", "ssl"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module (or the package whose name was imported)
    name: str  # the imported name, or "" for ``import x``
    line: int
    type_only: bool = False  # under ``if TYPE_CHECKING:``


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """``parsers.kafka.engine`` -> ``parsers``; ``l7proxy.policy.rules.http`` ->
    ``l7proxy.policy``."""
    parts = module.split(".")
    return "parsers" if parts[0] == "parsers" else ".".join(parts[:2])


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p for root in ("l7proxy", "parsers") for p in (REPO / root).rglob("*.py")
    }


def imports(modules: dict[str, Path]) -> Iterator[Import]:
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        type_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, alias.name, "", node.lineno, id(node) in type_only)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    target = submodule if submodule in modules else base
                    yield Import(module, target, alias.name, node.lineno, id(node) in type_only)


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Who imports whom when the code runs."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports(modules):
        if imp.target in modules and imp.target != imp.importer and not imp.type_only:
            graph[imp.importer].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(edges(project_modules())) == []


def test_packages_form_no_cycle() -> None:
    modules = project_modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, targets in edges(modules).items():
        for target in targets:
            if package_of(importer) != package_of(target):
                graph[package_of(importer)].add(package_of(target))
    assert cycles(graph) == []


def test_every_package_imports_only_the_layers_below_it() -> None:
    modules = project_modules()
    assert {package_of(m) for m in modules} <= set(LAYERS), "a new package needs a row in LAYERS"
    wrong = [
        f"{m}:{imp.line} imports {imp.target}"
        for imp in imports(modules)
        for m in [imp.importer]
        if imp.target in modules
        and package_of(imp.target) != package_of(m)
        and package_of(imp.target) not in LAYERS[package_of(m)]
    ]
    assert wrong == []


def test_parsers_do_no_io_and_know_nothing_of_the_proxy() -> None:
    modules = {m: p for m, p in project_modules().items() if m.startswith("parsers")}
    wrong = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in imports(modules)
        if imp.target.split(".")[0] in IO_MODULES | {"l7proxy"}
    ]
    assert wrong == []


def test_only_the_datapath_imports_bcc() -> None:
    importers = {
        imp.importer for imp in imports(project_modules()) if imp.target.split(".")[0] == "bcc"
    }
    assert importers and all(m.startswith("l7proxy.datapath.") for m in importers), importers


def test_nothing_private_is_imported_from_another_package() -> None:
    modules = project_modules()
    wrong = [
        f"{imp.importer}:{imp.line} imports {imp.target}.{imp.name}"
        for imp in imports(modules)
        if imp.name.startswith("_")
        and not imp.name.startswith("__")
        and package_of(imp.target) != package_of(imp.importer)
    ]
    assert wrong == []
