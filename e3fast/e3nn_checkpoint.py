"""Reading e3nn modules' state_dict entries into e3fast modules.

e3nn voxel modules save constant buffers next to their parameters: the convolution's
``lattice``, ``emb`` and ``sh``, the tensor product's compiled tables (``tp.*``: ``_w3j_*``,
an empty ``weight``, ``output_mask``) and ``o3.Linear``'s empty ``bias`` and ``output_mask``.
e3fast derives all of them from the constructor arguments, so on load each is checked against
e3fast's own value (a mismatch means the checkpoint was made with another configuration) and
then dropped. e3fast's own ``state_dict`` holds parameters and running statistics only -- except
for the modules :func:`e3fast.accelerate` puts in place of e3nn modules
(:class:`KeepsE3nnStateDict`), whose state_dict keeps the e3nn module's keys.
"""
from __future__ import annotations

import torch

from e3fast.radial_basis import smooth_finite_embedding
from e3fast.steerable_basis import physical_lattice


def _check_close(state_dict, key: str, expected: torch.Tensor, what: str) -> None:
    saved = state_dict.pop(key)
    if tuple(saved.shape) != tuple(expected.shape) or not torch.allclose(
            saved.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64), rtol=1e-4,
            atol=1e-5):
        raise ValueError(f"checkpoint entry {key!r} does not match this module's {what}: "
                         f"the checkpoint was saved with another configuration")


def absorb_convolution_buffers(conv, state_dict, prefix: str) -> None:
    """Check and drop an e3nn voxel convolution's constant buffers (``lattice``, ``emb``, ``sh``, ``tp.*``)."""
    from e3nn import o3

    if prefix + "lattice" in state_dict:
        lattice = physical_lattice(conv.diameter, conv.steps)
        _check_close(state_dict, prefix + "lattice", lattice, "lattice (diameter, steps)")
        if prefix + "emb" in state_dict:
            emb = smooth_finite_embedding(lattice.norm(dim=-1), 0.0, conv.diameter / 2, conv.num_radial_basis,
                                          conv.cutoff)
            _check_close(state_dict, prefix + "emb", emb, "radial embedding (num_radial_basis, cutoff)")
        if prefix + "sh" in state_dict:
            sh = o3.spherical_harmonics(conv.irreps_sh, lattice, normalize=True, normalization="component")
            _check_close(state_dict, prefix + "sh", sh, "spherical harmonics (irreps_sh)")
    for key in [k for k in state_dict if k.startswith(prefix + "tp.")]:
        del state_dict[key]


def absorb_linear_buffers(linear, state_dict, prefix: str) -> None:
    """Check and drop ``o3.Linear``'s empty ``bias`` buffer and its ``output_mask``."""
    bias = state_dict.get(prefix + "bias")
    if bias is not None:
        if bias.numel() != 0:
            raise ValueError(f"checkpoint entry {prefix + 'bias'!r} holds o3.Linear biases, which e3fast's "
                             "Linear does not have")
        del state_dict[prefix + "bias"]
    if prefix + "output_mask" in state_dict:
        _check_close(state_dict, prefix + "output_mask", linear.output_mask(), "output mask (irreps)")


class KeepsE3nnStateDict:
    """Mixin for a module that replaced an e3nn module: its ``state_dict`` keeps the e3nn one's keys.

    The replacement holds the e3nn module's parameters (and running statistics) itself; the other
    entries of the e3nn module's ``state_dict`` are constants (lattice, spherical harmonics,
    tensor-product tables, empty biases) that it no longer needs. :meth:`keep_e3nn_constants`
    records them; they are written back on ``state_dict()`` -- so a checkpoint of the accelerated
    model loads into the original e3nn model -- and checked and dropped on ``load_state_dict`` --
    so e3nn checkpoints load into the accelerated model.
    """

    _e3nn_constants: dict[str, torch.Tensor] = {}

    def keep_e3nn_constants(self, original: torch.nn.Module) -> None:
        """Record the entries of ``original.state_dict()`` that this module's own state_dict lacks."""
        self._e3nn_constants = {}
        own = set(self.state_dict())
        self._e3nn_constants = {key: value.detach() for key, value in original.state_dict().items()
                                if key not in own}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self._e3nn_constants.items():
            destination[prefix + key] = value

    def _drop_e3nn_constants(self, state_dict, prefix: str) -> None:
        """Check the e3nn constants present in ``state_dict`` against the recorded ones and drop them."""
        for key, value in self._e3nn_constants.items():
            if prefix + key in state_dict:
                _check_close(state_dict, prefix + key, value, f"e3nn constant {key!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._drop_e3nn_constants(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._e3nn_constants = {key: fn(value) for key, value in self._e3nn_constants.items()}
        return super()._apply(fn, *args, **kwargs)
