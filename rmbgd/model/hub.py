"""Where the model comes from: a local directory, the Hugging Face hub, or its local cache.

Only huggingface_hub is imported here (never torch), so `rmbgd fetch-model` starts quickly.
Every problem is a one-line ModelLoadError naming the config key to change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from rmbgd.errors import describe

# Long enough for a slow but working link to answer a HEAD request, short enough
# that a daemon on an offline machine reports the problem at once instead of
# sitting through huggingface_hub's retry back-off (about 23 s here).
HUB_PROBE_TIMEOUT_S = 5.0

# The extra that installs what BiRefNet's own code imports (see pyproject.toml).
BIREFNET_EXTRA_PACKAGES = ("timm", "kornia", "einops")
BIREFNET_EXTRA = "rmbgd[birefnet]"

# Files a model repository may hold that rmbgd never loads: exports for other runtimes and
# raw training checkpoints. RMBG-2.0 ships ONNX files several times the model's size.
_UNUSED_FILES = (
    "*.onnx",
    "*.onnx_data",
    "*.pth",
    "*.pt",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.tflite",
    "*.gguf",
    "*.mlmodel",
    "*.mlpackage/*",
)

_stdlib_log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """One line, for the operator; printed without traceback by the CLI.

    Always names the config key to change, e.g. ``model.name: ...``.
    """


def is_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that looks like a path
    # is one, so a mistyped directory gets a directory error, not a hub error.
    return (
        os.path.exists(name)
        or os.path.isabs(name)
        or name.startswith(("./", "../", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def offline_mode() -> bool:
    import huggingface_hub

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment is
    # read again so that the variable is honoured whenever it was set.
    return (
        huggingface_hub.is_offline_mode()
        or _env_flag("HF_HUB_OFFLINE")
        or _env_flag("TRANSFORMERS_OFFLINE")
    )


def locate_model(cfg: Any, log: Any = None) -> tuple[str, bool]:
    """Check ``model.name`` before transformers sees it.

    Returns what to pass to ``from_pretrained`` and whether it must stay off the
    network (``local_files_only``).
    """
    name = cfg.name
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"model.name: {name} is not a model directory (no config.json): the path does not exist"
            )
        if not path.is_dir():
            raise ModelLoadError(
                f"model.name: {name} is not a model directory (no config.json): it is a file"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name: {name} is not a model directory (no config.json)")
        # A local model needs nothing from the hub; staying offline means a
        # broken network can never stall loading it.
        return str(path), True

    _validate_hub_id(name)
    return name, _hub_needs_cache(cfg, log)


def _validate_hub_id(name: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise ModelLoadError(
            f"model.name: {name!r} is neither an existing local directory nor a valid "
            "Hugging Face model id (owner/name)"
        ) from exc


def probe_hub(name: str, revision: Optional[str]) -> Optional[str]:
    """Ask the hub for ``name``'s config.json once, quickly.

    Returns None when the hub answered, or why it is out of reach; raises
    ModelLoadError when its answer settles the matter (no such model, gated...).
    transformers would otherwise find out about a missing network through
    huggingface_hub's retry loop, whose back-off has no setting: 1+2+4+8+8 s
    before it gives up. This is one HEAD request without retries.
    """
    import huggingface_hub
    from huggingface_hub import errors

    url = huggingface_hub.hf_hub_url(name, "config.json", revision=revision)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
    except errors.GatedRepoError as exc:
        raise ModelLoadError(
            f"model.name: '{name}' is gated on the Hugging Face hub: accept its licence with your "
            f"account on https://huggingface.co/{name}, then give this machine an access token "
            "(set HF_TOKEN in the environment, or run `hf auth login` as this user)"
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"model.name: '{name}' was not found on the Hugging Face hub (check the spelling; "
            "a private model also needs an access token: set HF_TOKEN or run `hf auth login`)"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise ModelLoadError(
            f"model.revision: {revision!r} does not exist in '{name}' on the Hugging Face hub"
        ) from exc
    except errors.RemoteEntryNotFoundError as exc:
        raise ModelLoadError(
            f"model.name: '{name}' on the Hugging Face hub has no config.json; "
            "it is not a transformers model"
        ) from exc
    except errors.HfHubHTTPError as exc:
        # Server errors, rate limits, a proxy refusing: the cache may still do.
        return describe(exc, kind=False)
    except Exception as exc:  # noqa: BLE001
        # DNS, refused connections, TLS and timeouts surface as the HTTP
        # client's own exception types, which huggingface_hub does not
        # re-export; any of them means "the hub is out of reach".
        return describe(exc)
    return None


def _hub_needs_cache(cfg: Any, log: Any) -> bool:
    """True when loading must use the local cache only; raises when that cannot work."""
    import huggingface_hub

    name = cfg.name
    revision = getattr(cfg, "revision", None)
    offline = offline_mode()
    if not offline:
        unreachable = probe_hub(name, revision)
        if unreachable is None:
            return False
        log_info(log, "model_hub_unreachable", name=name, error=unreachable)

    cached = huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return True
    why = "HF_HUB_OFFLINE is set" if offline else "no network access?"
    at = f" at revision {revision!r}" if revision else ""
    example = name.rstrip("/").split("/")[-1]
    raise ModelLoadError(
        f"model.name: cannot download '{name}'{at} from the Hugging Face hub ({why}) and it is "
        f"not in this machine's Hugging Face cache ({cache_dir()}); run `rmbgd fetch-model --config PATH` "
        "where the hub is reachable to fill that cache, or, for an offline machine, copy the model "
        "folder to this machine and set model.name to that local directory, "
        f"e.g. model.name: /srv/rmbgd/models/{example}"
    )


def fetch_model(cfg: Any, to: Optional[Path] = None) -> Path:
    """Download ``model.name`` at ``model.revision`` into the hub cache, or into ``to``.

    Returns the folder holding the model. Only what rmbgd can load is downloaded:
    safetensors weights (``*.bin`` only when there are none), the config and the code.
    """
    import huggingface_hub

    name = cfg.name
    revision = getattr(cfg, "revision", None)
    if is_local_path(name):
        raise ModelLoadError(
            f"model.name: {name} is a local directory, not a Hugging Face model id; "
            "fetch-model needs an id such as ZhengPeng7/BiRefNet"
        )
    _validate_hub_id(name)
    if offline_mode():
        raise ModelLoadError(
            f"model.name: cannot fetch '{name}': HF_HUB_OFFLINE is set; run fetch-model "
            "without it, on a machine that can reach the Hugging Face hub"
        )
    unreachable = probe_hub(name, revision)
    if unreachable is not None:
        raise ModelLoadError(
            f"model.name: cannot fetch '{name}': the Hugging Face hub is out of reach "
            f"({unreachable}); run fetch-model on a machine with internet access and copy "
            "the result to this one"
        )
    try:
        files = huggingface_hub.list_repo_files(name, revision=revision)
        ignore = list(_UNUSED_FILES)
        if any(path.endswith(".safetensors") for path in files):
            ignore.append("*.bin")
        folder = huggingface_hub.snapshot_download(
            name,
            revision=revision,
            local_dir=None if to is None else str(to),
            ignore_patterns=ignore,
        )
    except Exception as exc:  # noqa: BLE001
        # The model-loading boundary for downloads: network drops, full disks and
        # permission problems all end as one line for the operator.
        raise ModelLoadError(
            f"model.name: downloading '{name}' failed: {describe(exc)}"
        ) from exc
    return Path(folder)


def missing_packages_hint(missing: list[str]) -> str:
    """What to install for the named packages, pointing BiRefNet's at rmbgd's extra."""
    if missing and all(package in BIREFNET_EXTRA_PACKAGES for package in missing):
        return (
            f"pip install '{BIREFNET_EXTRA}' (BiRefNet's code needs "
            f"{', '.join(BIREFNET_EXTRA_PACKAGES)})"
        )
    return f"pip install {' '.join(missing)}"


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def log_info(log: Any, event: str, **fields: Any) -> None:
    # Info, not warning: when the cache cannot stand in, the ModelLoadError says
    # it all, and an unconfigured root logger prints warnings to stderr.
    if log is not None:
        log.info(event, **fields)
    else:
        _stdlib_log.info("%s %s", event, fields)


def _env_flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
