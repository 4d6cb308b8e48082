"""The real BiRefNet_lite model code (random weights) through `rmbgd process`, the daemon and
the loader, at a small input size on the CPU. One `rmbgd process` runs as its own process;
the rest load the model in this one, where torch is imported already.

Skipped where ../shared/models is absent (a user's checkout) or the birefnet extra (timm,
kornia, einops) is not installed. The weights are built once per test session (about 180 MB
in the session's temporary folder, seconds of CPU).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmbgd import cli
from tests.support.daemon import REPO, subprocess_env, write_config
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.tinymodel import build_birefnet_lite, edit_weights

pytestmark = pytest.mark.slow

# The smallest input Swin-T's windows allow (4 x 32 pixels): the least CPU for the same code paths.
SIDE = 128


@pytest.fixture(scope="module")
def birefnet_fixed(birefnet_lite, tmp_path_factory) -> Path:
    """The same weights with the upstream fix (post_init) that lets from_pretrained load it."""
    dest = tmp_path_factory.mktemp("birefnet-fixed") / "BiRefNet_lite_fixed"
    return build_birefnet_lite(dest, post_init=True, weights_from=birefnet_lite)


def photo(path: Path, width: int, height: int) -> Path:
    rgb = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def model_section(model: Path, **extra) -> dict:
    return {"name": str(model), "device": "cpu", "input_size": SIDE, **extra}


def records(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def process_argv(tmp_path: Path, model: Path) -> list:
    """`rmbgd process` of two photos (JPEG and PNG, two sizes) with `model`, JSON log on stdout."""
    config = write_config(tmp_path / "process.yaml", {"model": model_section(model), "batch": {"size": 2}})
    photo(tmp_path / "in" / "a.jpg", 200, 150)
    photo(tmp_path / "in" / "b.png", 120, 160)
    return ["process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--config", str(config), "--json"]


def check_processed(tmp_path: Path, code: int, stdout: str, stderr: str, loader: str) -> None:
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    (ready,) = [r for r in records(stdout) if r["event"] == "ready"]
    assert ready["loader"] == loader
    for name, size in (("a.png", (200, 150)), ("b.png", (120, 160))):
        with Image.open(tmp_path / "out" / name) as out:
            assert out.mode == "RGBA" and out.size == size


def test_real_birefnet_lite_through_process(tmp_path, hf_home, birefnet_fixed):
    # The users' loader as users start it: its own Python, torch and transformers imported cold.
    result = subprocess.run(
        [sys.executable, "-m", "rmbgd", *process_argv(tmp_path, birefnet_fixed)],
        capture_output=True, text=True, timeout=280, cwd=str(REPO), env=subprocess_env(hf_home),
    )
    check_processed(tmp_path, result.returncode, result.stdout, result.stderr, "from_pretrained")


def test_real_birefnet_lite_through_process_with_the_legacy_loader(tmp_path, birefnet_lite, cli_in_process, capfd):
    # The same command in this process (torch is imported here already), on the code as
    # published, which needs the legacy loader.
    argv = process_argv(tmp_path, birefnet_lite)
    capfd.readouterr()
    code = cli.main(argv)
    stdout, stderr = capfd.readouterr()
    check_processed(tmp_path, code, stdout, stderr, "legacy")


def test_real_birefnet_lite_in_the_daemon(inprocess, birefnet_fixed):
    # The daemon's own loading (load_model=True), in this process: the subprocess start is
    # test_daemon.py's, with the tiny model.
    daemon = inprocess.start(load_model=True, model=model_section(birefnet_fixed), batch={"size": 2})
    assert daemon.events("ready")[0]["loader"] == "from_pretrained"
    photo(inprocess.root / "inbox" / "sub" / "c.jpg", 180, 140)
    done = daemon.wait_for("file_done", timeout=180)
    assert done["output"].endswith("sub/c.png")
    assert daemon.stop() == 0
    with Image.open(inprocess.root / "outbox" / "sub" / "c.png") as out:
        assert out.mode == "RGBA" and out.size == (180, 140)


def test_real_birefnet_lite_fp16_weights_run_in_fp32_on_the_cpu(tmp_path, birefnet_fixed):
    import torch

    from rmbgd.config import ModelConfig
    from rmbgd.model.loading import load_segmenter

    half = tmp_path / "BiRefNet_lite_fp16"
    shutil.copytree(birefnet_fixed, half)
    edit_weights(half, lambda state: state.update({k: v.half() for k, v in state.items() if v.is_floating_point()}))
    segmenter = load_segmenter(ModelConfig(name=str(half), device="cpu", input_size=SIDE))
    assert segmenter.dtype == "float32"
    assert {p.dtype for p in segmenter._model.parameters()} == {torch.float32}
    image = np.random.default_rng(3).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    (mask,) = segmenter.predict([image], [(90, 60)])
    assert mask.shape == (60, 90) and mask.dtype == np.uint8


def test_real_birefnet_lite_dynamic_input_size(birefnet_fixed):
    from rmbgd.config import ModelConfig
    from rmbgd.model.loading import load_segmenter

    segmenter = load_segmenter(
        ModelConfig(name=str(birefnet_fixed), device="cpu", input_size="dynamic", max_input_size=SIDE)
    )
    width, height = segmenter.model_size(300, 200)
    assert max(width, height) <= SIDE and width % 32 == 0 and height % 32 == 0 and width > height
    image = np.random.default_rng(4).integers(0, 256, (height, width, 3), dtype=np.uint8)
    (mask,) = segmenter.predict([image], [(300, 200)], model_size=(width, height))
    assert mask.shape == (200, 300)
