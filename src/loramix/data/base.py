"""Tasks: examples, splits, answer parsing, metrics, and the string-keyed task registry."""

from __future__ import annotations

import os
import random
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "LORAMIX_DATA_DIR"
SPLIT_SEED = 0


@dataclass(frozen=True)
class Example:
    """One prompt (the user's message) and the exact answer the model should give."""

    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    id: str = ""


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The medical data folder: the argument, else $LORAMIX_DATA_DIR, else ../shared/data/medical."""
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get(DATA_ENV):
        candidates = [Path(os.environ[DATA_ENV])]
    else:
        repository = Path(__file__).resolve().parents[3]
        candidates = [repository.parent / "shared/data/medical", Path.cwd().parent / "shared/data/medical"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no medical data folder; looked in {[str(c) for c in candidates]}. Pass --data-dir or set {DATA_ENV}."
    )


def require_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}")
    return path


def stratified_split(
    examples: list[Example], test_fraction: float, seed: int = SPLIT_SEED
) -> tuple[list[Example], list[Example]]:
    """Split deterministically, keeping each answer's share in both parts."""
    by_answer: dict[str, list[Example]] = {}
    for example in examples:
        by_answer.setdefault(example.answer, []).append(example)
    rng = random.Random(seed)
    train, test = [], []
    for answer in sorted(by_answer):
        group = by_answer[answer][:]
        rng.shuffle(group)
        cut = round(len(group) * test_fraction)
        test += group[:cut]
        train += group[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .")


def accuracy(predictions: list[str], golds: list[str]) -> float:
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / max(len(golds), 1)


def macro_f1(predictions: list[str], golds: list[str], labels: tuple[str, ...]) -> float:
    """Mean over the labels of the per-label F1 (a label never predicted nor present scores 0)."""
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predictions, golds, strict=True))
        predicted, actual = predictions.count(label), golds.count(label)
        scores.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return sum(scores) / len(scores)


class Task(ABC):
    """A named task: how to read its files, what a good answer is, and how to score answers."""

    name: str = ""
    trainable: bool = True
    max_new_tokens: int = 8
    choices: tuple[str, ...] | None = None

    @abstractmethod
    def read(self, folder: Path) -> dict[str, list[Example]]:
        """Every split of the task from its data folder."""

    def load(self, data_dir: str | Path | None = None) -> dict[str, list[Example]]:
        return self.read(resolve_data_dir(data_dir))

    def parse(self, generated: str) -> str:
        """A normalised prediction from generated text: the first allowed answer it names, else the text."""
        text = normalise(generated)
        if not self.choices:
            return text
        found = [(text.find(normalise(c)), -len(c), c) for c in self.choices if normalise(c) in text]
        return min(found)[2] if found else text

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        golds = [e.answer for e in examples]
        scores = {"accuracy": accuracy(predictions, golds)}
        if self.choices and len(self.choices) <= 5:
            scores["macro_f1"] = macro_f1(predictions, golds, self.choices)
        return scores

    def majority(self, train: list[Example], test: list[Example]) -> dict[str, float]:
        """The scores of always answering the most frequent training answer."""
        most_common = Counter(e.answer for e in train).most_common(1)[0][0]
        return self.score([most_common] * len(test), test)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if not task.name:
        raise ValueError("a task needs a name")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
