"""The package's layering, as pyproject.toml's import-linter contracts write it down.

Stages sit in sub-packages (config, intake, batching, imaging, model, render, output,
runtime, ops); the contracts keep torch, transformers, numpy and Pillow out of the light
layers and runtime out of everything but cli. The private-name rule is checked here with
the ast module, import-linter has no such contract.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.daemon import REPO

PACKAGE = REPO / "rmbgd"

CONTRACTS = [
    "intake, batching, output, config and ops never import torch, transformers, numpy or Pillow",
    "imaging and render never import torch (refinement is handed to render as a callable)",
    "model never imports intake, output, runtime or ops",
    "output never imports render or imaging",
    "nothing but cli imports runtime",
    "api reaches the pipeline only through the Backend the daemon hands it",
    "rmbgd.errors imports nothing of rmbgd's, so every layer may use it",
]

# What `rmbgd check` does without today; each is seconds of import time or more (torch).
HEAVY = ["torch", "torchvision", "transformers", "huggingface_hub", "safetensors", "numpy", "PIL", "watchdog"]


def lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    """import-linter on the package under `root`, with the contracts in `config`."""
    code = (
        "import sys\n"
        "from importlinter.cli import lint_imports\n"
        f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))\n"
    )
    # cwd first on sys.path (python -c), so `rmbgd` is the copy under root.
    return subprocess.run([sys.executable, "-c", code], cwd=str(root), capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    result = lint_imports(REPO, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    kept = [line for line in result.stdout.splitlines() if line.endswith(" KEPT")]
    assert len(kept) == len(CONTRACTS), result.stdout
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout


def test_import_contracts_catch_a_heavy_import_and_a_runtime_import(tmp_path):
    # The contracts must be able to fail: the same check on a copy with two violations.
    shutil.copytree(PACKAGE, tmp_path / "rmbgd", ignore=shutil.ignore_patterns("__pycache__"))
    job = tmp_path / "rmbgd" / "batching" / "job.py"
    job.write_text(job.read_text() + "\n\ndef _late():\n    import numpy  # noqa: F401\n")
    notify = tmp_path / "rmbgd" / "ops" / "notify.py"
    notify.write_text(notify.read_text() + "\nfrom rmbgd.runtime import daemon  # noqa: E402,F401\n")
    result = lint_imports(tmp_path, REPO / "pyproject.toml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rmbgd.batching is not allowed to import numpy" in result.stdout
    assert "rmbgd.ops is not allowed to import rmbgd.runtime" in result.stdout
    assert f"Contracts: {len(CONTRACTS) - 2} kept, 2 broken." in result.stdout


def _module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, source_text: str | None = None) -> list[str]:
    """`from rmbgd.x import _name`, and `mod._name` on an imported rmbgd module, in one file."""
    here = _module_of(path)
    text = path.read_text() if source_text is None else source_text
    tree = ast.parse(text, filename=str(path))
    found = []
    modules = set()  # local names bound to another rmbgd module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                package = here.split(".")[: -node.level] if path.name != "__init__.py" else here.split(".")
                source = ".".join(package + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "rmbgd" or source == here:
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {source}.{alias.name}")
                elif _is_module(f"{source}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rmbgd" and alias.asname and alias.name != here:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and _private(node.attr)
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in private_imports(path)]
    assert found == []


def test_the_private_name_check_sees_both_forms():
    # The rule above must be able to fail: a from-import and an attribute on an imported module.
    sample = PACKAGE / "ops" / "_sample_for_test.py"
    source = "from rmbgd.model.hub import _first\nfrom rmbgd.output import fsops\nfsops._helper()\n"
    assert private_imports(sample, source) == [
        "rmbgd/ops/_sample_for_test.py:1: rmbgd.model.hub._first",
        "rmbgd/ops/_sample_for_test.py:3: fsops._helper",
    ]


def test_check_never_imports_the_model_libraries(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"paths": {
        "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
        "errors": str(tmp_path / "errors"), "done": None,
    }}))
    code = (
        "import json, sys\n"
        "from rmbgd import cli\n"
        f"status = cli.main(['check', '--config', {str(config)!r}])\n"
        f"loaded = sorted(name for name in {HEAVY!r} if name in sys.modules)\n"
        "print(json.dumps({'status': status, 'loaded': loaded}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    *_, last = result.stdout.splitlines()
    assert yaml.safe_load(last) == {"status": 0, "loaded": []}, result.stdout
