"""The segmentation model: loading it, and turning batches of images into masks.

This is the only module that imports torch and transformers; the rest of rmbgd
imports it lazily so that the command line stays quick to start.

The model contract is BiRefNet's: RGB resized to ``input_size`` squared (by the
caller), ImageNet normalisation, a list of logit maps of shape (B, 1, S, S) out,
the last one being the final prediction.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Long enough for a slow but working link to answer a HEAD request, short enough
# that a daemon on an offline machine reports the problem at once instead of
# sitting through huggingface_hub's retry back-off (about 23 s here).
HUB_PROBE_TIMEOUT_S = 5.0

_DEVICE_RE = re.compile(r"cuda(?::(\d+))?")
_MISSING_PACKAGES_RE = re.compile(r"not found in your environment: (.+?)\. Run")

_stdlib_log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """One line, for the operator; printed without traceback by the CLI.

    Always names the config key to change, e.g. ``model.name: ...``.
    """


# --------------------------------------------------------------------------- device


def resolve_device(spec: str) -> str:
    """Turn ``model.device`` into a torch device string, checking that it exists."""
    wanted = spec.strip().lower()
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return "cpu"
    match = _DEVICE_RE.fullmatch(wanted)
    if match is None:
        raise ModelLoadError(f"model.device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.device: {wanted} requested but CUDA is not available "
            "(torch was built without CUDA or no GPU is visible)"
        )
    if match.group(1) is not None:
        count = torch.cuda.device_count()
        if int(match.group(1)) >= count:
            raise ModelLoadError(
                f"model.device: {wanted} requested but only {count} CUDA device(s) visible"
            )
    return wanted


def dtype_for_device(device: str) -> str:
    """The compute dtype for a resolved device: half precision on GPUs, full on CPU.

    CPUs have no fast fp16 convolutions, and BiRefNet is accurate enough in fp16.
    """
    return "float16" if torch.device(device).type == "cuda" else "float32"


# --------------------------------------------------------------------------- inference


class Segmenter:
    """A loaded model on its device, turning resized RGB images into alpha masks."""

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        device: str,
        dtype: str,
        input_size: int,
    ) -> None:
        self.name = name
        self.device = device
        self.dtype = dtype
        self.input_size = input_size
        self._model = model
        self._torch_dtype = getattr(torch, dtype)
        self._on_cuda = torch.device(device).type == "cuda"
        # (x / 255 - mean) / std folded into one multiply-add per pixel.
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(device=device, dtype=self._torch_dtype)
        self._shift = (-mean / std).to(device=device, dtype=self._torch_dtype)

    def predict(
        self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        """One model call for the whole batch; returns one (height, width) uint8 mask per image.

        ``images`` are (S, S, 3) uint8 RGB, already resized to ``input_size``;
        ``sizes`` are the (width, height) of the originals.
        """
        if len(images) != len(sizes):
            raise ValueError(f"got {len(images)} images but {len(sizes)} sizes")
        if not images:
            return []
        side = self.input_size
        for index, image in enumerate(images):
            if image.shape != (side, side, 3) or image.dtype != np.uint8:
                raise ValueError(
                    f"image {index}: expected a ({side}, {side}, 3) uint8 array, "
                    f"got {image.shape} {image.dtype}"
                )
        shapes = [(int(height), int(width)) for width, height in sizes]
        for index, (height, width) in enumerate(shapes):
            if height <= 0 or width <= 0:
                raise ValueError(f"image {index}: invalid original size {width}x{height}")

        # Filled in place so the batch is copied once, straight into pinned memory
        # on CUDA, which is what lets the upload below run asynchronously.
        host = torch.empty((len(images), side, side, 3), dtype=torch.uint8, pin_memory=self._on_cuda)
        host_view = host.numpy()
        for index, image in enumerate(images):
            host_view[index] = image

        with torch.inference_mode():
            batch = host.to(self.device, non_blocking=self._on_cuda)
            pixels = batch.permute(0, 3, 1, 2).to(
                dtype=self._torch_dtype, memory_format=torch.contiguous_format
            )
            pixels.mul_(self._scale).add_(self._shift)
            logits = _final_logits(self._model(pixels), len(images))
            # Sigmoid and resampling in fp32: cheap next to the model, and fp16
            # would cost a grey level near the top of the range.
            probs = logits.float().sigmoid()
            flat = [
                F.interpolate(
                    probs[index : index + 1], size=shape, mode="bilinear", align_corners=False
                ).reshape(-1)
                for index, shape in enumerate(shapes)
            ]
            packed = torch.cat(flat).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
            # One device-to-host copy (and one sync) for the whole batch.
            packed_host = packed.cpu().numpy()

        masks = []
        offset = 0
        for height, width in shapes:
            masks.append(packed_host[offset : offset + height * width].reshape(height, width))
            offset += height * width
        return masks

    def warmup(self) -> None:
        """Run one tiny batch so that lazy initialisation does not land on the first real one."""
        side = self.input_size
        self.predict([np.zeros((side, side, 3), dtype=np.uint8)], [(side, side)])


def _final_logits(output: Any, batch_size: int) -> torch.Tensor:
    """The final (B, 1, S, S) logit map out of whatever the model's forward returned."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, (list, tuple)) and output and isinstance(output[-1], torch.Tensor):
        # BiRefNet returns coarse-to-fine predictions; only the last is the final mask.
        logits = output[-1]
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        logits = output.logits
    else:
        raise TypeError(
            f"the model returned {type(output).__name__}; expected a list of logit maps"
        )
    if logits.dim() != 4 or logits.shape[0] != batch_size or logits.shape[1] != 1:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)}; "
            f"expected ({batch_size}, 1, H, W)"
        )
    return logits


# --------------------------------------------------------------------------- loading


def load_segmenter(cfg: Any, *, log: Any = None) -> Segmenter:
    """Load ``cfg.name`` onto ``cfg.device``; every failure is a one-line ModelLoadError."""
    device = resolve_device(cfg.device)
    dtype = dtype_for_device(device)
    name = cfg.name
    if log is not None:
        log.info("model_loading", name=name, device=device, dtype=dtype)
    started = time.perf_counter()

    _quiet_library_output()
    source, local_files_only = _locate_model(cfg, log)
    model = _from_pretrained(cfg, source, local_files_only, getattr(torch, dtype), log)
    try:
        model = model.to(device).eval()
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"model.device: not enough GPU memory on {device} to load '{name}'"
        ) from exc
    except RuntimeError as exc:
        raise ModelLoadError(
            f"model.device: cannot move '{name}' to {device}: {_first_line(exc)}"
        ) from exc

    ms = round((time.perf_counter() - started) * 1000.0, 1)
    if log is not None:
        log.info("model_loaded", name=name, device=device, dtype=dtype, ms=ms)
    return Segmenter(model, name=name, device=device, dtype=dtype, input_size=cfg.input_size)


def _quiet_library_output() -> None:
    """Keep transformers and huggingface_hub off stdout/stderr; their records go to the root logger.

    stdout carries the daemon's JSON log, and stray progress bars or plain-text
    warnings on stderr would be noise in the journal. Process-wide on purpose:
    the daemon loads one model and these libraries do nothing else in it.
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    disable_progress_bars()
    # huggingface_hub has no switch for its stderr handler, but its logger
    # already propagates, so dropping the handler is enough.
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)


def _locate_model(cfg: Any, log: Any) -> tuple[str, bool]:
    """Check ``model.name`` before transformers sees it.

    Returns what to pass to ``from_pretrained`` and whether it must stay off the
    network (``local_files_only``).
    """
    name = cfg.name
    if _is_local_path(name):
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

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise ModelLoadError(
            f"model.name: {name!r} is neither an existing local directory nor a valid "
            "Hugging Face model id (owner/name)"
        ) from exc
    return name, _hub_needs_cache(cfg, log)


def _is_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that looks like a path
    # is one, so a mistyped directory gets a directory error, not a hub error.
    return (
        os.path.exists(name)
        or os.path.isabs(name)
        or name.startswith(("./", "../", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _hub_needs_cache(cfg: Any, log: Any) -> bool:
    """Probe the hub for ``cfg.name`` quickly; True when loading must use the local cache only.

    transformers would otherwise find out about a missing network through
    huggingface_hub's retry loop, whose back-off has no setting: 1+2+4+8+8 s
    before it gives up. The probe is one HEAD request without retries.
    """
    import huggingface_hub
    from huggingface_hub import errors

    name = cfg.name
    revision = getattr(cfg, "revision", None)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment is
    # read again so that the variable is honoured whenever it was set.
    offline = (
        huggingface_hub.is_offline_mode()
        or _env_flag("HF_HUB_OFFLINE")
        or _env_flag("TRANSFORMERS_OFFLINE")
    )
    if not offline:
        url = huggingface_hub.hf_hub_url(name, "config.json", revision=revision)
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
        except errors.GatedRepoError as exc:
            raise ModelLoadError(
                f"model.name: '{name}' is gated on the Hugging Face hub: accept its terms on "
                "huggingface.co, then log in on this machine with `hf auth login`"
            ) from exc
        except errors.RepositoryNotFoundError as exc:
            raise ModelLoadError(
                f"model.name: '{name}' was not found on the Hugging Face hub (check the spelling; "
                "a private model also needs `hf auth login`)"
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
            _log_info(log, "model_hub_unreachable", name=name, error=_first_line(exc))
        except Exception as exc:  # noqa: BLE001
            # DNS, refused connections, TLS and timeouts surface as the HTTP
            # client's own exception types, which huggingface_hub does not
            # re-export; any of them means "the hub is out of reach".
            _log_info(
                log, "model_hub_unreachable", name=name, error=f"{type(exc).__name__}: {_first_line(exc)}"
            )
        else:
            return False

    cached = huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return True
    why = "HF_HUB_OFFLINE is set" if offline else "no network access?"
    example = name.rstrip("/").split("/")[-1]
    raise ModelLoadError(
        f"model.name: cannot download '{name}' from the Hugging Face hub ({why}); on an offline "
        "machine, copy the model folder there and set model.name to that local directory, "
        f"e.g. model.name: /srv/rmbgd/models/{example}"
    )


def _from_pretrained(
    cfg: Any, source: str, local_files_only: bool, torch_dtype: torch.dtype, log: Any
) -> Any:
    from transformers import AutoModelForImageSegmentation

    name = cfg.name
    kwargs: dict[str, Any] = {
        "trust_remote_code": cfg.trust_remote_code,
        "revision": getattr(cfg, "revision", None),
        # Explicit: transformers 5 defaults to dtype="auto", which would keep an
        # fp16 checkpoint in fp16 on CPU.
        "dtype": torch_dtype,
    }
    if local_files_only:
        kwargs["local_files_only"] = True

    caught: list[warnings.WarningMessage] = []
    try:
        # Remote model code may call warnings.warn, which writes to stderr;
        # the warnings are logged instead, after loading.
        with warnings.catch_warnings(record=True) as caught:
            return AutoModelForImageSegmentation.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"model.trust_remote_code: '{name}' needs its own Python code to run; "
                "set model.trust_remote_code: true if you trust that code"
            ) from exc
        raise _cannot_load(name, exc) from exc
    except ImportError as exc:
        missing = _missing_packages(exc)
        if not missing:
            raise _cannot_load(name, exc) from exc
        if len(missing) == 1:
            what = f"the Python package '{missing[0]}', which is not installed"
        else:
            listed = ", ".join(f"'{package}'" for package in missing)
            what = f"the Python packages {listed}, which are not installed"
        raise ModelLoadError(
            f"model.name: the model's code needs {what}: pip install {' '.join(missing)}"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        # The model-loading boundary: remote model code can raise anything, and
        # the operator must get one line naming the key, never a traceback.
        raise _cannot_load(name, exc) from exc
    finally:
        for warning in caught:
            _log_warning(log, warning)


def _missing_packages(exc: ImportError) -> list[str]:
    # transformers checks a model file's imports before running it and lists
    # every missing one; a failure inside the code itself names only one module.
    match = _MISSING_PACKAGES_RE.search(str(exc))
    if match is not None:
        return [package.strip() for package in match.group(1).split(",") if package.strip()]
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return [exc.name.split(".")[0]]
    return []


def _cannot_load(name: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(f"model.name: cannot load '{name}': {type(exc).__name__}: {_first_line(exc)}")


def _log_warning(log: Any, warning: warnings.WarningMessage) -> None:
    message = _first_line(warning.message)
    category = warning.category.__name__
    if log is None:
        _stdlib_log.warning("%s while loading the model: %s", category, message)
        return
    emit = getattr(log, "warning", log.info)
    emit("model_warning", category=category, message=message)


def _log_info(log: Any, event: str, **fields: Any) -> None:
    # Info, not warning: when the cache cannot stand in, the ModelLoadError says
    # it all, and an unconfigured root logger prints warnings to stderr.
    if log is not None:
        log.info(event, **fields)
    else:
        _stdlib_log.info("%s %s", event, fields)


def _first_line(value: object) -> str:
    lines = str(value).strip().splitlines()
    return lines[0].strip() if lines else "(no message)"


def _env_flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
