"""Warming the segmenter up before ``ready``, and what it falls back to when that fails.

Mixed into Segmenter (rmbgd.model.segmenter): the warm-up runs the model on a blank image,
drops a failing exported backend or compiled graph, moves half-precision weights that fail
to float32 under autocast, and times warm calls for the batcher.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from rmbgd.config import DYNAMIC_INPUT_SIZE as DYNAMIC
from rmbgd.errors import describe
from rmbgd.model.device import is_out_of_memory
from rmbgd.model.hub import ModelLoadError
from rmbgd.model.messages import library_messages

# The warm-up image side for dynamic input sizes: BiRefNet's training size, so the
# warm-up costs what a typical photo costs.
DYNAMIC_WARMUP_SIDE = 1024
# A warm call quicker than this is timed again for the batcher (Segmenter._time_calls).
QUICK_CALL_SECONDS = 1.0


class WarmUp:
    """Segmenter's warm-up (the attributes it uses are Segmenter's)."""

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
            self._emit("debug", "model_timing_skipped", error=describe(exc))
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
            return describe(exc), is_out_of_memory(exc)
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
