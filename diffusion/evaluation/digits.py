"""The digits stand-ins for Inception (scikit-learn's 8x8 digits, the CPU quickstart; nothing to download): a
feature extractor for FID, and the end-of-run check of how many samples a classifier reads as their label.

A small MLP (64 -> 128 -> 64 -> 10, tanh) is fit on the 1,797 real digits, quantised to uint8 exactly as samples are,
with a fixed seed and full-batch Adam. Its 64 penultimate activations play Inception's pool3 ("pool": FID,
precision/recall) and its 10 logits Inception's ("logits": an Inception Score out of 10). The reference statistics
are those of the real digits (``diffusion.evaluation.reference``). Real digits against themselves give FID 0, blurred
digits a few units, noise hundreds.

The end-of-run check (``eval.metric = "digits_accuracy"``) judges samples with another classifier, an RBF SVM on the
raw pixels, fit on all the real digits.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC
from torch import nn

from diffusion.errors import InputError

SEED, STEPS, LR = 0, 120, 1e-2
SIDE = 8


def real_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 (1797, 8, 8, 1) images quantised as the dataset and the samples are, labels (1797,))."""
    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)  # = to_uint8 of the dataset's d / 16 * 2 - 1
    return pixels[..., None], digits.target


@lru_cache(maxsize=1)
def _fitted_state() -> dict[str, torch.Tensor]:
    """The classifier's weights, fit once per process; seeded without touching torch's global random state."""
    images, labels = real_digits_uint8()
    x = torch.from_numpy(images).float().reshape(len(images), -1) / 255
    y = torch.from_numpy(labels).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        net = _network()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    with torch.enable_grad():
        for _ in range(STEPS):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _network() -> nn.Sequential:
    return nn.Sequential(nn.Linear(SIDE * SIDE, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))


class DigitsFeatures:
    """The feature network (see ``diffusion.evaluation.extractors``) of uint8 (N, 8, 8, 1 or 3) digit images (RGB ones
    are averaged to grey); ``id`` = ``digits-mlp-<sha256[:12]>`` of the fitted weights."""

    dims = {"pool": 64, "logits": 10}

    def __init__(self, device: torch.device | str = "cpu") -> None:
        state = _fitted_state()
        self.device = torch.device(device)
        self.network = _network()
        self.network.load_state_dict(state)
        self.network.to(self.device).eval().requires_grad_(False)
        digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state)))
        self.id = f"digits-mlp-{digest.hexdigest()[:12]}"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1:3] != (SIDE, SIDE):
            raise InputError(f"the digits extractor reads 8x8 images, got {tuple(images.shape[1:3])}")
        x = images.float().mean(dim=-1).flatten(1) / 255
        hidden = self.network[:4](x)
        return {"pool": hidden, "logits": self.network[4](hidden)}


# ----------------------------------------------------------------------------------------------------------------------
# The end-of-run check


def make_digits_classifier() -> SVC:
    """The (unfitted) classifier used to judge digit samples: an RBF SVM on the 64 raw pixel values in 0..16."""
    return SVC(gamma=0.001, C=10.0)


@lru_cache(maxsize=1)
def _fitted_classifier() -> SVC:
    """The classifier fit once per process on all 1,797 real digits."""
    digits = load_digits()
    return make_digits_classifier().fit(digits.data, digits.target)


def digits_classifier_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples (N, 1, 8, 8) in [-1, 1] that a classifier fit on all 1,797 real digits assigns to the
    given labels (N,). About 1.0 for real digits, about 0.1 for noise with balanced labels."""
    if samples.shape[1:] != (1, SIDE, SIDE) or labels.shape != samples.shape[:1]:
        raise ValueError(f"expected samples (N, 1, 8, 8) and labels (N,), got {tuple(samples.shape)}, "
                         f"{tuple(labels.shape)}")
    pixels = (samples.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 16
    predicted = _fitted_classifier().predict(pixels.reshape(len(pixels), SIDE * SIDE).numpy())
    return float((predicted == labels.detach().cpu().numpy()).mean())
