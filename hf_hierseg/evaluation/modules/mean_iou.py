"""Mean IoU as an offline `evaluate` metric (same inputs and outputs as the Hub's "mean_iou")."""

import evaluate

from hf_hierseg.evaluation.metric_info import label_map_feature, metric_info
from hf_hierseg.evaluation.metrics import mean_iou


_DESCRIPTION = """Mean intersection-over-union over a dataset (pixel counts summed over images), with per-category
IoU and accuracy and the overall pixel accuracy."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps [H, W].
    references (`List[ndarray]`): ground-truth label maps [H, W].
    num_labels (`int`): number of classes.
    ignore_index (`int`, *optional*): reference label left out of the evaluation (e.g. 255).
    nan_to_num (`float`, *optional*): replace NaN per-category values by this number.
    label_map (`dict`, *optional*): {old_id: new_id} applied to the references.
    reduce_labels (`bool`): reference 0 becomes 255 and every other label l becomes l - 1.
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy`, `per_category_iou`, `per_category_accuracy`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions=label_map_feature(), references=label_map_feature()
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels,
        ignore_index=None,
        nan_to_num=None,
        label_map=None,
        reduce_labels=False,
    ):
        return mean_iou(
            predictions,
            references,
            num_labels=num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            label_map=label_map,
            reduce_labels=reduce_labels,
        )
