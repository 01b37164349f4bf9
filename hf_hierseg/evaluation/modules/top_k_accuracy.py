"""Top-k accuracy as an offline `evaluate` metric."""

import datasets
import evaluate
import numpy as np

from hf_hierseg.evaluation.metric_info import metric_info
from hf_hierseg.evaluation.metrics import top_k_accuracy


_DESCRIPTION = """Fraction of samples whose label is among the k highest-scoring classes (top-1 and top-5 by
default)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[List[float]]`): class scores (logits or probabilities) per sample.
    references (`List[int]`): labels.
    top_k (`List[int]`): the values of k, default (1, 5).
Returns:
    `top{k}_accuracy` for every k.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            predictions=datasets.Sequence(datasets.Value("float32")),
            references=datasets.Value("int64"),
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        return top_k_accuracy(np.asarray(predictions), np.asarray(references), top_k=tuple(top_k))
