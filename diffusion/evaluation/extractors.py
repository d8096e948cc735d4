"""The feature extractors by name: the one table of builders behind ``eval.feature_extractor`` and ``--extractor``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion.errors import ConfigError
from diffusion.evaluation.digits import DigitsExtractor
from diffusion.evaluation.extractor import FeatureExtractor
from diffusion.evaluation.inception import InceptionExtractor

# name -> builder(weights, device)
_BUILDERS: dict[str, Callable[[str, torch.device | str], FeatureExtractor]] = {
    "inception": lambda weights, device: InceptionExtractor(weights, device=device),
    "digits": lambda weights, device: DigitsExtractor(device=device),
}
EXTRACTORS = tuple(_BUILDERS)


def build_feature_extractor(name: str = "inception", *, weights: str = "", device: torch.device | str = "cpu"
                            ) -> FeatureExtractor:
    """``inception``: pytorch-fid's FID Inception (``weights``: its .pth; "" = pytorch-fid's torch-hub cache).
    ``digits``: a small classifier fit on scikit-learn's 8x8 digits (CPU quickstart; ``weights`` unused)."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    return _BUILDERS[name](weights, device)
