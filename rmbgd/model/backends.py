"""Running the model through an exported graph on CPU-only hosts: ONNX Runtime or OpenVINO.

Part of the model layer (it imports torch, onnx, onnxruntime and openvino, lazily).

On a CPU, BiRefNet_lite in eager PyTorch spends about half of every image in torchvision's
deformable convolution; ONNX Runtime runs the exported graph 2.4-2.9x and OpenVINO (float32)
3-4x faster with the same masks (bench/cpu_model.py, bench/RESULTS.md). An export is made
once per model content, input size and library versions and cached next to the model; a
failure anywhere here is reported to the caller, which runs the model in torch instead.

Exports are fixed-shape: one square input size, batch 1 (a CPU gains nothing from batching;
the images of a batch run one after another).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from rmbgd.config import (
    BACKEND_AUTO,
    BACKEND_ONNXRUNTIME,
    BACKEND_OPENVINO,
    BACKEND_TORCH,
    DYNAMIC_INPUT_SIZE,
)
from rmbgd.errors import describe

# The package each exported backend needs, and the extra that installs it.
PACKAGES = {BACKEND_ONNXRUNTIME: "onnxruntime", BACKEND_OPENVINO: "openvino"}
EXTRAS = {BACKEND_ONNXRUNTIME: "onnx", BACKEND_OPENVINO: "openvino"}
# What `auto` tries on a CPU-only host, fastest first (bench/RESULTS.md).
AUTO_ORDER = (BACKEND_OPENVINO, BACKEND_ONNXRUNTIME)
# ONNX's DeformConv (which torchvision's deform_conv2d exports to) exists from opset 19.
ONNX_OPSET = 19
EXPORT_DIR_NAME = ".rmbgd-exports"


class BackendError(Exception):
    """An exported backend could not be made or run; the one-line reason says why."""


def package_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose_backend(
    wanted: str,
    *,
    device_type: str,
    input_size: int | str,
    dtype: str,
    installed: Callable[[str], bool] = package_installed,
) -> tuple[str, Optional[str]]:
    """(backend to try, why torch is used instead of what was asked or None).

    Pure: ``installed(package)`` says whether a package can be imported. ``auto`` picks the
    fastest installed exported backend on CPU-only hosts and torch everywhere else, quietly;
    a backend named explicitly that cannot be used comes back as torch with the reason.
    """
    if wanted == BACKEND_TORCH:
        return BACKEND_TORCH, None
    if wanted == BACKEND_AUTO:
        candidates = [name for name in AUTO_ORDER if installed(PACKAGES[name])]
        if device_type != "cpu" or input_size == DYNAMIC_INPUT_SIZE or dtype != "float32":
            return BACKEND_TORCH, None
        return (candidates[0], None) if candidates else (BACKEND_TORCH, None)
    if wanted not in PACKAGES:
        raise ValueError(f"unknown backend {wanted!r}")
    if device_type != "cpu":
        return BACKEND_TORCH, f"{wanted} runs on the CPU only; model.device is {device_type}"
    if input_size == DYNAMIC_INPUT_SIZE:
        return BACKEND_TORCH, f"{wanted} needs a fixed model.input_size (exports are fixed-shape)"
    if dtype != "float32":
        return BACKEND_TORCH, f"{wanted} runs float32 here; model.dtype is {dtype}"
    if not installed(PACKAGES[wanted]):
        return BACKEND_TORCH, (
            f"the Python package '{PACKAGES[wanted]}' is not installed: "
            f"pip install 'rmbgd[{EXTRAS[wanted]}]'"
        )
    return wanted, None


# --------------------------------------------------------------------------- the export cache


def library_versions(backend: str) -> dict[str, str]:
    names = ["torch", "torchvision"] + (
        ["onnx", "onnxscript", "onnxruntime"] if backend == BACKEND_ONNXRUNTIME else ["openvino"]
    )
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "none"
    return versions


def model_fingerprint(model_dir: Path) -> str:
    """A hash of what defines the model: its weights, config and code files' contents."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix not in (".safetensors", ".json", ".py") or not path.is_file():
            continue
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def export_key(backend: str, fingerprint: str, side: int) -> str:
    """The cache entry's name: changes with the model, the input size and any library version."""
    parts = {"backend": backend, "model": fingerprint, "side": side, "opset": ONNX_OPSET}
    parts.update(library_versions(backend))
    blob = json.dumps(parts, sort_keys=True).encode()
    return f"{backend}-{side}-{hashlib.sha256(blob).hexdigest()[:16]}"


def cache_dirs(model_dir: Path, local: bool = True) -> list[Path]:
    """Where exports are kept: next to a local model, else (a read-only model folder, a
    model in the Hugging Face cache) in the user's cache."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rmbgd" / "exports"
    return ([Path(model_dir) / EXPORT_DIR_NAME] if local else []) + [user]


def _cached_or_export(
    roots: list[Path], key: str, filename: str, make: Callable[[Path], None]
) -> Path:
    """The cached export ``key`` (its ``filename``), made by ``make(folder)`` if absent.

    Made in a temporary folder beside the cache and renamed into place, so a crash or a
    second daemon never leaves a half-written export where a later start would use it.
    """
    for root in roots:
        done = root / key / filename
        if done.is_file():
            return done
    errors = []
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        except OSError as exc:
            errors.append(f"{root}: {type(exc).__name__}: {exc.strerror or exc}")
            continue
        try:
            make(scratch)
            try:
                os.rename(scratch, root / key)
            except OSError:
                if not (root / key / filename).is_file():  # not another process's export
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return root / key / filename
    raise BackendError("no writable folder for the export: " + "; ".join(errors))


# --------------------------------------------------------------------------- runners


class Runner:
    """One exported model ready to run: (1, 3, side, side) float32 array -> (1, 1, side, side)."""

    backend = ""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, pixels: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


def final_logits_module(model: Any) -> Any:
    """``model`` wrapped to return only its final logit map, which is all that gets exported."""
    import torch

    from rmbgd.model.segmenter import final_logits

    class FinalLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return final_logits(self.inner(pixels), pixels.shape[0])

    return FinalLogits().eval()


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    # The exporters print progress on stdout, which carries the daemon's JSON log.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def export_onnx(model: Any, side: int, folder: Path) -> Path:
    import onnx
    import torch

    path = folder / "model.onnx"
    example = torch.zeros((1, 3, side, side), dtype=torch.float32)
    with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            final_logits_module(model),
            (example,),
            str(path),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["pixels"],
            output_names=["logits"],
            external_data=False,
            verbose=False,
        )
    # The exporter can report success yet write a graph ONNX Runtime refuses (DeformConv
    # left in an opset-18 graph); the checker says so now rather than at the first image.
    onnx.checker.check_model(str(path))
    return path


def export_openvino(model: Any, side: int, folder: Path) -> Path:
    ov = _openvino()
    import torch

    path = folder / "model.xml"
    example = torch.zeros((1, 3, side, side), dtype=torch.float32)
    # Converted from the torch module: OpenVINO's ONNX frontend has no DeformConv-19.
    with _quiet_exporter(), torch.no_grad():
        converted = ov.convert_model(final_logits_module(model), example_input=example)
        ov.save_model(converted, str(path), compress_to_fp16=False)
    return path


def _openvino() -> Any:
    """`import openvino`, with its usage reporting declined first.

    Importing OpenVINO's converter, and converting, send events to Google Analytics unless the
    user opted out in a consent file in their home folder. A daemon converting a model on a
    server must not phone home, and OpenVINO has no switch for it, so its consent check is
    answered "declined" for this process before OpenVINO is imported.
    """
    try:
        from openvino_telemetry.utils import opt_in_checker
    except ImportError:  # no telemetry package: nothing is reported
        pass
    else:
        declined = opt_in_checker.ConsentCheckResult.DECLINED
        opt_in_checker.OptInChecker.check = lambda self, *args, **kwargs: declined
    import openvino

    return openvino


class OnnxRuntimeRunner(Runner):
    backend = BACKEND_ONNXRUNTIME

    def __init__(self, path: Path, threads: Optional[int]) -> None:
        super().__init__(path)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def __call__(self, pixels: Any) -> Any:
        return self._session.run(None, {self._input: pixels})[0]


class OpenVinoRunner(Runner):
    backend = BACKEND_OPENVINO

    def __init__(self, path: Path, threads: Optional[int], precision: str = "f32") -> None:
        super().__init__(path)
        ov = _openvino()
        core = ov.Core()
        # Explicit: on CPUs with bfloat16, OpenVINO otherwise switches to it on its own,
        # which changes the masks (about 1% logit error).
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)

    def __call__(self, pixels: Any) -> Any:
        return self._request.infer({0: pixels})[self._output].copy()


EXPORTERS = {
    BACKEND_ONNXRUNTIME: (export_onnx, "model.onnx", OnnxRuntimeRunner),
    BACKEND_OPENVINO: (export_openvino, "model.xml", OpenVinoRunner),
}


def build_runner(
    backend: str,
    model: Any,
    model_dir: Path,
    side: int,
    threads: Optional[int],
    *,
    fingerprint: Optional[str] = None,
    local: bool = True,
    **runner_options: Any,
) -> tuple[Runner, bool]:
    """(a runner for ``model`` exported to ``backend`` at ``side``, whether it was exported now).

    Every failure (a missing package, an operator the exporter cannot handle, a graph the
    runtime refuses) is a BackendError with a one-line reason.
    """
    export, filename, runner_class = EXPORTERS[backend]
    try:
        key = export_key(backend, fingerprint or model_fingerprint(model_dir), side)
        exported = [False]

        def make(folder: Path) -> None:
            export(model, side, folder)
            exported[0] = True

        roots = cache_dirs(model_dir, local)
        path = _cached_or_export(roots, key, filename, make)
        try:
            return runner_class(path, threads, **runner_options), exported[0]
        except Exception:  # noqa: BLE001
            if exported[0]:
                raise
            # A cached export that no longer loads (a disk fault, a hand edit) is made again
            # once rather than failing every later start.
            shutil.rmtree(path.parent, ignore_errors=True)
            path = _cached_or_export(roots, key, filename, make)
            return runner_class(path, threads, **runner_options), exported[0]
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001
        # The backend boundary: exporters and runtimes raise anything; torch takes over.
        raise BackendError(f"{backend}: {type(exc).__name__}: {describe(exc, kind=False, limit=300)}") from exc

