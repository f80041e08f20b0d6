"""Project rules that keep the layers apart (STYLE habit 1) and the code tidy (habit 9)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

CORE = REPO / "wan_assets" / "core"
FORBIDDEN = ("dagster", "dagster_pipes", "dagster_duckdb", "dagster_webserver", "resources")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_core_source_never_imports_dagster_or_resources() -> None:
    offenders = {}
    for path in sorted(CORE.rglob("*.py")):
        bad = {m for m in _imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, f"wan_assets/core must not import dagster or resources: {offenders}"


def test_importing_all_of_core_loads_no_dagster() -> None:
    # The static walk misses imports done by third-party code on our behalf; import for real too.
    modules = sorted(
        "wan_assets.core." + ".".join(p.relative_to(CORE).with_suffix("").parts)
        for p in CORE.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"importing wan_assets.core pulled in: {out.stdout.strip()}"
    assert len(modules) >= 3


def test_ruff_lint_and_format_pass() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([str(ruff), *args], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, f"ruff {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
