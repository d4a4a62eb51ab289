"""Metrics for generated samples (FID and friends)."""

from bdia.metrics.fid import (
    FeatureStatistics,
    extract_features,
    frechet_distance,
    image_statistics,
    load_detector,
    load_reference,
    save_reference,
)

__all__ = [
    "FeatureStatistics",
    "extract_features",
    "frechet_distance",
    "image_statistics",
    "load_detector",
    "load_reference",
    "save_reference",
]
