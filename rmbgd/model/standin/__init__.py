"""A tiny segmentation model that `rmbgd doctor` writes to a temporary folder and loads the
way users' models are loaded (config.json with auto_map, its own code, model.safetensors,
``from_pretrained(..., trust_remote_code=True)``), so the doctor's pipeline run goes through
the real loading code without needing the user's model or a download.

Its mask depends on the red channel only: red 255 is opaque, red 0 transparent. Importing
this package imports nothing heavy; ``build`` imports torch and transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["CODE_FILES", "build", "expected_alpha"]

CODE_FILES = ("configuration_standin.py", "modeling_standin.py")
AUTO_MAP = {
    "AutoConfig": "configuration_standin.StandInConfig",
    "AutoModelForImageSegmentation": "modeling_standin.StandInModel",
}

# logit = GAIN * red + OFFSET with red in [0, 1]: red 0 -> alpha 0, red 255 -> alpha 255.
GAIN = 24.0
OFFSET = -12.0
# The ImageNet normalisation rmbgd applies before the model; the weights undo it for red.
_MEAN_RED = 0.485
_STD_RED = 0.229


def expected_alpha(red: int) -> int:
    """The alpha the stand-in predicts for a flat region with this red value (0-255)."""
    import math

    return int(round(255.0 / (1.0 + math.exp(-(GAIN * red / 255.0 + OFFSET)))))


def build(dest: Path) -> Path:
    """Write the stand-in model (config, weights, code; a few kB) into ``dest``; return it."""
    import torch
    from transformers.utils import logging as hf_logging

    from rmbgd.model.standin.configuration_standin import StandInConfig
    from rmbgd.model.standin.modeling_standin import StandInModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = StandInModel(StandInConfig(auto_map=dict(AUTO_MAP)))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0, 0, 0] = GAIN * _STD_RED
        model.head.bias.fill_(GAIN * _MEAN_RED + OFFSET)
    hf_logging.disable_progress_bar()  # save_pretrained would draw one on stderr
    model.save_pretrained(dest, safe_serialization=True)
    here = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, dest / name)
    return dest
