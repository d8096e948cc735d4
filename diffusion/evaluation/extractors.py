"""The feature extractors, from a name to named feature matrices: :func:`build_feature_extractor` builds the network
a name stands for (the one table behind ``eval.feature_extractor`` and ``--extractor``, each made for an evaluation
protocol: ``eval.protocol``, ``--protocol``, the FID Inception's front end), and :class:`FeatureExtractor` puts it
behind the one interface, uint8 images in:

    extractor = build_feature_extractor("inception", weights="", device="cuda")
    features = extractor(images)        # uint8 (N, H, W, 3) numpy array or tensor, as the FID tools store samples
    features["pool"]                    # (N, D) float32 on extractor.device: FID, precision/recall
    features["logits"]                  # (N, classes): Inception Score
    features["spatial"]                 # (N, 2023), Inception only: sFID

``extractor.id`` names the network and its weights; caches of features and statistics are keyed by it.
``extractor.dims`` maps each output to its width (what :class:`~diffusion.evaluation.metrics.RunningStatistics`
needs before any image is seen). The networks are in inception.py (pytorch-fid's FID Inception), digits.py (the
quickstart's stand-in) and fd_dinov2.py (EDM2's FD-DINOv2 features); they know nothing of this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as Interface

import numpy as np
import torch

from diffusion.errors import ConfigError, InputError
from diffusion.evaluation.digits import DigitsFeatures
from diffusion.evaluation.fd_dinov2 import DINOv2Features
from diffusion.evaluation.inception import InceptionFeatures
from diffusion.evaluation.metrics import full_precision
from diffusion.evaluation.protocols import Protocol, get_protocol


class FeatureNetwork(Interface):
    """What a feature network provides: its name, output widths and device, and the forward on checked images."""

    id: str
    dims: dict[str, int]
    device: torch.device

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, H, W, C) on ``self.device`` -> {"pool": (N, D), ...} float32."""
        ...


# name -> builder(weights, device, protocol)
_BUILDERS: dict[str, Callable[[str, torch.device | str, Protocol], FeatureNetwork]] = {
    "inception": lambda weights, device, protocol: InceptionFeatures(weights, device, protocol.front_end),
    "digits": lambda weights, device, protocol: DigitsFeatures(device=device),  # no resize: no front end to change
    "dinov2": lambda weights, device, protocol: DINOv2Features(weights, device),  # EDM2's preprocessing always
}
EXTRACTORS = tuple(_BUILDERS)


class FeatureExtractor:
    """A :class:`FeatureNetwork` behind the one interface: checks and moves the images, runs the network's forward
    without autograd and TF32; ``id``, ``dims`` and ``device`` are the network's."""

    def __init__(self, network: FeatureNetwork) -> None:
        self.network = network
        self.id, self.dims, self.device = network.id, network.dims, network.device

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise InputError(f"images must be uint8 (N, H, W, 1 or 3) as the FID tools store samples (see "
                             f"diffusion.sampling.pixels.to_uint8), got {x.dtype} {tuple(x.shape)}")
        with torch.inference_mode(), full_precision():
            return self.network.forward(x.to(self.device))


def build_feature_extractor(name: str = "inception", *, weights: str = "", device: torch.device | str = "cpu",
                            protocol: str = "pytorch_fid") -> FeatureExtractor:
    """``inception``: pytorch-fid's FID Inception (``weights``: its .pth; "" = pytorch-fid's torch-hub cache) behind
    the ``protocol``'s front end (pytorch_fid or adm). ``digits``: a small classifier fit on scikit-learn's 8x8
    digits (CPU quickstart; ``weights`` unused; the same features under every protocol). ``dinov2``: EDM2's
    FD-DINOv2 features of DINOv2 ViT-L/14 (``weights``: what ``load_vision_encoder`` takes, "" = the local caches;
    EDM2's preprocessing under every protocol)."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    return FeatureExtractor(_BUILDERS[name](weights, device, get_protocol(protocol)))
