"""Doctor check: generated images through the real pipeline with the stand-in model."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from rmbgd.errors import describe
from rmbgd.runtime.doctor.packages import importable
from rmbgd.runtime.doctor.result import FAIL, OK, Result

# The generated images of the pipeline run: a red square (opaque for the stand-in) on blue.
PIPELINE_IMAGES = 12
_IMAGE_SIZE = (320, 240)


def check_pipeline(cfg: Any, device: str) -> Result:
    """Generated images through the real pipeline with the stand-in model, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="rmbgd-doctor-") as scratch:
        try:
            return _run_pipeline(cfg, device, Path(scratch))
        except Exception as exc:  # noqa: BLE001 - the check's boundary: any failure is its result
            return Result(FAIL, "pipeline", describe(exc, limit=300))


def _run_pipeline(cfg: Any, device: str, scratch: Path) -> Result:
    from rmbgd.model import standin
    from rmbgd.ops import logs
    from rmbgd.runtime import oneshot
    from rmbgd.runtime.daemon import StartupError

    inputs = _generate_images(scratch / "in", PIPELINE_IMAGES)
    model_dir = standin.build(scratch / "model")
    model = dataclasses.replace(
        cfg.model, name=str(model_dir), device=device, revision=None, trust_remote_code=True, backend="torch",
        compile=False,
    )
    if device == "cpu" and model.dtype == "float16":
        model = dataclasses.replace(model, dtype="auto")
    run_cfg = dataclasses.replace(cfg, model=model)
    records: List[Dict[str, Any]] = []
    logs.configure("info", stream=_RecordSink(records.append))
    log = logs.get_logger()
    work = oneshot.plan([str(scratch / "in")], out=str(scratch / "out"))
    runner = oneshot.Runner(run_cfg, work, log, oneshot.Report())
    try:
        code = runner.run()
    except StartupError as exc:
        return Result(FAIL, "pipeline", f"the stand-in model did not load: {exc}")
    summary = next((r for r in records if r.get("event") == "summary"), {})
    failed = [r for r in records if r.get("event") == "file_failed"]
    if code != 0 or failed or summary.get("processed") != len(inputs):
        why = failed[0].get("error") if failed else f"exit {code}, {summary.get('processed')} of {len(inputs)} done"
        return Result(FAIL, "pipeline", f"the run on {len(inputs)} generated images failed: {why}")
    wrong = _wrong_result(run_cfg, scratch / "out")
    if wrong:
        return Result(FAIL, "pipeline", wrong)
    return Result(
        OK,
        "pipeline",
        f"{len(inputs)} generated images (JPEG, PNG, HEIC) decoded, batched, segmented by a stand-in model "
        f"on {device}, encoded and published in {summary.get('seconds')} s: {summary.get('images_per_s')} images/s "
        f"(batch.size {cfg.batch.size}; the real model is much slower)",
    )


def _generate_images(folder: Path, count: int) -> List[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    width, height = _IMAGE_SIZE
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = (10, 60, 200)
    rgb[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (250, 40, 20)
    image = Image.fromarray(rgb)
    formats = [("jpg", {"quality": 95}), ("png", {})]
    if importable("pillow_heif"):
        import pillow_heif

        pillow_heif.register_heif_opener()
        formats.append(("heic", {"quality": 90}))
    paths = []
    for index in range(count):
        suffix, params = formats[index % len(formats)]
        path = folder / f"doctor-{index:02d}.{suffix}"
        image.save(path, **params)
        paths.append(path)
    return paths


def _wrong_result(cfg: Any, out: Path) -> Optional[str]:
    """Why the first result does not show the stand-in's mask, or None (only for plain RGBA outputs)."""
    from PIL import Image

    output = cfg.output
    if output.format not in ("png", "webp") or output.background is not None or output.crop or output.max_size:
        return None
    if cfg.profiles or output.mask != "none":
        return None
    results = sorted(out.glob("doctor-00.*"))
    if not results:
        return f"no result written for doctor-00 in {out}"
    with Image.open(results[0]) as im:
        if im.size != _IMAGE_SIZE or im.mode != "RGBA":
            return f"result is {im.mode} {im.size[0]}x{im.size[1]}, expected RGBA {_IMAGE_SIZE[0]}x{_IMAGE_SIZE[1]}"
        inside = im.getpixel((_IMAGE_SIZE[0] // 2, _IMAGE_SIZE[1] // 2))[3]
        outside = im.getpixel((4, 4))[3]
    if inside < 200 or outside > 55:
        return f"the result's mask is wrong (alpha {inside} on the subject, {outside} on the background)"
    return None


class _RecordSink:
    """A text stream for the JSON log that hands each record to `on_record` instead of printing it."""

    def __init__(self, on_record: Callable[[Dict[str, Any]], None]) -> None:
        self._on_record = on_record

    def write(self, text: str) -> int:
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._on_record(record)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
