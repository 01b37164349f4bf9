"""Hierarchical classification accuracy (per-level top-1, full-path accuracy, tree consistency / TICE) as an offline
`evaluate` metric."""

import datasets
import evaluate
import numpy as np

from hf_hierseg.evaluation.metric_info import metric_info
from hf_hierseg.evaluation.metrics import hierarchical_accuracy


_DESCRIPTION = """Accuracy of predictions along a taxonomy, as H-CAST evaluates them: top-1 accuracy of every label
level, full-path accuracy (every level right) and tree consistency (the predicted tuple is a path of the taxonomy;
TICE, the inconsistency error, is 1 - consistency)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[List[int]]`): predicted class id per label level, finest first, per sample.
    references (`List[List[int]]`): true class ids, same layout.
    paths (`List[List[int]]`): the taxonomy's rows [fine, ..., coarsest], one per finest class.
Returns:
    `top1_accuracy_per_level`, `full_path_accuracy`, `tree_consistency`, `tice`, `num_samples`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HierarchicalAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            predictions=datasets.Sequence(datasets.Value("int64")),
            references=datasets.Sequence(datasets.Value("int64")),
        )

    def _compute(self, predictions, references, paths=None):
        if paths is None:
            raise ValueError("hierarchical_accuracy needs `paths`: the taxonomy's rows [fine, ..., coarsest].")
        return hierarchical_accuracy(np.asarray(predictions), np.asarray(references), paths)
