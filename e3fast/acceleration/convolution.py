"""e3fast's steerable convolution in place of an e3nn voxel convolution, on that module's own data."""
from __future__ import annotations

import torch

from e3fast.acceleration.recognition import ConvolutionRecipe
from e3fast.e3nn_checkpoint import KeepsE3nnStateDict
from e3fast.nn import VoxelConvolution
from e3fast.nn.assembled_kernel import AssembledKernelModule
from e3fast.steerable_basis import SteerableKernelBasis


class AcceleratedConvolution(KeepsE3nnStateDict, VoxelConvolution):
    """A :class:`~e3fast.nn.VoxelConvolution` made from an e3nn voxel convolution (e3nn's v2103 / v2104,
    e3nn_Unet's ``Convolution`` / ``ConvolutionVoxel``).

    Its kernel basis is built from the original's own spherical harmonics (``sh``) and radial
    embedding (``emb``) buffers with the original's normalization (:class:`ConvolutionRecipe`), so
    every variant gives the original's kernel. It holds the original's ``weight`` and
    ``sc.weight`` parameters themselves and takes the same ``[batch, irreps_in.dim, x, y, z]`` input.
    """

    def __init__(self, original: torch.nn.Module, recipe: ConvolutionRecipe):
        AssembledKernelModule.__init__(self)
        weight = original.weight
        basis = SteerableKernelBasis(original.irreps_in, original.irreps_out, original.irreps_sh,
                                     radial_embedding=original.emb.detach().cpu(), conv_scale=recipe.conv_scale,
                                     harmonics=original.sh.detach().cpu(), dtype=weight.dtype)
        self._setup(basis, original.irreps_sh, recipe.padding)
        self.to(weight.device)
        self.weight = weight
        self.sc.weight = original.sc.weight
        self.units = recipe.units
        self.kwargs = dict(original.kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The e3nn constants are this module's own (not VoxelConvolution's, derived from a diameter).
        self._drop_e3nn_constants(state_dict, prefix)
        AssembledKernelModule._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} -> {self.irreps_out}, sh={self.irreps_sh}, kernel_size={self.kernel_size}, "
                f"num_radial_basis={self.num_radial_basis}, {self.units}")
