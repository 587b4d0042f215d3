"""Training batches of several tasks: which task and example each row is (TaskSampler, by the recipe's sampling
rule), and the examples encoded once, on first use (Encoder)."""

from __future__ import annotations

import numpy as np
import torch

from loramix.data.base import Example
from loramix.data.encode import collate, encode_example


class TaskSampler:
    """Draws training rows from a seeded generator: a task by the sampling rule, then one of its examples; with
    `batching="task"` one task per batch, so that short tasks' rows are not padded to long tasks' length."""

    def __init__(self, sizes: list[int], sampling: str, temperature: float, seed: int, batching: str = "mixed") -> None:
        counts = np.asarray(sizes, dtype=float)
        if sampling == "uniform":
            weights = np.ones_like(counts)
        elif sampling == "proportional":
            weights = counts
        elif sampling == "temperature":
            weights = counts ** (1.0 / temperature)
        else:
            raise ValueError(f"sampling={sampling!r}; allowed: proportional, temperature, uniform")
        if batching not in ("mixed", "task"):
            raise ValueError(f"batching={batching!r}; allowed: mixed, task")
        weights = np.where(counts > 0, weights, 0.0)  # a task without examples is never drawn
        self.probabilities = weights / weights.sum()
        self.sizes, self.batching = sizes, batching
        self.rng = np.random.default_rng(seed)

    def draw(self, count: int) -> list[tuple[int, int]]:
        """`count` (task index, example index) pairs."""
        if self.batching == "task":
            tasks = [self.rng.choice(len(self.sizes), p=self.probabilities)] * count
        else:
            tasks = self.rng.choice(len(self.sizes), size=count, p=self.probabilities)
        return [(int(t), int(self.rng.integers(self.sizes[t]))) for t in tasks]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class Encoder:
    """Encodes training examples on first use (answer-only labels, context-side truncation) and counts,
    per task, the distinct examples drawn ("encoded"), how many of them lost context ("truncated") and the
    earliest conversation turns dropped to fit ("dropped_turns")."""

    def __init__(
        self, tokenizer, max_length: int, examples: list[list[Example]], system_prompt: str | None = None
    ) -> None:
        self.tokenizer, self.max_length, self.examples = tokenizer, max_length, examples
        self.system_prompt = system_prompt
        self.cache: dict[tuple[int, int], dict] = {}
        names = [group[0].task if group else "" for group in examples]
        self.counts = {key: dict.fromkeys(names, 0) for key in ("encoded", "truncated", "dropped_turns")}

    def batch(self, picks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = []
        for task, index in picks:
            if (task, index) not in self.cache:
                example = self.examples[task][index]
                row = encode_example(example, self.tokenizer, self.max_length, system_prompt=self.system_prompt)
                self.counts["encoded"][example.task] += 1
                self.counts["truncated"][example.task] += int(row["truncated"])
                self.counts["dropped_turns"][example.task] += row["dropped_turns"]
                self.cache[task, index] = row
            rows.append({**self.cache[task, index], "task_id": task})
        return collate(rows, self.tokenizer.pad_token_id)
