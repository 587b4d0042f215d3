"""Metrics: accuracy, macro-F1 over a label set, and micro precision / recall / F1 over sets of items."""

from __future__ import annotations

from collections.abc import Hashable


def accuracy(predictions: list[str], golds: list[str]) -> float:
    """The share of predictions equal to their gold answer (0 for no examples)."""
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / max(len(golds), 1)


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
