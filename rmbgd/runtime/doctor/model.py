"""Doctor check: is the model at hand (a local folder or the Hugging Face cache), nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rmbgd.runtime.doctor.result import FAIL, OK, WARN, Result

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model(model_cfg: Any) -> Result:
    from rmbgd.model.hub import is_local_path

    name = model_cfg.name
    if is_local_path(name):
        problem = local_model_problem(Path(name).expanduser(), model_cfg.trust_remote_code)
        if problem:
            return Result(FAIL, "model", f"model.name: {name}: {problem}")
        return Result(OK, "model", f"local folder {name} (config.json, code and weights present)")
    cached = cached_file(model_cfg, "config.json")
    if cached:
        folder = Path(cached).parent
        problem = local_model_problem(folder, model_cfg.trust_remote_code)
        if problem:
            return Result(FAIL, "model", f"{name} in this machine's Hugging Face cache ({folder}): {problem}")
        return Result(OK, "model", f"{name} is in this machine's Hugging Face cache ({folder})")
    from rmbgd.model.hub import cache_dir, offline_mode

    fetch = (
        f"run `rmbgd fetch-model --config PATH` on a machine that can reach the Hugging Face hub, then "
        f"copy its cache to {cache_dir()} here, or use `--to DIR` and set model.name to that folder"
    )
    missing = f"{name} is not in this machine's Hugging Face cache ({cache_dir()})"
    if offline_mode():
        return Result(FAIL, "model", f"{missing} and HF_HUB_OFFLINE is set: {fetch}")
    from rmbgd.model.hub import ModelLoadError, probe_hub

    # One quick request for config.json's metadata, as `rmbgd run` makes first; nothing is downloaded.
    try:
        unreachable = probe_hub(name, getattr(model_cfg, "revision", None))
    except ModelLoadError as exc:
        return Result(FAIL, "model", str(exc))
    if unreachable is not None:
        return Result(FAIL, "model", f"{missing} and the hub is out of reach ({unreachable}): {fetch}")
    return Result(WARN, "model", f"{missing}; `rmbgd run` will download it from the hub at its first start")


def local_model_problem(folder: Path, trust_remote_code: bool) -> Optional[str]:
    """What is missing for rmbgd to load the model folder, or None when it looks complete."""
    if not folder.is_dir():
        return "the folder does not exist" if not folder.exists() else "not a folder"
    config_file = folder / "config.json"
    if not config_file.is_file():
        return "no config.json (not a transformers model folder; `rmbgd fetch-model --to DIR` makes one)"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"config.json cannot be read: {exc}"
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and auto_map:
        if not trust_remote_code:
            return "the model ships its own code (auto_map) but model.trust_remote_code is false"
        for reference in auto_map.values():
            reference = reference[0] if isinstance(reference, list) and reference else reference
            if isinstance(reference, str) and "--" not in reference:
                module = reference.rsplit(".", 1)[0]
                if not (folder / f"{module}.py").is_file():
                    return f"config.json's auto_map names {module}.py, which is missing"
    elif not config.get("model_type"):
        return "config.json has neither auto_map nor model_type: transformers cannot tell which model it is"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return f"no weights ({' or '.join(_WEIGHT_FILES[::2])})"
    return None


def cached_file(model_cfg: Any, filename: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(model_cfg.name, filename, revision=getattr(model_cfg, "revision", None))
    except (HFValidationError, ValueError, OSError):
        return None
    return found if isinstance(found, str) else None
