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


# The stages of wan_assets/core, in the order they build on each other: a module may import from its
# own stage or an earlier one, never a later one, so each stage can be read (and tested) without
# the ones after it. "" is the base layer: the modules directly in wan_assets/core/.
STAGES = ("", "model", "speed", "data", "train", "eval", "metrics")
# The only backwards imports allowed, each lazy (inside a function) and each with its reason.
ALLOWED_BACKWARDS = {
    # `workdir` sets up a demo workdir: it writes the synthetic clips and the tiny model on request.
    ("workdir", "data.synthetic"): "demo workdir writes synthetic clips",
    ("workdir", "model.tiny"): "demo workdir writes the tiny model",
}


def _stage(module: str) -> str:
    """'wan_assets.core.train.loop' -> 'train'; 'wan_assets.core.config' -> ''."""
    parts = module.split(".")[2:]
    return parts[0] if len(parts) > 1 else ""


def _core_imports(path: Path) -> set[str]:
    """The wan_assets.core modules `path` imports anywhere (function bodies and TYPE_CHECKING too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("wan_assets.core."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("wan_assets.core."):
                found.add(node.module)
            elif node.module in ("wan_assets.core", *(f"wan_assets.core.{s}" for s in STAGES if s)):
                found.update(f"{node.module}.{a.name}" for a in node.names)  # from pkg import module
    return found


def _backwards_imports() -> dict[str, list[str]]:
    offenders = {}
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).with_suffix("")
        module = "wan_assets.core." + ".".join(rel.parts)
        own = STAGES.index(_stage(module))
        bad = []
        for imported in sorted(_core_imports(path)):
            stage = _stage(imported)
            assert stage in STAGES, f"{module} imports {imported}: not in a known stage {STAGES}"
            short = (".".join(rel.parts), imported.removeprefix("wan_assets.core."))
            if STAGES.index(stage) > own and short not in ALLOWED_BACKWARDS:
                bad.append(imported)
        if bad:
            offenders[module] = bad
    return offenders


def test_core_stages_import_only_earlier_stages() -> None:
    offenders = _backwards_imports()
    assert not offenders, f"a core module imports from a later stage (order {STAGES}): {offenders}"


def test_layering_check_sees_a_backwards_import(tmp_path: Path, monkeypatch) -> None:
    # The rule above must be able to fail: plant a model module that imports the training loop.
    import shutil

    fake_core = tmp_path / "core"
    shutil.copytree(CORE, fake_core, ignore=shutil.ignore_patterns("__pycache__"))
    planted = fake_core / "model" / "planted.py"
    planted.write_text("def f():\n    from wan_assets.core.train.loop import train\n")
    monkeypatch.setattr(sys.modules[__name__], "CORE", fake_core)
    assert _backwards_imports() == {"wan_assets.core.model.planted": ["wan_assets.core.train.loop"]}


def test_ruff_lint_and_format_pass() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([str(ruff), *args], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, f"ruff {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
