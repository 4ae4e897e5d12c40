"""Host-side digests of the ops' small integer tables, computed once per table tensor.

Kernels need facts about the tables as compile-time constants (the largest field dimension, the
fan-out of the gate table, ...) and derived device tables (inverse gate tables, per-row path
lists). Reading a CUDA table on the host waits for the GPU, so a digest is built once per set of
table tensors and extra key, and reused while those tensors live and are not modified (their
version counters; inference tensors have none and count as unchanged). Tables made anew for
every call (tests, opcheck, a traced ``torch.tensor``) are simply read every time.
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

Digest = TypeVar("Digest")

_CACHE: dict[tuple, tuple[tuple[weakref.ref, ...], tuple, object]] = {}


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def digest(tables: tuple[torch.Tensor, ...], key: tuple, build: Callable[..., Digest]) -> Digest:
    """``build(*host_copies)`` of ``tables``, cached per (table tensors, ``key``)."""
    cache_key = (tuple(id(t) for t in tables), key)
    versions = tuple(_version(t) for t in tables)
    entry = _CACHE.get(cache_key)
    if entry is not None:
        refs, seen_versions, value = entry
        if seen_versions == versions and all(r() is t for r, t in zip(refs, tables)):
            return value
    value = build(*(t.detach().cpu() for t in tables))

    def forget(_, cache_key=cache_key):
        _CACHE.pop(cache_key, None)

    _CACHE[cache_key] = (tuple(weakref.ref(t, forget) for t in tables), versions, value)
    return value
