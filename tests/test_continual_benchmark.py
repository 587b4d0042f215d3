"""The pure parts of benchmarks/continual.py: GEM's measures of an accuracy matrix, and when an old task's rows
may be reused."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import continual  # noqa: E402

TASKS = ["a", "b", "c"]
# R[i][j]: the score on task j after stage i (b is scored before its stage too: a look-ahead, as LoRA's)
MATRIX = [
    {"a": 0.6, "b": 0.3},
    {"a": 0.5, "b": 0.7, "c": 0.2},
    {"a": 0.4, "b": 0.6, "c": 0.9},
]
ZERO_SHOT = {"a": 0.1, "b": 0.25, "c": 0.3}


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert continual.average_accuracy(MATRIX) == pytest.approx((0.4 + 0.6 + 0.9) / 3)


def test_backward_transfer_compares_the_last_row_with_each_tasks_own_stage():
    # a: 0.4 - 0.6 (after stage 1); b: 0.6 - 0.7 (after stage 2); the last task does not count
    assert continual.backward_transfer(MATRIX, TASKS) == pytest.approx(((0.4 - 0.6) + (0.6 - 0.7)) / 2)
    assert continual.backward_transfer(MATRIX[:1], TASKS[:1]) is None
    unchanged = [{"a": 0.6}, {"a": 0.6, "b": 0.7}, {"a": 0.6, "b": 0.7, "c": 0.9}]
    assert continual.backward_transfer(unchanged, TASKS) == 0.0


def test_forward_transfer_needs_each_task_scored_before_its_stage():
    # b before its stage (after stage 1): 0.3 - 0.25; c after stage 2: 0.2 - 0.3
    assert continual.forward_transfer(MATRIX, TASKS, ZERO_SHOT) == pytest.approx(((0.3 - 0.25) + (0.2 - 0.3)) / 2)
    routed = [{"a": 0.6}, {"a": 0.6, "b": 0.7}, {"a": 0.6, "b": 0.7, "c": 0.9}]  # no score before a stage
    assert continual.forward_transfer(routed, TASKS, ZERO_SHOT) is None
    assert continual.forward_transfer(MATRIX, TASKS, {"a": 0.1}) is None
    assert not math.isnan(continual.forward_transfer(MATRIX[:2], TASKS[:2], ZERO_SHOT))


def test_rows_are_reused_only_when_the_probe_is_unchanged():
    probe = [
        {"task": "a", "id": "1", "prediction": "yes", "prediction_norm": "yes", "choice_scores": [-1.25, -2.5]},
        {"task": "a", "id": "2", "prediction": "no", "prediction_norm": "no", "choice_scores": [-3.0, -0.5]},
    ]
    assert continual.same_rows(probe, [dict(row) for row in probe])
    moved = [probe[0], probe[1] | {"choice_scores": [-3.0, -0.5001]}]  # a likelihood moved, the answer did not
    assert not continual.same_rows(probe, moved)
    assert not continual.same_rows(probe, probe[:1])
    assert not continual.same_rows(probe, [probe[0], probe[1] | {"prediction": "yes"}])
    generated = [{"task": "n", "id": "1", "prediction": ["flu"], "output": "flu"}]
    assert not continual.same_rows(generated, [generated[0] | {"output": "flu."}])
