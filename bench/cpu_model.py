"""The real BiRefNet_lite on a CPU: per-image time and mask agreement of every way to run it.

    .venv/bin/python bench/cpu_model.py            # 512 and 1024: about 15-25 min on 2 cores
    .venv/bin/python bench/cpu_model.py --quick    # 256 only, 2 images, no torch.compile: a smoke run

Builds a BiRefNet_lite model folder (the real code from ../shared/models, random weights from a
fixed seed; kept in --cache between runs with its exports) and runs, in ONE process, per input
size:

- eager: today's path, rmbgd.model.loading.load_segmenter's Segmenter (float32, inference_mode);
- channels_last: a copy of the model and its input in channels-last memory format;
- compile: torch.compile(model) (default mode); its first call, the compilation, is reported
  apart. Only at --compile-sizes (default 512): compiling costs minutes per input size;
- bf16: torch.autocast(bfloat16), only where oneDNN reports native bfloat16 (avx512_bf16 or
  AMX); torchvision's deform_conv2d has no bfloat16 CPU kernel, so it is run in float32;
- onnxruntime, openvino (f32) and, on bfloat16 CPUs, openvino_bf16: the exports rmbgd's
  model.backend uses (rmbgd/model/backends.py), made once and cached next to the model, keyed by
  model content, input size and library versions; export time is reported apart.

Every variant is warmed up once per size, then timed on the same images, round-robin
(A B C, B C A, ...), so that load from other programs hits all alike; the figures are medians
and ratios to eager from this run. The images are six visually different generated styles; each
variant's mask (sigmoid of the final logits, 8-bit, at the model size) is compared with eager's:
IoU of alpha >= 0.5 (>= 0.99 wanted) and mean absolute alpha difference (<= 1/255 wanted). With
random weights the logits are small (about +-0.02), so the relative logit error is given too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import _support as support

STYLES = ("product", "portrait", "high_key", "foliage", "low_light", "graphic")
IOU_MIN = 0.99
MEAN_DIFF_MAX = 1.0 / 255.0
SEED = 1234


# --------------------------------------------------------------------------- the photo set


def styled_photo(style: str, side: int, seed: int):
    """A (side, side, 3) uint8 RGB image in one of six looks a background remover meets."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    if style == "product":
        return np.asarray(support.photo(side, side, seed))
    if style == "portrait":
        image = Image.new("RGB", (side, side), (40, 45, 60))
        draw = ImageDraw.Draw(image)
        draw.ellipse((side * 0.15, side * 0.6, side * 0.85, side * 1.3), fill=(30, 60, 120))  # shoulders
        draw.ellipse((side * 0.33, side * 0.18, side * 0.67, side * 0.62), fill=(224, 172, 140))  # face
        for _ in range(120):  # hair strands
            x = side * rng.uniform(0.3, 0.7)
            draw.line((x, side * 0.15, x + rng.uniform(-40, 40), side * rng.uniform(0.3, 0.6)), fill=(60, 35, 20), width=2)
        image = image.filter(ImageFilter.GaussianBlur(1.2))
    elif style == "high_key":
        image = Image.new("RGB", (side, side), (246, 246, 244))
        draw = ImageDraw.Draw(image)
        draw.ellipse((side * 0.2, side * 0.75, side * 0.85, side * 0.85), fill=(215, 215, 212))  # shadow
        draw.polygon([(side * 0.2, side * 0.78), (side * 0.3, side * 0.45), (side * 0.55, side * 0.4),
                      (side * 0.85, side * 0.7), (side * 0.8, side * 0.8)], fill=(25, 25, 30))  # a shoe
        draw.rectangle((side * 0.4, side * 0.5, side * 0.6, side * 0.55), fill=(240, 240, 240))
        image = image.filter(ImageFilter.GaussianBlur(0.8))
    elif style == "foliage":
        noise = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        noise[..., 0] //= 4
        noise[..., 2] //= 3
        image = Image.fromarray(noise).resize((side, side), Image.Resampling.NEAREST).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(image)
        draw.rounded_rectangle((side * 0.35, side * 0.2, side * 0.65, side * 0.9), radius=side // 10, fill=(250, 210, 40))
    elif style == "low_light":
        image = Image.new("RGB", (side, side), (12, 10, 18))
        draw = ImageDraw.Draw(image)
        draw.ellipse((side * 0.25, side * 0.25, side * 0.75, side * 0.9), fill=(70, 50, 45))
        draw.ellipse((side * 0.6, side * 0.05, side * 0.75, side * 0.2), fill=(255, 230, 160))  # a lamp
        image = image.filter(ImageFilter.GaussianBlur(3))
    elif style == "graphic":
        image = Image.new("RGB", (side, side), (255, 80, 120))
        draw = ImageDraw.Draw(image)
        draw.regular_polygon((side * 0.5, side * 0.5, side * 0.32), 6, fill=(20, 200, 220))
        draw.text((side * 0.3, side * 0.45), "rmbgd  rmbgd", fill=(0, 0, 0), font_size=max(10, side // 16))
        draw.rectangle((0, side * 0.9, side, side), fill=(255, 255, 255))
    else:
        raise ValueError(f"unknown style {style!r}")
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.normal(0.0, 4.0 if style != "low_light" else 9.0, size=(side, side, 1)).astype(np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- variants


def build_model_dir(cache: Path) -> Path:
    import torch

    from tests.support.tinymodel import BIREFNET_LITE_CODE, build_birefnet_lite

    if not BIREFNET_LITE_CODE.is_dir():
        raise SystemExit(f"cpu_model: the BiRefNet_lite code is not at {BIREFNET_LITE_CODE} (set RMBGD_SHARED_MODELS)")
    dest = cache / "birefnet_lite"
    if not (dest / "model.safetensors").is_file():
        torch.manual_seed(SEED)
        build_birefnet_lite(dest)
    return dest


def uses_deformable_conv(model) -> bool:
    return any(type(m).__name__ == "DeformableConv2d" for m in model.modules())


@contextlib.contextmanager
def deform_conv_in_float32(model):
    """BiRefNet's code calls torchvision's deform_conv2d by its imported name; under bfloat16
    autocast it would get bfloat16 tensors, for which the CPU has no kernel."""
    import torch

    modules = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__ == "DeformableConv2d"}
    originals = {module: module.deform_conv2d for module in modules}

    def in_float32(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None):
        with torch.autocast("cpu", enabled=False):
            f = lambda t: None if t is None else t.float()  # noqa: E731
            return originals_any(f(input), f(offset), f(weight), f(bias), stride, padding, dilation, f(mask))

    originals_any = next(iter(originals.values())) if originals else None
    try:
        for module in modules:
            module.deform_conv2d = in_float32
        yield
    finally:
        for module, original in originals.items():
            module.deform_conv2d = original


def make_variants(names, segmenter, model, model_dir, side, threads, fingerprint, notes):
    """{name: (callable(x) -> (1,1,S,S) float32 numpy logits, setup seconds or None)}; skipped
    ones go into ``notes`` with their reason."""
    import torch

    from rmbgd.model import backends
    from rmbgd.model.device import _cpu_has_bfloat16
    from rmbgd.model.segmenter import Segmenter, final_logits

    seg = Segmenter(model, name="birefnet_lite", device="cpu", dtype="float32", input_size=side)
    variants = {}

    def eager(x):
        return seg.predict_prepared(x)[0].unsqueeze(0).numpy()

    for name in names:
        started = time.perf_counter()
        try:
            if name == "eager":
                variants[name] = (eager, None)
            elif name == "channels_last":
                cl = copy.deepcopy(model).to(memory_format=torch.channels_last)

                def run(x, cl=cl):
                    with torch.inference_mode():
                        return final_logits(cl(x.contiguous(memory_format=torch.channels_last)), 1).float().numpy()

                variants[name] = (run, None)
            elif name == "compile":
                compiled = torch.compile(model)

                def run(x, compiled=compiled):
                    with torch.inference_mode():
                        return final_logits(compiled(x), 1).float().numpy()

                variants[name] = (run, None)
            elif name == "bf16":
                if not _cpu_has_bfloat16():
                    notes[name] = "skipped: this CPU has no native bfloat16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)"
                    continue

                def run(x):
                    with torch.inference_mode(), deform_conv_in_float32(model), torch.autocast("cpu", dtype=torch.bfloat16):
                        return final_logits(model(x), 1).float().numpy()

                variants[name] = (run, None)
            elif name in ("onnxruntime", "openvino", "openvino_bf16"):
                backend = "openvino" if name.startswith("openvino") else name
                package = backends.PACKAGES[backend]
                if importlib.util.find_spec(package) is None:
                    notes[name] = f"skipped: {package} is not installed (pip install 'rmbgd[{backends.EXTRAS[backend]}]')"
                    continue
                options = {}
                if name == "openvino_bf16":
                    if not _cpu_has_bfloat16():
                        notes[name] = "skipped: this CPU has no native bfloat16"
                        continue
                    options["precision"] = "bf16"
                runner, exported = backends.build_runner(
                    backend, model, model_dir, side, threads, fingerprint=fingerprint, **options
                )
                notes[f"{name}_export"] = ("exported" if exported else "from cache") + f" {runner.path.parent.name}"

                def run(x, runner=runner):
                    return runner(x.numpy())

                variants[name] = (run, time.perf_counter() - started)
            else:
                raise SystemExit(f"cpu_model: unknown variant {name}")
        except backends.BackendError as exc:
            notes[name] = f"failed: {exc}"
    return variants


# --------------------------------------------------------------------------- measuring


def progress(text: str) -> None:
    # stderr, so that stdout stays the one JSON line and the summary; the run takes minutes.
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] cpu_model: {text}\n")
    sys.stderr.flush()


def mask_of(segmenter, logits, side):
    import torch

    return segmenter.finish(torch.from_numpy(logits).reshape(1, side, side).float(), (side, side))


def compare(mask, reference, logits, reference_logits) -> dict:
    import numpy as np

    a, b = mask >= 128, reference >= 128
    union = np.logical_or(a, b).sum()
    iou = 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
    mean_diff = float(np.abs(mask.astype(np.int16) - reference.astype(np.int16)).mean()) / 255.0
    scale = float(np.abs(reference_logits).max()) or 1.0
    return {
        "iou": iou,
        "mean_alpha_diff": mean_diff,
        "max_logit_diff": float(np.abs(logits - reference_logits).max()),
        "rel_logit_err": float(np.abs(logits - reference_logits).max()) / scale,
    }


def measure_size(side, count, names, segmenter, model, model_dir, threads, fingerprint) -> dict:
    import torch

    notes: dict[str, str] = {}
    progress(f"{side}: exporting / preparing {', '.join(names)}")
    variants = make_variants(names, segmenter, model, model_dir, side, threads, fingerprint, notes)
    images = [styled_photo(STYLES[i % len(STYLES)], side, seed=i) for i in range(count)]
    inputs = [torch.stack([segmenter.prepare(image)]) for image in images]

    first_call = {}
    for name, (run, setup) in list(variants.items()):
        progress(f"{side}: first call of {name}")
        started = time.perf_counter()
        try:
            run(inputs[0])
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a finding, not a crash
            notes[name] = f"failed on its first call: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            del variants[name]
            continue
        first_call[name] = time.perf_counter() - started

    times = {name: [] for name in variants}
    logits = {name: [] for name in variants}
    order = list(variants)
    for index, x in enumerate(inputs):
        progress(f"{side}: image {index + 1}/{len(inputs)}")
        rotation = order[index % len(order):] + order[: index % len(order)]
        for name in rotation:
            started = time.perf_counter()
            out = variants[name][0](x)
            times[name].append((time.perf_counter() - started) * 1000.0)
            logits[name].append(out.reshape(side, side).astype("float32"))

    rows = {}
    eager_ms = statistics.median(times["eager"]) if "eager" in times else None
    for name in variants:
        row = {
            "ms": round(statistics.median(times[name]), 1),
            "all_ms": [round(t, 1) for t in times[name]],
            "first_call_s": round(first_call[name], 1),
        }
        if variants[name][1] is not None:
            row["setup_s"] = round(variants[name][1], 1)
        if eager_ms:
            row["speedup"] = round(eager_ms / row["ms"], 2)
        if name != "eager" and "eager" in logits:
            per_image = []
            for index in range(len(inputs)):
                ref = logits["eager"][index]
                got = logits[name][index]
                per_image.append(compare(mask_of(segmenter, got, side), mask_of(segmenter, ref, side), got, ref))
            row["iou_min"] = round(min(p["iou"] for p in per_image), 5)
            row["mean_alpha_diff_max"] = round(max(p["mean_alpha_diff"] for p in per_image), 6)
            row["rel_logit_err_max"] = float(f"{max(p['rel_logit_err'] for p in per_image):.3g}")
            row["masks_equal"] = row["iou_min"] >= IOU_MIN and row["mean_alpha_diff_max"] <= MEAN_DIFF_MAX
        rows[name] = row
    return {
        "images": count,
        "styles": [STYLES[i % len(STYLES)] for i in range(count)],
        "variants": rows,
        "notes": notes,
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 only, 2 images, no torch.compile: a smoke run")
    parser.add_argument("--sizes", default="512,1024", help="input sides, comma-separated (default 512,1024)")
    parser.add_argument("--images", type=int, default=0, help="timed images per size and variant (default 6 at <= 512, 3 above)")
    parser.add_argument("--variants", default="eager,channels_last,compile,bf16,onnxruntime,openvino,openvino_bf16")
    parser.add_argument("--compile-sizes", default="512", help="sizes at which torch.compile is measured (compiling costs minutes per size)")
    parser.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rmbgd-bench-cpu-model"),
                        help="where the model folder and its exports are kept between runs")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",") if v]
    names = [v for v in args.variants.split(",") if v]
    compile_sizes = {int(v) for v in args.compile_sizes.split(",") if v}
    if args.quick:
        sizes, compile_sizes, args.images = [256], set(), 2

    import torch

    from rmbgd.config import parse_config
    from rmbgd.model import backends
    from rmbgd.model.device import _cpu_has_bfloat16
    from rmbgd.model.loading import load_segmenter

    machine = support.machine()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(cache)
    work = cache / "work"
    folders = {n: str(work / n) for n in ("inbox", "outbox", "errors", "done")}
    cfg = parse_config({"paths": folders, "model": {"name": str(model_dir), "device": "cpu", "input_size": sizes[0], "backend": "torch"}}, work)
    started = time.perf_counter()
    segmenter = load_segmenter(cfg.model)
    load_s = time.perf_counter() - started
    model = segmenter._model
    threads = torch.get_num_threads()
    fingerprint = backends.model_fingerprint(model_dir)
    deformable = uses_deformable_conv(model)

    results = {}
    for side in sizes:
        count = args.images or (6 if side <= 512 else 3)
        wanted = [n for n in names if n != "compile" or side in compile_sizes]
        results[str(side)] = measure_size(side, count, wanted, segmenter, model, model_dir, threads, fingerprint)
        if "compile" in names and side not in compile_sizes:
            results[str(side)]["notes"]["compile"] = "not measured at this size (--compile-sizes)"
        torch._dynamo.reset()

    machine.update(
        {
            "threads": threads,
            "cpu_bf16": _cpu_has_bfloat16(),
            "cpu_model": _cpu_model(),
            "versions": {**backends.library_versions("onnxruntime"), **backends.library_versions("openvino")},
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        }
    )
    result = {
        "bench": "cpu_model",
        "machine": machine,
        "model": {"code": "BiRefNet_lite 2025-02 (random weights)", "uses_deform_conv2d": deformable, "load_s": round(load_s, 1)},
        "sizes": results,
    }
    lines = [
        f"cpu_model: BiRefNet_lite, random weights, batch 1, {threads} threads, median ms per image; "
        f"masks vs eager (IoU >= {IOU_MIN} at alpha 0.5, mean |alpha diff| <= 1/255); "
        f"load {machine['loadavg_1m_at_start']} -> {machine['loadavg_1m_at_end']}"
    ]
    for side, res in results.items():
        lines.append(f"  {side}x{side}, {res['images']} images ({', '.join(res['styles'])}):")
        lines.append("  | variant | ms / image | vs eager | first call s | IoU min | mean alpha diff max | rel logit err | equal |")
        lines.append("  |---|---|---|---|---|---|---|---|")
        for name, row in res["variants"].items():
            equal = "—" if name == "eager" else ("yes" if row["masks_equal"] else "NO")
            lines.append(
                f"  | {name} | {row['ms']:.0f} | {row.get('speedup', 1.0):.2f}x | {row['first_call_s']:.1f}"
                + (f" (+{row['setup_s']:.0f} export/load)" if "setup_s" in row else "")
                + f" | {row.get('iou_min', '—')} | {row.get('mean_alpha_diff_max', '—')} | {row.get('rel_logit_err_max', '—')} | {equal} |"
            )
        for name, note in res["notes"].items():
            lines.append(f"    {name}: {note}")
    support.emit(result, lines)
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return "unknown"
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
