"""Autotuning that runs timing trials on a GPU only.

Under the interpreter (``TRITON_INTERPRET=1``) timing is meaningless and each trial costs
seconds, so every kernel gets one fixed configuration there, with blocks large enough that few
programs run (the interpreter's cost is per program and per operation, not per element).
``E3FAST_TRITON_AUTOTUNE=0`` keeps the first GPU configuration of each kernel (no trials: fewer
compilations, e.g. for test runs).
"""
from __future__ import annotations

import os

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("E3FAST_TRITON_AUTOTUNE", "1") != "0"


def autotune(gpu_configs: list[triton.Config], interpreter_config: triton.Config, key: list[str]):
    """``triton.autotune`` over ``gpu_configs`` (the first alone without autotuning), or over
    ``interpreter_config`` alone when interpreted."""
    if INTERPRETED:
        configs = [interpreter_config]
    else:
        configs = gpu_configs if AUTOTUNE else gpu_configs[:1]
    return triton.autotune(configs=configs, key=key)


def largest(configs: list[triton.Config], name: str) -> int:
    """The largest value of meta-parameter ``name`` among the configurations in use."""
    return max(config.kwargs[name] for config in configs)
