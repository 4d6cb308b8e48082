"""Configuration of TinySeg, a one-layer stand-in for BiRefNet in tests."""

from transformers import PretrainedConfig


class TinySegConfig(PretrainedConfig):
    # Written in the pre-dataclass style (an ``__init__`` that forwards
    # ``**kwargs``), which is how BiRefNet's own configuration is written, so the
    # tests go through the same compatibility path in transformers.
    model_type = "tinyseg"

    def __init__(
        self,
        num_channels: int = 3,
        delay_ms_per_call: float = 0.0,
        delay_ms_per_image: float = 0.0,
        sample_stride: int = 1,
        **kwargs,
    ):
        self.num_channels = num_channels
        # Simulated accelerator time: the forward call waits without using the CPU, so tests
        # and benchmarks can have a model that is busy for a known time.
        self.delay_ms_per_call = delay_ms_per_call
        self.delay_ms_per_image = delay_ms_per_image
        # Above 1, the head looks at every n-th pixel only and returns that coarser map: the
        # forward then costs the CPU next to nothing, as a model on a real accelerator does.
        self.sample_stride = sample_stride
        super().__init__(**kwargs)
