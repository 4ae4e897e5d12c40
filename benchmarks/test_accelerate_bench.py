"""``e3fast.accelerate`` and ``e3fast.freeze`` on an e3nn_Unet-structured U-Net, 1x1xS^3 on CPU.

The model is the paper's configuration composed from e3nn modules
(:mod:`e3fast.testing.e3nn_reference`, e3nn_Unet's structure). Rows of each group, measured side
by side in one process:

* ``e3nn``: that model as it is (the baseline);
* ``accelerated``: the same model (same weights) after ``e3fast.accelerate``, fed a contiguous
  input, and again fed a channels_last_3d input (the model's own code is unchanged, so the memory
  format is the input's);
* inference only: ``accelerated + frozen``, after ``e3fast.freeze`` (kernels assembled once).

A training step is forward, cross-entropy against a fixed random label map, backward and an
Adam step, as in ``test_unet_step.py``.

Run alone (the whole-network e3nn step takes seconds, so few rounds)::

    python -m pytest benchmarks/test_accelerate_bench.py -p no:cacheprovider --benchmark-min-rounds=3 \\
        --benchmark-disable-gc --benchmark-json=benchmarks/results/<stem>-accelerate.json
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import e3fast
from bench_settings import PAPER_UNET, backend_label, bench_size, segmentation_inputs, train_step
from e3fast.testing import e3nn_reference
from e3fast.testing.memory import module_state_tensors

SIZE = bench_size()


# Built once each (building and accelerating the e3nn modules takes a while); the rows share them.
# The training rows change the weights, which does not change the work.


@functools.lru_cache(maxsize=1)
def _e3nn():
    torch.manual_seed(0)
    return e3nn_reference.UNet(**PAPER_UNET)


@functools.lru_cache(maxsize=1)
def _accelerated():
    """The same network (a copy of the same weights) after ``e3fast.accelerate``."""
    model, _ = e3fast.accelerate(_e3nn(), inplace=False)
    return model


@functools.lru_cache(maxsize=1)
def _frozen():
    return e3fast.freeze(copy.deepcopy(_accelerated()))


# name: (builder, impl, label, input memory format, baseline role)
TRAINING = {
    "e3nn": (_e3nn, "e3nn", "e3nn_Unet-structured UNet (e3nn modules)", "contiguous", "e3nn"),
    "accelerated": (_accelerated, "e3fast", "same model after e3fast.accelerate", "contiguous", None),
    "accelerated-channels-last": (_accelerated, "e3fast", "same model after e3fast.accelerate",
                                  "channels_last_3d", None),
}
INFERENCE = {
    **TRAINING,
    "frozen": (_frozen, "e3fast", "same model after e3fast.accelerate + e3fast.freeze", "contiguous", None),
    "frozen-channels-last": (_frozen, "e3fast", "same model after e3fast.accelerate + e3fast.freeze",
                             "channels_last_3d", None),
}


@pytest.mark.parametrize("name", TRAINING)
def test_accelerated_train_step(measure, name):
    build, impl, label, memory_format, baseline = TRAINING[name]
    model = build().train()
    x, labels = segmentation_inputs(memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    measure(train_step(model, optimizer, x, labels), group=f"accelerate: e3nn_Unet train step 1x1x{SIZE}^3",
            impl=impl, label=label,
            backend=backend_label(impl), memory_format=memory_format, baseline=baseline, slow=True,
            resident=lambda: [*module_state_tensors(model, optimizer), x, labels])


@pytest.mark.parametrize("name", INFERENCE)
def test_accelerated_inference(measure, name):
    build, impl, label, memory_format, baseline = INFERENCE[name]
    model = build().eval()
    x, _ = segmentation_inputs(memory_format)

    def infer():
        with torch.inference_mode():
            model(x)

    measure(infer, group=f"accelerate: e3nn_Unet inference 1x1x{SIZE}^3", impl=impl, label=label,
            backend=backend_label(impl), memory_format=memory_format, baseline=baseline, slow=True,
            resident=lambda: [*module_state_tensors(model), x])
