"""The feature extractors by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusion.evaluation.extractor import FeatureExtractor


EXTRACTORS = ("inception", "digits")


def build_feature_extractor(name: str = "inception", *, weights: str = "", device: torch.device | str = "cpu"
                            ) -> FeatureExtractor:
    """``inception``: pytorch-fid's FID Inception (``weights``: its .pth; "" = pytorch-fid's torch-hub cache).
    ``digits``: a small classifier fit on scikit-learn's 8x8 digits (CPU quickstart; ``weights`` unused)."""
    if name == "inception":
        from diffusion.evaluation.inception import InceptionExtractor

        return InceptionExtractor(weights, device=device)
    if name == "digits":
        from diffusion.evaluation.digits import DigitsExtractor

        return DigitsExtractor(device=device)
    raise ValueError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
