"""Build a tiny BiRefNet-like model on disk, in the Hugging Face custom-code layout.

The checkpoint is loaded by rmbgd exactly like BiRefNet is: through
``AutoModelForImageSegmentation.from_pretrained(path, trust_remote_code=True)``,
which reads ``config.json``'s ``auto_map``, imports the copied Python files and
loads ``model.safetensors``.

The model's mask depends only on the red channel of the pixel::

    logit = GAIN * r + OFFSET        with r = red / 255 in [0, 1]
    alpha = round(255 * sigmoid(logit))

so pure red is opaque (255), no red is transparent (0), and red 128 is about
half (131). The coefficients live in the saved weights, not in the code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

GAIN = 24.0
OFFSET = -12.0

# BiRefNet's input normalisation; the stored weights undo it for the red channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CODE_DIR = Path(__file__).parent / "tinyseg"
CODE_FILES = ("configuration_tinyseg.py", "modeling_tinyseg.py")
DEFORMABLE_CODE_FILE = "modeling_deformseg.py"

AUTO_MAP = {
    "AutoConfig": "configuration_tinyseg.TinySegConfig",
    "AutoModelForImageSegmentation": "modeling_tinyseg.TinySegModel",
}


def alpha_for_rgb(r: int, g: int, b: int) -> int:
    """The alpha the tiny model predicts for a flat region of colour (r, g, b)."""
    del g, b  # the model looks at red only; kept for a colour-shaped signature
    logit = GAIN * (r / 255.0) + OFFSET
    return int(round(255.0 / (1.0 + math.exp(-logit))))


def expected_alpha(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel uint8 alpha for an (..., 3) uint8 RGB array of flat regions."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) RGB, got shape {rgb.shape}")
    logit = GAIN * (rgb[..., 0].astype(np.float64) / 255.0) + OFFSET
    return np.rint(255.0 / (1.0 + np.exp(-logit))).astype(np.uint8)


def build_tiny_model(
    dest: Path,
    *,
    delay_ms_per_call: float = 0.0,
    delay_ms_per_image: float = 0.0,
    stored_dtype: str = "float32",
    deformable: bool = False,
    sample_stride: int = 1,
    load_gate: Path | None = None,
) -> Path:
    """Write config.json, model.safetensors and the model's code into ``dest``; return it.

    The delays make the forward call wait (without using the CPU) like a busy accelerator.
    ``stored_dtype="float16"`` stores the weights in half precision, as BiRefNet_HR and the
    512 variants are (config.json then says so too). ``deformable`` runs the head through
    torchvision's deformable convolution, which has no bfloat16 kernel, like BiRefNet's.
    ``sample_stride`` > 1 computes the mask from every n-th pixel (blocky masks, almost no
    CPU): with the delays, a stand-in for a model running on an accelerator.
    ``load_gate`` makes constructing the model wait until that file exists (checked twice
    a second, for at most 10 minutes): a download or load that takes as long as a test wants.
    """
    import torch

    from .tinyseg.configuration_tinyseg import TinySegConfig
    from .tinyseg.modeling_tinyseg import TinySegModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    auto_map = dict(AUTO_MAP)
    if deformable:
        auto_map["AutoModelForImageSegmentation"] = "modeling_deformseg.DeformSegModel"
    config = TinySegConfig(
        auto_map=auto_map,
        delay_ms_per_call=delay_ms_per_call,
        delay_ms_per_image=delay_ms_per_image,
        sample_stride=sample_stride,
    )
    model = TinySegModel(config)
    # x_red = (r - mean) / std, so GAIN * r + OFFSET = (GAIN * std) * x_red + (GAIN * mean + OFFSET).
    weight = torch.zeros_like(model.head.weight)
    weight[0, 0, 0, 0] = GAIN * IMAGENET_STD[0]
    bias = torch.tensor([GAIN * IMAGENET_MEAN[0] + OFFSET])
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)

    from transformers.utils import logging as hf_logging

    # save_pretrained draws a progress bar on stderr otherwise.
    hf_logging.disable_progress_bar()
    # GAIN * std and the bias are exact in fp16 to well within a grey level.
    model.to(getattr(torch, stored_dtype)).save_pretrained(dest, safe_serialization=True)
    for name in CODE_FILES + ((DEFORMABLE_CODE_FILE,) if deformable else ()):
        shutil.copyfile(CODE_DIR / name, dest / name)
    if load_gate is not None:
        # Written after saving: the model built above must not wait for it.
        config_path = dest / "config.json"
        saved = json.loads(config_path.read_text())
        saved["load_gate"] = str(load_gate)
        config_path.write_text(json.dumps(saved, indent=2))
    return dest


# The habits of older BiRefNet / RMBG-2.0 code that break transformers 5's from_pretrained,
# and the class in tinyseg/modeling_legacyseg.py that reproduces each.
LEGACY_CLASSES = {
    "plain_config": "ReplacesConfig",
    "item_in_init": "ItemInInit",
    "no_post_init": "NoPostInit",
    "birefnet_style": "BiRefNetStyle",
}
LEGACY_CODE_FILE = "modeling_legacyseg.py"


def build_legacy_model(dest: Path, habit: str, **options) -> Path:
    """The tiny model (same weights, same mask) with model code written in an older style.

    ``habit`` is a key of LEGACY_CLASSES; ``options`` go to build_tiny_model.
    """
    dest = build_tiny_model(dest, **options)
    shutil.copyfile(CODE_DIR / LEGACY_CODE_FILE, dest / LEGACY_CODE_FILE)
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    module = LEGACY_CODE_FILE.removesuffix(".py")
    config["auto_map"]["AutoModelForImageSegmentation"] = f"{module}.{LEGACY_CLASSES[habit]}"
    config_path.write_text(json.dumps(config, indent=2))
    return dest


# --------------------------------------------------------------------------- the real BiRefNet_lite

# The real BiRefNet_lite model code (no weights), beside the repository as ../shared/models
# (RMBGD_SHARED_MODELS overrides where); tests using it skip where it is absent.
SHARED_MODELS = Path(
    os.environ.get("RMBGD_SHARED_MODELS") or Path(__file__).resolve().parents[3] / "shared" / "models"
)
BIREFNET_LITE_CODE = SHARED_MODELS / "birefnet_lite_2k_2025-02"
BIREFNET_LITE_FILES = ("birefnet.py", "BiRefNet_config.py", "config.json")
# BiRefNet's code picks its backbone in its Config class: Swin-T in BiRefNet_lite, Swin-L in
# the full ZhengPeng7/BiRefNet (about 220 M parameters); the rest of the network is the same.
BIREFNET_LITE_BACKBONE = "swin_v1_t"
BIREFNET_FULL_BACKBONE = "swin_v1_l"


def build_birefnet_lite(
    dest: Path, *, post_init: bool = False, weights_from: Path | None = None, backbone: str | None = None
) -> Path:
    """BiRefNet_lite's real code with random weights (about 180 MB) in ``dest``; return it.

    The code is the 2025-02 version, which transformers 5 only loads through rmbgd's legacy
    loader; ``post_init=True`` adds the ``self.post_init()`` call the hub's current code has,
    so that ``from_pretrained`` loads it directly. ``weights_from`` copies another such
    folder's weights instead of building new ones (seconds of CPU). ``backbone`` swaps
    Swin-T for another of the code's backbones: BIREFNET_FULL_BACKBONE gives the full
    BiRefNet's architecture (about 890 MB of weights).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in BIREFNET_LITE_FILES:
        shutil.copyfile(BIREFNET_LITE_CODE / name, dest / name)
    code = dest / "birefnet.py"
    if post_init:
        _insert_before(code, "\n    def forward_enc(self, x):", "\n        self.post_init()\n")
    if backbone is not None and backbone != BIREFNET_LITE_BACKBONE:
        # Right after Config chose Swin-T from its list, before anything reads the choice.
        _insert_before(code, "\n        self.lateral_channels_in_collection = {", f"\n        self.bb = {backbone!r}")
    if weights_from is not None:
        shutil.copyfile(Path(weights_from) / "model.safetensors", dest / "model.safetensors")
        return dest

    from safetensors.torch import save_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with warnings.catch_warnings():
        # timm's deprecated import paths, which BiRefNet's code uses; rmbgd's own loading is
        # what tests look at, not this.
        warnings.simplefilter("ignore", FutureWarning)
        model_class = get_class_from_dynamic_module("birefnet.BiRefNet", str(dest), local_files_only=True)
        config_class = get_class_from_dynamic_module(
            "BiRefNet_config.BiRefNetConfig", str(dest), local_files_only=True
        )
    model = model_class(bb_pretrained=False, config=config_class())
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _insert_before(code: Path, marker: str, insert: str) -> None:
    text = code.read_text()
    if text.count(marker) != 1:
        raise ValueError(f"{code}: expected {marker.strip()!r} once, found it {text.count(marker)} times")
    code.write_text(text.replace(marker, insert + marker, 1))


def edit_weights(model_dir: Path, edit) -> None:
    """Rewrite ``model_dir``'s model.safetensors with ``edit(state)`` applied to its tensors."""
    from safetensors.torch import load_file, save_file

    weights = Path(model_dir) / "model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights, metadata={"format": "pt"})
