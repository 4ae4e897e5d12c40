"""Equivariant voxel modules with e3nn-style constructors.

Every module takes and returns ``[batch, irreps.dim, x, y, z]`` tensors.
"""
from e3fast.nn.convolution import VoxelConvolution
from e3fast.nn.dropout import Dropout
from e3fast.nn.linear import Linear
from e3fast.nn.norm_gate import BatchNorm, Gate, NormGate
from e3fast.nn.pooling import NormMaxPool3d

__all__ = ["VoxelConvolution", "Dropout", "Linear", "BatchNorm", "Gate", "NormGate", "NormMaxPool3d"]
