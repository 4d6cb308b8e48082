"""TinySeg written the way older BiRefNet / RMBG-2.0 remote code is written.

Each class reproduces one habit that breaks ``from_pretrained`` on transformers 5
(and ``BiRefNetStyle`` all of them at once, as the real code does). They share
TinySegModel's parameter names, so the checkpoint written by
``tests.support.tinymodel.build_tiny_model`` loads into any of them, and the
same ``[-fine, fine]`` output, so the predicted mask is the same known function.
"""

import torch
from torch import nn

from transformers import PreTrainedModel

from .configuration_tinyseg import TinySegConfig


class PlainConfig:
    """Stand-in for BiRefNet's ``Config``: a plain object, not a PretrainedConfig."""

    def __init__(self) -> None:
        self.num_channels = 3
        self.drop_path_rate = 0.1
        self.depths = (2, 2)


class _LegacyBase(PreTrainedModel):
    config_class = TinySegConfig
    base_model_prefix = "tinyseg"
    main_input_name = "pixel_values"

    def _build(self, num_channels):
        self.head = nn.Conv2d(num_channels, 1, kernel_size=1)
        # Zero like TinySegModel: weights that did not load predict alpha 128.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values):
        fine = self.head(pixel_values)
        return [-fine, fine]


class ReplacesConfig(_LegacyBase):
    """Habit 1: ``self.config`` becomes a plain object (BiRefNet: ``self.config = Config()``)."""

    def __init__(self, config):
        super().__init__(config)
        self.post_init()
        self.config = PlainConfig()
        self._build(self.config.num_channels)


class ItemInInit(_LegacyBase):
    """Habit 2: ``.item()`` on a fresh tensor in ``__init__`` (a drop-path schedule)."""

    def __init__(self, config):
        super().__init__(config)
        depth = 4
        # transformers 5 builds models on the meta device, where .item() has no data.
        self.drop_path = [x.item() for x in torch.arange(depth) * (0.1 / depth)]
        self._build(config.num_channels)
        self.post_init()


class NoPostInit(_LegacyBase):
    """Habit 3: ``post_init()`` is never called."""

    def __init__(self, config):
        super().__init__(config)
        self._build(config.num_channels)


class BiRefNetStyle(_LegacyBase):
    """All three habits, with BiRefNet's signature (``config`` is not the first argument)."""

    def __init__(self, bb_pretrained=True, config=TinySegConfig()):
        super().__init__(config)
        self.bb_pretrained = bb_pretrained
        self.config = PlainConfig()
        depth = sum(self.config.depths)
        self.drop_path = [x.item() for x in torch.arange(depth) * (self.config.drop_path_rate / depth)]
        self._build(self.config.num_channels)
