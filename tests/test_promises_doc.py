"""docs/operations.md's "What stddaq promises" names a test for every fault: they exist."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO


def test_every_test_named_in_the_promises_exists():
    text = (REPO / "docs" / "operations.md").read_text()
    promises = text[text.index("## What stddaq promises"):]
    named = re.findall(r"`(test_\w+)::(test_\w+)`", promises)
    assert len(named) >= 20
    missing = []
    for module, test in named:
        tree = ast.parse((REPO / "tests" / f"{module}.py").read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        if test not in functions:
            missing.append(f"{module}::{test}")
    assert not missing, missing
