"""Autotuning that runs timing trials on a GPU only.

Under the interpreter (``TRITON_INTERPRET=1``) timing is meaningless and each trial costs
seconds, so every kernel gets one fixed configuration there, with blocks large enough that few
programs run (the interpreter's cost is per program and per operation, not per element).
"""
from __future__ import annotations

import os

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def autotune(gpu_configs: list[triton.Config], interpreter_config: triton.Config, key: list[str]):
    """``triton.autotune`` over ``gpu_configs``, or over ``interpreter_config`` alone when interpreted."""
    return triton.autotune(configs=[interpreter_config] if INTERPRETED else gpu_configs, key=key)


def largest(configs: list[triton.Config], name: str) -> int:
    """The largest value of meta-parameter ``name`` among the configurations in use."""
    return max(config.kwargs[name] for config in configs)
