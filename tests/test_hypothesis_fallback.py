"""The stand-in for hypothesis used where it is not installed (tests/hypothesis_fallback.py)."""
import inspect

import pytest

import hypothesis_fallback as fallback


def test_given_by_name_drops_the_drawn_arguments_and_skips():
    @fallback.given(size=fallback.INERT, dtype=fallback.INERT)
    def test_example(backend, size, dtype):
        raise AssertionError("the body must not run")

    assert list(inspect.signature(test_example).parameters) == ["backend"]
    with pytest.raises(pytest.skip.Exception, match="hypothesis is not installed"):
        test_example("cpu")


def test_given_by_position_fills_from_the_right():
    @fallback.given(fallback.INERT)
    def test_example(backend, drawn):
        raise AssertionError("the body must not run")

    assert list(inspect.signature(test_example).parameters) == ["backend"]


def test_marks_set_before_given_are_kept():
    @fallback.given(drawn=fallback.INERT)
    @pytest.mark.slow
    def test_example(drawn):
        pass

    assert [mark.name for mark in test_example.pytestmark] == ["slow"]


def test_strategies_compose_at_import_time_and_settings_leave_the_test():
    strategies = fallback._module("strategies", {"composite": fallback.composite})
    entry = strategies.tuples(strategies.integers(0, 5), strategies.sampled_from(["0e", "1o"]))
    assert strategies.lists(entry, min_size=1).map(len).filter(bool) is fallback.INERT

    @fallback.composite
    def specs(draw):
        raise AssertionError("never drawn")

    assert specs() is fallback.INERT

    def test_example():
        pass

    assert fallback.settings(max_examples=3, deadline=None)(test_example) is test_example
    assert fallback.assume(False) is True


def test_module_attributes_other_than_dunders_are_inert():
    module = fallback._module("hypothesis", {})
    assert module.HealthCheck.too_slow is fallback.INERT
    with pytest.raises(AttributeError):
        module.__file__
