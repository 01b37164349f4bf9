"""Image classification of labelled datasets: top-1 / top-5 accuracy of classifiers and weighted kNN accuracy
(`metrics.knn_accuracy`) of image embeddings.

The embedding of a CAST model is its `pooler_output`; that of a transformers ViT (the reproduction's baseline) is
the final-norm CLS token, which its classifier reads. Images go through `CastImageProcessor` with DeiT's evaluation
view (`views.center_crop_view`: the shorter side resized to size / 0.875, central crop), CAST's superpixels computed
on the view.
"""

import numpy as np
import torch

from ..errors import InvalidInputError
from ..loading import load_cast_model, resolve_model_source
from .metrics import knn_accuracy, top_k_accuracy
from .segmentation_eval import format_score, load_dataset_split
from .views import center_crop_view, evaluation_processor, superpixel_settings


DEFAULT_TOP_K = (1, 5)


def classification_processor(
    image_size, crop_fraction=0.875, model_name_or_path=None, superpixel_method=None, num_superpixels=None,
    seeds_recipe=None,
):  # fmt: skip
    """The `CastImageProcessor` of the classification evaluation: DeiT's central crop of `image_size` px
    (`views.center_crop_view`), with the settings saved with the model unless overridden (see
    `views.evaluation_processor`)."""
    view = center_crop_view(image_size, crop_fraction)
    return evaluation_processor(view, model_name_or_path, superpixel_method, num_superpixels, seeds_recipe)


def load_classifier_and_processor(
    model_name_or_path, image_size=None, crop_fraction=0.875, superpixel_method=None, num_superpixels=None,
    seeds_recipe=None, device="cpu",
):  # fmt: skip
    """`(model, image_size, processor)` of a classification evaluation: the CAST classifier (`loading.load_cast_model`)
    on `device`, the view size (default: the model's) and its `classification_processor`."""
    model = load_cast_model(model_name_or_path, classifier=True, device=device)
    image_size = image_size or model.config.image_size
    processor = classification_processor(
        image_size, crop_fraction, model_name_or_path, superpixel_method, num_superpixels, seeds_recipe
    )
    return model, image_size, processor


@torch.no_grad()
def embed_batch(model, pixel_values, superpixels):
    """`(features [B, C], logits [B, K] or None)`: CAST's `pooler_output` (+ `logits` of a classifier), or a ViT's
    final-norm CLS token (+ its classifier's logits)."""
    if model.config.model_type == "vit":
        vit = getattr(model, "vit", model)
        features = vit(pixel_values=pixel_values).last_hidden_state[:, 0]
        classifier = getattr(model, "classifier", None)
        return features, classifier(features) if classifier is not None else None
    outputs = model(pixel_values=pixel_values, superpixels=superpixels)
    return outputs.pooler_output, getattr(outputs, "logits", None)


def labelled_batches(examples, processor, labels_of, image_column="image", batch_size=64, max_samples=None):
    """`(inputs, labels)` per batch of `batch_size` records of `examples` (a dataset or an iterable of dicts), at
    most `max_samples` records: `inputs` is `processor` (a `CastImageProcessor`) of the RGB images, `labels` the
    list of `labels_of(record)`."""
    from ..image_datasets import decode_image

    def processed(batch):
        inputs = processor(images=[image for image, _ in batch], return_tensors="pt")
        return inputs, [labels for _, labels in batch]

    batch = []
    for count, example in enumerate(examples):
        if max_samples is not None and count >= max_samples:
            break
        batch.append((decode_image(example[image_column]), labels_of(example)))
        if len(batch) == batch_size:
            yield processed(batch)
            batch = []
    if batch:
        yield processed(batch)


def extract_features(
    model, examples, processor, image_column="image", label_column="label", batch_size=64, max_samples=None
):
    """Embeddings, logits and labels of a labelled dataset (or iterable of dicts with a PIL image and an int label),
    the inputs made by `processor` (see `classification_processor`).

    Returns:
        dict with `features` float32 `[N, C]`, `logits` float32 `[N, K]` (None for a model without a classifier)
        and `labels` int64 `[N]`.
    """
    model.eval()
    features, logits, labels = [], [], []
    batches = labelled_batches(
        examples, processor, lambda example: int(example[label_column]), image_column, batch_size, max_samples
    )
    for inputs, batch_labels in batches:
        batch_features, batch_logits = embed_batch(model, inputs["pixel_values"], inputs["superpixels"])
        features.append(batch_features.float())
        if batch_logits is not None:
            logits.append(batch_logits.float())
        labels.extend(batch_labels)
    if not labels:
        raise InvalidInputError("No examples to evaluate.")
    return {
        "features": torch.cat(features).numpy(),
        "logits": torch.cat(logits).numpy() if logits else None,
        "labels": np.asarray(labels, dtype=np.int64),
    }


def evaluate_classification(
    model,
    eval_examples,
    processor,
    train_examples=None,
    image_column="image",
    label_column="label",
    top_k=DEFAULT_TOP_K,
    knn_k=20,
    knn_temperature=0.07,
    batch_size=64,
    max_eval_samples=None,
    max_train_samples=None,
):
    """Top-k accuracy of a classifier on `eval_examples` and, with `train_examples`, the weighted kNN accuracy of
    its embeddings (neighbours among the training embeddings); inputs by `processor` (`classification_processor`).

    Returns:
        dict with `num_eval`, `top{k}_accuracy` (classifiers only), and `num_train`, `knn_accuracy`, `knn_k` (when
        `train_examples` is given).
    """
    common = dict(image_column=image_column, label_column=label_column, batch_size=batch_size)
    evaluated = extract_features(model, eval_examples, processor, max_samples=max_eval_samples, **common)
    results = {"num_eval": int(len(evaluated["labels"]))}
    if evaluated["logits"] is not None:
        results.update(top_k_accuracy(evaluated["logits"], evaluated["labels"], top_k))
    if train_examples is not None:
        train = extract_features(model, train_examples, processor, max_samples=max_train_samples, **common)
        results["num_train"] = int(len(train["labels"]))
        results["knn_k"] = int(min(knn_k, len(train["labels"])))
        results.update(
            knn_accuracy(
                train["features"],
                train["labels"],
                evaluated["features"],
                evaluated["labels"],
                k=knn_k,
                temperature=knn_temperature,
            )
        )
    return results


def format_classification_table(rows, top_k=DEFAULT_TOP_K):
    """A markdown table from `{model name: evaluate_classification results}`."""
    knn_k = next((results["knn_k"] for results in rows.values() if "knn_k" in results), None)
    columns = [(f"top{k}_accuracy", f"top-{k}") for k in top_k]
    columns.append(("knn_accuracy", f"kNN (k={knn_k})" if knn_k else "kNN"))
    lines = [
        "| model | images | " + " | ".join(title for _, title in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, results in rows.items():
        cells = [format_score(results.get(key)) for key, _ in columns]
        lines.append(f"| {name} | {results['num_eval']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_classification_evaluation(
    model_name_or_path,
    dataset_name,
    eval_split="test",
    train_split="train",
    knn=True,
    image_column=None,
    label_column=None,
    superpixel_method=None,
    num_superpixels=None,
    seeds_recipe=None,
    image_size=None,
    crop_fraction=0.875,
    top_k=DEFAULT_TOP_K,
    knn_k=20,
    knn_temperature=0.07,
    batch_size=64,
    max_eval_samples=None,
    max_train_samples=None,
):
    """Evaluate a CAST model folder on a labelled dataset (scripts/evaluate_classification.py).

    Returns `{"settings": ..., "results": evaluate_classification results}`."""
    from ..image_datasets import image_column_of, label_column_of

    resolve_model_source(model_name_or_path)  # a missing folder is named before the data are read
    eval_examples = load_dataset_split(dataset_name, eval_split)
    image_column = image_column or image_column_of(eval_examples)
    label_column = label_column or label_column_of(eval_examples)
    train_examples = load_dataset_split(dataset_name, train_split) if knn else None
    model, image_size, processor = load_classifier_and_processor(
        model_name_or_path, image_size, crop_fraction, superpixel_method, num_superpixels, seeds_recipe
    )
    results = evaluate_classification(
        model,
        eval_examples,
        processor,
        train_examples,
        image_column,
        label_column,
        top_k,
        knn_k,
        knn_temperature,
        batch_size,
        max_eval_samples,
        max_train_samples,
    )
    settings = {
        "model": str(model_name_or_path),
        "classifier": any(key.startswith("top") for key in results),
        "dataset": str(dataset_name),
        "eval_split": eval_split,
        "train_split": train_split if knn else None,
        "image_size": image_size,
        "crop_fraction": crop_fraction,
        "superpixels": superpixel_settings(processor),
        "knn_temperature": knn_temperature,
    }
    return {"settings": settings, "results": results}


__all__ = [
    "classification_processor",
    "embed_batch",
    "evaluate_classification",
    "extract_features",
    "labelled_batches",
    "format_classification_table",
    "load_classifier_and_processor",
    "run_classification_evaluation",
]
