"""Overlap metrics on label maps, over the (case, organ) pairs whose reference is annotated."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def jaccard(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Jaccard (intersection over union) of two boolean masks; 1.0 when both are empty."""
    union = int(np.logical_or(prediction, reference).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(prediction, reference).sum()) / union


def per_class_dice(prediction: np.ndarray, reference: np.ndarray, classes: Iterable[int]) -> dict[int, float]:
    """Dice of each class value in ``classes`` (the annotated organs of the reference)."""
    return {int(k): dice(prediction == k, reference == k) for k in classes}


def summarise(scores: list[dict[int, float]]) -> dict[int, tuple[float, float, int]]:
    """Per class: (mean, SD, n) over the cases that scored it."""
    by_class: dict[int, list[float]] = {}
    for case in scores:
        for k, value in case.items():
            by_class.setdefault(k, []).append(value)
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in sorted(by_class.items())}
