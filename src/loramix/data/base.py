"""Tasks: examples, answer parsing, scoring, the majority baseline, and the string-keyed task registry."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loramix.data.metrics import accuracy, macro_f1, token_f1
from loramix.data.paths import resolve_data_dir

SPLIT_SEED = 0  # the seed of every split made in code (recorded in a run's splits.json)


@dataclass(frozen=True)
class Example:
    """One prompt (the user's message) and the exact answer the model should give; `id` names it in its source.

    A conversation's earlier turns are `context`: (role, content) pairs before the prompt, an optional system turn
    (which replaces the recipe's system prompt) then user and assistant turns in turn. `train_on` "all" puts the
    loss on the earlier assistant turns too, "last" on the answer alone.
    """

    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    id: str = ""
    context: tuple[tuple[str, str], ...] = ()
    train_on: str = "all"


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or punctuation: the form answers are compared in."""
    return re.sub(r"\s+", " ", text.lower()).strip(" .,;:!?'\"")


def first_choice(text: str, choices: tuple[str, ...]) -> str | None:
    """The choice named earliest in `text` as whole words, ignoring case (the longest one at a tie), or None."""
    found = []
    for choice in choices:
        words = r"\s+".join(re.escape(word) for word in normalise(choice).split())
        match = re.search(rf"(?<!\w){words}(?!\w)", text.lower())
        if match:
            found.append((match.start(), -len(choice), choice))
    return min(found)[2] if found else None


class Task(ABC):
    """A named task: how to read its files, what a good answer is, and how to score answers.

    Subclasses set `name`, implement `read`, and set `choices` for classification (the allowed answers; the
    default `parse` maps generated text to the first choice it names). `metrics` names what `score` reports;
    the default `score` knows "accuracy", "macro_f1" (only with choices) and "token_f1" (SQuAD's, for free text).
    """

    name: str = ""
    trainable: bool = True
    max_new_tokens: int = 8
    choices: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("accuracy", "macro_f1")

    @abstractmethod
    def read(self, folder: Path) -> dict[str, list[Example]]:
        """Every split of the task ("train", "test", maybe "validation") from the medical data folder."""

    def load(self, data_dir: str | Path | None = None) -> dict[str, list[Example]]:
        """The task's splits, read from `resolve_data_dir(data_dir)`."""
        return self.read(resolve_data_dir(data_dir))

    def parse(self, generated: str) -> str:
        """A prediction from generated text: the first allowed answer it names, else the normalised text."""
        if self.choices:
            choice = first_choice(generated, self.choices)
            if choice is not None:
                return choice
        return normalise(generated)

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """The task's metrics of parsed predictions against the examples' answers (compared normalised)."""
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples of {self.name}")
        predicted = [normalise(p) for p in predictions]
        gold = [normalise(e.answer) for e in examples]
        scores = {"accuracy": accuracy(predicted, gold)}
        if "macro_f1" in self.metrics and self.choices:
            scores["macro_f1"] = macro_f1(predicted, gold, tuple(normalise(c) for c in self.choices))
        if "token_f1" in self.metrics:
            scores["token_f1"] = sum(map(token_f1, predicted, gold)) / max(len(gold), 1)
        return scores

    def majority_answer(self, train: list[Example]) -> str:
        """The most frequent answer of `train` (the majority-class baseline's constant prediction)."""
        if not train:
            raise ValueError(f"no training examples of {self.name} to take the majority answer from")
        return Counter(e.answer for e in train).most_common(1)[0][0]

    def majority(self, train: list[Example], test: list[Example]) -> dict[str, float]:
        """The scores on `test` of always answering the most frequent answer of `train`."""
        return self.score([self.majority_answer(train)] * len(test), test)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add (or replace) a task in the registry under its name; returns it."""
    if not task.name:
        raise ValueError(f"a task needs a non-empty name, got {task.name!r}")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
