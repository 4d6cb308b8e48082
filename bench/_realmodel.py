"""pipeline.py --real: the real BiRefNet architectures, model-only against the whole daemon.

Not a script of its own: pipeline.py's --real mode uses these pieces. The model folder is
the real BiRefNet code from ../shared/models with random weights (tests/support/tinymodel.py
builds it), cached between runs; "lite" is BiRefNet_lite (Swin-T), "full" the same code with
the full BiRefNet's Swin-L backbone.

Model-only is what the daemon could reach if nothing but the model ran: the segmenter loaded
exactly as the daemon loads it, timed over repeated calls at batch.size on inputs made
beforehand, two ways:

- forward: one model call on a batch already normalised on the device (Segmenter's own
  upload), synchronised before the clock is read. The ceiling.
- model_call: Segmenter.predict on host images at the model size, as the daemon's model
  thread calls it: upload, forward, masks scaled to the 1.5 MP photo size, copied back to
  the host (which synchronises). What the model thread does per batch.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import _support as support

VARIANTS = ("lite", "full")
PACKAGES = ("timm", "kornia", "einops")  # rmbgd's `birefnet` extra: what BiRefNet's code imports
SEED = 1234


def refusal(variant: str, device: str) -> str | None:
    """Why this machine cannot run `--real variant --device device`, as one line; None if it can."""
    from tests.support.tinymodel import BIREFNET_LITE_CODE

    if device.startswith("cuda"):
        # Only here: torch takes seconds to import, which a refusal for the CPU need not wait for.
        import torch

        if not torch.cuda.is_available():
            return (f"pipeline: --device {device}, but this torch ({torch.__version__}) sees no CUDA device; "
                    "run on a GPU machine or use --device cpu")
    if not BIREFNET_LITE_CODE.is_dir():
        return (f"pipeline: --real {variant} needs the BiRefNet model code at {BIREFNET_LITE_CODE} "
                "(set RMBGD_SHARED_MODELS to its models folder)")
    missing = [name for name in PACKAGES if not _installed(name)]
    if missing:
        return f"pipeline: --real {variant} needs {', '.join(missing)}: pip install 'rmbgd[birefnet]'"
    return None


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        # An import hook that hides the package (tests.support.hidepkgs) says so by raising.
        return False


def model_dir(cache: Path, variant: str) -> Path:
    """The `variant` model folder in `cache`, built with random weights from a fixed seed the
    first time (seconds for lite; about a minute and 890 MB for full)."""
    import torch

    from tests.support.tinymodel import BIREFNET_FULL_BACKBONE, build_birefnet_lite

    dest = cache / f"birefnet_{variant}"
    if not (dest / "model.safetensors").is_file():
        torch.manual_seed(SEED)
        # post_init: the hub's current code, which from_pretrained loads directly.
        build_birefnet_lite(dest, post_init=True, backbone=BIREFNET_FULL_BACKBONE if variant == "full" else None)
    return dest


def gpu_info(device: str) -> dict | None:
    import torch

    if not device.startswith("cuda"):
        return None
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    return {
        "name": torch.cuda.get_device_name(index),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def model_only(model_dir: Path, work: Path, *, device: str, dtype: str, input_size: int, batch: int,
               calls: int, photo_size: tuple[int, int]) -> dict:
    """Images/s of the model alone at batch `batch`, median of `calls` timed calls each way."""
    import numpy as np
    import torch
    from PIL import Image

    segmenter, _ = support.load_model(model_dir, input_size, work, device=device, dtype=dtype)
    on_cuda = device.startswith("cuda")

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    images = [
        np.asarray(support.photo(*photo_size, seed=i).resize((input_size, input_size), Image.Resampling.BILINEAR))
        for i in range(batch)
    ]
    sizes = [photo_size] * batch
    with torch.inference_mode():
        # The daemon's own normalisation, already on the device: what the model sees.
        pixels = segmenter._upload(images, input_size, input_size)  # noqa: SLF001

    def forward() -> None:
        segmenter.predict_prepared(pixels)

    def model_call() -> None:
        segmenter.predict(images, sizes)

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result = {}
    for name, step in (("forward", forward), ("model_call", model_call)):
        # Untimed: the first calls at this batch size choose kernels (cuDNN benchmark).
        for _ in range(2):
            step()
        sync()
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        result[name] = {
            "calls": calls,
            "median_ms": round(median * 1000.0, 2),
            "min_ms": round(min(times) * 1000.0, 2),
            "images_per_s": round(batch / median, 3),
        }
    result["precision"] = segmenter.precision
    result["dtype"] = segmenter.dtype
    if on_cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result
