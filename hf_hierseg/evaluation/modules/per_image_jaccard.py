"""Per-image Jaccard index averaged over images (CAST's open-vocabulary protocol) as an offline `evaluate` metric."""

import evaluate

from hf_hierseg.evaluation.metric_info import label_map_feature, metric_info
from hf_hierseg.evaluation.metrics import per_image_jaccard


_DESCRIPTION = """The Jaccard index of every image as torchmetrics' `MulticlassJaccardIndex(average="macro")` gives it
(mean IoU over the classes present in the image's prediction or reference), averaged over images, beside the
dataset-level mean IoU (pixel counts summed over images)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps [H, W], values in 0..num_labels-1.
    references (`List[ndarray]`): ground-truth label maps [H, W].
    num_labels (`int`): number of classes, background included.
    ignore_index (`int`, *optional*): reference label left out.
Returns:
    `mean_per_image_jaccard`, `per_image_jaccard`, `mean_iou`, `per_category_iou`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerImageJaccard(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions=label_map_feature(), references=label_map_feature()
        )

    def _compute(self, predictions, references, num_labels, ignore_index=None):
        return per_image_jaccard(predictions, references, num_labels=num_labels, ignore_index=ignore_index)
