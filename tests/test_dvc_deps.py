"""dvc.yaml's code dependencies match what each stage imports: an edit to a project file re-runs exactly the
stages whose code runs it (a missing dependency leaves a stale output; a superfluous one re-runs a stage for
nothing). Each stage's imports are followed through the project, function-level imports included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "vae")
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None outside the project."""
    if module.split(".")[0] not in PACKAGES:
        return None
    path = REPO.joinpath(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement anywhere in the file names (``from a import b`` names ``a`` and,
    when it is a submodule, ``a.b``), plus the packages above each."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def import_closure(module: str) -> set[Path]:
    """The project files that running ``python -m <module>`` imports, followed transitively."""
    found: set[Path] = set()
    pending = [module, f"{module}.__main__"]  # `python -m package` runs its __main__ too
    while pending:
        path = module_file(pending.pop())
        if path is None or path in found:
            continue
        found.add(path)
        pending.extend(imported_modules(path))
    return {p.relative_to(REPO) for p in found}


def stage_module(command: str) -> str:
    match = re.match(r"sh pipeline/stage\.sh (\w+)", command)
    assert match, f"stage command {command!r} does not go through pipeline/stage.sh"
    return f"pipeline.{match.group(1)}"


def code_deps(stage: dict) -> set[Path]:
    """The stage's dependencies that are project code (files or folders under pipeline/ and vae/)."""
    return {Path(dep) for dep in stage.get("deps", []) if dep.split("/")[0] in PACKAGES}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_file_is_a_dependency(name):
    stage = STAGES[name]
    closure = import_closure(stage_module(stage["cmd"]))
    deps = code_deps(stage)
    missing = sorted(str(p) for p in closure if not any(p == d or d in p.parents for d in deps))
    assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them as deps"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_code_dependency_the_stage_does_not_import(name):
    stage = STAGES[name]
    closure = import_closure(stage_module(stage["cmd"]))
    files = {d: sorted(f.relative_to(REPO) for f in (REPO / d).rglob("*.py")) if (REPO / d).is_dir() else [d]
             for d in code_deps(stage) if d != Path("pipeline/stage.sh")}
    extra = sorted(str(f) for listed in files.values() for f in listed if f not in closure)
    assert not extra, f"stage {name} lists {extra} as deps but never imports them (it re-runs for nothing)"
    assert Path("pipeline/stage.sh") in code_deps(stage), f"stage {name} runs through pipeline/stage.sh"


def test_closure_follows_function_level_imports(tmp_path):
    """The closure must see an import inside a function (the stages import heavy modules lazily)."""
    closure = import_closure("pipeline.evaluate")
    source = (REPO / "pipeline/evaluate.py").read_text()
    lazy = [m for m in re.findall(r"^\s+from (pipeline\.\w+) import", source, re.M)]
    assert lazy, "evaluate.py has no function-level import to check against"
    assert all(module_file(m).relative_to(REPO) in closure for m in lazy)
