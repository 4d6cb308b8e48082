"""Model-loading failures turned into one-line ModelLoadErrors that name the fix."""

from __future__ import annotations

import re
from typing import Any

from rmbgd.errors import describe
from rmbgd.model.hub import ModelLoadError, missing_packages_hint

_MISSING_PACKAGES_RE = re.compile(r"not found in your environment: (.+?)\. Run")


def load_error(cfg: Any, exc: BaseException) -> ModelLoadError:
    """The one line for a loading failure, naming the key (or the package) to fix."""
    name = cfg.name
    if isinstance(exc, ModelLoadError):
        return exc
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return ModelLoadError(
            f"model.trust_remote_code: '{name}' needs its own Python code to run; "
            "set model.trust_remote_code: true if you trust that code"
        )
    if isinstance(exc, ImportError):
        missing = _missing_packages(exc)
        if missing:
            if len(missing) == 1:
                what = f"the Python package '{missing[0]}', which is not installed"
            else:
                listed = ", ".join(f"'{package}'" for package in missing)
                what = f"the Python packages {listed}, which are not installed"
            return ModelLoadError(
                f"model.name: the model's code needs {what}: {missing_packages_hint(missing)}"
            )
    return ModelLoadError(f"model.name: cannot load '{name}': {describe(exc)}")


def _missing_packages(exc: ImportError) -> list[str]:
    # transformers checks a model file's imports before running it and lists
    # every missing one; a failure inside the code itself names only one module.
    match = _MISSING_PACKAGES_RE.search(str(exc))
    if match is not None:
        return [package.strip() for package in match.group(1).split(",") if package.strip()]
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return [exc.name.split(".")[0]]
    return []

