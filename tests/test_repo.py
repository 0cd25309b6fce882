"""The repository keeps its promises: README's commands, CI, requirements, `common/` stays pure, lint is clean."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("pannuke", "stress_granules", "cellsam", "retinopathy", "hydra_lv")
TEST_COMMAND = ".venv/bin/python -m pytest -q"


def readme_code_blocks():
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```(?:bash|bat)?\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_the_two_setup_commands():
    first, second = readme_code_blocks()[:2]
    assert first.startswith("python3 -m venv .venv") and "pip install -r requirements.txt" in first
    assert first.endswith("pannuke/train.py --demo")
    assert second.startswith("python3 -m venv .venv") and "pip install -r requirements-dev.txt" in second
    assert second.endswith(TEST_COMMAND)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    commands = [line for line in ci.splitlines() if line and not line.startswith("#")]
    assert commands[-1] == TEST_COMMAND
    assert "requirements.txt" in ci and "requirements-dev.txt" in ci


def test_requirements_use_one_headless_opencv():
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    assert "opencv-python-headless" in names
    assert not names & {"opencv-python", "opencv-contrib-python"}
    for needed in ("torch", "torchvision", "albumentations", "numpy", "scipy", "scikit-image", "scikit-learn"):
        assert needed in names
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev and "pytest" in dev and "ruff" in dev


def test_layout():
    for path in ("requirements.txt", "requirements-dev.txt", "README.md", "pyproject.toml", ".gitignore", "common"):
        assert (ROOT / path).exists(), path
    for domain in DOMAINS:
        assert (ROOT / domain).is_dir(), domain
    ignored = (ROOT / ".gitignore").read_text()
    assert ".venv/" in ignored and "/runs/" in ignored


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "common").glob("*.py")))
def test_common_has_no_io_and_no_argparse(module):
    """common/ is pure functions and small modules: no command line, no files, no training loop."""
    tree = ast.parse((ROOT / "common" / module).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"argparse", "os", "shutil", "pathlib", "h5py", "tifffile", "pandas"}
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert not calls & {"open", "load", "save", "imread", "imwrite", "savez", "print"}


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -r requirements-dev.txt)")
    result = subprocess.run([ruff, "check", "--output-format", "concise", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def readme_import_line():
    python_blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(line for block in python_blocks for line in block.splitlines() if line.startswith("sys.path.insert"))


@pytest.mark.parametrize("layout", ["in_repo", "copied_out"])
def test_readme_import_line_finds_common_from_any_directory(tmp_path, layout):
    """A script with README's first line imports `common` and its own domain package, wherever it is run from:
    inside this repository, or copied out together with `common/` as README says."""
    root = ROOT if layout == "in_repo" else tmp_path / "experiment"
    if layout == "copied_out":
        shutil.copytree(ROOT / "common", root / "common", ignore=shutil.ignore_patterns("__pycache__"))
    domain = root / f"_probe_domain_{layout}"
    domain.mkdir(parents=True)
    try:
        (domain / "__init__.py").write_text("")
        (domain / "model.py").write_text("WIDTH = 7\n")
        (domain / "train.py").write_text(
            "import sys\nfrom pathlib import Path\n\n"
            + readme_import_line()
            + f"\nimport common.metrics\nfrom {domain.name}.model import WIDTH\n"
            + "print(Path(common.metrics.__file__).resolve().parent.parent, WIDTH)\n"
        )
        result = subprocess.run(
            [sys.executable, str(domain / "train.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [str(root.resolve()), "7"]
    finally:
        shutil.rmtree(domain)
