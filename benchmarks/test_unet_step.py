"""Whole-network benchmarks: one U-Net training step and one inference, 1x1xS^3 on CPU.

Rows of each group, measured side by side in one process:

* ``e3fast``: :class:`e3fast.models.EquivariantUNet`, the paper's configuration, default backend
  (it runs channels_last_3d inside by default);
* ``e3nn``: the same network composed from e3nn modules (:mod:`e3fast.testing.e3nn_reference`);
* ``plain``: :class:`e3fast.models.PlainUNet` of equal width (30 top features, 5^3 kernels),
  contiguous memory format, and the same again in channels_last_3d as an extra row.

A training step is forward, cross-entropy against a fixed random label map, backward and an
Adam step; gradients are released after the step, so each step starts from the same memory.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench_settings import automatic_backend, bench_size
from e3fast.models import EquivariantUNet, PlainUNet
from e3fast.testing import e3nn_reference
from e3fast.testing.memory import module_state_tensors

SIZE = bench_size()
NUM_CLASSES = 4
PAPER_UNET = dict(input_irreps="1x0e", output_irreps=f"{NUM_CLASSES}x0e", diameter=5, num_radial_basis=5,
                  steps=(1, 1, 1), n=2, n_downsample=3)
PLAIN_UNET = dict(in_channels=1, out_channels=NUM_CLASSES, features=30, n_downsample=3, kernel_size=5)


def _e3fast():
    return EquivariantUNet(**PAPER_UNET)


def _e3nn():
    return e3nn_reference.UNet(**PAPER_UNET)


def _plain():
    return PlainUNet(**PLAIN_UNET)


def _plain_channels_last():
    return PlainUNet(**PLAIN_UNET).to(memory_format=torch.channels_last_3d)


# name: (builder, impl, label, memory format of the input and model, baseline role)
MODELS = {
    "e3fast": (_e3fast, "e3fast", "e3fast EquivariantUNet", "contiguous", None),
    "e3nn": (_e3nn, "e3nn", "e3nn reference UNet", "contiguous", "e3nn"),
    "plain": (_plain, "plain", "plain U-Net", "contiguous", "plain"),
    "plain-channels-last": (_plain_channels_last, "plain", "plain U-Net", "channels_last_3d", None),
}

_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def _backend(impl: str) -> str:
    return f"auto: {automatic_backend()}" if impl == "e3fast" else "-"


def _inputs(memory_format: str):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, SIZE, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (1, SIZE, SIZE, SIZE), generator=generator)
    return x.contiguous(memory_format=_MEMORY_FORMATS[memory_format]), labels


@pytest.mark.parametrize("name", MODELS)
def test_train_step(measure, name):
    build, impl, label, memory_format, baseline = MODELS[name]
    model = build().train()
    x, labels = _inputs(memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measure(step, group=f"unet train step 1x1x{SIZE}^3", impl=impl, label=label, backend=_backend(impl),
            memory_format=memory_format, baseline=baseline, slow=True,
            resident=lambda: [*module_state_tensors(model, optimizer), x, labels])


@pytest.mark.parametrize("name", MODELS)
def test_inference(measure, name):
    build, impl, label, memory_format, baseline = MODELS[name]
    model = build().eval()
    x, _ = _inputs(memory_format)

    def infer():
        with torch.inference_mode():
            model(x)

    measure(infer, group=f"unet inference 1x1x{SIZE}^3", impl=impl, label=label, backend=_backend(impl),
            memory_format=memory_format, baseline=baseline, slow=True,
            resident=lambda: [*module_state_tensors(model), x])
