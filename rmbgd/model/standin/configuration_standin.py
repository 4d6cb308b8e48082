"""Configuration of rmbgd's stand-in model (see rmbgd/standin/__init__.py)."""

from transformers import PretrainedConfig


class StandInConfig(PretrainedConfig):
    model_type = "rmbgd_standin"

    def __init__(self, num_channels: int = 3, **kwargs):
        self.num_channels = num_channels
        super().__init__(**kwargs)
