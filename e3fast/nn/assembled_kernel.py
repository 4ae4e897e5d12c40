"""Modules that assemble a dense conv3d kernel from their weights, and freezing that kernel."""
from __future__ import annotations

import torch


class AssembledKernelModule(torch.nn.Module):
    """Base of the modules whose forward applies a kernel assembled from their weights at every call.

    For inference the kernel can be *frozen* (:func:`e3fast.freeze`): assembled once into the
    non-persistent buffer ``frozen_kernel``, which :meth:`kernel` then returns, so the forward is a
    plain ``conv3d`` with a constant weight. A frozen module refuses to run in training mode, where
    its weights would silently get no gradients; loading a state_dict into it assembles the frozen
    kernel again from the loaded weights.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("frozen_kernel", None, persistent=False)
        self.register_load_state_dict_post_hook(_refreeze_after_load)

    def assembled_kernel(self) -> torch.Tensor:
        """The kernel computed from the current weights (differentiable)."""
        raise NotImplementedError

    def kernel(self) -> torch.Tensor:
        """The frozen kernel if there is one, else :meth:`assembled_kernel`."""
        if self.frozen_kernel is None:
            return self.assembled_kernel()
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is frozen for inference and cannot train: "
                               "call e3fast.unfreeze(model) first")
        return self.frozen_kernel

    @property
    def is_frozen(self) -> bool:
        return self.frozen_kernel is not None

    def freeze_kernel(self) -> None:
        with torch.no_grad():
            self.frozen_kernel = self.assembled_kernel().detach()

    def unfreeze_kernel(self) -> None:
        self.frozen_kernel = None


def _refreeze_after_load(module: AssembledKernelModule, incompatible_keys) -> None:
    if module.is_frozen:
        module.freeze_kernel()
