"""Making an existing e3nn voxel model fast: :func:`accelerate` swaps its e3nn modules for e3fast's.

* :mod:`~e3fast.acceleration.recognition` -- which modules are e3nn voxel modules, and their settings
* :mod:`~e3fast.acceleration.convolution`, :mod:`~e3fast.acceleration.e3nn_layout`,
  :mod:`~e3fast.acceleration.pooling` -- the replacements
* :mod:`~e3fast.acceleration.fusion` -- norm -> gate chains found in a parent's forward
* :mod:`~e3fast.acceleration.verification` -- replacements checked on the modules' own outputs
* :mod:`~e3fast.acceleration.swap` -- the walk over the model; :mod:`~e3fast.acceleration.report`
"""
from e3fast.acceleration.report import AccelerationReport
from e3fast.acceleration.swap import accelerate

__all__ = ["accelerate", "AccelerationReport"]
