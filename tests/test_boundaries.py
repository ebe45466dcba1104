"""One module talks to each outside system: MLflow, DVC, Great Expectations. Checked on the source."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
OWNERS = {"mlflow": "components/tracking.py", "dvc": "components/versioning.py",
          "great_expectations": "components/validate.py"}


def _sources():
    for folder in ("components", "flows", "bench"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("system", OWNERS)
def test_only_its_own_module_imports_an_outside_system(system):
    importers = {path.relative_to(ROOT).as_posix() for path in _sources()
                 if system in _imports(ast.parse(path.read_text()))}
    assert importers == {OWNERS[system]}


def test_nothing_reaches_past_the_tracker_to_the_mlflow_client():
    reached = []
    for path in _sources():
        if path.relative_to(ROOT).as_posix() == OWNERS["mlflow"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("client", "experiment_id"):
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                if name.endswith("tracker"):
                    reached.append(f"{path.name}:{node.lineno}")
    assert reached == []
