"""A stand-in for ``hypothesis`` where it is not installed: property-based tests skip, the rest run.

The GPU machines have pytest but not hypothesis. Without this, every test module that imports
hypothesis would fail to import and none of its plain tests (the CUDA and Triton ones included)
would run. ``tests/conftest.py`` installs this module as ``hypothesis`` only when the real one
cannot be imported; then each ``@given`` test is reported as skipped, with :data:`SKIP_REASON`.

Covered: ``given``, ``settings`` (as a decorator and its profiles), ``assume``, ``example``,
``seed``, ``note``, ``HealthCheck`` and everything under ``hypothesis.strategies`` (strategies are
built at import time but never drawn from). Anything else a test module imports from hypothesis
stands for an inert value.
"""
from __future__ import annotations

import functools
import inspect
import sys
import types

import pytest

SKIP_REASON = "hypothesis is not installed: property-based test not run"


class _Inert:
    """Any attribute and any call give the same inert object (strategies that are never drawn)."""

    def __getattr__(self, name: str) -> "_Inert":
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs) -> "_Inert":
        return self

    def __or__(self, other) -> "_Inert":
        return self

    __ror__ = __or__

    def __repr__(self) -> str:
        return "<hypothesis is not installed>"


INERT = _Inert()


def given(*strategies_by_position, **strategies_by_name):
    """Replace the test with one that skips, without the arguments hypothesis would have drawn."""

    def decorate(test):
        signature = inspect.signature(test)
        parameters = list(signature.parameters.values())
        if strategies_by_name:
            parameters = [p for p in parameters if p.name not in strategies_by_name]
        elif strategies_by_position:  # hypothesis fills positional strategies from the right
            parameters = parameters[:len(parameters) - len(strategies_by_position)]

        @functools.wraps(test)
        def skipped(*args, **kwargs):
            pytest.skip(SKIP_REASON)

        del skipped.__wrapped__  # pytest must see the reduced signature, not the original one
        skipped.__signature__ = signature.replace(parameters=parameters)
        return skipped

    return decorate


class settings:  # noqa: N801  (hypothesis's name)
    """``@settings(...)`` leaves the test as it is; profiles are accepted and ignored."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, test):
        return test

    @staticmethod
    def register_profile(*args, **kwargs) -> None:
        pass

    @staticmethod
    def load_profile(*args, **kwargs) -> None:
        pass


def assume(condition) -> bool:
    return True


def _identity_decorator(*args, **kwargs):
    return lambda test: test


def composite(function):
    """``@st.composite``: calling the decorated function gives an inert strategy."""
    return lambda *args, **kwargs: INERT


def _inert_attribute(name: str) -> _Inert:
    if name.startswith("__"):  # e.g. __file__, looked up by inspect on every module
        raise AttributeError(name)
    return INERT


def _module(name: str, attributes: dict) -> types.ModuleType:
    module = types.ModuleType(name, __doc__)
    module.__dict__.update(attributes)
    module.__getattr__ = _inert_attribute  # PEP 562: names not listed are inert
    return module


def install() -> None:
    """Register the stand-in as ``hypothesis`` and ``hypothesis.strategies`` in ``sys.modules``."""
    strategies = _module("hypothesis.strategies", {"composite": composite})
    hypothesis = _module("hypothesis", {
        "given": given, "settings": settings, "assume": assume, "example": _identity_decorator,
        "seed": _identity_decorator, "note": lambda *args, **kwargs: None, "HealthCheck": INERT,
        "strategies": strategies, "IS_FALLBACK": True,
    })
    sys.modules["hypothesis"] = hypothesis
    sys.modules["hypothesis.strategies"] = strategies
