"""Deterministic train / test splits of tasks that ship as one file, and removal of duplicate examples."""

from __future__ import annotations

import random

from loramix.data.base import SPLIT_SEED, Example


def stratified_split(
    examples: list[Example], test_fraction: float, seed: int = SPLIT_SEED
) -> tuple[list[Example], list[Example]]:
    """(train, test), deterministic for a seed and the examples' order, each answer keeping its share in both.

    Answers too rare to put one in the test part (round(count * test_fraction) == 0, e.g. free-text answers)
    are pooled and split together; the pool gives at least one test example when it has two or more.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction}; allowed: strictly between 0 and 1")
    by_answer: dict[str, list[Example]] = {}
    for example in examples:
        by_answer.setdefault(example.answer, []).append(example)
    strata = [group for _, group in sorted(by_answer.items()) if round(len(group) * test_fraction) > 0]
    rare = [e for group in by_answer.values() if round(len(group) * test_fraction) == 0 for e in group]
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for group in [*strata, rare] if rare else strata:
        group = group[:]
        rng.shuffle(group)
        cut = round(len(group) * test_fraction) or (1 if len(group) > 1 else 0)
        test += group[:cut]
        train += group[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def deduplicate(examples: list[Example]) -> list[Example]:
    """The examples without repeated prompts: the first of identical (prompt, answer) copies is kept, and a prompt
    given different answers (a multi-label item) is dropped altogether, so no prompt can be in two splits."""
    answers: dict[str, set[str]] = {}
    for example in examples:
        answers.setdefault(example.prompt, set()).add(example.answer)
    kept, seen = [], set()
    for example in examples:
        if len(answers[example.prompt]) == 1 and example.prompt not in seen:
            seen.add(example.prompt)
            kept.append(example)
    return kept
