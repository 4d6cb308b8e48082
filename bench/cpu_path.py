"""Per-image CPU cost of rmbgd's path against the naive script, at 1.5 MP and 12 MP.

    .venv/bin/python bench/cpu_path.py            # about 1 minute
    .venv/bin/python bench/cpu_path.py --quick    # one small photo: checks that it runs

Both paths run on the same JPEGs in one process and one thread (torch too), alternating so
that background load hits both alike. The figures are the median over the repeats of the CPU
time of that thread (what an image costs, barely moved by other programs on the machine),
with the wall time beside it. Both call the same model (the test suite's tiny network, no simulated delay), so
the model costs the same on both sides and the difference is all decode, pre- and
post-processing and encoding.

- naive: what BiRefNet's model card does: PIL open + convert, torchvision Resize + ToTensor
  + Normalize, the model, sigmoid, ToPILImage, resize the mask to the photo's size (bilinear,
  as rmbgd does), putalpha, `save(format="PNG")` with Pillow's defaults.
- rmbgd: rmbgd.imaging.decode.decode_image, Segmenter.predict (rmbgd.model.segmenter), combine_alpha,
  encode_png with the default output settings, exactly as the daemon's pipeline calls them.

It also checks that both outputs show the same thing: alpha within rounding of each other
(the naive path truncates its mask to 8 bits before resizing it) and identical RGB wherever
rmbgd's alpha is above 0.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _support as support


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small photo, one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=0, help="repeats per size (default 5 at 1.5 MP, 3 at 12 MP)")
    parser.add_argument("--model", help="an already built tiny-model folder (without simulated delay) to use")
    parser.add_argument("--input-size", type=int, default=1024, help="model input side (default 1024)")
    args = parser.parse_args(argv)
    if args.quick:
        cases = [("quick", support.QUICK_SIZE, 1)]
        args.input_size = 64
    else:
        cases = [("1.5MP", support.SIZE_1_5MP, args.repeats or 5), ("12MP", support.SIZE_12MP, args.repeats or 3)]

    import torch

    # One thread, so that thread CPU time is the whole cost of an image on either path.
    torch.set_num_threads(1)
    machine = support.machine()
    with tempfile.TemporaryDirectory(prefix="rmbgd-bench-cpu-") as tmp:
        paths = Paths(Path(tmp), args.input_size, args.model)
        sizes = {}
        for label, size, repeats in cases:
            source = Path(tmp) / f"{label}.jpg"
            source.write_bytes(support.photo_jpeg(*size, seed=7))
            sizes[label] = measure(paths, source, repeats) | {"size": list(size), "repeats": repeats}

    result = {"bench": "cpu_path", "machine": machine, "input_size": args.input_size, "sizes": sizes}
    lines = [f"cpu_path: CPU ms per image, naive script vs rmbgd (model input {args.input_size}, median of repeats)"]
    for label, row in sizes.items():
        lines.append(
            f"  {label:6s} naive {row['naive_ms']:7.0f} ms {row['naive_bytes'] / 1e6:6.2f} MB | "
            f"rmbgd {row['rmbgd_ms']:6.0f} ms {row['rmbgd_bytes'] / 1e6:6.2f} MB | {row['speedup']:.1f}x less CPU "
            f"({row['wall_speedup']:.1f}x wall)"
        )
        stages = ", ".join(f"{name} {ms:.0f}" for name, ms in row["rmbgd_stages_ms"].items())
        lines.append(
            f"         rmbgd stages: {stages}; alpha max diff {row['alpha_max_diff']}, "
            f"RGB equal where alpha > 0: {row['rgb_equal_where_visible']}"
        )
    support.emit(result, lines)
    return 0


class Paths:
    """The two ways of turning one file into a transparent PNG, sharing one loaded model."""

    def __init__(self, tmp: Path, input_size: int, model: str | None) -> None:
        self.input_size = input_size
        self.segmenter, cfg = support.load_model(support.tiny_model(tmp, model), input_size, tmp)
        # The naive script calls the model directly, as the model card shows.
        self.model = self.segmenter._model
        self.output = cfg.output

    def naive(self, path: Path) -> bytes:
        import torch
        from PIL import Image
        from torchvision import transforms

        transform = transforms.Compose(
            [
                transforms.Resize((self.input_size, self.input_size)),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        image = Image.open(path).convert("RGB")
        pixels = transform(image).unsqueeze(0)
        with torch.no_grad():
            prediction = self.model(pixels)[-1].sigmoid()
        # Bilinear like rmbgd (Pillow's default here would be bicubic), so that the two alphas
        # differ only by rounding and any difference in cost is not a quality trade.
        mask = transforms.ToPILImage()(prediction[0].squeeze()).resize(image.size, Image.Resampling.BILINEAR)
        image.putalpha(mask)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    def rmbgd(self, path: Path, stages: dict) -> bytes:
        from rmbgd.imaging.decode import decode_image
        from rmbgd.imaging.pixels import combine_alpha
        from rmbgd.render.png import encode_png

        t0 = time.thread_time()
        image = decode_image(path, input_size=self.input_size, max_pixels=200_000_000)
        t1 = time.thread_time()
        (mask,) = self.segmenter.predict([image.model_input], [(image.width, image.height)])
        t2 = time.thread_time()
        data = encode_png(
            image.rgb,
            combine_alpha(mask, image.alpha),
            compress_level=self.output.png_compress_level,
            clean_transparent=self.output.clean_transparent,
            icc_profile=image.icc_profile,
        )
        t3 = time.thread_time()
        for name, ms in (("decode+resize", t1 - t0), ("model+pre/post", t2 - t1), ("alpha+encode", t3 - t2)):
            stages.setdefault(name, []).append(ms * 1000.0)
        return data


def measure(paths: Paths, source: Path, repeats: int) -> dict:
    import numpy as np
    from PIL import Image

    naive_ms, rmbgd_ms, naive_wall, rmbgd_wall, stages = [], [], [], [], {}
    naive_png = rmbgd_png = b""
    for _ in range(repeats):
        cpu, wall = time.thread_time(), time.perf_counter()
        naive_png = paths.naive(source)
        naive_ms.append((time.thread_time() - cpu) * 1000.0)
        naive_wall.append((time.perf_counter() - wall) * 1000.0)
        cpu, wall = time.thread_time(), time.perf_counter()
        rmbgd_png = paths.rmbgd(source, stages)
        rmbgd_ms.append((time.thread_time() - cpu) * 1000.0)
        rmbgd_wall.append((time.perf_counter() - wall) * 1000.0)

    with Image.open(io.BytesIO(naive_png)) as im:
        naive_px = np.asarray(im.convert("RGBA"))
    with Image.open(io.BytesIO(rmbgd_png)) as im:
        rmbgd_px = np.asarray(im.convert("RGBA"))
    alpha_diff = np.abs(naive_px[..., 3].astype(np.int16) - rmbgd_px[..., 3].astype(np.int16))
    visible = rmbgd_px[..., 3] > 0
    naive_median, rmbgd_median = statistics.median(naive_ms), statistics.median(rmbgd_ms)
    return {
        "naive_ms": round(naive_median, 1),
        "rmbgd_ms": round(rmbgd_median, 1),
        "speedup": round(naive_median / rmbgd_median, 2),
        "naive_wall_ms": round(statistics.median(naive_wall), 1),
        "rmbgd_wall_ms": round(statistics.median(rmbgd_wall), 1),
        "wall_speedup": round(statistics.median(naive_wall) / statistics.median(rmbgd_wall), 2),
        "naive_bytes": len(naive_png),
        "rmbgd_bytes": len(rmbgd_png),
        "rmbgd_stages_ms": {name: round(statistics.median(v), 1) for name, v in stages.items()},
        "alpha_max_diff": int(alpha_diff.max()),
        "alpha_mean_diff": round(float(alpha_diff.mean()), 4),
        "transparent_fraction": round(float((rmbgd_px[..., 3] == 0).mean()), 3),
        "rgb_equal_where_visible": bool(np.array_equal(naive_px[..., :3][visible], rmbgd_px[..., :3][visible])),
    }


if __name__ == "__main__":
    sys.exit(main())
