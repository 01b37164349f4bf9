"""Ship CAST as Hub remote code: the flat module files beside the weights, with `auto_map` and `custom_pipelines`
entries in `config.json`, so `AutoModel.from_pretrained(repo, trust_remote_code=True)` and `pipeline(...)` work on a
machine without `hf_hierseg`.

This module is itself shipped (`CastConfig.save_pretrained` calls it), so it imports nothing but the standard library
and transformers, and finds the other modules as files beside it.
"""

import re
import shutil
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files


CODE_DIRECTORY = Path(__file__).resolve().parent

# Auto class -> "module.Class" for every class CAST registers; entries whose module (or a module it imports) is not
# in the folder are left out, so a model loaded as remote code ships what it was loaded with.
AUTO_CLASSES = {
    "AutoConfig": "configuration_cast.CastConfig",
    "AutoModel": "modeling_cast.CastModel",
    "AutoModelForImageClassification": "modeling_cast.CastForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_cast.CastForSemanticSegmentation",
    "AutoBackbone": "modeling_cast.CastBackbone",
    "AutoImageProcessor": "image_processing_cast.CastImageProcessor",
}

# Pipeline task -> implementation; `pt` names the Auto classes `pipeline(task, model=repo)` loads the model with.
CUSTOM_PIPELINES = {
    "hierarchical-segmentation": {"impl": "pipelines.HierarchicalSegmentationPipeline", "pt": ["AutoModel"]},
    "image-segmentation": {"impl": "pipelines.CastImageSegmentationPipeline", "pt": ["AutoModel"]},
}
SEGMENTATION_ARCHITECTURE = "CastForSemanticSegmentation"


def module_files(module, directory=CODE_DIRECTORY):
    """`directory/module.py` and every file it imports relatively (recursively); None if any is missing."""
    path = Path(directory) / f"{module}.py"
    if not path.is_file():
        return None
    try:
        return [path] + [Path(needed) for needed in get_relative_import_files(path)]
    except FileNotFoundError:  # transformers reads the imported files recursively
        return None


def is_shippable(reference, directory=CODE_DIRECTORY):
    """Whether "module.Class" names a class defined at the top level of `directory/module.py`, and every module it
    needs is in `directory`."""
    module, name = reference.split(".")
    if module_files(module, directory) is None:
        return False
    source = (Path(directory) / f"{module}.py").read_text(encoding="utf-8")
    return re.search(rf"^class {name}\b", source, re.MULTILINE) is not None


def remote_auto_map(directory=CODE_DIRECTORY):
    """The `auto_map` entries that can be shipped from `directory`."""
    return {auto: reference for auto, reference in AUTO_CLASSES.items() if is_shippable(reference, directory)}


def remote_custom_pipelines(architectures=None, directory=CODE_DIRECTORY):
    """The `custom_pipelines` entries that can be shipped from `directory`. A checkpoint of
    `CastForSemanticSegmentation` feeds `image-segmentation` through its head; others paint a hierarchy level."""
    pipelines = {}
    for task, info in CUSTOM_PIPELINES.items():
        if not is_shippable(info["impl"], directory):
            continue
        info = {**info, "pt": list(info["pt"])}
        if task == "image-segmentation" and SEGMENTATION_ARCHITECTURE in (architectures or []):
            info["pt"] = ["AutoModelForSemanticSegmentation"]
        pipelines[task] = {**info, "type": "image"}
    return pipelines


def remote_code_files(directory=CODE_DIRECTORY):
    """The module files to ship: those of the auto_map classes and pipelines, and everything they import relatively."""
    references = list(remote_auto_map(directory).values())
    references += [info["impl"] for info in remote_custom_pipelines(directory=directory).values()]
    files = set()
    for reference in references:
        files.update(module_files(reference.split(".")[0], directory))
    return sorted(files)


def add_remote_code(config, save_directory):
    """Copy the code files into `save_directory` and set `config.auto_map` and `config.custom_pipelines`, for the
    `config.json` written next. Called by `CastConfig.save_pretrained`, so every `save_pretrained` / `push_to_hub` of
    a CAST model ships its code. Returns the copied paths."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **remote_auto_map()}
    config.custom_pipelines = remote_custom_pipelines(getattr(config, "architectures", None))
    copied = []
    for path in remote_code_files():
        destination = save_directory / path.name
        if path.resolve() != destination.resolve():
            shutil.copyfile(path, destination)
        copied.append(destination)
    return copied


__all__ = [
    "AUTO_CLASSES",
    "CUSTOM_PIPELINES",
    "add_remote_code",
    "remote_auto_map",
    "remote_code_files",
    "remote_custom_pipelines",
]
