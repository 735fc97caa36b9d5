"""The package stays mypy --strict clean and ruff clean (DESIGN.md rule 6)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_mypy_strict() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "teraproxy"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "."], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _over_budget(folder: str, file_lines: int = 600, function_lines: int = 60) -> list[str]:
    import ast

    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(ROOT)
        if text.count("\n") > file_lines:
            out.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > function_lines:
                    out.append(f"{name}:{node.lineno} {node.name}: {n} lines")
    return out


def test_size_budget() -> None:
    """teraproxy/ and bench/ are held to the project's budgets: files ≤ 600 lines, functions ≤ 60 lines."""
    assert _over_budget("teraproxy") + _over_budget("bench") == []


def test_compiled_modules_give_each_except_name_one_type() -> None:
    """mypyc gives a function's variable one type: ``except A as e`` then ``except B as e`` in one
    function raises TypeError when B is caught, compiled only (seen: a hung Redis's TimeoutError
    became a 500 and the pool's PoolBusy a 500 instead of a 503)."""
    import ast

    from teraproxy import COMPILED

    clashes = []
    for name in COMPILED:
        for fn in ast.walk(ast.parse((ROOT / "teraproxy" / f"{name}.py").read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                types: dict[str, set[str]] = {}
                for node in ast.walk(fn):
                    if isinstance(node, ast.ExceptHandler) and node.name:
                        types.setdefault(node.name, set()).add(ast.unparse(node.type) if node.type else "")
                clashes += [f"{name}.{fn.name}: {v} as {sorted(t)}" for v, t in types.items() if len(t) > 1]
    assert clashes == []


def test_ci_tests_the_compiled_build() -> None:
    """With TERAPROXY_MYPYC=1 (.ci/run) the suite runs the extensions that ship, none older than its source."""
    import os

    import pytest

    from teraproxy import build

    if os.environ.get("TERAPROXY_MYPYC") != "1":
        pytest.skip("an install without TERAPROXY_MYPYC=1")
    assert build() == "compiled"
