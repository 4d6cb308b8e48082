"""Loading a segmentation model: from the hub cache or a folder, through from_pretrained or
the legacy loader, optionally compiled or exported, into a Segmenter.

This layer and its neighbours are the only modules that import torch and transformers; the
rest of rmbgd imports them lazily so that the command line stays quick to start.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch

from rmbgd.errors import describe
from rmbgd.model.device import configure_backends, configure_cpu_threads, resolve_device, resolve_dtype
from rmbgd.model.errors import load_error
from rmbgd.model.hub import ModelLoadError, locate_model, log_info
from rmbgd.model.legacy import check_loading_info, load_legacy, needs_legacy_loader, some_names
from rmbgd.model.messages import library_messages, log_warning_event, quiet_library_output
from rmbgd.model.segmenter import LOADER_FROM_PRETRAINED, LOADER_LEGACY, Segmenter


def load_segmenter(cfg: Any, *, log: Any = None) -> Segmenter:
    """Load ``cfg.name`` onto ``cfg.device``; every failure is a one-line ModelLoadError."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(getattr(cfg, "dtype", "auto"), device)
    input_size = getattr(cfg, "input_size", 1024)
    name = cfg.name
    on_cuda = torch.device(device).type == "cuda"
    threads = None if on_cuda else configure_cpu_threads()
    log_info(log, "model_loading", name=name, device=device, dtype=dtype)
    started = time.perf_counter()

    quiet_library_output()
    source, local_files_only = locate_model(cfg, log)
    model, loader = _load_model(cfg, source, local_files_only, getattr(torch, dtype), log)
    try:
        model = model.to(device).eval()
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"model.device: not enough GPU memory on {device} to load '{name}'"
        ) from exc
    except RuntimeError as exc:
        raise ModelLoadError(
            f"model.device: cannot move '{name}' to {device}: {describe(exc, kind=False)}"
        ) from exc
    configure_backends(device, input_size)
    runner, backend_fields = _exported_backend(cfg, model, source, device, dtype, input_size, threads, log)
    compiled = None
    if runner is None and getattr(cfg, "compile", False):
        compiled = _compile(model, log)

    fields: dict[str, Any] = {"name": name, "device": device, "dtype": dtype, "loader": loader}
    fields.update(backend_fields)
    if threads is not None:
        fields["threads"] = threads
    if compiled is not None:
        fields["compiled"] = True
    fields["ms"] = round((time.perf_counter() - started) * 1000.0, 1)
    log_info(log, "model_loaded", **fields)
    return Segmenter(
        model,
        name=name,
        device=device,
        dtype=dtype,
        input_size=input_size,
        max_input_size=getattr(cfg, "max_input_size", 2048),
        compiled=compiled,
        loader=loader,
        log=log,
        runner=runner,
    )


def _exported_backend(
    cfg: Any,
    model: Any,
    source: str,
    device: str,
    dtype: str,
    input_size: int | str,
    threads: Optional[int],
    log: Any,
) -> tuple[Any, dict[str, Any]]:
    """(a runner for model.backend's export, or None for torch; fields for model_loaded).

    An export or runtime failure is never a reason not to start: torch runs the model and
    model_loaded says why (backend_fallback_reason).
    """
    from rmbgd.model import backends

    wanted = getattr(cfg, "backend", "torch")
    backend, reason = backends.choose_backend(
        wanted,
        device_type=torch.device(device).type,
        input_size=input_size,
        dtype=dtype,
    )
    if backend != "torch":
        started = time.perf_counter()
        try:
            folder, local = _model_folder(cfg, source)
            # A first export takes minutes at 1024 on a small CPU; say so before going quiet.
            log_info(log, "model_backend_loading", backend=backend, input_size=input_size)
            with library_messages(log):
                runner, exported = backends.build_runner(
                    backend, model, folder, int(input_size), threads, local=local
                )
        except backends.BackendError as exc:
            backend, reason = "torch", str(exc)
        else:
            return runner, {
                "backend": backend,
                "export": str(runner.path),
                "exported": exported,
                "export_ms": round((time.perf_counter() - started) * 1000.0, 1),
            }
    fields: dict[str, Any] = {"backend": backend}
    if reason is not None:
        fields["backend_fallback_reason"] = reason
    return None, fields


def _model_folder(cfg: Any, source: str) -> tuple[str, bool]:
    """(the folder holding the model's files, whether it is the user's own folder)."""
    from rmbgd.model import backends

    if os.path.isdir(source):
        return source, True
    from transformers.utils import cached_file

    try:
        config = cached_file(
            source, "config.json", revision=getattr(cfg, "revision", None), local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001
        # The backend boundary: any hub error just means torch runs the model.
        raise backends.BackendError(f"cannot find the model's files: {describe(exc)}") from exc
    return os.path.dirname(config), False


def _compile(model: Any, log: Any) -> Any:
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001
        # The model-loading boundary: compiling is an optimisation, never a reason not to start.
        log_warning_event(log, "model_compile_failed", error=describe(exc), fallback="eager")
        return None


def _load_model(
    cfg: Any, source: str, local_files_only: bool, torch_dtype: torch.dtype, log: Any
) -> tuple[Any, str]:
    """The model in ``torch_dtype`` on the CPU, and which loader produced it."""
    name = cfg.name
    hub_kwargs: dict[str, Any] = {"revision": getattr(cfg, "revision", None)}
    if local_files_only:
        hub_kwargs["local_files_only"] = True

    with library_messages(log):
        try:
            model, info = _from_pretrained(cfg, source, hub_kwargs, torch_dtype)
        except Exception as exc:  # noqa: BLE001
            # The model-loading boundary: remote model code can raise anything.
            legacy_reason = needs_legacy_loader(exc)
            if legacy_reason is None:
                raise load_error(cfg, exc) from exc
        else:
            computed = check_loading_info(name, model, info)
            if not computed:
                return model, LOADER_FROM_PRETRAINED
            # from_pretrained builds the model on the meta device, so a buffer its __init__
            # computes (an index table) and the checkpoint lacks is left as uninitialised
            # memory; the legacy loader constructs the model for real and keeps it.
            legacy_reason = (
                f"{len(computed)} buffer(s) missing from the checkpoint would be left "
                f"uninitialised ({some_names(computed)})"
            )
        log_info(log, "model_legacy_fallback", name=name, reason=legacy_reason)
        try:
            return load_legacy(cfg, source, hub_kwargs, torch_dtype), LOADER_LEGACY
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001
            error = load_error(cfg, exc)
            raise ModelLoadError(
                f"{error}; from_pretrained had failed with {legacy_reason} "
                "(the loader for older model code was tried because of that)"
            ) from exc


def _from_pretrained(
    cfg: Any, source: str, hub_kwargs: dict, torch_dtype: torch.dtype
) -> tuple[Any, dict]:
    from transformers import AutoModelForImageSegmentation

    return AutoModelForImageSegmentation.from_pretrained(
        source,
        trust_remote_code=cfg.trust_remote_code,
        # Explicit: transformers 5 defaults to dtype="auto", which would keep an
        # fp16 checkpoint in fp16 on CPU.
        dtype=torch_dtype,
        # transformers only logs what it could not load and initialises it at random; the
        # report comes back so that check_loading_info can refuse it. Tensors of the wrong
        # shape are listed there too, with their shapes, rather than raised about without
        # their names.
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        **hub_kwargs,
    )
