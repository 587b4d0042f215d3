"""`bf16: auto` resolves to a measured choice; explicit settings pass through; anything else is refused."""

import pytest
import torch

from loramix import precision
from loramix.precision import use_bf16


def test_explicit_settings_pass_through():
    assert use_bf16(True, "cpu") is True and use_bf16(False, "cpu") is False


def test_auto_follows_the_measured_matmul_speed(monkeypatch):
    seconds = {torch.float32: 1.0, torch.bfloat16: 2.0}
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype, device: seconds[dtype])
    precision.bf16_is_faster.cache_clear()
    assert use_bf16("auto", "cpu") is False  # bf16 emulated: twice as slow
    precision.bf16_is_faster.cache_clear()
    seconds[torch.bfloat16] = 0.5
    assert use_bf16("auto", "cpu") is True
    precision.bf16_is_faster.cache_clear()


def test_the_measurement_times_real_products():
    assert 0 < precision._matmul_seconds(torch.float32, torch.device("cpu"), repeats=1) < 1


@pytest.mark.parametrize("setting", ["yes", 1, None])
def test_other_settings_are_refused(setting):
    with pytest.raises(ValueError, match=r"bf16=.* is invalid; allowed: true, false, auto"):
        use_bf16(setting, "cpu")
