"""rmbgd's stand-in model: one 1x1 convolution, called like BiRefNet.

Takes ImageNet-normalised RGB (B, 3, S, S) and returns a list of logit maps (B, 1, S, S),
coarse to fine, the last being the prediction (the first is its inverse, so code that used
the wrong one would be caught by the doctor's check of the result).
"""

from torch import nn
from transformers import PreTrainedModel

from .configuration_standin import StandInConfig


class StandInModel(PreTrainedModel):
    config_class = StandInConfig
    base_model_prefix = "standin"
    main_input_name = "pixel_values"

    def __init__(self, config: StandInConfig):
        super().__init__(config)
        self.head = nn.Conv2d(config.num_channels, 1, kernel_size=1)
        self.post_init()

    def _init_weights(self, module):
        # Zero, so weights that failed to load give alpha 128 everywhere, which is noticed.
        if isinstance(module, nn.Conv2d):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values):
        fine = self.head(pixel_values)
        return [-fine, fine]
