"""Networks built from e3fast's modules, and the plain baseline they are measured against."""
from e3fast.models.equivariant_unet import EquivariantUNet
from e3fast.models.plain_unet import PlainUNet

__all__ = ["EquivariantUNet", "PlainUNet"]
