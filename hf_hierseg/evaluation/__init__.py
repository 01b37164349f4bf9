"""Evaluation: metrics, offline `evaluate` modules, the ViT + k-means baseline, evaluation data, the segmentation,
classification, open-vocabulary and segment-retrieval evaluations run by `hf-hierseg evaluate` (`hf_hierseg.apps.evaluate`)."""

from .baselines import (
    evaluate_vit_baseline,
    hierarchical_kmeans,
    make_vit_like,
    spherical_kmeans,
    vit_kmeans_hierarchy,
)
from .classification_eval import classification_processor, evaluate_classification, run_classification_evaluation
from .metrics import (
    boundary_fscore,
    evaluate_hierarchy,
    hierarchical_accuracy,
    knn_accuracy,
    majority_mean_iou,
    mean_iou,
    per_image_jaccard,
    segment_matching,
    top_k_accuracy,
)
from .modules import METRIC_NAMES, metric_path
from .open_vocabulary import (
    CocoPartDataset,
    MaskPartDataset,
    PartTaxonomy,
    evaluate_open_vocabulary,
    run_open_vocabulary_evaluation,
)
from .real_photos import RealPhotosUnavailableError, load_arc2017_photo, load_imagenet_photos, load_voc_photo
from .segment_retrieval import (
    CastRetrievalSegments,
    VitRetrievalSegments,
    evaluate_segment_retrieval,
    run_segment_retrieval_evaluation,
)
from .segmentation_eval import (
    evaluate_cast_hierarchy,
    evaluate_segmentation,
    evaluate_vit_hierarchy,
    run_segmentation_evaluation,
    segmentation_processor,
)
from .synthetic import CLASS_NAMES, PART_NAMES, generate_example, load_synthetic_dataset, write_synthetic_dataset


__all__ = [
    "boundary_fscore",
    "evaluate_hierarchy",
    "hierarchical_accuracy",
    "knn_accuracy",
    "majority_mean_iou",
    "mean_iou",
    "per_image_jaccard",
    "segment_matching",
    "top_k_accuracy",
    "METRIC_NAMES",
    "metric_path",
    "CocoPartDataset",
    "MaskPartDataset",
    "PartTaxonomy",
    "evaluate_open_vocabulary",
    "run_open_vocabulary_evaluation",
    "evaluate_vit_baseline",
    "hierarchical_kmeans",
    "make_vit_like",
    "spherical_kmeans",
    "vit_kmeans_hierarchy",
    "RealPhotosUnavailableError",
    "load_arc2017_photo",
    "load_imagenet_photos",
    "load_voc_photo",
    "CLASS_NAMES",
    "PART_NAMES",
    "generate_example",
    "load_synthetic_dataset",
    "write_synthetic_dataset",
    "evaluate_cast_hierarchy",
    "evaluate_segmentation",
    "evaluate_vit_hierarchy",
    "run_segmentation_evaluation",
    "evaluate_classification",
    "run_classification_evaluation",
    "classification_processor",
    "segmentation_processor",
    "CastRetrievalSegments",
    "VitRetrievalSegments",
    "evaluate_segment_retrieval",
    "run_segment_retrieval_evaluation",
]
