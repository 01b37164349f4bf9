"""Unsupervised-segmentation matching as an offline `evaluate` metric."""

import evaluate

from hf_hierseg.evaluation.metric_info import label_map_feature, metric_info
from hf_hierseg.evaluation.metrics import majority_mean_iou, segment_matching


_DESCRIPTION = """Scores segmentations whose region ids carry no class: (a) every ground-truth region is matched to
its best-overlapping predicted region (mean best IoU and size-weighted covering); (b) with `num_labels`, every
predicted region takes the majority ground-truth label of its pixels, then mean IoU is computed."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps [H, W] with arbitrary region ids.
    references (`List[ndarray]`): ground-truth label maps [H, W].
    num_labels (`int`, *optional*): number of ground-truth classes; enables the majority-assignment mIoU.
    ignore_index (`int`, *optional*): reference label left out.
    exclude_labels (`List[int]`): reference labels not scored as regions in the best-overlap matching.
Returns:
    `mean_best_overlap`, `covering`, `num_regions`, and with `num_labels`: `majority_mean_iou`,
    `majority_pixel_accuracy`, `majority_per_category_iou`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SegmentMatching(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions=label_map_feature(), references=label_map_feature()
        )

    def _compute(self, predictions, references, num_labels=None, ignore_index=None, exclude_labels=()):
        results = segment_matching(predictions, references, ignore_index=ignore_index, exclude_labels=exclude_labels)
        if num_labels is not None:
            majority = majority_mean_iou(predictions, references, num_labels=num_labels, ignore_index=ignore_index)
            results["majority_mean_iou"] = majority["mean_iou"]
            results["majority_pixel_accuracy"] = majority["overall_accuracy"]
            results["majority_per_category_iou"] = majority["per_category_iou"]
        return results
