"""The stage boundaries DVC sees: each stage's `deps` in dvc.yaml list exactly the project code it
runs (derived here from the imports, function-level ones included), its `params` exactly the sections
it reads, and no stage module imports another."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

STAGES = ("fetch", "preprocess", "tune", "train", "evaluate")
PACKAGE = "pipeline"


def module_file(name: str) -> Path | None:
    """The source file of a project module (`pipeline.core.config`), or None for other packages."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module a file imports, wherever the import statement sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if module_file(name) is not None}


def code_deps(stage: str) -> set[str]:
    """The project files `python -m pipeline.<stage>` can run: its module and all it imports, transitively."""
    seen: set[Path] = set()
    pending = [module_file(f"{PACKAGE}.{stage}")]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        pending.extend(module_file(name) for name in imported_modules(path))
    return {path.relative_to(REPO_ROOT).as_posix() for path in seen}


def dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def stage_modules() -> set[str]:
    return {f"{PACKAGE}.{stage}" for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_deps_list_exactly_the_code_the_stage_runs(stage):
    listed = {dep for dep in dvc_stages()[stage]["deps"] if dep.endswith(".py")}
    needed = code_deps(stage)
    assert needed - listed == set(), f"dvc.yaml's {stage} stage misses code it runs"
    assert listed - needed == set(), f"dvc.yaml's {stage} stage lists code it never runs"


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another(stage):
    path = module_file(f"{PACKAGE}.{stage}")
    others = stage_modules() - {f"{PACKAGE}.{stage}"}
    assert imported_modules(path) & others == set()


@pytest.mark.parametrize("stage", STAGES)
def test_params_list_exactly_the_sections_the_stage_reads(stage):
    """Each stage module declares the sections it reads (reading any other fails at run time, see
    `Params.only`); dvc.yaml must list the same, so changing one re-runs exactly the stages that read it."""
    declared = set(importlib.import_module(f"{PACKAGE}.{stage}").PARAMS)
    assert set(dvc_stages()[stage].get("params", [])) == declared


def test_the_derivation_sees_function_level_imports(tmp_path):
    """A guard on the guard: an import inside a function counts."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from pipeline.registry import store\n    import pipeline.core.plots\n")
    assert imported_modules(source) == {"pipeline.registry", "pipeline.registry.store", "pipeline.core.plots"}


if __name__ == "__main__":  # prints each stage's code deps, to paste into dvc.yaml
    for name in STAGES:
        print(name, sorted(code_deps(name)))


def test_only_the_command_line_entry_points_parse_argv():
    """Library modules never parse argv: argparse is imported only by `pipeline/commands/`, the
    dispatcher and the stages."""
    entry_points = {f"pipeline/{stage}.py" for stage in STAGES} | {"pipeline/__main__.py"}
    parsing = set()
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        if "argparse" in names:
            parsing.add(path.relative_to(REPO_ROOT).as_posix())
    outside = {path for path in parsing if path not in entry_points and not path.startswith("pipeline/commands/")}
    assert outside == set(), f"these library modules parse argv; move their CLI to pipeline/commands/: {sorted(outside)}"
    assert "pipeline/commands/common.py" in parsing  # the check sees real imports
