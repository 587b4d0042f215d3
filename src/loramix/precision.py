"""`bf16: auto`: bfloat16 autocast where it is faster than float32 on the device at hand."""

from __future__ import annotations

import functools
import time

import torch

BF16_SETTINGS = (True, False, "auto")


def _matmul_seconds(dtype: torch.dtype, device: torch.device, repeats: int = 8) -> float:
    """The best time of a (512 x 576) @ (576 x 1536) product, the shape of a small model's MLP."""
    left = torch.randn(512, 576, dtype=dtype, device=device)
    right = torch.randn(576, 1536, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        started = time.perf_counter()
        left @ right
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


@functools.cache
def bf16_is_faster(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 here: always on a CUDA device that supports them; on a
    CPU it depends on the instruction set (AVX512-BF16/AMX are fast, emulation is slow), so it is measured."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return _matmul_seconds(torch.bfloat16, device) < 0.9 * _matmul_seconds(torch.float32, device)


def use_bf16(setting: bool | str, device: str | torch.device) -> bool:
    """The `bf16` setting of a recipe resolved for `device`: True, False, or "auto" (bf16 if it is faster)."""
    if setting not in BF16_SETTINGS or not isinstance(setting, bool | str):
        raise ValueError(f"bf16={setting!r} is invalid; allowed: true, false, auto")
    return bf16_is_faster(torch.device(device)) if setting == "auto" else bool(setting)
