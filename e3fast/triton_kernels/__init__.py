"""Triton kernels of the fused ops: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

One module per op (:mod:`.kernel_assembly`, :mod:`.norm_gate`, :mod:`.norm_max_pool`), each with
its ``@triton.jit`` kernels and host launchers taking exactly the arguments of the native op.
The ``torch.library`` custom ops ``e3fast::<op>_triton`` that call these launchers are defined
next to each op's reference in :mod:`e3fast.ops`; they import the kernel module (and triton) on
first call, so importing this package, or e3fast, needs no triton. Set ``TRITON_INTERPRET=1``
before the first call for the interpreter: triton reads it when a kernel is defined.
"""
from __future__ import annotations

import importlib
from types import ModuleType

OP_MODULES = ("kernel_assembly", "norm_gate", "norm_max_pool")


def load(op_module: str) -> ModuleType:
    """The kernel module ``e3fast.triton_kernels.<op_module>`` (imported on first use)."""
    if op_module not in OP_MODULES:
        raise ValueError(f"no Triton kernel module {op_module!r}; expected one of {OP_MODULES}")
    return importlib.import_module(f"{__name__}.{op_module}")
