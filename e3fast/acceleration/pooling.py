"""e3fast's norm max pooling in place of e3nn_Unet's ``DynamicPool3d(mode='maxpool3d')``."""
from __future__ import annotations

import torch

from e3fast.nn import NormMaxPool3d


class AcceleratedNormMaxPool3d(NormMaxPool3d):
    """Norm max pooling with window and stride ``kernel_size``, pooling each sample on its own
    (e3nn_Unet's ``max_pool3d`` gathers every sample's vectors from sample 0).

    Keeps the original's ``mode``, ``kernel_size``, ``irreps`` and, where it had them, ``scale`` and
    ``steps``, which models read (e3nn_Unet's U-Net pads its input by the pools' ``kernel_size``).
    """

    def __init__(self, original: torch.nn.Module):
        super().__init__(original.irreps, original.kernel_size)
        self.mode = original.mode
        self.scale = getattr(original, "scale", None)
        self.steps = getattr(original, "steps", None)
