"""`evaluate`-compatible metric scripts, loadable offline: `evaluate.load(metric_path("mean_iou"))`.

Each script subclasses `evaluate.Metric` and calls `hf_hierseg.evaluation.metrics`, so `evaluate.load` of its
local path needs neither the Hub nor a network connection.
"""

from pathlib import Path


METRIC_NAMES = (
    "mean_iou",
    "per_image_jaccard",
    "boundary_fscore",
    "top_k_accuracy",
    "segment_matching",
    "hierarchical_accuracy",
)


def metric_path(name):
    """Local path of the `evaluate` metric script `name` (one of `METRIC_NAMES`), to pass to `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; the package ships {list(METRIC_NAMES)}.")
    return str(Path(__file__).with_name(f"{name}.py"))


__all__ = ["METRIC_NAMES", "metric_path"]
