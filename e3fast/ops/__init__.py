"""The fused ops: each a pure-PyTorch reference plus native kernels behind ``torch.library``.

* :func:`assemble_kernel` -- steerable kernel assembly (radial + self-connection weights -> conv3d kernel)
* :func:`norm_gate` -- equivariant instance/batch normalization fused with the gated nonlinearity
* :func:`norm_max_pool3d` -- norm-based max pooling, per sample
"""
from e3fast.ops.kernel_assembly import assemble_kernel, assemble_kernel_reference
from e3fast.ops.norm_gate import NormGateSpec, norm_gate, norm_gate_reference
from e3fast.ops.norm_max_pool import norm_max_pool3d, norm_max_pool3d_reference

__all__ = [
    "assemble_kernel",
    "assemble_kernel_reference",
    "NormGateSpec",
    "norm_gate",
    "norm_gate_reference",
    "norm_max_pool3d",
    "norm_max_pool3d_reference",
]
