"""The module layout keeps the promises of docs/design.md's "Architecture" section."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "warmfit"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_the_trainer_stays_a_facade_a_newcomer_reads():
    assert _lines(PACKAGE / "trainer.py") <= 500


def test_every_module_over_600_lines_is_explained_in_the_design_notes():
    docs = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    why = docs.split("Modules over ~600 lines, and why:")[1].split("\n\n")[0]
    named = set(re.findall(r"`(?:backends/)?(\w+\.py)`", why))
    long = {p.name for p in MODULES if _lines(p) > 600}
    assert long <= named, f"over 600 lines and not explained: {sorted(long - named)}"


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if re.match(r"_(?!_\w+__$)", a.name)]
                found += [f"{path.relative_to(PACKAGE)}: {node.module}.{n}" for n in private]
    assert found == []


def test_every_module_in_the_package_is_in_the_architecture_tree():
    docs = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    tree = docs.split("## Architecture")[1].split("```")[1]
    listed = set(re.findall(r"(\w+\.py)", tree))
    modules = {p.name for p in MODULES if p.name not in ("__init__.py", "__main__.py")}
    assert modules <= listed, f"not in the tree: {sorted(modules - listed)}"
