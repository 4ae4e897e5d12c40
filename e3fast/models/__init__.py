"""Networks built from e3fast's modules."""
from e3fast.models.equivariant_unet import EquivariantUNet

__all__ = ["EquivariantUNet"]
