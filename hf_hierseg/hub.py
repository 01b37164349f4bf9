"""Publishing CAST checkpoints on the Hugging Face Hub: the model card, the remote code of shared folders and the
push, shared by the converter and the training scripts.

Where `custom_pipelines` belongs. A `save_pretrained` folder is saved the transformers way: `register_for_auto_class`
(in `hf_hierseg/__init__.py`) copies the core modules the saved class needs and writes its `auto_map` entry, and
nothing else, so with `hf_hierseg` installed `pipeline(task, model=folder)` runs every task without
`trust_remote_code` (a `custom_pipelines` entry would make transformers demand it for those tasks even then). What
is *shared* is made self-contained instead: `push_folder_to_hub` (behind the converter's `--push-to-hub` and the
trainers' `--push_to_hub`) uploads the folder with every core module, the `auto_map` of every CAST Auto class and
`custom_pipelines` for `hierarchical-segmentation`, `zero-shot-hierarchical-segmentation` and `image-segmentation`
(H-CAST checkpoints also `hierarchical-image-classification`; see `shared_files`), leaving the local folder as it
was; `add_remote_code` does the same in place, for a folder shared by copying it. There, without the package, `pipeline("hierarchical-segmentation", model=repo, trust_remote_code=True)` works; with the package,
pass `trust_remote_code=True` too, or load the model and hand it to the pipeline. `strip_remote_code` turns a
saved folder into a plain one (no code files, no `auto_map`), as the bundled default model is.
"""

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS as HUB_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from transformers.dynamic_module_utils import get_relative_import_files

from . import AUTO_CLASSES, HIERARCHICAL_AUTO_CLASS
from .configuration_cast import CastConfig
from .modeling_cast import CastForHierarchicalImageClassification
from .pipelines import (
    CastImageSegmentationPipeline,
    HierarchicalImageClassificationPipeline,
    HierarchicalSegmentationPipeline,
    ZeroShotHierarchicalSegmentationPipeline,
)


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
    "ForHierarchicalImageClassification": (HIERARCHICAL_AUTO_CLASS, "image-classification"),
    "ForSemanticSegmentation": ("AutoModelForSemanticSegmentation", "image-segmentation"),
}
# Not published by `push_folder_to_hub`: training states (accelerate checkpoints) and caches.
DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", "*.tmp", "__pycache__/*", "*.pyc", ".*")
# Task -> pipeline class named in the `custom_pipelines` of shared CAST repos.
SHARED_PIPELINES = {
    "hierarchical-segmentation": HierarchicalSegmentationPipeline,
    "zero-shot-hierarchical-segmentation": ZeroShotHierarchicalSegmentationPipeline,
    "image-segmentation": CastImageSegmentationPipeline,
}
SEGMENTATION_ARCHITECTURE = "CastForSemanticSegmentation"
HIERARCHICAL_ARCHITECTURE = CastForHierarchicalImageClassification.__name__
# Task -> pipeline class added to the `custom_pipelines` of shared H-CAST repos only (it needs a taxonomy).
HIERARCHICAL_PIPELINES = {"hierarchical-image-classification": HierarchicalImageClassificationPipeline}
CONFIG_FILES = ("config.json", "preprocessor_config.json")
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


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
installed (`import hf_hierseg`) the same classes load from the package. The repository also names its pipelines:
`pipeline("hierarchical-segmentation", model=repo_id, trust_remote_code=True)(image)` gives every level's segments
with their parent links, `pipeline("image-segmentation", ...)` the masks of one level (or of the segmentation
head's classes), `pipeline("zero-shot-hierarchical-segmentation", ..., clip_model="openai/clip-vit-base-patch16")`
objects and parts named from your vocabulary (`candidate_labels=`, `part_labels=`)."""


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


# -- remote code of shared folders ---------------------------------------------------------------------------


def class_reference(cls):
    """`"module.Class"`, as `auto_map` and `custom_pipelines` name a class of the flat remote-code files."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def remote_code_files():
    """The core modules a shared CAST repo ships: those of the Auto classes and the pipelines, and every module they
    import relatively (what transformers copies on `save_pretrained`, plus the pipelines). Returns sorted paths."""
    modules = {sys.modules[cls.__module__].__file__ for cls in (*AUTO_CLASSES.values(), *SHARED_PIPELINES.values())}
    files = set(modules)
    for module in modules:
        files.update(get_relative_import_files(module))
    return sorted(Path(path) for path in files)


def custom_pipelines(architectures=()):
    """The `custom_pipelines` entry of a shared CAST repo. `pt` names the Auto class `pipeline()` loads the model
    with: a `CastForSemanticSegmentation` checkpoint feeds `image-segmentation` through its head, others paint the
    segments of a hierarchy level. An H-CAST checkpoint (`CastForHierarchicalImageClassification`) also gets
    `hierarchical-image-classification`, loaded with the Auto class its `auto_map` names it under."""
    segmentation_model = "AutoModelForSemanticSegmentation" if SEGMENTATION_ARCHITECTURE in architectures else None
    auto_models = {
        "hierarchical-segmentation": "AutoModel",
        "zero-shot-hierarchical-segmentation": "AutoModel",
        "image-segmentation": segmentation_model or "AutoModel",
        **dict.fromkeys(HIERARCHICAL_PIPELINES, HIERARCHICAL_AUTO_CLASS),
    }
    pipelines = dict(SHARED_PIPELINES)
    if HIERARCHICAL_ARCHITECTURE in architectures:
        pipelines.update(HIERARCHICAL_PIPELINES)
    return {
        task: {"impl": class_reference(pipeline_class), "pt": [auto_models[task]], "type": "image"}
        for task, pipeline_class in pipelines.items()
    }


def _read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read {path}: {error}") from None


def _json_text(values):
    return json.dumps(values, indent=2, sort_keys=True) + "\n"  # as transformers writes its JSON files


def shared_files(folder):
    """What sharing a CAST `save_pretrained` folder adds or replaces: `{name: Path or JSON text}` with the core module
    files (`remote_code_files`), `config.json` with the `auto_map` of every CAST Auto class and `custom_pipelines`,
    and `preprocessor_config.json` (when present) with the image processor's `auto_map`. Empty for a folder whose
    `config.json` is missing or not CAST (other models are shared as they are)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if config.get("model_type") != CastConfig.model_type:
        return {}
    processor_class = AUTO_CLASSES["AutoImageProcessor"]
    model_auto_map = {auto: class_reference(cls) for auto, cls in AUTO_CLASSES.items() if cls is not processor_class}
    architectures = config.get("architectures") or ()
    if HIERARCHICAL_ARCHITECTURE in architectures:  # H-CAST takes the classification Auto class
        model_auto_map[HIERARCHICAL_AUTO_CLASS] = class_reference(CastForHierarchicalImageClassification)
    config["auto_map"] = {**config.get("auto_map", {}), **model_auto_map}
    config["custom_pipelines"] = custom_pipelines(architectures)
    files = {path.name: path for path in remote_code_files()}
    files["config.json"] = _json_text(config)
    processor_path = folder / "preprocessor_config.json"
    if processor_path.is_file():
        processor = _read_json(processor_path)
        processor["auto_map"] = {
            **processor.get("auto_map", {}),
            "AutoImageProcessor": class_reference(processor_class),
        }
        files["preprocessor_config.json"] = _json_text(processor)
    return files


def add_remote_code(folder):
    """Make `folder` (a CAST `save_pretrained` folder) self-contained for sharing by copying it: write the files of
    `shared_files` into it. Afterwards it loads with `trust_remote_code=True` where `hf_hierseg` is not installed,
    pipelines included; note that its `custom_pipelines` then make `pipeline("hierarchical-segmentation" |
    "image-segmentation", model=folder)` ask for `trust_remote_code=True` also where the package is installed.
    Returns the written paths."""
    folder = Path(folder)
    files = shared_files(folder)
    if not files:
        raise ValueError(f"{folder} is not a CAST model folder (no config.json with model_type 'cast').")
    written = []
    for name, content in files.items():
        destination = folder / name
        if isinstance(content, Path):
            shutil.copyfile(content, destination)
        else:
            destination.write_text(content, encoding="utf-8")
        written.append(destination)
    return written


def strip_remote_code(folder):
    """Make `folder` a plain `save_pretrained` folder: delete the shipped core module files (`remote_code_files`
    names) and the `auto_map` / `custom_pipelines` entries of `config.json` and `preprocessor_config.json`. It then
    loads with the `hf_hierseg` classes only (as the bundled default model). Returns the deleted file names."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"`folder` must be a model folder with a config.json, got {str(folder)!r}.")
    deleted = []
    for path in remote_code_files():
        if (folder / path.name).is_file():
            (folder / path.name).unlink()
            deleted.append(path.name)
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file():
            values = _read_json(path)
            if any(key in values for key in REMOTE_CODE_KEYS):
                path.write_text(_json_text({k: v for k, v in values.items() if k not in REMOTE_CODE_KEYS}), "utf-8")
    return deleted


# -- push ------------------------------------------------------------------------------------------------------


def push_folder_to_hub(
    folder, repo_id, commit_message, private=False, token=None, ignore_patterns=DEFAULT_IGNORE_PATTERNS
):
    """Create `repo_id` on the Hub if needed and upload `folder` (a `save_pretrained` folder with its model card)
    in one commit; training checkpoints (`checkpoint-*`) are left out. A CAST folder is shared self-contained: the
    upload adds or replaces the files of `shared_files` (core code, full `auto_map`, `custom_pipelines`), so the repo
    loads with `trust_remote_code=True` where `hf_hierseg` is not installed; the local folder is not changed.
    Returns the `CommitInfo` (`.oid`, `.commit_url`, `.repo_url.repo_id`)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ValueError(f"`folder` must be an existing, non-empty folder, got {str(folder)!r}.")
    _check_repo_id(repo_id, "repo_id")
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError("`commit_message` must be a non-empty string.")
    local_files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    kept = filter_repo_objects(list(local_files), ignore_patterns=[*(ignore_patterns or ()), *HUB_IGNORE_PATTERNS])
    contents = {name: local_files[name] for name in kept}
    for name, content in shared_files(folder).items():
        contents[name] = content if isinstance(content, Path) else content.encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in contents.items()]
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(repo_id=repo_url.repo_id, operations=operations, commit_message=commit_message)
