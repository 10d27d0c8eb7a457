"""The package's one-way dependencies: pipelines -> capfilt -> model, read from the import statements.

`model/` is pure PyTorch + transformers (installed as `capfilt.model`, it imports its siblings
relatively and never names capfilt or Ray); the `capfilt` library never imports the pipelines or
Ray, only its command line (`capfilt/cli.py`, `capfilt/commands/`) wires them in. No module of the
three folders imports itself back through others (no import cycles), and `capfilt/stages/` imports
nothing above it: not the command line or the pipelines, nor a capfilt module that imports a stage.

Function-level imports count as imports everywhere here: one runs the first time its function
does, so it ties the modules together all the same, and it is the usual way a cycle gets hidden
(capfilt/evaluate.py imported capfilt/demo_eval.py inside functions while demo_eval imported
evaluate at the top).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"capfilt": "capfilt", "model": "capfilt.model", "pipelines": "capfilt.pipelines"}  # folder -> name
STAGES = "capfilt.stages"
ABOVE_STAGES = ("capfilt.cli", "capfilt.commands", "capfilt.pipelines")


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports, function-level imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def offenders(folder: str, forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> dict[str, list[str]]:
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel.startswith(exempt):
            continue
        bad = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            found[rel] = bad
    return found


def test_model_imports_neither_capfilt_nor_ray():
    assert offenders("model", ("capfilt", "ray", "model", "pipelines")) == {}


def test_capfilt_library_imports_neither_pipelines_nor_ray():
    assert offenders("capfilt", ("capfilt.pipelines", "pipelines", "ray", "model"),
                     exempt=("capfilt/cli.py", "capfilt/commands/")) == {}


def test_the_checker_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from capfilt.pipelines.run import run_capfilt\n    import ray\n")
    assert imported_modules(probe) == {"capfilt.pipelines.run", "ray"}


def test_nothing_imports_the_folders_by_their_bare_names():
    # From the repository root `import model` would load a second copy of the package beside
    # capfilt.model (two MED classes, patches applied to the wrong one).
    found = {}
    for folder in ("capfilt", "model", "pipelines", "tests", "benchmarks"):
        found |= offenders(folder, ("model", "pipelines"))
    assert found == {}


# --- the module graph: cycles, and what the stages may import ---------------------------------------


def module_files(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """Installed module name -> file, for every .py file under the folders of `packages`."""
    modules = {}
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def module_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` imports (relative and function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    found = set()
    for target in targets:
        while target and target not in modules:  # `from capfilt.x import name`: the module capfilt.x
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph(root: Path = REPO, packages: dict[str, str] = PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: module_imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
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
    return sorted(found)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def above_stages(graph: dict[str, set[str]], stages: str = STAGES,
                 above: tuple[str, ...] = ABOVE_STAGES) -> dict[str, list[str]]:
    """{stage module: what it imports from above the stages}: the command line, the pipelines, or
    a module that itself (directly or not) imports a stage."""
    def in_stages(module: str) -> bool:
        return module == stages or module.startswith(stages + ".")

    found = {}
    for name in sorted(m for m in graph if in_stages(m)):
        bad = sorted(t for t in graph[name] if not in_stages(t) and (
            t.startswith(above) or any(in_stages(m) for m in reachable(graph, t))))
        if bad:
            found[name] = bad
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_stages_import_nothing_above_them():
    graph = import_graph()
    assert any(m.startswith(STAGES + ".") for m in graph)  # the checker sees the stages
    assert above_stages(graph) == {}


def test_the_graph_checkers_see_cycles_and_back_up_arrows(tmp_path):
    """A planted package: a cycle closed by a function-level relative import, a stage that imports
    a module which imports a stage, and one that imports the pipelines."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from .c import g\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/loader.py": "from pkg.stages.common import helper\n",
        "pkg/stages/__init__.py": "",
        "pkg/stages/common.py": "helper = 1\n",
        "pkg/stages/filter.py": "from pkg.loader import helper\nfrom pkg.stages.common import helper\n",
        "pkg/stages/write.py": "def f():\n    from pkg.pipelines.run import run\n",
        "pipe/run.py": "from pkg.stages import filter\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, {"pkg": "pkg", "pipe": "pkg.pipelines"})
    assert graph["pkg.b"] == {"pkg.c"}  # relative, inside a function
    assert graph["pkg.pipelines.run"] == {"pkg.stages", "pkg.stages.filter"}  # the package runs first
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert above_stages(graph, "pkg.stages", ("pkg.pipelines",)) == {"pkg.stages.filter": ["pkg.loader"],
                                                                     "pkg.stages.write": ["pkg.pipelines.run"]}
