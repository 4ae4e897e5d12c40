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

from bench_settings import NUM_CLASSES, PAPER_UNET, backend_label, bench_size, segmentation_inputs, train_step
from e3fast.models import EquivariantUNet, PlainUNet
from e3fast.testing import e3nn_reference
from e3fast.testing.memory import module_state_tensors

SIZE = bench_size()
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


@pytest.mark.parametrize("name", MODELS)
def test_train_step(measure, name):
    build, impl, label, memory_format, baseline = MODELS[name]
    model = build().train()
    x, labels = segmentation_inputs(memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    measure(train_step(model, optimizer, x, labels), group=f"unet train step 1x1x{SIZE}^3", impl=impl, label=label,
            backend=backend_label(impl), memory_format=memory_format, baseline=baseline, slow=True,
            resident=lambda: [*module_state_tensors(model, optimizer), x, labels])


@pytest.mark.parametrize("name", MODELS)
def test_inference(measure, name):
    build, impl, label, memory_format, baseline = MODELS[name]
    model = build().eval()
    x, _ = segmentation_inputs(memory_format)

    def infer():
        with torch.inference_mode():
            model(x)

    measure(infer, group=f"unet inference 1x1x{SIZE}^3", impl=impl, label=label, backend=backend_label(impl),
            memory_format=memory_format, baseline=baseline, slow=True,
            resident=lambda: [*module_state_tensors(model), x])
