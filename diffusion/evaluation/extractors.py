"""The feature extractors by name: the one table of builders behind ``eval.feature_extractor`` and ``--extractor``,
each made for an evaluation protocol (``eval.protocol``, ``--protocol``: the FID Inception's front end)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion.errors import ConfigError
from diffusion.evaluation.digits import DigitsExtractor
from diffusion.evaluation.extractor import FeatureExtractor
from diffusion.evaluation.fd_dinov2 import DINOv2Extractor
from diffusion.evaluation.inception import InceptionExtractor
from diffusion.evaluation.protocols import Protocol, get_protocol

# name -> builder(weights, device, protocol)
_BUILDERS: dict[str, Callable[[str, torch.device | str, Protocol], FeatureExtractor]] = {
    "inception": lambda weights, device, protocol: InceptionExtractor(weights, device, protocol.front_end),
    "digits": lambda weights, device, protocol: DigitsExtractor(device=device),  # no resize: no front end to change
    "dinov2": lambda weights, device, protocol: DINOv2Extractor(weights, device),  # EDM2's preprocessing always
}
EXTRACTORS = tuple(_BUILDERS)


def build_feature_extractor(name: str = "inception", *, weights: str = "", device: torch.device | str = "cpu",
                            protocol: str = "pytorch_fid") -> FeatureExtractor:
    """``inception``: pytorch-fid's FID Inception (``weights``: its .pth; "" = pytorch-fid's torch-hub cache) behind
    the ``protocol``'s front end (pytorch_fid or adm). ``digits``: a small classifier fit on scikit-learn's 8x8
    digits (CPU quickstart; ``weights`` unused; the same features under every protocol). ``dinov2``: EDM2's
    FD-DINOv2 features of DINOv2 ViT-L/14 (``weights``: what ``load_vision_encoder`` takes, "" = the local caches;
    EDM2's preprocessing under every protocol)."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    return _BUILDERS[name](weights, device, get_protocol(protocol))
