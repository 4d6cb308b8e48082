"""Cost and effect of rmbgd.model.refine.estimate_foreground (halo removal) at 1.5 MP and 12 MP.

    .venv/bin/python bench/refine.py            # about 1 minute
    .venv/bin/python bench/refine.py --quick    # one small scene: checks that it runs

Synthetic scenes in which the true foreground is known: a textured warm subject on a
saturated green backdrop, a soft edge about 1% of the short side wide plus hair-like strands,
photo = round(a*F + (1-a)*B). Besides the time it reports how far the border's colours are
from the true foreground before (the photo as it is) and after the estimate.

- "border": the scene above; only tiles along the soft edge are solved at the large levels,
  which is what a mask from the model looks like.
- "all soft": the same scene with every pixel's alpha forced into 1..254, so that every tile
  is solved: the worst case for the cost.

Times: the median over the repeats of the CPU time of one thread with torch on one thread
(what an image costs, barely moved by other programs on the machine), and the median wall
time with torch's default number of threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _support as support
import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small scene, one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=0, help="repeats per case (default 5 at 1.5 MP, 3 at 12 MP)")
    # No model is involved; accepted so that tests/test_bench.py can run every script alike.
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        sizes = [("quick", support.QUICK_SIZE, 1)]
    else:
        sizes = [("1.5MP", support.SIZE_1_5MP, args.repeats or 5), ("12MP", support.SIZE_12MP, args.repeats or 3)]

    import torch

    from rmbgd.model.refine import estimate_foreground

    default_threads = torch.get_num_threads()
    cases = {}
    for label, (width, height), repeats in sizes:
        alpha, foreground = scene(width, height, seed=3)
        for kind, matte in (("border", alpha), ("all soft", np.clip(alpha, 1, 254))):
            image = composite(foreground, matte, backdrop(width, height))
            row = {"size": [width, height], "repeats": repeats}
            row["partial_fraction"] = round(float(((matte > 0) & (matte < 255)).mean()), 4)
            torch.set_num_threads(1)
            row["cpu_ms"] = median_ms(lambda: estimate_foreground(image, matte), time.thread_time, repeats)
            torch.set_num_threads(default_threads)
            row["wall_ms"] = median_ms(lambda: estimate_foreground(image, matte), time.perf_counter, repeats)
            row.update(border_error(image, estimate_foreground(image, matte), matte, foreground))
            cases[f"{label} {kind}"] = row

    result = {"bench": "refine", "machine": support.machine(), "torch_threads": default_threads, "cases": cases}
    lines = [f"refine: estimate_foreground per image (CPU ms on one thread | wall ms on {default_threads} threads)"]
    for name, row in cases.items():
        lines.append(
            f"  {name:16s} {row['cpu_ms']:7.0f} ms CPU | {row['wall_ms']:7.0f} ms wall | "
            f"soft pixels {row['partial_fraction']:.1%} | colour error where alpha > 10% {row['error_before']:.1f} -> "
            f"{row['error_after']:.1f} ({row['error_reduction']:.1f}x less)"
        )
    support.emit(result, lines)
    return 0


def scene(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, true foreground), uint8: a soft-edged disc with strands, and a textured subject."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    foreground = np.stack(
        [
            0.75 + 0.2 * np.sin(x / 37.0) * np.cos(y / 23.0),
            0.35 + 0.25 * x / width,
            0.25 + 0.2 * y / height + 0.1 * np.sin((x + y) / 11.0),
        ],
        axis=-1,
    )
    foreground = np.round(foreground * 255).astype(np.uint8)
    side = min(width, height)
    radius, ramp = 0.3 * side, max(2.0, side / 100)
    cx, cy = width / 2, height / 2
    alpha = np.clip((radius - np.hypot(x - cx, y - cy)) / ramp + 0.5, 0, 1)
    for _ in range(60):
        # A strand: a line segment about 1.5 px wide leaving the disc, partly transparent.
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4) * radius
        ux, uy = np.cos(angle), np.sin(angle)
        along = np.clip((x - cx) * ux + (y - cy) * uy, 0.9 * radius, radius + length)
        distance = np.hypot(x - cx - along * ux, y - cy - along * uy)
        alpha = np.maximum(alpha, np.clip(1.2 - distance, 0, 1) * rng.uniform(0.3, 0.8))
    return np.round(alpha * 255).astype(np.uint8), foreground


def backdrop(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    green = np.stack([0.05 + 0.05 * y / height, 0.85 + 0.1 * x / width, np.full_like(x, 0.1)], axis=-1)
    return np.round(green * 255).astype(np.uint8)


def composite(foreground: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / 255
    return np.round(a * foreground + (1 - a) * background).astype(np.uint8)


def median_ms(call, clock, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = clock()
        call()
        samples.append((clock() - start) * 1000.0)
    return round(statistics.median(samples), 1)


def border_error(image: np.ndarray, estimate: np.ndarray, alpha: np.ndarray, foreground: np.ndarray) -> dict:
    """Mean absolute colour error against the true foreground where alpha > 10%, in 8-bit levels."""
    border = (alpha > 25) & (alpha < 255)
    truth = foreground[border].astype(np.float32)
    before = float(np.abs(image[border] - truth).mean())
    after = float(np.abs(estimate[border] - truth).mean())
    return {
        "error_before": round(before, 2),
        "error_after": round(after, 2),
        "error_reduction": round(before / after, 2),
    }


if __name__ == "__main__":
    sys.exit(main())
