"""Draw the README's pictures of the output options from a synthetic scene.

    .venv/bin/python docs/pictures.py      # rewrites docs/img/*.png

The scene is made here, with a known mask, so the pictures show exactly what rmbgd's own
output code (rmbgd.render.render.render, the function the daemon runs) does with a mask: no model
and no download are needed. The subject is an orange ball with hair-like strands, shot
against green foliage, composited as a camera would see it: I = a*F + (1-a)*B.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rmbgd.config import OutputConfig, Padding  # noqa: E402
from rmbgd.imaging.decode import DecodedImage  # noqa: E402
from rmbgd.model.refine import estimate_foreground  # noqa: E402
from rmbgd.render.render import render  # noqa: E402

OUT = Path(__file__).parent / "img"
W, H = 360, 270
LABEL_H = 18


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input RGB, true foreground, mask) of the synthetic photo."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    leaves = Image.fromarray(rng.integers(0, 255, (H // 6, W // 6), dtype=np.uint8)).resize((W, H), Image.BICUBIC)
    texture = np.asarray(leaves.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64) / 255.0
    background = np.stack([30 + 40 * texture, 120 + 110 * texture, 40 + 30 * texture], axis=-1)

    shade = np.clip(1.1 - np.hypot(xx - 150, yy - 105) / 170.0, 0.35, 1.0)[..., None]
    foreground = np.array([250.0, 140.0, 40.0]) * shade + 10.0

    # A ball with a soft edge, plus thin strands sticking out of it, like hair or fur.
    body = np.clip((82.0 - np.hypot(xx - 180, yy - 140)) / 3.0, 0.0, 1.0)
    strands = Image.new("L", (W * 4, H * 4), 0)
    draw = ImageDraw.Draw(strands)
    for angle in np.linspace(0, 2 * np.pi, 70, endpoint=False) + rng.uniform(0, 0.05, 70):
        length = rng.uniform(14, 34)
        start = (180 + 76 * np.cos(angle), 140 + 76 * np.sin(angle))
        end = (180 + (82 + length) * np.cos(angle + 0.08), 140 + (82 + length) * np.sin(angle + 0.08))
        draw.line([(4 * start[0], 4 * start[1]), (4 * end[0], 4 * end[1])], fill=int(rng.uniform(130, 230)), width=3)
    hair = np.asarray(strands.resize((W, H), Image.BOX), dtype=np.float64) / 255.0
    alpha = np.maximum(body, hair)

    a = alpha[..., None]
    photo = np.rint(a * foreground + (1.0 - a) * background).clip(0, 255).astype(np.uint8)
    mask = np.rint(alpha * 255.0).astype(np.uint8)
    return photo, foreground, mask


def checkerboard(width: int, height: int, cell: int = 10) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    grey = np.where(((yy // cell) + (xx // cell)) % 2 == 0, 205, 240).astype(np.uint8)
    return Image.fromarray(grey).convert("RGBA")


def shown(data: bytes) -> Image.Image:
    """An output file as a reader would see it: transparency over a checkerboard."""
    im = Image.open(io.BytesIO(data))
    im.load()
    if im.mode != "RGBA":
        return im.convert("RGB")
    board = checkerboard(*im.size)
    board.alpha_composite(im)
    return board.convert("RGB")


def labelled(im: Image.Image, text: str) -> Image.Image:
    tile = Image.new("RGB", (im.width, im.height + LABEL_H), "white")
    tile.paste(im, (0, LABEL_H))
    ImageDraw.Draw(tile).text((4, 3), text, fill=(30, 30, 30))
    return tile


def row(tiles: list[Image.Image], gap: int = 8) -> Image.Image:
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + gap
    return sheet


def zoom(im: Image.Image, box: tuple[int, int, int, int], factor: int = 4) -> Image.Image:
    part = im.crop(box)
    return part.resize((part.width * factor, part.height * factor), Image.NEAREST)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    photo, _, mask = scene()
    image = DecodedImage(rgb=photo, alpha=None, model_input=None, format="PNG")

    def output(**options) -> bytes:
        return render(image, mask, dataclasses.replace(OutputConfig(), **options), refine=estimate_foreground)[0].data

    sheet = row([
        labelled(Image.fromarray(photo), "input"),
        labelled(shown(output()), "default: transparent PNG"),
        labelled(shown(output(crop=True, crop_padding=Padding(pixels=8))), "crop: true, crop_padding: 8"),
        labelled(shown(output(format="jpeg", background=(255, 255, 255))), 'format: jpeg, background: "#ffffff"'),
    ])
    sheet.save(OUT / "outputs.png", optimize=True)

    # The strands at the ball's upper right, on white, 4x: green fringe without refinement.
    edge = (232, 40, 312, 100)
    plain = shown(output(background=(255, 255, 255)))
    refined = shown(output(background=(255, 255, 255), refine_foreground=True))
    row([
        labelled(zoom(plain, edge), "refine_foreground: false"),
        labelled(zoom(refined, edge), "refine_foreground: true"),
    ]).save(OUT / "refine.png", optimize=True)

    mask_sheet = row([
        labelled(Image.fromarray(photo), "input"),
        labelled(Image.open(io.BytesIO(render(image, mask, dataclasses.replace(OutputConfig(), mask="only"))[0].data)).convert("RGB"), "mask: only  (photo.mask.png)"),
    ])
    mask_sheet.save(OUT / "mask.png", optimize=True)
    for name in ("outputs.png", "refine.png", "mask.png"):
        path = OUT / name
        sys.stdout.write(f"{path} {path.stat().st_size // 1024} KiB\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
