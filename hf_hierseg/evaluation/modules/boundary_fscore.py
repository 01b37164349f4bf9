"""Boundary F-score as an offline `evaluate` metric."""

import evaluate

from hf_hierseg.evaluation.metric_info import label_map_feature, metric_info
from hf_hierseg.evaluation.metrics import boundary_fscore


_DESCRIPTION = """Boundary F-score of label maps: precision and recall of the pixels where labels change, matched
within a tolerance in pixels, averaged over images. Label ids do not matter."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps [H, W] (any region ids).
    references (`List[ndarray]`): ground-truth label maps [H, W].
    tolerance (`float`): matching distance in pixels, default 1.
    ignore_index (`int`, *optional*): reference label whose pixels are not evaluated.
Returns:
    `boundary_fscore`, `boundary_precision`, `boundary_recall`, `per_image_fscore`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BoundaryFScore(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions=label_map_feature(), references=label_map_feature()
        )

    def _compute(self, predictions, references, tolerance=1, ignore_index=None):
        return boundary_fscore(predictions, references, tolerance=tolerance, ignore_index=ignore_index)
