"""Publishing CAST checkpoints on the Hugging Face Hub: the model card and the push, shared by the converter and
the training scripts."""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


CITATION = """@inproceedings{ke2024cast,
  title     = {Learning Hierarchical Image Segmentation For Recognition and By Recognition},
  author    = {Ke, Tsung-Wei and Mo, Sangwoo and Yu, Stella X.},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024},
  url       = {https://openreview.net/forum?id=IRcv4yFX6z}
}"""

DEFAULT_TAGS = ("cast", "hierarchical-segmentation", "superpixels", "vision-transformer", "hf_hierseg")
# Hub tasks a CAST checkpoint can serve; the Hub rejects cards whose `pipeline_tag` is not a Hub task.
PIPELINE_TAGS = ("image-feature-extraction", "image-classification", "image-segmentation")
# Architecture suffix in config.json -> (Auto class of the usage snippet, default pipeline tag).
TASK_OF_ARCHITECTURE = {
    "ForImageClassification": ("AutoModelForImageClassification", "image-classification"),
    "ForSemanticSegmentation": ("AutoModelForSemanticSegmentation", "image-segmentation"),
}
# Not published by `push_folder_to_hub`: training states (accelerate checkpoints) and caches.
DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", "*.tmp", "__pycache__/*", "*.pyc", ".*")


def _check_repo_id(repo_id, argument):
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(
            f"`{argument}` must be a non-empty Hub repo id ('name' or 'namespace/name'), got {repo_id!r}."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`{argument}` is not a valid Hub repo id ('name' or 'namespace/name'): {error}") from None


def _as_list(value, argument):
    """`None`, a string or a sequence of strings -> list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(item, str) and item for item in value):
        return list(value)
    raise TypeError(f"`{argument}` must be a string or a sequence of non-empty strings, got {value!r}.")


def _bullets(values: Mapping) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in values.items())


def _metrics_table(metrics: Mapping) -> str:
    rows = [
        f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in metrics.items()
    ]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def _model_details(config: dict) -> str:
    details = {"Architecture": ", ".join(config.get("architectures") or ["CastModel"])}
    names = {
        "hidden_size": "Width",
        "num_attention_heads": "Attention heads",
        "depths": "Blocks per level",
        "num_clusters": "Segments kept by each graph pooling",
        "image_size": "Training resolution (px)",
    }
    details.update({label: config[key] for key, label in names.items() if key in config})
    if config.get("id2label"):
        details["Classes"] = len(config["id2label"])
    return _bullets(details)


def _usage(repo_id: str, auto_class: str) -> str:
    task = ""
    if auto_class == "AutoModelForImageClassification":
        task = f"""
# Classification
classifier = {auto_class}.from_pretrained(repo_id, trust_remote_code=True).eval()
with torch.no_grad():
    logits = classifier(**inputs).logits
print(classifier.config.id2label[logits.argmax(-1).item()])
"""
    elif auto_class != "AutoModel":
        task = f"""
# Task head
head = {auto_class}.from_pretrained(repo_id, trust_remote_code=True).eval()
with torch.no_grad():
    head_outputs = head(**inputs)
"""
    return f"""```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel{", " + auto_class if auto_class != "AutoModel" else ""}

repo_id = "{repo_id}"
processor = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)
model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()

image = Image.open("photo.jpg").convert("RGB")
inputs = processor(images=image, return_tensors="pt")  # pixel_values and superpixels [1, H, W]
with torch.no_grad():
    outputs = model(**inputs)
embedding = outputs.pooler_output  # [1, hidden_size]

# The part-to-whole hierarchy as pixel maps [1, H, W] of segment ids: level 0 (superpixels) to level 4.
# (`outputs.hierarchy` holds, per level, the segment of every superpixel.)
for level, segment_map in enumerate(outputs.hierarchy_maps(inputs["superpixels"])):
    print(f"level {{level}}: {{segment_map.unique().numel()}} segments")
{task}```

`trust_remote_code=True` runs the modelling code stored in this repository; with the `hf_hierseg` package
installed (`import hf_hierseg`) the same classes load from the package."""


def write_model_card(
    output_dir,
    *,
    repo_id=None,
    base_model=None,
    datasets=(),
    pipeline_tag=None,
    tags=(),
    objective=None,
    training_summary=None,
    metrics=None,
    extra=None,
    license="mit",
) -> Path:
    """Write `output_dir/README.md`: YAML metadata (license, library, task, tags, datasets, base model), what the
    model is, how it was trained, its metrics, a usage snippet and the citation. Returns the README path.

    Args:
        output_dir: a `save_pretrained` folder; its `config.json` (when present) gives the model details and picks
            the Auto class of the usage snippet.
        repo_id: Hub id the snippet loads (defaults to the folder name).
        base_model: Hub id(s) this checkpoint was fine-tuned or converted from.
        datasets: Hub dataset id(s) of the training data.
        pipeline_tag: one of `PIPELINE_TAGS` (defaults to the task of the architecture in `config.json`).
        tags: extra tags, added to `DEFAULT_TAGS`.
        objective: training objective in a few words (e.g. "MoCo v3 self-supervised pre-training").
        training_summary: a string or a mapping (steps, batch size, learning rate ...) shown as a list.
        metrics: mapping metric name -> value, shown as a table.
        extra: more Markdown, a string or a mapping section title -> text.
        license: Hub licence id of the weights.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"`output_dir` must be an existing folder, got {str(output_dir)!r}.")
    repo_id = repo_id if repo_id is not None else output_dir.resolve().name
    _check_repo_id(repo_id, "repo_id")
    base_models = _as_list(base_model, "base_model")
    for model_id in base_models:
        _check_repo_id(model_id, "base_model")
    dataset_ids = _as_list(datasets, "datasets")
    for dataset_id in dataset_ids:
        _check_repo_id(dataset_id, "datasets")
    for name, value in (("training_summary", training_summary), ("extra", extra)):
        if value is not None and not isinstance(value, (str, Mapping)):
            raise TypeError(f"`{name}` must be a string or a mapping, got {type(value).__name__}.")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must be a mapping name -> value, got {type(metrics).__name__}.")

    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    architecture = (config.get("architectures") or ["CastModel"])[0]
    auto_class, default_tag = next(
        (task for suffix, task in TASK_OF_ARCHITECTURE.items() if architecture.endswith(suffix)),
        ("AutoModel", "image-feature-extraction"),
    )
    pipeline_tag = pipeline_tag or default_tag
    if pipeline_tag not in PIPELINE_TAGS:
        raise ValueError(f"`pipeline_tag` must be one of {PIPELINE_TAGS} (Hub tasks), got {pipeline_tag!r}.")

    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *_as_list(tags, "tags")])),
        datasets=dataset_ids or None,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
    )
    sections = [
        f"# {repo_id.split('/')[-1]}",
        "A [CAST](https://openreview.net/forum?id=IRcv4yFX6z) model (Ke, Mo & Yu, ICLR 2024): a Vision "
        "Transformer whose tokens are superpixel segments, merged level by level by graph pooling. One forward "
        "pass gives an image embedding and a part-to-whole segmentation hierarchy. Packaged with `hf_hierseg`.",
    ]
    if config:
        sections += ["## Model details", _model_details(config)]
    if objective or training_summary:
        training = [f"Objective: {objective}." if objective else ""]
        if isinstance(training_summary, Mapping):
            training.append(_bullets(training_summary))
        elif training_summary:
            training.append(training_summary)
        sections += ["## Training", "\n\n".join(part for part in training if part)]
    if metrics:
        sections += ["## Results", _metrics_table(metrics)]
    sections += ["## How to use", _usage(repo_id, auto_class)]
    if isinstance(extra, Mapping):
        for title, text in extra.items():
            sections += [f"## {title}", str(text)]
    elif extra:
        sections.append(extra)
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```"]

    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    readme = output_dir / "README.md"
    ModelCard(content).save(readme)  # ModelCard parses the metadata back: a malformed card fails here
    return readme


def push_folder_to_hub(
    folder, repo_id, commit_message, private=False, token=None, ignore_patterns=DEFAULT_IGNORE_PATTERNS
):
    """Create `repo_id` on the Hub if needed and upload `folder` (a `save_pretrained` folder with its model card)
    in one commit; training checkpoints (`checkpoint-*`) are left out. Returns the `CommitInfo`
    (`.oid`, `.commit_url`, `.repo_url.repo_id`)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ValueError(f"`folder` must be an existing, non-empty folder, got {str(folder)!r}.")
    _check_repo_id(repo_id, "repo_id")
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError("`commit_message` must be a non-empty string.")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns or ()),
    )
