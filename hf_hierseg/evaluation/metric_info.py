"""The `evaluate.MetricInfo` of the offline metric scripts in `hf_hierseg.evaluation.modules`.

The scripts are loaded by `evaluate.load(path)` as standalone files, so they import this module absolutely.
"""

import datasets
import evaluate


def label_map_feature():
    """Feature of one label map [H, W] of integer ids."""
    return datasets.Sequence(datasets.Sequence(datasets.Value("int64")))


def metric_info(description, inputs_description, predictions, references):
    """`evaluate.MetricInfo` of a metric whose sample has the feature types `predictions` and `references`."""
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": predictions, "references": references}),
    )
