"""Doctor check: torch's build, the device model.device names, and why CUDA is missing."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from rmbgd.runtime.doctor.result import FAIL, OK, WARN, Result

_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def cuda_unavailable_reason(
    *, cuda_build: Optional[str], visible_devices: Optional[str], driver: Optional[str], error: Optional[str]
) -> str:
    """Why torch sees no GPU, and what to do, from the facts `_cuda_facts` gathers.

    `cuda_build` is torch.version.cuda (None for a CPU-only wheel), `visible_devices` the
    CUDA_VISIBLE_DEVICES variable (None when unset), `driver` the NVIDIA driver's version
    (None when no driver is loaded) and `error` what initialising CUDA said.
    """
    if cuda_build is None:
        return (
            "this torch is a CPU-only build; for the GPU, install a CUDA build of torch "
            "(PyTorch's install selector gives the command)"
        )
    if visible_devices is not None and visible_devices.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES is {visible_devices!r}, which hides every GPU; unset it or name a GPU"
    if driver is None:
        return (
            f"no NVIDIA driver is loaded ({_NVIDIA_DRIVER} is missing); install the driver, "
            "or in a container give it the GPU (e.g. docker run --gpus all)"
        )
    detail = f": {error}" if error else ""
    return f"NVIDIA driver {driver} is loaded but CUDA {cuda_build} (torch's build) did not start{detail}"


def _cuda_facts(torch: Any) -> Dict[str, Optional[str]]:
    driver = None
    try:
        match = re.search(r"Kernel Module\s+(\S+)", _NVIDIA_DRIVER.read_text())
        driver = match.group(1) if match else "(unknown version)"
    except OSError:
        pass
    error = None
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 - whatever CUDA says is the reason shown
            error = " ".join(str(exc).split())[:300]
    return {
        "cuda_build": torch.version.cuda,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "driver": driver,
        "error": error,
    }


def check_device(spec: str) -> Tuple[Result, Optional[str], Optional[Result]]:
    """(the device line, the device the pipeline run should use, the GPU line or None)."""
    import torch

    build = f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})"
    wanted = spec.strip().lower()
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        index = int(wanted.split(":")[1]) if wanted.startswith("cuda:") else 0
        if index >= count:
            return (
                Result(FAIL, "device", f"{build}; model.device: {wanted} but only {count} GPU(s) are visible"),
                "cpu",
                None,
            )
        device = "cpu" if wanted == "cpu" else f"cuda:{index}"
        return Result(OK, "device", f"{build}; using {device} (model.device: {wanted})"), device, _gpu_line(torch, index)
    reason = cuda_unavailable_reason(**_cuda_facts(torch))
    if wanted.startswith("cuda"):
        return Result(FAIL, "device", f"{build}; model.device: {wanted} but CUDA is not available: {reason}"), "cpu", None
    status = OK if wanted == "cpu" else WARN
    return Result(status, "device", f"{build}; using the CPU (CUDA is not available: {reason})"), "cpu", None


def _gpu_line(torch: Any, index: int) -> Result:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    # fp16 arithmetic at full speed from compute capability 5.3 on; tensor cores from 7.0.
    fp16 = "fp16 yes" + (" (tensor cores)" if capability >= (7, 0) else "") if capability >= (5, 3) else "fp16 no"
    bf16 = "bf16 yes" if torch.cuda.is_bf16_supported() else "bf16 no"
    free, total = torch.cuda.mem_get_info(index)
    return Result(
        OK,
        "gpu",
        f"{props.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), compute capability "
        f"{props.major}.{props.minor}, {fp16}, {bf16}",
    )
