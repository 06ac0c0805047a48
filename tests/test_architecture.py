"""The package's shape is part of its contract: the layers in pyproject.toml ([tool.importlinter]),
no import cycles, and a clean lint (ruff). These run the real tools on the real tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed: run scripts/setup.sh (it installs the dev extras)")
        return found
    return str(path)


def _lint_imports(src: Path) -> subprocess.CompletedProcess:
    """lint-imports with the repository's contracts over the package found in `src`."""
    return subprocess.run([_tool("lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
                          cwd=ROOT, env={"PYTHONPATH": str(src), "PATH": str(BIN)}, capture_output=True, text=True,
                          timeout=300)


def test_layers_and_no_import_cycles():
    result = _lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("nn/model.py", "import moge.parallel.mesh", "Layers"),  # core must not know about parallelism
    ("nn/routing.py", "import moge.nn.model", "No import cycles"),  # model imports routing
])
def test_contracts_catch_violations(tmp_path, module, line, broken):
    """The contracts are not vacuous: one forbidden import in a copy of the package breaks them."""
    shutil.copytree(ROOT / "src" / "moge", tmp_path / "moge", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "moge" / module
    target.write_text(target.read_text() + f"\n{line}  # injected by the test\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    report = result.stdout.split("Broken contracts")[-1]
    assert broken in report and "injected" not in result.stderr
    assert ("moge.nn.model" in report or ".nn -> .parallel" in report) if broken == "Layers" else \
        ("routing" in report)


def test_ruff_is_clean():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "src", "tests", "benchmarks"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
