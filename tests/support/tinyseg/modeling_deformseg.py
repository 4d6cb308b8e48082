"""TinySeg with its head run as a deformable convolution, as in BiRefNet's decoder.

The offsets are zero, so the maths (and the mask) are those of TinySegModel; what
changes is the kernel: torchvision's deform_conv2d has no bfloat16 implementation,
which is how BiRefNet fails in bfloat16. A file of its own because transformers
imports every package a model file imports before loading it, and torchvision
takes seconds to import: the plain tiny model stays quick to load.
"""

from torchvision.ops import deform_conv2d

from .modeling_tinyseg import TinySegModel


class DeformSegModel(TinySegModel):
    def forward(self, pixel_values):
        batch, _, height, width = pixel_values.shape
        offset = pixel_values.new_zeros((batch, 2, height, width))
        fine = deform_conv2d(pixel_values, offset, self.head.weight, self.head.bias)
        return [-fine, fine]
