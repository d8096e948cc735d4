"""Evaluation: FID, sFID, Inception Score and precision/recall, on pytorch-fid's FID Inception (or a digits
classifier for the CPU quickstart). This package re-exports the names below for eval_fid.py and the tests; the
project's own modules import from the modules themselves.

    metrics      statistics, RunningStatistics, frechet_distance, inception_score, precision_recall
    protocols    PROTOCOLS, Protocol, get_protocol: pytorch-fid's and ADM's evaluation rules by name
    extractors   EXTRACTORS, build_feature_extractor, FeatureExtractor: the extractors by name, behind one interface
                 (uint8 images in, named features out), over the feature networks of inception.py (pytorch-fid's FID
                 Inception, with pytorch-fid's or ADM's front end), digits.py (the quickstart's stand-ins: digit
                 features, and the end-of-run digits accuracy) and fd_dinov2.py (EDM2's FD-DINOv2 features, DINOv2
                 ViT-L/14 class token)
    sources      .npz files, image folders, dataset configs, MS-COCO as uint8 image datasets
    features     batched multi-process extraction, per-source feature caches, running statistics of a source or
                 of images generated on the fly (FID during training)
    reference    statistics files and ADM batches, reference_statistics_for_config (FID during training)
    training     FID during training (the trainer's evaluator)

``eval_fid.py`` at the repository root is the command line over these.
"""

from diffusion.evaluation.extractors import EXTRACTORS, FeatureExtractor, build_feature_extractor
from diffusion.evaluation.features import (
    accumulate_statistics,
    cached_features,
    extract_features,
    generated_statistics,
)
from diffusion.evaluation.metrics import (
    RunningStatistics,
    frechet_distance,
    inception_score,
    precision_recall,
    statistics,
)
from diffusion.evaluation.protocols import PROTOCOL_NAMES, PROTOCOLS, Protocol, get_protocol
from diffusion.evaluation.reference import (
    Reference,
    load_reference,
    read_statistics,
    reference_statistics_for_config,
    save_statistics,
)
from diffusion.evaluation.sources import open_images

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "PROTOCOLS",
    "PROTOCOL_NAMES",
    "Protocol",
    "Reference",
    "RunningStatistics",
    "accumulate_statistics",
    "build_feature_extractor",
    "cached_features",
    "extract_features",
    "frechet_distance",
    "generated_statistics",
    "get_protocol",
    "inception_score",
    "load_reference",
    "open_images",
    "precision_recall",
    "read_statistics",
    "reference_statistics_for_config",
    "save_statistics",
    "statistics",
]
