"""Networks built from e3fast's modules, and the plain baseline they are measured against."""
from e3fast.models.equivariant_unet import EquivariantUNet
from e3fast.models.factory import build_model, equivariant_model_config, plain_model_config
from e3fast.models.plain_unet import PlainUNet

__all__ = ["EquivariantUNet", "PlainUNet", "build_model", "equivariant_model_config", "plain_model_config"]
