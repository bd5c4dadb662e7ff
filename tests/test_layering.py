"""Dependency direction: models -> kernels -> {torch, triton}. Kernels never import the model, trainer,
data pipeline or configs (so they stay usable, testable and benchmarkable on their own)."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
FORBIDDEN = ("spidr_fast.models", "spidr_fast.train", "spidr_fast.data", "spidr_fast.config", "spidr_fast.extraction")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_kernels_import_nothing_above_them() -> None:
    files = sorted(KERNELS.glob("*.py"))
    assert files
    offenders = {
        f"{path.name}: {name}" for path in files for name in imported_modules(path) if name.startswith(FORBIDDEN)
    }
    assert not offenders, offenders
