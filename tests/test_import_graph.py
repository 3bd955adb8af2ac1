"""slimformer's modules import only downward: no import cycles, no upward imports.

Every module under src/slimformer is parsed with `ast`; every import counts, including those
inside functions and under `if TYPE_CHECKING:` (a lazy import is still a dependency, and the
cycles this test guards against were made of lazy ones). Importing `slimformer.x.y` from outside
the package `slimformer.x` also runs `slimformer/x/__init__.py`, so it counts as importing that
too. The root package (`slimformer/__init__.py`, the public facade over the API) runs before any
submodule and is left out.

The layering: each top-level component has a rank in RANKS; a module may import modules of its
own component or of components of a strictly lower rank. So, for example, `layers/` imports
nothing above kernels/errors, `engines/` never imports passes/search/api/cli,
`checkpoint/` never imports passes or assets, `passes/` never imports search/api/cli/report,
and `search/` never imports report or the model card. A new top-level module needs a rank here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "slimformer"

# component -> rank, lowest first. Components of one rank are peers that may not import each
# other (e.g. checkpoint and passes).
RANKS = {
    "errors": 0,
    "files": 1,
    "quiet": 1,  # silencing transformers around loads and conversions
    "child": 2,  # running a child process with a request: errors and files only
    "kernels": 1,
    "cpu": 1,
    "taskspec": 1,
    "layers": 2,  # quantized and smoothed layers + their codecs: torch, kernels, errors
    "adapters": 2,
    "recipe": 2,  # data only
    "model": 3,
    "tokens": 3,  # token merging/pruning inside an encoder's forward: adapters, errors
    "generation": 4,  # greedy generation through any served module: errors (and model types)
    "engines": 4,  # served modules: never passes, pipeline, checkpoint, search, api, cli
    "checkpoint": 5,  # never passes or assets
    "passes": 5,  # never search, api, cli, report
    "pipeline": 6,
    "assets": 6,
    "tasks": 7,
    "trained_prefix": 7,  # models kept after training for later builds: pipeline, checkpoint
    "measure": 8,
    "figures": 8,  # the table of measured figures: no slimformer imports
    "evaluate": 9,
    "build": 9,  # the build child: applies a recipe; evaluate's peer, neither imports the other
    "search": 10,  # the study: settings, space, records, run folder, runner, confirmation
    "report": 11,  # reads search's records; search never imports it
    "card": 12,
    "report_html": 12,  # report.html: reads the run folder through search, formats like report
    "api": 13,
    "cli": 14,
}
# Pairs allowed to break the rules above; none today (the study.py ⇄ report.py cycle went
# with the split of study.py into search/).
ALLOWED_CYCLES: list[set[str]] = []
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def module_files() -> dict[str, Path]:
    files = {}
    for path in (SRC / ROOT).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def packages_of(name: str) -> list[str]:
    """The packages whose __init__ runs when `name` is imported (the root left out)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def imported(module: str, path: Path) -> set[str]:
    """slimformer modules `module` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [source]
            # `from package import submodule` imports the submodule
            targets += [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
        for target in targets:
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target == ROOT:
                continue
            found.add(target)
            # Packages entered from outside run their __init__ too.
            found.update(p for p in packages_of(target) if not module.startswith(p + "."))
    found.discard(module)
    return found


GRAPH = {module: imported(module, path) for module, path in MODULES.items() if module != ROOT}


def component(module: str) -> str:
    return module.split(".")[1]


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the components of more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.add(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(members)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_imports_and_package_inits():
    # A function-level import (assets resolves checkpoint folders lazily) is an edge, and a
    # submodule imported from outside its package brings the package's __init__ along.
    assert "slimformer.checkpoint" in GRAPH["slimformer.assets"]
    assert "slimformer.layers" in GRAPH["slimformer.passes.quantize_dynamic_int8"]
    assert "slimformer.passes" not in GRAPH["slimformer.passes.prune_layers"]


def test_every_module_has_a_declared_layer():
    missing = sorted({component(m) for m in GRAPH} - set(RANKS))
    assert not missing, f"give these modules a rank in RANKS: {missing}"


def test_no_import_cycles():
    cycles = [sorted(c) for c in strongly_connected(GRAPH) if c not in ALLOWED_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module: str):
    here = component(module)
    upward = sorted(
        target
        for target in GRAPH[module]
        if component(target) != here
        and RANKS.get(component(target), 99) >= RANKS.get(here, -1)
        and (module, target) not in ALLOWED_UPWARD
    )
    assert not upward, f"{module} (layer {here}) imports {upward}, which are not below it"


def test_registries_list_their_members_explicitly():
    """Each registry package imports every module that registers into it, by name."""
    for package, folder in (("passes", "passes"), ("layers", "layers"), ("engines", "engines")):
        init = GRAPH[f"{ROOT}.{package}"]
        members = {
            f"{ROOT}.{package}.{p.stem}"
            for p in (SRC / ROOT / folder).glob("*.py")
            if any(
                line.startswith(("@register_", "register_codec("))
                for line in p.read_text().splitlines()
            )
        }
        assert members and members <= init, f"{package}/__init__.py misses {members - init}"
