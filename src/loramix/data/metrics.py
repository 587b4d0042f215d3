"""Metrics: accuracy, token F1, macro-F1 over a label set, micro precision / recall / F1 over sets of items, and the
bootstrap that puts intervals on them."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Hashable


def accuracy(predictions: list[str], golds: list[str]) -> float:
    """The share of predictions equal to their gold answer (0 for no examples)."""
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / max(len(golds), 1)


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 of a prediction against its gold answer, over lower-case word tokens (1 when both have none)."""
    predicted, reference = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", gold.lower())
    if not predicted or not reference:
        return float(predicted == reference)
    common = sum((Counter(predicted) & Counter(reference)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def macro_f1(predictions: list[str], golds: list[str], labels: tuple[str, ...]) -> float:
    """The mean per-label F1 over the labels that occur among the golds or the predictions.

    A prediction outside `labels` (unparsable text) is wrong for its example's gold label and forms no label of
    its own; labels neither present nor predicted are left out of the mean (as scikit-learn does by default).
    """
    pairs = list(zip(predictions, golds, strict=True))
    present = [label for label in labels if label in golds or label in predictions]
    if not present:
        return 0.0
    scores = []
    for label in present:
        true_positives = sum(p == label and g == label for p, g in pairs)
        scores.append(2 * true_positives / (predictions.count(label) + golds.count(label)))
    return sum(scores) / len(scores)


def micro_prf(predicted: set[Hashable], gold: set[Hashable]) -> dict[str, float]:
    """Precision, recall and F1 of a predicted set of items against the gold set (0 where undefined)."""
    true_positives = len(predicted & gold)
    precision = true_positives / len(predicted) if predicted else 0.0
    recall = true_positives / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def bootstrap(score: Callable[[list[int]], dict], size: int, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """`score(rows)` of `resamples` bootstrap samples: each `size` row indices drawn with replacement (seeded)."""
    if size < 1:
        raise ValueError(f"cannot bootstrap {size} examples")
    rng = random.Random(seed)
    return [score([rng.randrange(size) for _ in range(size)]) for _ in range(resamples)]


def percentile_interval(values: list[float], confidence: float = 0.95) -> list[float]:
    """[low, high]: the central `confidence` share of the values (the bootstrap percentile interval)."""
    ordered = sorted(values)
    tail = (1 - confidence) / 2
    last = len(ordered) - 1
    return [ordered[round(tail * last)], ordered[round((1 - tail) * last)]]
