"""The package's one-way dependencies: pipelines -> capfilt -> model, read from the import statements.

`model/` is pure PyTorch + transformers (installed as `capfilt.model`, it imports its siblings
relatively and never names capfilt or Ray); the `capfilt` library never imports the pipelines or
Ray, only its command line (`capfilt/cli.py`, `capfilt/commands/`) wires them in.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
