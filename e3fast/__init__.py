"""e3fast: fused kernels for SO(3)/O(3)-steerable 3D voxel convolutions and the equivariant U-Net.

Voxel tensors are ``[batch, irreps.dim, x, y, z]`` with channels in e3nn's irreps order (see
:mod:`e3fast.irreps_layout`); channels-first and channels-last-3d memory formats are both accepted.
``accelerate(model)`` swaps an existing e3nn voxel model's modules for e3fast's; ``freeze(model)``
prepares a model for inference (``unfreeze`` goes back).
"""
from e3fast.backends import available_backends, set_backend, use_backend
from e3fast import ops, nn, models  # noqa: E402  (ops registers the native autograd)
from e3fast.acceleration import AccelerationReport, accelerate  # noqa: E402
from e3fast.freezing import freeze, is_frozen, unfreeze  # noqa: E402

__version__ = "0.1.0"

__all__ = ["available_backends", "set_backend", "use_backend", "ops", "nn", "models", "accelerate",
           "AccelerationReport", "freeze", "unfreeze", "is_frozen", "__version__"]
