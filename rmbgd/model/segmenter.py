"""The segmentation model: loading it, and turning batches of images into masks.

This is the only module that imports torch and transformers; the rest of rmbgd
imports it lazily so that the command line stays quick to start.

The model contract is BiRefNet's: RGB at the model's input size, ImageNet
normalisation, a list of logit maps of shape (B, 1, H, W) out, the last one
being the final prediction. On the CPU the caller resizes images to the input
size (in the decode pool); on a GPU the segmenter can also take them at any size
and resize them on the device.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from rmbgd.config import DYNAMIC_INPUT_SIZE as DYNAMIC
from rmbgd.model.hub import ModelLoadError, first_line, log_info, locate_model, missing_packages_hint
from rmbgd.imaging.sizing import dynamic_input_size

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelLoadError",
    "Segmenter",
    "configure_backends",
    "cpu_threads",
    "dtype_for_device",
    "is_out_of_memory",
    "load_segmenter",
    "resolve_device",
    "resolve_dtype",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The warm-up image side for dynamic input sizes: BiRefNet's training size, so the
# warm-up costs what a typical photo costs.
DYNAMIC_WARMUP_SIDE = 1024
# A warm call quicker than this is timed again for the batcher (Segmenter._time_calls).
QUICK_CALL_SECONDS = 1.0

LOADER_FROM_PRETRAINED = "from_pretrained"
LOADER_LEGACY = "legacy"

_DEVICE_RE = re.compile(r"cuda(?::(\d+))?")
_MISSING_PACKAGES_RE = re.compile(r"not found in your environment: (.+?)\. Run")
_DTYPES = ("float16", "bfloat16", "float32")
# What older remote code (BiRefNet before 2025, RMBG-2.0) trips over in
# transformers 5's from_pretrained: a plain object as self.config, .item() on
# tensors built on the meta device, and no post_init().
_LEGACY_MESSAGE_RE = re.compile(r"\bmeta\b", re.IGNORECASE)
# Terminal control sequences (colours, bold) as transformers writes into its load report.
_ANSI_ESCAPE_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# Library messages logged at debug only: harmless, or said better by rmbgd itself.
_QUIET_LIBRARY_MESSAGES = (
    # BiRefNet's code imports timm's old module paths, which still work.
    re.compile(r"^Importing from timm\.models\.\w+ is deprecated"),
    # transformers' table of missing/unexpected weights: _check_loading_info refuses the
    # model with the names, or (for computed buffers) moves to the legacy loader.
    re.compile(r"\bLOAD REPORT\b"),
)
_NORM_WITH_STATS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)

_stdlib_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- device and precision


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
    """The compute dtype ``auto`` means on a resolved device: half precision on GPUs, full on CPU.

    CPUs have no fast fp16 convolutions, and BiRefNet is accurate enough in fp16.
    """
    return "float16" if torch.device(device).type == "cuda" else "float32"


def resolve_dtype(spec: str, device: str) -> str:
    """Turn ``model.dtype`` into a torch dtype name for the resolved device.

    float16 on the CPU is refused rather than warned about: CPUs have no fast float16
    convolutions, so it runs about 100 times slower than float32 (a 512x512 warm-up of
    BiRefNet_lite took 349 s instead of 4 s) for no gain in quality. A daemon in that state
    looks alive yet falls hopelessly behind, and a warning in a log nobody reads at start-up
    does not stop that; the fix is one config line, which the error names.
    """
    wanted = spec.strip().lower()
    if wanted == "auto":
        return dtype_for_device(device)
    if wanted not in _DTYPES:
        raise ModelLoadError(
            f"model.dtype: expected auto, float16, bfloat16 or float32, got {spec!r}"
        )
    if wanted == "float16" and torch.device(device).type == "cpu":
        raise ModelLoadError(
            "model.dtype: float16 on the CPU runs about 100 times slower than float32 "
            f"(CPUs have no fast float16 kernels); set model.dtype: {_cpu_dtypes_that_work()}"
        )
    return wanted


def _cpu_dtypes_that_work() -> str:
    if _cpu_has_bfloat16():
        return "float32 (or auto), or bfloat16, which this CPU supports"
    return "float32 (or auto)"


def _cpu_has_bfloat16() -> bool:
    """Whether oneDNN has native bfloat16 kernels for this CPU (AVX-512 BF16, AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN, or a future rename
        return False


def cpu_threads(available: int) -> int:
    """Threads for the model on a CPU-only host with ``available`` cores.

    A quarter of the cores (none on 2 or 3) is left to the decode and encode pools:
    the model is by far the slowest stage, but starving decoding would leave it
    waiting for input between batches.
    """
    return max(1, available - available // 4)


def _configure_cpu_threads() -> Optional[int]:
    # An operator's OMP_NUM_THREADS (read by torch at start-up) always wins.
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    from rmbgd.config.cpus import available_cpus  # the count config.effective_workers uses too

    available = available_cpus()
    threads = cpu_threads(available)
    torch.set_num_threads(threads)
    return threads


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the GPU running out of memory (as torch raises it, in any version)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


# --------------------------------------------------------------------------- inference


class Segmenter:
    """A loaded model on its device, turning RGB images into alpha masks.

    ``input_size`` is the side of the square the model sees, or ``"dynamic"``:
    each batch then runs at its own size (all images of one batch share it).
    ``dtype`` is the compute precision: the weights' dtype, or, after a warm-up
    showed that the model cannot run with weights in that dtype, float32 weights
    under autocast to it (``precision`` says which).
    """

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        device: str,
        dtype: str,
        input_size: int | str,
        max_input_size: int = 2048,
        compiled: Any = None,
        resize_on_device: Optional[bool] = None,
        loader: str = LOADER_FROM_PRETRAINED,
        log: Any = None,
        runner: Any = None,
    ) -> None:
        self.name = name
        self.device = device
        self.dtype = dtype
        self.input_size = input_size
        self.max_input_size = max_input_size
        self.loader = loader
        self.precision = "weights"
        self._model = model
        self._compiled = compiled
        self._log = log
        self._on_cuda = torch.device(device).type == "cuda"
        # An exported graph (rmbgd.model.backends) that runs the model instead of torch on the CPU;
        # the torch model stays loaded to take over if it fails its warm-up.
        self._runner = runner
        self.backend = runner.backend if runner is not None else "torch"
        if runner is not None:
            resize_on_device = False
        # On a GPU, resampling there costs nothing next to the model and spares the decode
        # pool's cores; on the CPU the decoder's Pillow resize stays the only one, so CPU
        # outputs do not depend on this.
        self.resizes_on_device = self._on_cuda if resize_on_device is None else resize_on_device
        # See "the CPU path in three steps" below.
        self.splits_work = not self._on_cuda and not self.resizes_on_device
        # (input size, images, seconds) of a warm call, once warmed up; see _time_one_call.
        self.call_timings: list[tuple[tuple[int, int], int, float]] = []
        self._last_warmup: tuple[int, float] = (1, 0.0)
        self._compute_dtype = getattr(torch, dtype)
        self._autocast_dtype: Optional[torch.dtype] = None
        self._set_input_dtype(self._compute_dtype)

    def _set_input_dtype(self, input_dtype: torch.dtype) -> None:
        self._input_dtype = input_dtype
        # (x / 255 - mean) / std folded into one multiply-add per pixel.
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(device=self.device, dtype=input_dtype)
        self._shift = (-mean / std).to(device=self.device, dtype=input_dtype)

    # -- predicting -------------------------------------------------------------------------
    def model_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size is run at."""
        if self.input_size == DYNAMIC:
            return dynamic_input_size(width, height, self.max_input_size)
        return (int(self.input_size), int(self.input_size))

    def predict(
        self,
        images: Sequence[np.ndarray],
        sizes: Sequence[tuple[int, int]],
        model_size: Optional[tuple[int, int]] = None,
    ) -> list[np.ndarray]:
        """One model call for the whole batch; returns one (height, width) uint8 mask per image.

        ``images`` are (H, W, 3) uint8 RGB at the batch's model size (width, height):
        ``model_size`` if given, else ``input_size`` squared, or for dynamic input
        sizes the first image's size. A segmenter that resizes on the device also
        takes images at any other size. ``sizes`` are the (width, height) of the
        originals, which the masks are scaled back to.
        """
        if len(images) != len(sizes):
            raise ValueError(f"got {len(images)} images but {len(sizes)} sizes")
        if not images:
            return []
        height, width = self._target(images, model_size)
        for index, image in enumerate(images):
            right_size = image.shape[:2] == (height, width) or self.resizes_on_device
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or not right_size:
                raise ValueError(
                    f"image {index}: expected a ({height}, {width}, 3) uint8 array, "
                    f"got {image.shape} {image.dtype}"
                )
        shapes = [(int(h), int(w)) for w, h in sizes]
        for index, (h, w) in enumerate(shapes):
            if h <= 0 or w <= 0:
                raise ValueError(f"image {index}: invalid original size {w}x{h}")

        if self.splits_work:
            prepared = [self.prepare(image) for image in images]
            logits = self.predict_prepared(prepared)
            return [self.finish(one, size) for one, size in zip(logits, sizes)]

        with torch.inference_mode():
            pixels = self._upload(images, height, width)
            with self._autocast():
                output = (self._compiled or self._model)(pixels)
            logits = final_logits(output, len(images))
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
        for h, w in shapes:
            masks.append(packed_host[offset : offset + h * w].reshape(h, w))
            offset += h * w
        return masks

    # -- the CPU path in three steps ----------------------------------------------------------
    # On the CPU, normalising the input and turning logits into a full-size mask are plain
    # CPU work. The pipeline runs `prepare` in its decode pool and `finish` in its encode
    # pool, so they overlap the next model call instead of running in series with it in the
    # model thread (bench/RESULTS.md). On a GPU they stay on the device, inside `predict`.

    def resize_input(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> the same at `size` (width, height), for the model's input.

        Bilinear, antialiased when shrinking: the filter of Pillow's resize (what the decoder
        uses otherwise), to within one level, in ~40% of its time on this CPU (torch's uint8
        kernels; measured 4.6-5.6 ms against 12.5 ms for a 1.5 MP photo to 1024²), which
        keeps the decode pool ahead of the accelerator on a 2-core host (bench/RESULTS.md).
        """
        width, height = (int(v) for v in size)
        if rgb.shape[:2] == (height, width):
            return rgb
        with torch.inference_mode():
            # HWC viewed as NCHW is channels-last, which torch's uint8 resize kernels want.
            pixels = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
            resized = F.interpolate(
                pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
            return np.ascontiguousarray(resized[0].permute(1, 2, 0).numpy())

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB at the model size -> the normalised (3, H, W) model input."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
        if not image.flags.writeable:
            # torch warns about read-only arrays even though the tensor is only read here.
            image = image.copy()
        with torch.inference_mode():
            pixels = torch.from_numpy(image).permute(2, 0, 1).to(
                dtype=self._input_dtype, memory_format=torch.contiguous_format
            )
            return pixels.mul_(self._scale[0]).add_(self._shift[0])

    def stack(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        """`prepare`d inputs of one size as one (B, 3, H, W) batch.

        A copy of every input, so the pipeline does it for the next batch while the model
        still runs the current one.
        """
        with torch.inference_mode():
            return torch.stack(list(prepared))

    def predict_prepared(self, prepared: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """One model call over `prepare`d inputs of one size (or their `stack`); the (1, h, w)
        float32 logits of each."""
        pixels = prepared if isinstance(prepared, torch.Tensor) else self.stack(prepared)
        if self._runner is not None:
            return self._run_exported(pixels)
        with torch.inference_mode():
            with self._autocast():
                output = (self._compiled or self._model)(pixels)
            return list(final_logits(output, len(pixels)).float().unbind(0))

    def _run_exported(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        # Exports take batch 1; on a CPU a batch gains nothing over its images in turn.
        logits = []
        for index in range(len(pixels)):
            out = torch.from_numpy(np.asarray(self._runner(pixels[index : index + 1].numpy())))
            logits.append(final_logits(out, 1).float()[0])
        return logits

    def finish(self, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """(1, h, w) logits from `predict_prepared` -> the (height, width) uint8 mask for `size`."""
        width, height = (int(v) for v in size)
        with torch.inference_mode():
            # Sigmoid and resampling in fp32: fp16 would cost a grey level near the top.
            probs = logits.unsqueeze(0).sigmoid()
            full = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            mask = full.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return mask.reshape(height, width).numpy()

    def _target(
        self, images: Sequence[np.ndarray], model_size: Optional[tuple[int, int]]
    ) -> tuple[int, int]:
        if self.input_size != DYNAMIC:
            side = int(self.input_size)
            if model_size is not None and tuple(model_size) != (side, side):
                raise ValueError(f"model size {model_size} differs from the input size {side}")
            return side, side
        if model_size is not None:
            width, height = (int(v) for v in model_size)
        else:
            height, width = (int(v) for v in images[0].shape[:2])
        if width <= 0 or height <= 0 or width % 32 or height % 32:
            raise ValueError(f"dynamic model size must be multiples of 32, got {width}x{height}")
        return height, width

    def _upload(self, images: Sequence[np.ndarray], height: int, width: int) -> torch.Tensor:
        """The normalised (B, 3, H, W) batch on the device, in the model's input dtype."""
        count = len(images)
        if all(image.shape[:2] == (height, width) for image in images):
            # Filled in place so the batch is copied once, straight into pinned memory
            # on CUDA, which is what lets the upload run asynchronously.
            host = torch.empty((count, height, width, 3), dtype=torch.uint8, pin_memory=self._on_cuda)
            host_view = host.numpy()
            for index, image in enumerate(images):
                host_view[index] = image
            batch = host.to(self.device, non_blocking=self._on_cuda)
            pixels = batch.permute(0, 3, 1, 2).to(
                dtype=self._input_dtype, memory_format=torch.contiguous_format
            )
        else:
            pixels = torch.empty((count, 3, height, width), dtype=self._input_dtype, device=self.device)
            for index, image in enumerate(images):
                pixels[index] = self._resized_on_device(image, height, width)[0]
        return pixels.mul_(self._scale).add_(self._shift)

    def _resized_on_device(self, image: np.ndarray, height: int, width: int) -> torch.Tensor:
        host = torch.empty(image.shape, dtype=torch.uint8, pin_memory=self._on_cuda)
        host.numpy()[...] = image
        full = host.to(self.device, non_blocking=self._on_cuda).permute(2, 0, 1).unsqueeze(0).float()
        if full.shape[2:] != (height, width):
            # Antialiased bilinear, like the decoder's Pillow resize, so the model sees
            # the same kind of image whichever side resized it.
            full = F.interpolate(
                full, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
        return full.to(self._input_dtype)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self._autocast_dtype)

    # -- warming up -------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run the model once before the daemon says ``ready``, settling how it runs.

        Lazy initialisation (CUDA kernels, cuDNN's algorithm search, torch.compile)
        happens here rather than on the first real batch. A compiled model that fails
        falls back to the plain one; weights in half precision that fail fall back to
        float32 weights under autocast (BiRefNet's deformable convolution has no
        bfloat16 kernel). What still fails is a one-line ModelLoadError.
        """
        # Model code warns on its first call too (torch.meshgrid in Swin, for one).
        with library_messages(self._log):
            self._warm_up()

    def _warm_up(self) -> None:
        side = self._warmup_side()
        first_error: Optional[str] = None
        while True:
            error = self._warmup_error(side)
            if error is None:
                self._time_calls(side)
                return
            description, out_of_memory = error
            if self._runner is not None:
                self._emit(
                    "warning",
                    "model_backend_fallback",
                    backend=self.backend,
                    error=description,
                    fallback="torch",
                )
                self._runner = None
                self.backend = "torch"
                continue
            if out_of_memory:
                raise ModelLoadError(
                    f"model.device: out of GPU memory on {self.device} running one {side}x{side} "
                    f"image through '{self.name}'; free the GPU, lower model.input_size "
                    "(or model.max_input_size) or pick a smaller model"
                )
            if self._compiled is not None:
                self._emit("warning", "model_compile_failed", error=description, fallback="eager")
                self._compiled = None
                continue
            if self.precision == "weights" and self._compute_dtype != torch.float32:
                if not isinstance(self._model, torch.nn.Module):
                    raise self._warmup_failed(description)
                first_error = description
                self._emit(
                    "warning",
                    "model_precision_fallback",
                    dtype=self.dtype,
                    error=description,
                    fallback=f"float32 weights under {self.dtype} autocast",
                )
                self._use_autocast()
                continue
            if first_error is not None:
                raise self._precision_failed(side, first_error, description)
            raise self._warmup_failed(description)

    def _time_calls(self, side: int) -> None:
        """Note what warm calls cost, for the batcher (collector.CallCost).

        Calls of one and of two images tell the fixed cost of a call from its per-image
        cost. They are timed after the warm-up, which pays for lazy set-up (kernels, cuDNN's
        search), on a GPU (tens of milliseconds) or where a call is quick; a CPU model taking
        seconds per image keeps the warm-up's own time, since two more calls would delay the
        start by several seconds and its calls are long next to any batch window anyway."""
        count, seconds = self._last_warmup
        self.call_timings = [((side, side), count, seconds)]
        if not (self._on_cuda or seconds < QUICK_CALL_SECONDS):
            return
        timings = []
        try:
            for count in (1, 2):
                image = np.zeros((side, side, 3), dtype=np.uint8)
                started = time.perf_counter()
                self.predict([image] * count, [(side, side)] * count)
                timings.append(((side, side), count, time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001 - model-loading boundary; the warm-up worked
            self._emit("debug", "model_timing_skipped", error=_describe(exc))
            return
        self.call_timings = timings

    def _warmup_side(self) -> int:
        if self.input_size == DYNAMIC:
            return min(DYNAMIC_WARMUP_SIDE, self.max_input_size)
        return int(self.input_size)

    def _warmup_error(self, side: int) -> Optional[tuple[str, bool]]:
        # A compiled model is warmed up with two batch sizes, so that the batch
        # dimension is compiled as dynamic now rather than on a later real batch.
        counts = (1, 2) if self._compiled is not None else (1,)
        try:
            for count in counts:
                image = np.zeros((side, side, 3), dtype=np.uint8)
                started = time.perf_counter()
                self.predict([image] * count, [(side, side)] * count)
                self._last_warmup = (count, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001
            # The model-loading boundary: the model's own code can raise anything.
            return _describe(exc), is_out_of_memory(exc)
        return None

    def _use_autocast(self) -> None:
        self._model.float()
        self._autocast_dtype = self._compute_dtype
        self.precision = "autocast"
        self._set_input_dtype(torch.float32)

    def _precision_failed(self, side: int, first_error: str, description: str) -> ModelLoadError:
        """Neither weights in the dtype nor autocast to it ran: blame model.dtype if float32 runs.

        Whether the model works at all is only known by trying float32; an error the same
        under both (BiRefNet's deformable convolution on a CPU) says nothing by itself.
        """
        self._autocast_dtype = None
        self.precision = "weights"
        float32_error = self._warmup_error(side)
        if float32_error is not None:
            return ModelLoadError(
                f"model.name: '{self.name}' fails on a test image on {self.device} in "
                f"{self.dtype} and in float32: {float32_error[0]}"
            )
        also = (
            f"; float32 weights under {self.dtype} autocast failed too: {description}"
            if description != first_error
            else f" (with its weights in {self.dtype} and under {self.dtype} autocast alike)"
        )
        return ModelLoadError(
            f"model.dtype: {self.dtype} does not work with '{self.name}' on {self.device}: "
            f"{first_error}{also}; it runs in float32: set model.dtype: float32"
            + (" (or auto)" if not self._on_cuda else "")
        )

    def _warmup_failed(self, description: str) -> ModelLoadError:
        return ModelLoadError(
            f"model.name: '{self.name}' fails on a test image on {self.device} "
            f"({self.dtype}): {description}"
        )

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        if self._log is None:
            _stdlib_log.log(logging.getLevelName(level.upper()), "%s %s", event, fields)
            return
        getattr(self._log, level, self._log.info)(event, **fields)


def final_logits(output: Any, batch_size: int) -> torch.Tensor:
    """The final (B, 1, H, W) logit map out of whatever the model's forward returned."""
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
    dtype = resolve_dtype(getattr(cfg, "dtype", "auto"), device)
    input_size = getattr(cfg, "input_size", 1024)
    name = cfg.name
    on_cuda = torch.device(device).type == "cuda"
    threads = None if on_cuda else _configure_cpu_threads()
    log_info(log, "model_loading", name=name, device=device, dtype=dtype)
    started = time.perf_counter()

    _quiet_library_output()
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
            f"model.device: cannot move '{name}' to {device}: {first_line(exc)}"
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
        raise backends.BackendError(f"cannot find the model's files: {_describe(exc)}") from exc
    return os.path.dirname(config), False


def configure_backends(device: str, input_size: int | str) -> None:
    """Process-wide torch settings for running the model on ``device``."""
    if torch.device(device).type == "cuda" and input_size != DYNAMIC:
        # With one input size, cuDNN's search for the fastest kernels pays off after
        # a handful of batches; with dynamic sizes it would search again for each size.
        torch.backends.cudnn.benchmark = True


def _compile(model: Any, log: Any) -> Any:
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001
        # The model-loading boundary: compiling is an optimisation, never a reason not to start.
        _log_warning_event(log, "model_compile_failed", error=_describe(exc), fallback="eager")
        return None


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
            legacy_reason = _legacy_reason(exc)
            if legacy_reason is None:
                raise _load_error(cfg, exc) from exc
        else:
            computed = _check_loading_info(name, model, info)
            if not computed:
                return model, LOADER_FROM_PRETRAINED
            # from_pretrained builds the model on the meta device, so a buffer its __init__
            # computes (an index table) and the checkpoint lacks is left as uninitialised
            # memory; the legacy loader constructs the model for real and keeps it.
            legacy_reason = (
                f"{len(computed)} buffer(s) missing from the checkpoint would be left "
                f"uninitialised ({_some(computed)})"
            )
        log_info(log, "model_legacy_fallback", name=name, reason=legacy_reason)
        try:
            return _load_legacy(cfg, source, hub_kwargs, torch_dtype), LOADER_LEGACY
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001
            error = _load_error(cfg, exc)
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
        # report comes back so that _check_loading_info can refuse it. Tensors of the wrong
        # shape are listed there too, with their shapes, rather than raised about without
        # their names.
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        **hub_kwargs,
    )


def _legacy_reason(exc: BaseException) -> Optional[str]:
    """Why ``exc`` looks like older remote code meeting transformers 5, or None."""
    if isinstance(exc, AttributeError):
        # self.config replaced by a plain object ('model_type', 'get_text_config', ...)
        # or post_init() never called ('all_tied_weights_keys').
        return _describe(exc)
    if isinstance(exc, (RuntimeError, NotImplementedError)) and _LEGACY_MESSAGE_RE.search(str(exc)):
        # .item() (or another data access) on a tensor built on the meta device.
        return _describe(exc)
    return None


def _load_legacy(cfg: Any, source: str, hub_kwargs: dict, torch_dtype: torch.dtype) -> Any:
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


def _check_loading_info(name: str, model: Any, info: dict) -> list[str]:
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
        problems.append(f"{len(missing)} weight(s) missing from the checkpoint ({_some(missing)})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint ({_some(unexpected)})"
        )
    if mismatched:
        shown = [
            key if stored is None else f"{key}: {list(stored)} in the checkpoint, {list(wanted)} in the code"
            for key, stored, wanted in sorted(mismatched)
        ]
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape ({_some(shown)})")
    if errors:
        problems.append(f"{len(errors)} loading error(s) ({first_line(errors[0])})")
    if problems:
        raise ModelLoadError(
            f"model.name: cannot load '{name}': its weights do not match its code: "
            + "; ".join(problems)
            + " (an incomplete download, or weights for other code?)"
        )


def _load_error(cfg: Any, exc: BaseException) -> ModelLoadError:
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
    return ModelLoadError(f"model.name: cannot load '{name}': {_describe(exc)}")


def _missing_packages(exc: ImportError) -> list[str]:
    # transformers checks a model file's imports before running it and lists
    # every missing one; a failure inside the code itself names only one module.
    match = _MISSING_PACKAGES_RE.search(str(exc))
    if match is not None:
        return [package.strip() for package in match.group(1).split(",") if package.strip()]
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return [exc.name.split(".")[0]]
    return []


def _some(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(list(keys)[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


@contextlib.contextmanager
def library_messages(log: Any) -> Iterator[None]:
    """Log what model code and transformers say meanwhile as clean one-line events.

    Remote model code calls warnings.warn (timm's deprecations), and transformers logs a
    coloured multi-line table when weights do not match. Both would otherwise reach the
    JSON log as one event holding terminal escape codes and line breaks. Each becomes one
    ``model_warning`` event with a one-line ``message`` (and any further lines as a
    ``details`` list), afterwards; known-harmless ones and what rmbgd reports itself go to
    debug. Process-wide on purpose, like _quiet_library_output: nothing else in the
    process uses these libraries while the model loads.
    """
    collector = _RecordCollector()
    library_logger = logging.getLogger("transformers")
    propagate = library_logger.propagate
    library_logger.addHandler(collector)
    library_logger.propagate = False
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        library_logger.removeHandler(collector)
        library_logger.propagate = propagate
        for warning in caught:
            _log_library_message(log, str(warning.message), category=warning.category.__name__)
        for record in collector.records:
            _log_library_message(log, record.getMessage(), logger=record.name)


class _RecordCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def clean_lines(text: str) -> list[str]:
    """``text`` without terminal escape codes, as its non-empty lines, each stripped."""
    lines = (_ANSI_ESCAPE_RE.sub("", line).strip() for line in str(text).splitlines())
    return [line for line in lines if line]


def _log_library_message(log: Any, text: str, **origin: str) -> None:
    lines = clean_lines(text) or ["(no message)"]
    fields: dict[str, Any] = {**origin, "message": lines[0]}
    if len(lines) > 1:
        fields["details"] = lines[1:]
    quiet = any(pattern.search(lines[0]) for pattern in _QUIET_LIBRARY_MESSAGES)
    if log is None:
        _stdlib_log.log(logging.DEBUG if quiet else logging.WARNING, "model_warning %s", fields)
        return
    emit = getattr(log, "debug", None) if quiet else getattr(log, "warning", log.info)
    if emit is not None:
        emit("model_warning", **fields)


def _log_warning_event(log: Any, event: str, **fields: Any) -> None:
    if log is None:
        _stdlib_log.warning("%s %s", event, fields)
        return
    getattr(log, "warning", log.info)(event, **fields)
