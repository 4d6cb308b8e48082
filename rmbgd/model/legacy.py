"""The legacy loader: models whose remote code predates transformers 5's from_pretrained.

Builds the model from its config and loads its safetensors strictly; a missing, unexpected
or misshapen weight is a one-line ModelLoadError naming a few of them.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch

from rmbgd.errors import describe, first_line
from rmbgd.model.hub import ModelLoadError

# What older remote code (BiRefNet before 2025, RMBG-2.0) trips over in
# transformers 5's from_pretrained: a plain object as self.config, .item() on
# tensors built on the meta device, and no post_init().
_LEGACY_MESSAGE_RE = re.compile(r"\bmeta\b", re.IGNORECASE)
_NORM_WITH_STATS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)


def needs_legacy_loader(exc: BaseException) -> Optional[str]:
    """Why ``exc`` looks like older remote code meeting transformers 5, or None."""
    if isinstance(exc, AttributeError):
        # self.config replaced by a plain object ('model_type', 'get_text_config', ...)
        # or post_init() never called ('all_tied_weights_keys').
        return describe(exc)
    if isinstance(exc, (RuntimeError, NotImplementedError)) and _LEGACY_MESSAGE_RE.search(str(exc)):
        # .item() (or another data access) on a tensor built on the meta device.
        return describe(exc)
    return None


def load_legacy(cfg: Any, source: str, hub_kwargs: dict, torch_dtype: torch.dtype) -> Any:
    """Build the model class from config.json's auto_map, construct it, load its weights strictly.

    The path transformers 4 took: the model is constructed for real (on the CPU,
    not on the meta device), so its __init__ may do what it likes, and the weights
    are copied in with ``load_state_dict``.
    """
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    name = cfg.name
    config = AutoConfig.from_pretrained(
        source, trust_remote_code=cfg.trust_remote_code, **hub_kwargs
    )
    auto_map = getattr(config, "auto_map", None) or {}
    reference = auto_map.get("AutoModelForImageSegmentation")
    if isinstance(reference, (list, tuple)):
        reference = reference[0] if reference else None
    if not reference:
        raise ModelLoadError(
            f"model.name: cannot load '{name}': its config.json has no auto_map entry for "
            "AutoModelForImageSegmentation"
        )
    model_class = get_class_from_dynamic_module(reference, source, **hub_kwargs)
    # BiRefNet's signature is (bb_pretrained=True, config=...): the config goes by name
    # where the class takes one by that name.
    if "config" in inspect.signature(model_class.__init__).parameters:
        model = model_class(config=config)
    else:
        model = model_class(config)
    state = _read_safetensors(name, source, hub_kwargs)
    _load_state_strictly(name, model, state)
    return model.to(torch_dtype)


def _read_safetensors(name: str, source: str, hub_kwargs: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    def locate(filename: str) -> Optional[str]:
        return cached_file(source, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    index = locate("model.safetensors.index.json")
    if index is not None:
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = locate(shard)
        if path is None:
            raise ModelLoadError(
                f"model.name: cannot load '{name}': {shard} is missing (older model code is "
                "loaded from safetensors weights only)"
            )
        state.update(load_file(path))
    return state


def _load_state_strictly(name: str, model: Any, state: dict[str, torch.Tensor]) -> None:
    """Every learned tensor must come from the checkpoint and every tensor in it must be used.

    Buffers the checkpoint lacks are allowed when the model's own __init__ computes them
    (index tables and the like), which it really ran on this path.
    """
    expected = model.state_dict()
    mismatched = [
        (key, tuple(tensor.shape), tuple(expected[key].shape))
        for key, tensor in state.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    wrong = {key for key, _, _ in mismatched}
    result = model.load_state_dict(
        {key: tensor for key, tensor in state.items() if key not in wrong}, strict=False
    )
    missing = [key for key in result.missing_keys if key not in wrong]
    weights, _ = _classify_missing(model, missing)
    _raise_weight_problems(name, weights, result.unexpected_keys, mismatched, [])


def check_loading_info(name: str, model: Any, info: dict) -> list[str]:
    """Refuse what from_pretrained could not load; returns the computed buffers it left out."""
    weights, computed = _classify_missing(model, info.get("missing_keys") or ())
    mismatched = []
    for entry in info.get("mismatched_keys") or ():
        if isinstance(entry, (tuple, list)) and len(entry) == 3:
            key, stored, wanted = entry
            mismatched.append((str(key), tuple(stored), tuple(wanted)))
        else:  # only the name, in some transformers versions
            mismatched.append((str(entry), None, None))
    _raise_weight_problems(
        name, weights, info.get("unexpected_keys") or (), mismatched, info.get("error_msgs") or ()
    )
    return computed


def _classify_missing(model: Any, missing: Iterable[str]) -> tuple[list[str], list[str]]:
    """Checkpoint keys the model wanted but did not get: (learned ones, computed buffers).

    Parameters and normalisation layers' running statistics are learned, so without them
    the model predicts nonsense; BatchNorm's num_batches_tracked is a training counter
    that evaluation never reads, and is not reported at all.
    """
    buffers = {key for key, _ in model.named_buffers()}
    learned_buffers = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM_WITH_STATS) and getattr(module, "track_running_stats", False):
            learned_buffers.update(
                f"{prefix}.{stat}" if prefix else stat for stat in ("running_mean", "running_var")
            )
    learned, computed = [], []
    for key in sorted(missing):
        if key not in buffers or key in learned_buffers:
            learned.append(key)
        elif not key.endswith("num_batches_tracked"):
            computed.append(key)
    return learned, computed


def _raise_weight_problems(
    name: str,
    missing: Sequence[str],
    unexpected: Iterable[str],
    mismatched: Sequence[tuple[str, Optional[tuple], Optional[tuple]]],
    errors: Sequence[str],
) -> None:
    unexpected = sorted(unexpected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the checkpoint ({some_names(missing)})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint ({some_names(unexpected)})"
        )
    if mismatched:
        shown = [
            key if stored is None else f"{key}: {list(stored)} in the checkpoint, {list(wanted)} in the code"
            for key, stored, wanted in sorted(mismatched)
        ]
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape ({some_names(shown)})")
    if errors:
        problems.append(f"{len(errors)} loading error(s) ({first_line(errors[0])})")
    if problems:
        raise ModelLoadError(
            f"model.name: cannot load '{name}': its weights do not match its code: "
            + "; ".join(problems)
            + " (an incomplete download, or weights for other code?)"
        )


def some_names(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(list(keys)[:limit])
    return shown + (", ..." if len(keys) > limit else "")
