"""Doctor check: the Python packages rmbgd and the model's own code import."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any, Optional, Tuple

from rmbgd.runtime.doctor.model import cached_file
from rmbgd.runtime.doctor.result import FAIL, OK, Result

# What rmbgd itself imports, as (module, distribution). isal is optional (a faster zlib).
CORE_PACKAGES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("huggingface_hub", "huggingface-hub"),
    ("safetensors", "safetensors"),
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("pillow_heif", "pillow-heif"),
    ("yaml", "pyyaml"),
    ("structlog", "structlog"),
    ("watchdog", "watchdog"),
)
# What model code commonly imports beyond torch; looked for in the model's own .py files.
MODEL_CODE_PACKAGES = ("timm", "kornia", "einops", "torchvision")
# Without the model's code at hand (a hub model not yet cached), its name decides.
_BIREFNET_NAME_RE = re.compile(r"birefnet|rmbg", re.IGNORECASE)
_IMPORT_RE = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.MULTILINE)


def check_packages(model_cfg: Any) -> Result:
    from rmbgd.model.hub import missing_packages_hint

    found, missing = [], []
    needed = [module for module, _ in CORE_PACKAGES] + list(model_code_packages(model_cfg))
    for module in needed:
        if importable(module):
            found.append(f"{module} {_version(module)}")
        else:
            missing.append(_DISTRIBUTION.get(module, module))
    if missing:
        return Result(FAIL, "packages", f"missing {', '.join(missing)}: {missing_packages_hint(missing)}")
    return Result(OK, "packages", ", ".join(found))


_DISTRIBUTION = dict(CORE_PACKAGES)


def model_code_packages(model_cfg: Any) -> Tuple[str, ...]:
    """The packages the model's own code imports, of those rmbgd does not install itself."""
    folder = _model_code_folder(model_cfg)
    if folder is not None:
        imported = set()
        for code in folder.glob("*.py"):
            try:
                imported.update(_IMPORT_RE.findall(code.read_text(encoding="utf-8", errors="replace")))
            except OSError:
                continue
        return tuple(name for name in MODEL_CODE_PACKAGES if name in imported)
    if _BIREFNET_NAME_RE.search(model_cfg.name):
        from rmbgd.model.hub import BIREFNET_EXTRA_PACKAGES

        return tuple(BIREFNET_EXTRA_PACKAGES) + ("torchvision",)
    return ()


def _model_code_folder(model_cfg: Any) -> Optional[Path]:
    from rmbgd.model.hub import is_local_path

    if is_local_path(model_cfg.name):
        path = Path(model_cfg.name).expanduser()
        return path if path.is_dir() else None
    cached = cached_file(model_cfg, "config.json")
    return Path(cached).parent if cached else None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
