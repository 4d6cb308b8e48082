"""TinySeg: a 1x1 convolution whose stored weights define the predicted mask.

It mimics BiRefNet's interface: it takes ImageNet-normalised RGB of shape
(B, 3, S, S) and returns a list of logit maps of shape (B, 1, S, S), the last
one being the prediction to use.
"""

import os
import time

from torch import nn

from transformers import PreTrainedModel

from .configuration_tinyseg import TinySegConfig


class TinySegModel(PreTrainedModel):
    config_class = TinySegConfig
    base_model_prefix = "tinyseg"
    main_input_name = "pixel_values"

    def __init__(self, config: TinySegConfig):
        super().__init__(config)
        gate = getattr(config, "load_gate", None)
        if gate:
            # A slow download or load, for as long as a test wants (tinymodel.build_tiny_model).
            deadline = time.monotonic() + 600
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.5)
        self.head = nn.Conv2d(config.num_channels, 1, kernel_size=1)
        self.post_init()

    def _init_weights(self, module):
        # Zero on purpose: a checkpoint whose weights did not load then predicts
        # logit 0 (alpha 128) everywhere, which the tests notice.
        if isinstance(module, nn.Conv2d):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values):
        delay = self.config.delay_ms_per_call + self.config.delay_ms_per_image * pixel_values.shape[0]
        if delay > 0:
            time.sleep(delay / 1000.0)
        stride = getattr(self.config, "sample_stride", 1)
        # A coarser map is still a valid prediction: rmbgd scales every map to the photo's size.
        fine = self.head(pixel_values[:, :, ::stride, ::stride] if stride > 1 else pixel_values)
        # BiRefNet returns coarse-to-fine maps; the coarse one here is the
        # inverse mask so that code using output[0] instead of output[-1] fails.
        return [-fine, fine]
