"""The peak-memory measurement used by the benchmarks, checked against tensors of known size."""
import pytest
import torch

from e3fast.testing.memory import peak_memory_bytes, peak_of_running_sum, tensor_bytes

MIB = 1 << 20


def _two_live_then_one():
    a = torch.empty(MIB // 4)  # 1 MiB
    b = torch.empty(2 * MIB // 4)  # 2 MiB, both alive: 3 MiB
    del a, b
    c = torch.empty(MIB // 4)  # 1 MiB after the others are gone
    return c.shape


def test_cpu_peak_counts_simultaneously_live_tensors():
    peak = peak_memory_bytes(_two_live_then_one, "cpu")
    assert 3 * MIB <= peak < 3 * MIB + 4096


def test_cpu_peak_ignores_memory_held_before_the_call():
    held = torch.empty(8 * MIB // 4)
    peak = peak_memory_bytes(lambda: held + 1, "cpu")  # one 8 MiB temporary
    assert 8 * MIB <= peak < 8 * MIB + 4096


def test_cpu_peak_of_a_backward_pass_sees_the_gradient():
    weight = torch.randn(256, 1024, requires_grad=True)  # 1 MiB

    def step():
        product = weight * 2  # 1 MiB, alive during backward
        product.sum().backward()  # weight.grad: 1 MiB more

    peak = peak_memory_bytes(step, "cpu")
    assert 2 * MIB <= peak < 2 * MIB + 4096
    assert weight.grad is not None


def test_running_sum_is_taken_in_time_order():
    assert peak_of_running_sum([(3, -5), (1, 10), (2, 4)]) == 14
    assert peak_of_running_sum([]) == 0


def test_views_of_one_storage_count_once():
    x = torch.empty(1000)
    assert tensor_bytes([x, x[:10], x.view(10, 100)]) == 4000


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="cpu or cuda"):
        peak_memory_bytes(lambda: None, "meta")
