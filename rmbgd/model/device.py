"""Which device and precision the model runs on, and the torch settings that go with them.

Resolves model.device and model.dtype (auto included), sizes torch's CPU thread pool and
tells an out-of-memory error from others.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from rmbgd.config import DYNAMIC_INPUT_SIZE as DYNAMIC
from rmbgd.model.hub import ModelLoadError

_DEVICE_RE = re.compile(r"cuda(?::(\d+))?")
_DTYPES = ("float16", "bfloat16", "float32")


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


def configure_cpu_threads() -> Optional[int]:
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


def configure_backends(device: str, input_size: int | str) -> None:
    """Process-wide torch settings for running the model on ``device``."""
    if torch.device(device).type == "cuda" and input_size != DYNAMIC:
        # With one input size, cuDNN's search for the fastest kernels pays off after
        # a handful of batches; with dynamic sizes it would search again for each size.
        torch.backends.cudnn.benchmark = True
