"""Shared helpers for the benchmark scripts: synthetic photos, the repo on sys.path, stats.

Not a test module and not part of the rmbgd package: the scripts reuse the test suite's tiny
model and daemon runner so that the benchmarks exercise exactly what the tests do.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # The scripts run as `python bench/x.py`, which puts bench/ (not the repo) on sys.path.
    sys.path.insert(0, str(REPO))

# Loading the tiny model in this process copies its code into the Hugging Face cache; keep
# that out of the user's own cache, and never try the network. Set before transformers loads.
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "rmbgd-bench-hf-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

# Re-exported: the scripts start daemons exactly as the tests do.
from tests.support.daemon import DaemonProcess, base_config, subprocess_env, write_config  # noqa: E402,F401

# Photo sizes the issue names: about 1.5 MP (a downscaled phone photo) and 12 MP (a phone's
# full resolution), both 3:4 portrait.
SIZE_1_5MP = (1086, 1448)
SIZE_12MP = (3000, 4000)
QUICK_SIZE = (300, 400)


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth lighting, a reddish subject, soft edges, sensor noise.

    The tiny test model keys its mask on the red channel, so the subject comes out opaque and
    the cool-toned background transparent, with soft edges where they meet, which is what a
    product shot gives BiRefNet. Gradients and noise make JPEG decoding and PNG encoding cost
    what they cost on real photos; flat synthetic colours would compress far too well.
    """
    rng = np.random.default_rng(seed)
    # Background: a coarse random field of cool colours, upsampled into smooth gradients.
    coarse = np.empty((6, 5, 3), np.uint8)
    coarse[..., 0] = rng.integers(10, 90, (6, 5))
    coarse[..., 1] = rng.integers(60, 200, (6, 5))
    coarse[..., 2] = rng.integers(90, 240, (6, 5))
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)

    # Subject: warm shapes around the centre; a few cool details cut holes into its mask.
    draw = ImageDraw.Draw(image)
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.45, 0.6)
    rx, ry = width * rng.uniform(0.2, 0.32), height * rng.uniform(0.22, 0.35)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=tuple(int(v) for v in rng.integers((190, 40, 20), (250, 140, 90))))
    head = rx * rng.uniform(0.4, 0.6)
    hy = cy - ry - head * 0.8
    draw.ellipse((cx - head, hy - head, cx + head, hy + head), fill=tuple(int(v) for v in rng.integers((200, 90, 60), (255, 170, 130))))
    for _ in range(int(rng.integers(3, 7))):
        x, y = cx + rng.uniform(-rx, rx) * 0.7, cy + rng.uniform(-ry, ry) * 0.7
        r = min(width, height) * rng.uniform(0.02, 0.06)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers((20, 20, 20), (80, 120, 160))))
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(width, height) / 600)))

    # Sensor noise plus a little fine texture.
    pixels = np.asarray(image, dtype=np.int16)
    noise = rng.normal(0.0, 5.0, size=(height, width, 1)).astype(np.int16)
    chroma = rng.integers(-3, 4, size=(height, width, 3), dtype=np.int16)
    pixels = np.clip(pixels + noise + chroma, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    photo(width, height, seed).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_photos(
    folder: Path, count: int, size: tuple[int, int], seed: int = 0, prefix: str = "photo"
) -> list[Path]:
    """`count` JPEGs in `folder`; a handful of distinct photos reused under new names, so
    generating 100 of them does not dominate the benchmark's own run time."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = [photo_jpeg(*size, seed=seed + i) for i in range(min(count, 12))]
    paths = []
    for index in range(count):
        path = folder / f"{prefix}-{index:04d}.jpg"
        path.write_bytes(distinct[index % len(distinct)])
        paths.append(path)
    return paths


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; fine for the few dozen samples a benchmark takes."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "loadavg_1m_at_start": round(load[0], 2),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def batch_histogram(sizes: list[int]) -> dict:
    """{"size": number of model calls of that size}, smallest size first (JSON keys are text)."""
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return {str(size): counts[size] for size in sorted(counts)}


def show_histogram(histogram: dict) -> str:
    """`1x3 2x1 8x36`: calls of each batch size, for the human summary."""
    return " ".join(f"{size}x{count}" for size, count in histogram.items()) or "none"


def emit(result: dict, summary: list[str]) -> None:
    """One JSON line (for scripts), then a short summary for people."""
    print(json.dumps(result, sort_keys=True), flush=True)
    for line in summary:
        print(line)


# --------------------------------------------------------------------------- real daemon


class TimedDaemon(DaemonProcess):
    """The test suite's daemon runner, also noting when each log line reached us.

    Latencies are measured on this process's monotonic clock, from the moment a file is moved
    into the inbox to the moment its `file_done` line is read: what a user would see.
    """

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            arrived = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                record = json.loads(line)
            except ValueError:
                self.non_json.append(line)
                continue
            record["_arrived"] = arrived
            self.records.append(record)
            self._queue.put(record)


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a live process in KiB, from /proc (Linux only)."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def daemon_config(root: Path, model_dir: Path, **sections) -> Path:
    """A config for a benchmark daemon under `root` (the tests' defaults, then `sections`)."""
    data = base_config(root, model_dir)
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return write_config(root / "config.yaml", data)


def load_model(model_dir: Path, input_size: int, work: Path, device: str = "cpu", dtype: str = "auto"):
    """The segmenter exactly as the daemon loads it (on `device`, in `dtype`), warmed up."""
    from rmbgd.config import parse_config
    from rmbgd.model.loading import load_segmenter

    folders = {name: str(work / name) for name in ("inbox", "outbox", "errors", "done")}
    model = {"name": str(model_dir), "device": device, "dtype": dtype, "input_size": input_size}
    cfg = parse_config({"paths": folders, "model": model}, work)
    segmenter = load_segmenter(cfg.model)
    segmenter.warmup()
    return segmenter, cfg


def tiny_model(work: Path, given: str | None, **delays: float) -> Path:
    """The model folder to use: `given` (a tiny model built earlier), or a new one in `work`."""
    if given:
        return Path(given)
    from tests.support.tinymodel import build_tiny_model

    return build_tiny_model(work / "model", **delays)


def simulated_delays(model_dir: Path) -> tuple[float, float]:
    """(ms per call, ms per image) that the tiny model in `model_dir` sleeps per forward."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return float(config.get("delay_ms_per_call", 0.0)), float(config.get("delay_ms_per_image", 0.0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The simulated accelerator of pipeline.py and burst.py: 40 ms per image + 5 ms per call at
# any input size. The tiny network computes its mask from every n-th pixel: its arithmetic is
# the GPU's work in this simulation and must not load the CPU (a full-size 1x1 convolution
# costs ~60 ms per 1024² image on this CPU, more than the simulated GPU time itself).
SIMULATED_MS_PER_CALL = 5.0
SIMULATED_MS_PER_IMAGE = 40.0
SIMULATED_SAMPLE_STRIDE = 8


def add_daemon_args(parser) -> None:
    """The daemon settings a simulated-accelerator bench can vary."""
    parser.add_argument("--input-size", type=int, default=1024, help="model.input_size (default 1024)")
    parser.add_argument("--workers", type=int, default=0, help="pipeline.workers (0 = one per core)")
    parser.add_argument("--max-in-flight", type=int, default=0, help="pipeline.max_in_flight (0 = its default)")
    parser.add_argument("--batch", type=int, default=8, help="batch.size (default 8)")
    parser.add_argument("--max-wait-ms", type=int, default=200, help="batch.max_wait_ms (default 200)")
    parser.add_argument("--model", help="an already built tiny-model folder (its own delays apply)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and print its path")


def simulated_daemon(root: Path, args) -> tuple[Path, Path, tuple[float, float]]:
    """(model folder, daemon config, (ms per call, ms per image)) for a simulated-accelerator
    run with the settings of add_daemon_args."""
    model_dir = tiny_model(
        root,
        args.model,
        delay_ms_per_call=SIMULATED_MS_PER_CALL,
        delay_ms_per_image=SIMULATED_MS_PER_IMAGE,
        sample_stride=SIMULATED_SAMPLE_STRIDE,
    )
    config = daemon_config(
        root,
        model_dir,
        batch={"size": args.batch, "max_wait_ms": args.max_wait_ms},
        model={"input_size": args.input_size},
        pipeline={"workers": args.workers, "max_in_flight": args.max_in_flight},
        # Files arrive by rename, which is ready at once; the rescan only matters for losses.
        watch={"settle_seconds": 1.0, "rescan_seconds": 30.0},
    )
    return model_dir, config, simulated_delays(model_dir)
