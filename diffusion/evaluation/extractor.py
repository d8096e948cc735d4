"""The interface of every feature extractor (:class:`FeatureExtractor`): uint8 images in, named feature matrices
out. The extractors themselves are in inception.py, digits.py and fd_dinov2.py, built by name in
extractors.py:

    extractor = build_feature_extractor("inception", weights="", device="cuda")
    features = extractor(images)        # uint8 (N, H, W, 3) numpy array or tensor, as the FID tools store samples
    features["pool"]                    # (N, D) float32 on extractor.device: FID, precision/recall
    features["logits"]                  # (N, classes): Inception Score
    features["spatial"]                 # (N, 2023), Inception only: sFID

``extractor.id`` names the network and its weights; caches of features and statistics are keyed by it.
``extractor.dims`` maps each output to its width (what :class:`~diffusion.evaluation.metrics.RunningStatistics`
needs before any image is seen).
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion.errors import InputError
from diffusion.evaluation.metrics import full_precision


class FeatureExtractor:
    """Base class: checks and moves the images, runs :meth:`forward` without autograd and TF32."""

    id: str
    dims: dict[str, int]
    device: torch.device

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise InputError(f"images must be uint8 (N, H, W, 1 or 3) as the FID tools store samples (see "
                             f"diffusion.sampling.pixels.to_uint8), got {x.dtype} {tuple(x.shape)}")
        with torch.inference_mode(), full_precision():
            return self.forward(x.to(self.device))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, H, W, C) on ``self.device`` -> {"pool": (N, D), ...} float32."""
        raise NotImplementedError
