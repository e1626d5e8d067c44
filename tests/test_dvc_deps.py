"""Stage dependencies are correct by construction: every project file a stage's code can load is a dep in dvc.yaml.

For each stage, its module (`python -m pipeline.<stage>`) is imported in a fresh subprocess and the project
files in `sys.modules` are collected; the imports written anywhere in those files (also inside functions, which
run only on some paths) are followed too. A file found that the stage's `deps` do not cover (as the file or a
folder above it) fails the test with the list to add, so editing a file always re-runs the stages that use it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models")


def _module_file(name: str) -> Path | None:
    """The project file of module `name` (package `__init__.py` or module `.py`), None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Project modules named by every import statement of `path` (at any depth), with their parent packages."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from models import t5`
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in out if _module_file(n) is not None}


def loaded_at_import(module: str) -> set[str]:
    """Project modules in `sys.modules` after importing `module` in a fresh interpreter."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {n for n in json.loads(result.stdout.splitlines()[-1]) if _module_file(n) is not None}


def project_files(module: str) -> set[str]:
    """Repo-relative paths of every project file `module` loads, at import time or by any import it contains."""
    todo = sorted(loaded_at_import(module) | {module})
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imports(_module_file(name)) - seen)
    return {_module_file(n).relative_to(ROOT).as_posix() for n in seen}


def stage_modules() -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage name -> (the `pipeline.<x>` module its command runs, its deps)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, body in stages.items():
        words = body["cmd"].split()
        if "-m" in words and words[words.index("-m") + 1].startswith("pipeline."):
            out[name] = (words[words.index("-m") + 1], [str(d) for d in body.get("deps", [])])
    return out


def covered(path: str, deps: list[str]) -> bool:
    """Whether `path` is one of `deps` or inside a folder among them."""
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = stage_modules()


def test_every_code_stage_is_checked():
    assert {"prepare", "tokenize", "pretrain", "finetune", "evaluate", "benchmark", "compare"} <= set(STAGES)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_loads(stage):
    module, deps = STAGES[stage]
    missing = sorted(p for p in project_files(module) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} ({module}) loads files its deps miss; add: {missing}"


def test_the_check_notices_a_missing_dep():
    """The check can fail: train.py's own files minus one listed module is reported."""
    files = project_files("pipeline.pretrain")
    assert {"pipeline/training/train.py", "pipeline/training/launch.py", "models/reformer.py", "models/t5.py"} <= files
    deps = sorted(files - {"pipeline/training/launch.py"})
    assert [p for p in files if not covered(p, deps)] == ["pipeline/training/launch.py"]
    assert all(covered(p, ["pipeline", "models/"]) for p in files)
