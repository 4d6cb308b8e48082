"""The loaded segmentation model, turning batches of images into masks.

Loading is rmbgd.model.loading's, the warm-up rmbgd.model.warmup's.

The model contract is BiRefNet's: RGB at the model's input size, ImageNet
normalisation, a list of logit maps of shape (B, 1, H, W) out, the last one
being the final prediction. On the CPU the caller resizes images to the input
size (in the decode pool); on a GPU the segmenter can also take them at any size
and resize them on the device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from rmbgd.config import DYNAMIC_INPUT_SIZE as DYNAMIC
from rmbgd.imaging.sizing import dynamic_input_size
from rmbgd.model.warmup import WarmUp

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Segmenter", "final_logits"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LOADER_FROM_PRETRAINED = "from_pretrained"
LOADER_LEGACY = "legacy"


_stdlib_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inference


class Segmenter(WarmUp):
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
