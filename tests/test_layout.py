"""The architecture the folders show, checked from the imports: tasks never import tasks, blocks never import tasks
or methods, the engine knows no Typer or rich, and the CLI reaches the engine only through tasks and configs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "simclr_cli"
ENGINE = PACKAGE / "engine"


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions included), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


TASKS = sorted(p for p in (ENGINE / "tasks").glob("*.py") if p.name != "__init__.py")
BLOCKS = sorted(p for p in ENGINE.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("task", TASKS, ids=lambda p: p.stem)
def test_tasks_never_import_tasks(task):
    others = {module(t) for t in TASKS} - {module(task)}
    assert not imports(task) & others


@pytest.mark.parametrize("block", BLOCKS, ids=lambda p: p.stem)
def test_blocks_never_import_tasks_and_only_the_trainer_knows_methods(block):
    used = imports(block)
    assert not any(name.startswith("simclr_cli.engine.tasks") for name in used)
    if block.stem != "trainer":
        assert not any(name.startswith("simclr_cli.engine.methods") for name in used), block.stem


def test_the_engine_knows_no_typer_or_rich():
    for path in ENGINE.rglob("*.py"):
        assert not {name.split(".")[0] for name in imports(path)} & {"typer", "rich", "click"}, path


def test_the_cli_reaches_the_engine_through_tasks_and_configs():
    used = imports(PACKAGE / "cli.py")
    for internal in ("distributed", "datasets", "images", "features", "rundir", "trainer", "defaults"):
        assert not any(name.startswith(f"simclr_cli.engine.{internal}") for name in used), internal
