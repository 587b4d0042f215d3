"""learning_curve.jsonl: how a run's trained tasks score on their dev examples as it trains."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from torch import nn

from loramix.data import Example, get_task
from loramix.evaluate import evaluate_model
from loramix.methods import AdaptedModel
from loramix.model import MixLoraModel
from loramix.process_group import slowest
from loramix.recipe import Recipe
from loramix.sharding import is_sharded
from loramix.tracking import Trackers

DEV_MAX_NEW_TOKENS = 32  # the most tokens a dev answer of a free-text task is given (the curve stays cheap)


@contextlib.contextmanager
def routing_stats_kept(model: nn.Module):
    """The routers' statistics (their `stat_*` buffers) as they were before the block, whatever it ran."""
    routers = {id(r): r for r in model.routers().values()} if isinstance(model, MixLoraModel) else {}
    saved = [
        (buffer, buffer.clone())
        for router in routers.values()
        for name, buffer in router.named_buffers(recurse=False)
        if name.startswith("stat_")
    ]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


class LearningCurve:
    """learning_curve.jsonl: each trained task's metrics on its dev examples at some steps of a run. Rank 0
    scores them; the other ranks wait for it, or, for a sharded model (whose every forward is a collective),
    score the same examples alongside it."""

    def __init__(
        self,
        path: Path,
        recipe: Recipe,
        dev_sets: dict[str, list[Example]],
        bf16: bool,
        rank: int,
        world: int,
        trackers: Trackers | None = None,
    ) -> None:
        self.path, self.recipe, self.dev_sets, self.bf16 = path, recipe, dev_sets, bf16
        self.rank, self.world, self.trackers = rank, world, trackers

    def scores(self, model: nn.Module, tokenizer) -> dict[str, dict[str, float]]:
        """Per task, the metrics of its dev examples by `evaluate_model` in the recipe's eval_mode (free-text
        answers of at most DEV_MAX_NEW_TOKENS tokens); the routers' statistics stay those of training."""
        adapted = isinstance(model, AdaptedModel)
        scores = {}
        with routing_stats_kept(model):
            for name, examples in self.dev_sets.items():
                result = evaluate_model(
                    model,
                    tokenizer,
                    {name: examples},
                    task_ids={name: self.recipe.tasks.index(name)} if adapted else None,
                    mode=self.recipe.eval_mode,
                    batch_size=16,
                    max_prompt_length=self.recipe.max_length,
                    max_new_tokens=min(get_task(name).max_new_tokens, DEV_MAX_NEW_TOKENS),
                    bf16=self.bf16,
                    system_prompt=self.recipe.system_prompt,
                    perplexity=False,
                )
                scores[name] = result[name]["metrics"]
        return scores

    def add(self, model: nn.Module, tokenizer, step: int, seconds: float) -> float:
        """Score the dev examples after `step` steps, `seconds` into the run, and append their line; returns
        the seconds that took (on every rank: they wait in `slowest` for rank 0)."""
        started = time.perf_counter()
        if self.rank != 0 and is_sharded(model):
            self.scores(model, tokenizer)
        elif self.rank == 0:
            tasks = self.scores(model, tokenizer)
            line = {"step": step, "seconds": round(seconds, 2), "dev_seconds": round(time.perf_counter() - started, 2)}
            with self.path.open("a") as curve:
                curve.write(json.dumps(line | {"tasks": tasks}) + "\n")
            if self.trackers is not None:  # the load since the last logged step, as history.jsonl will show it
                self.trackers.log(line | {"tasks": tasks}, "dev/")
                routing = model.routing_stats() if isinstance(model, MixLoraModel) else {}
                self.trackers.expert_load(routing, step)
        return slowest(time.perf_counter() - started, self.world)
