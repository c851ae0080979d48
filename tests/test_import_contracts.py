"""The import direction of pyproject.toml's [tool.importlinter] contracts, checked by `lint-imports`.

`lint-imports` finds a package by its import path, and in this checkout `kubellm` is a folder map
(pyproject.toml's [tool.setuptools]: `runtime/` is `kubellm.runtime`, ...) that only the editable
install's import hook resolves. So the package is staged as installed: each mapped folder's modules
copied into `kubellm/...` under a temporary directory, which comes first on PYTHONPATH. By hand:

    python tests/test_import_contracts.py          # lint-imports' report; exit status 1 if a contract breaks
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def stage_package(dest: Path, root: Path = ROOT) -> list[str]:
    """Copy every package of [tool.setuptools] packages from its mapped folder to dest/kubellm/...;
    returns the packages."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    for package in setuptools["packages"]:
        parts = package.split(".")
        prefix = next(n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in folders)
        source = root / folders[".".join(parts[:prefix])] / Path(*parts[prefix:])
        target = dest / Path(*parts)
        target.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copy2(module, target / module.name)
    return setuptools["packages"]


def lint_imports(work: Path) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports not found: import-linter is in the dev extra (pip install -e '.[dev]')")
    stage_package(work / "src")
    env = {**os.environ, "PYTHONPATH": str(work / "src")}
    return subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)


def test_stage_holds_every_package(tmp_path):
    packages = stage_package(tmp_path)
    for package in packages:
        assert (tmp_path / Path(*package.split(".")) / "__init__.py").is_file(), package
    assert (tmp_path / "kubellm" / "runtime" / "serving" / "router.py").is_file()


def test_import_contracts_are_kept(tmp_path):
    result = lint_imports(tmp_path)
    assert result.returncode == 0, f"lint-imports: a contract of pyproject.toml is broken\n{result.stdout}{result.stderr}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as work:
        proc = lint_imports(Path(work))
        print(proc.stdout + proc.stderr, end="")
        sys.exit(proc.returncode)
