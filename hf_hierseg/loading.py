"""Load a CAST model and its image processor from a folder, a Hub id or the bundled default model.

    from hf_hierseg.loading import load_model_and_processor

    model, processor = load_model_and_processor("path/to/folder", device="cpu")

The class follows the checkpoint: a segmentation checkpoint loads as `CastForSemanticSegmentation` (its encoder
differs), a classifier as `CastForImageClassification` (an H-CAST one as `CastForHierarchicalImageClassification`)
when `classifier=True`, anything else as `CastModel`. Without `trust_remote_code` the package's classes are used;
with it, the Auto classes run the code stored with the model.
The user's mistakes (a folder that does not exist, a Hub id that cannot be found, a model that is not CAST, a device
this machine lacks) raise `errors.MissingInputError` / `errors.InvalidInputError` with a message naming the problem.
"""

import copy
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .configuration_cast import check_is_cast
from .default_model import default_model_path
from .errors import InvalidInputError, MissingInputError
from .image_processing_cast import CastImageProcessor
from .modeling_cast import (
    CastForHierarchicalImageClassification,
    CastForImageClassification,
    CastForSemanticSegmentation,
    CastModel,
)


CONFIG_FILE = "config.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
SEGMENTATION_ARCHITECTURE = "CastForSemanticSegmentation"
CLASSIFIER_ARCHITECTURE = "CastForImageClassification"
HIERARCHICAL_ARCHITECTURE = "CastForHierarchicalImageClassification"
# (package class, Auto class) per kind of checkpoint.
MODEL_CLASSES = {
    "segmentation": (CastForSemanticSegmentation, AutoModelForSemanticSegmentation),
    "classifier": (CastForImageClassification, AutoModelForImageClassification),
    "hierarchical": (CastForHierarchicalImageClassification, AutoModelForImageClassification),
    "backbone": (CastModel, AutoModel),
}


def resolve_model_source(model_name_or_path=None):
    """The folder or Hub id to load: `model_name_or_path`, or the bundled default model's folder when it is None.

    Raises:
        MissingInputError: no default model is installed, the folder does not exist (and the name is not a Hub id)
            or has no `config.json`.
        InvalidInputError: the name is a file.
    """
    if model_name_or_path is None:
        try:
            return str(default_model_path())
        except FileNotFoundError as error:
            raise MissingInputError(f"{error} (--model)") from error
    name = str(model_name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise MissingInputError(f"The folder {path} holds no model: it has no {CONFIG_FILE}.")
        return str(path)
    if path.exists():
        raise InvalidInputError(f"{path} is a file; a model is a folder (save_pretrained) or a Hub id.")
    if not is_hub_id(name):
        raise MissingInputError(f"The model folder {path} does not exist.")
    return name


def is_hub_id(name):
    """Whether `name` has the form of a Hub repo id (`name` or `owner/name`)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_config(source, trust_remote_code=False):
    """The config of a model folder or Hub id (see `resolve_model_source`), by `AutoConfig`.

    Raises:
        MissingInputError: a Hub id that cannot be found (offline: in the local Hub cache).
        InvalidInputError: a model type transformers does not know (or that needs `trust_remote_code`).
    """
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        if Path(source).is_dir():
            raise
        where = "offline (HF_HUB_OFFLINE is set) in the local Hub cache" if is_offline_mode() else "on the Hub"
        raise MissingInputError(
            f"There is no model folder {source}, and the Hub model {source!r} could not be found {where}: "
            f"{str(error).splitlines()[0]}"
        ) from error
    except ValueError as error:
        raise InvalidInputError(f"{source} holds no model that can be loaded: {str(error).splitlines()[0]}") from error


def load_cast_config(source, trust_remote_code=False):
    """The config of a CAST model folder or Hub id (see `load_config`).

    Raises:
        InvalidInputError: the model is not a CAST model, besides the errors of `load_config`.
    """
    config = load_config(source, trust_remote_code)
    check_is_cast(config, f"Loading {source}", error=InvalidInputError)
    return config


def checkpoint_kind(config, classifier=False):
    """`"segmentation"`, `"classifier"` / `"hierarchical"` (only when `classifier` is wanted) or `"backbone"`, from
    `config.architectures`."""
    architectures = config.architectures or ()
    if SEGMENTATION_ARCHITECTURE in architectures:
        return "segmentation"
    if classifier and HIERARCHICAL_ARCHITECTURE in architectures:
        return "hierarchical"
    if classifier and CLASSIFIER_ARCHITECTURE in architectures:
        return "classifier"
    return "backbone"


def resolve_device(device="cpu"):
    """`device` as a `torch.device`, checked to exist on this machine.

    Raises:
        InvalidInputError: not a device name, or a device this machine (or this torch build) does not have.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidInputError(f"{device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from error
    if resolved.type in ("cpu", "meta"):
        return resolved
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != resolved.type:
        available = f"only {accelerator.type} and cpu" if accelerator is not None else "only cpu"
        raise InvalidInputError(f"Device {device!r} is not available on this machine ({available}).")
    count = torch.accelerator.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise InvalidInputError(
            f"Device {device!r} is not available: this machine has {count} {resolved.type} device(s)."
        )
    return resolved


def load_cast_model(model_name_or_path=None, classifier=False, trust_remote_code=False, device="cpu"):
    """A CAST model in eval mode on `device`, of the class its checkpoint needs (see the module docstring).

    Args:
        model_name_or_path: a `save_pretrained` folder or a Hub id; None: the bundled default model.
        classifier: load a classifier checkpoint with its head (`CastForImageClassification`) instead of the
            backbone.
        trust_remote_code: use the code stored with the model (Auto classes) instead of the package's classes.
        device: torch device name.
    """
    device = resolve_device(device)
    source = resolve_model_source(model_name_or_path)
    config = load_cast_config(source, trust_remote_code)
    package_class, auto_class = MODEL_CLASSES[checkpoint_kind(config, classifier)]
    if trust_remote_code:
        model = auto_class.from_pretrained(source, config=config, trust_remote_code=True)
    else:
        model = package_class.from_pretrained(source, config=config)
    return model.to(device).eval()


def load_cast_image_processor(model_name_or_path=None, trust_remote_code=False, **overrides):
    """The image processor saved with a model (`overrides` replace its settings; None values are ignored), or None
    when the model has none."""
    source = resolve_model_source(model_name_or_path)
    if Path(source).is_dir() and not (Path(source) / IMAGE_PROCESSOR_FILE).is_file():
        return None
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        if trust_remote_code:
            return AutoImageProcessor.from_pretrained(source, trust_remote_code=True, **overrides)
        return CastImageProcessor.from_pretrained(source, **overrides)
    except OSError:
        if Path(source).is_dir():
            raise
        return None  # a Hub repo without preprocessor_config.json


def load_model_and_processor(
    model_name_or_path=None, classifier=False, trust_remote_code=False, device="cpu", processor_overrides=None
):
    """`(model, image processor)` of a CAST model (see `load_cast_model`; `processor_overrides` as in
    `load_cast_image_processor`).

    Raises:
        MissingInputError: the model has no image processor (`preprocessor_config.json`), besides the errors of
            `load_cast_model`.
    """
    model = load_cast_model(model_name_or_path, classifier, trust_remote_code, device)
    processor = load_cast_image_processor(model_name_or_path, trust_remote_code, **(processor_overrides or {}))
    if processor is None:
        raise MissingInputError(
            f"{resolve_model_source(model_name_or_path)} has no image processor ({IMAGE_PROCESSOR_FILE}); save the "
            "model's CastImageProcessor beside it."
        )
    return model, align_processor_with_model(model, processor)


def static_model_and_processor(model, processor, num_segment_tokens):
    """`(model, processor)` with a static token budget of `num_segment_tokens` level-1 tokens: the model is switched
    in place (`CastPreTrainedModel.set_num_segment_tokens`: `config.num_segment_tokens`, padding masked) and the
    processor is a copy that never returns more labels (`CastImageProcessor(num_segment_tokens=...)`: SEEDS is
    asked for fewer superpixels where its block grid would exceed the budget, other maps have their smallest
    segments merged). Saving both (`save_pretrained` into one folder) keeps them consistent, and
    `load_model_and_processor` caps a processor saved without the budget.

    The model then compiles with `torch.compile(model, fullgraph=True)` and its outputs equal those of the dynamic
    model with `mask_padding_tokens=True` on the same inputs (padding tokens aside)."""
    check_is_cast(model, "static_model_and_processor")
    model.set_num_segment_tokens(num_segment_tokens)
    processor = copy.deepcopy(processor)
    processor.num_segment_tokens = model.config.num_segment_tokens
    return model, processor


def align_processor_with_model(model, processor):
    """Give `processor` the model's static token budget when it has none or a larger one (a processor saved before
    the budget was set), so that it never returns labels the model refuses. Returns the processor."""
    budget = getattr(model.config, "num_segment_tokens", None)
    current = getattr(processor, "num_segment_tokens", None)
    if budget is not None and (current is None or current > budget):
        processor.num_segment_tokens = budget
    return processor


__all__ = [
    "align_processor_with_model",
    "checkpoint_kind",
    "is_hub_id",
    "load_cast_config",
    "load_cast_image_processor",
    "load_cast_model",
    "load_config",
    "load_model_and_processor",
    "resolve_device",
    "resolve_model_source",
    "static_model_and_processor",
]
