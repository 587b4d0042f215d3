"""How a run's steps go: the learning rate of each step, and how many steps a run takes (all of `training.steps`,
or as many as fit its `time_limit`)."""

from __future__ import annotations

import math

from loramix.recipe import Training, parse_duration

CALIBRATION_STEPS = 10  # steps timed to plan a run with a time limit


def learning_rate_factor(step: int, training: Training, total_steps: int | None = None) -> float:
    """The factor of the peak learning rate at `step` (0-based): linear warm-up to 1 over `warmup_steps`,
    then the schedule's decay (cosine, linear or none) to 0 at the last of `total_steps` (default: `steps`)."""
    total = total_steps or training.steps
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    if training.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - training.warmup_steps) / max(1, total - training.warmup_steps))
    if training.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class StepPlan:
    """How many steps a run takes: `training.steps`, or with a `time_limit` as many as fit (at most `steps`),
    planned once from the speed of the CALIBRATION_STEPS steps after the first (which also pays for warming
    up) and, for a learning curve, the mean time of its dev evaluations (one every `dev_every` steps, one more
    after the last step). The limit is the training's: the evaluation on the test splits comes after it. The
    run also stops, whatever was planned, once its time is up."""

    def __init__(self, training: Training) -> None:
        self.limit = parse_duration(training.time_limit) if training.time_limit else None
        self.steps, self.dev_every = training.steps, training.dev_every
        self.planned = self.limit is None
        self.timer: tuple[int, float] | None = None  # (step, seconds not spent on dev) when the calibration began
        self.dev_seconds, self.dev_count = 0.0, 0  # the dev evaluations so far

    def after_dev(self, seconds: float) -> None:
        """Called after each dev evaluation with the seconds it took (already in the next `elapsed`)."""
        self.dev_seconds += seconds
        self.dev_count += 1

    def after_step(self, step: int, elapsed: float) -> None:
        """Called after each step with the seconds spent so far; plans the step count once calibrated."""
        if self.planned:
            return
        if self.timer is None:
            self.timer = (step, elapsed - self.dev_seconds)
        elif step - self.timer[0] >= CALIBRATION_STEPS:
            per_step = (elapsed - self.dev_seconds - self.timer[1]) / (step - self.timer[0])
            left = self.limit - elapsed
            if self.dev_count:
                per_dev = self.dev_seconds / self.dev_count
                per_step += per_dev / self.dev_every
                left -= per_dev  # the evaluation after the last step
            fitting = step + int(left / per_step)
            self.steps, self.planned = max(step, min(self.steps, fitting)), True

    def out_of_time(self, elapsed: float) -> bool:
        return self.limit is not None and elapsed >= self.limit

    def state(self) -> dict:
        return {"steps": self.steps, "planned": self.planned, "dev": [self.dev_seconds, self.dev_count]}

    def restore(self, state: dict) -> None:
        self.steps, self.planned = state["steps"], state["planned"]
        # checkpoints of earlier versions have neither
        self.dev_seconds, self.dev_count = state.get("dev", (0.0, 0))
