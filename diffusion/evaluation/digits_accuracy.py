"""The quickstart's end-of-run check: the share of generated digits that a classifier fitted on the real
ones reads as their label."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC

_digits_classifier: SVC | None = None


def make_digits_classifier() -> SVC:
    """The (unfitted) classifier used to judge digit samples: an RBF SVM on the 64 raw pixel values in 0..16."""
    return SVC(gamma=0.001, C=10.0)


def digits_classifier_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples (N, 1, 8, 8) in [-1, 1] that a classifier fit on all 1,797 real digits assigns to the
    given labels (N,). About 1.0 for real digits, about 0.1 for noise with balanced labels."""
    global _digits_classifier
    if samples.shape[1:] != (1, 8, 8) or labels.shape != samples.shape[:1]:
        raise ValueError(f"expected samples (N, 1, 8, 8) and labels (N,), got {tuple(samples.shape)}, "
                         f"{tuple(labels.shape)}")
    if _digits_classifier is None:
        digits = load_digits()
        _digits_classifier = make_digits_classifier().fit(digits.data, digits.target)
    pixels = (samples.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 16
    predicted = _digits_classifier.predict(pixels.reshape(len(pixels), 64).numpy())
    return float((predicted == labels.detach().cpu().numpy()).mean())
