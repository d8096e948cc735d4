"""Evaluation: FID, sFID, Inception Score and precision/recall, on pytorch-fid's FID Inception (or a digits
classifier for the CPU quickstart).

    metrics      statistics, RunningStatistics, frechet_distance, inception_score, precision_recall
    extractor    FeatureExtractor, build_feature_extractor            (inception.py, digits.py: the two extractors)
    sources      .npz files, image folders, dataset configs, MS-COCO as uint8 image datasets
    features     batched multi-process extraction, per-source feature caches, running statistics of a source or
                 of images generated on the fly (FID during training)
    reference    statistics files and ADM batches, reference_statistics_for_config (FID during training)

``eval_fid.py`` at the repository root is the command line over these.
"""

from diffusion.evaluation.extractor import FeatureExtractor
from diffusion.evaluation.extractors import EXTRACTORS, build_feature_extractor
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
    "Reference",
    "RunningStatistics",
    "accumulate_statistics",
    "build_feature_extractor",
    "cached_features",
    "extract_features",
    "frechet_distance",
    "generated_statistics",
    "inception_score",
    "load_reference",
    "open_images",
    "precision_recall",
    "read_statistics",
    "reference_statistics_for_config",
    "save_statistics",
    "statistics",
]
