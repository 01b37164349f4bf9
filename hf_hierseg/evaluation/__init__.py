"""Evaluation: metrics, offline `evaluate` modules, the ViT + k-means baseline and evaluation data."""

from .metrics import (
    boundary_fscore,
    evaluate_hierarchy,
    majority_mean_iou,
    mean_iou,
    segment_matching,
    top_k_accuracy,
)
from .modules import METRIC_NAMES, metric_path


__all__ = [
    "boundary_fscore",
    "evaluate_hierarchy",
    "majority_mean_iou",
    "mean_iou",
    "segment_matching",
    "top_k_accuracy",
    "METRIC_NAMES",
    "metric_path",
]
