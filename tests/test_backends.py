"""Backend listing, selection and override; the pure-Python fallback without the extension."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import e3fast
from e3fast import backends
from conftest import FAST_BACKENDS

PAPER_GATE = ("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")


def test_reference_is_always_available():
    assert "reference" in e3fast.available_backends()
    assert "reference" in e3fast.available_backends("cpu")


def test_cpu_backend_listed_exactly_when_the_extension_is_loaded():
    from e3fast import native_extension
    assert ("cpu" in e3fast.available_backends("cpu")) == native_extension.native_cpu_available()


def test_cuda_backend_is_not_offered_for_cpu_tensors():
    assert "cuda" not in e3fast.available_backends("cpu")


def test_automatic_choice_prefers_the_native_kernels():
    expected = "cpu" if "cpu" in FAST_BACKENDS else "reference"
    assert backends.select_backend(torch.device("cpu"), "norm_gate", ("reference", "cpu")) == expected


def test_use_backend_nests_and_restores():
    assert backends.requested_backend() is None
    with e3fast.use_backend("reference"):
        assert backends.requested_backend() == "reference"
        with e3fast.use_backend(None):
            assert backends.requested_backend() is None
        assert backends.requested_backend() == "reference"
    assert backends.requested_backend() is None


def test_set_backend_is_global_until_reset():
    e3fast.set_backend("reference")
    try:
        assert backends.select_backend(torch.device("cpu"), "norm_gate", ("reference", "cpu")) == "reference"
        with e3fast.use_backend(None):  # the context manager's None means "no override here"
            assert backends.requested_backend() == "reference"
    finally:
        e3fast.set_backend(None)
    assert backends.requested_backend() is None


def test_an_explicit_choice_that_cannot_run_is_an_error_not_a_fallback():
    x = torch.randn(1, 36, 3, 3, 3)
    layer = e3fast.nn.NormGate(*PAPER_GATE)
    with e3fast.use_backend("cuda"):
        with pytest.raises(ValueError, match="'cuda' (cannot run norm_gate on cpu tensors|has no implementation of norm_gate)"):
            layer(x)


def test_every_backend_gives_the_same_result():
    layer = e3fast.nn.NormGate(*PAPER_GATE)
    x = torch.randn(2, 36, 4, 5, 3)
    with e3fast.use_backend("reference"):
        expected = layer(x)
    for name in FAST_BACKENDS:
        with e3fast.use_backend(name):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_without_the_extension_e3fast_runs_on_the_reference_and_says_so_once():
    script = """
import sys, warnings
sys.modules["e3fast._C"] = None  # as if the extension were missing
import torch, e3fast
assert e3fast.available_backends("cpu") == ["reference"], e3fast.available_backends("cpu")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    layer = e3fast.nn.NormGate("2x0e", [torch.relu], "1x0e", [torch.sigmoid], "1x1o")
    for _ in range(3):
        layer(torch.randn(1, 6, 3, 3, 3))
messages = [str(w.message) for w in caught if "e3fast._C" in str(w.message)]
assert len(messages) == 1, messages
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}  # no interpreted Triton either
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
