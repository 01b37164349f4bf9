"""hf_hierseg: CAST (hierarchical segmentation by graph pooling of superpixel tokens) for Hugging Face.

Importing the package registers CAST with transformers:

- the Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForImageClassification`, `AutoModelForSemanticSegmentation`,
  `AutoBackbone`, `AutoImageProcessor`), so `Auto*.from_pretrained(folder)` and `pipeline(task, model=folder)` use
  the package's classes without `trust_remote_code`;
- `register_for_auto_class` on each class, the transformers way of shipping remote code: `save_pretrained` copies
  the class's module and every module it imports relatively (the flat core files) into the folder and writes its
  `auto_map` entry, so the folder also loads with `trust_remote_code=True` where `hf_hierseg` is not installed;
- the `hierarchical-segmentation`, `zero-shot-hierarchical-segmentation` and `hierarchical-image-classification`
  tasks in transformers' `PIPELINE_REGISTRY` (transformers' own tasks are left as they are: `image-classification`,
  `image-feature-extraction` and `image-segmentation` run CAST models as any).

`CastForHierarchicalImageClassification` (H-CAST) shares `AutoModelForImageClassification` with
`CastForImageClassification`: both are registered for CastConfig, and transformers picks the one named in the
folder's `config.architectures` (a folder without one, or a fresh config, gets `CastForImageClassification`). Its
saved folders name it under `auto_map["AutoModelForImageClassification"]`, so
`AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)` loads it as remote code where the
package is not installed.

Saved folders carry no `custom_pipelines`: that entry makes `pipeline(task, model=folder)` demand
`trust_remote_code` even with the package installed. It is added only to what is shared (see `hf_hierseg.hub`).
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)
from transformers.models.auto.video_processing_auto import (
    AutoVideoProcessor,
)  # the real class, even without torchvision

from .configuration_cast import CAST_PRESETS, CastConfig
from .default_model import default_model_path, load_default
from .image_processing_cast import CastImageProcessor
from .modeling_cast import (
    CastBackbone,
    CastForHierarchicalImageClassification,
    CastForImageClassification,
    CastForSelfSupervisedPretraining,
    CastForSemanticSegmentation,
    CastModel,
    CastModelOutput,
    CastPreTrainedModel,
)
from .pipelines import (
    CastImageSegmentationPipeline,
    HierarchicalImageClassificationPipeline,
    HierarchicalSegmentationPipeline,
    ZeroShotHierarchicalSegmentationPipeline,
    register_pipelines,
)


# Auto class -> the package's class for it; one `register_for_auto_class` each, so a saved folder names its class.
AUTO_CLASSES = {
    "AutoConfig": CastConfig,
    "AutoModel": CastModel,
    "AutoModelForImageClassification": CastForImageClassification,
    "AutoModelForSemanticSegmentation": CastForSemanticSegmentation,
    "AutoBackbone": CastBackbone,
    "AutoImageProcessor": CastImageProcessor,
}
# The Auto class of H-CAST folders: shared with CastForImageClassification, told apart by `config.architectures`.
HIERARCHICAL_AUTO_CLASS = "AutoModelForImageClassification"

AutoConfig.register(CastConfig.model_type, CastConfig, exist_ok=True)
for auto_model, model_class in (
    (AutoModel, CastModel),
    (AutoModelForImageClassification, (CastForImageClassification, CastForHierarchicalImageClassification)),
    (AutoModelForSemanticSegmentation, CastForSemanticSegmentation),
    (AutoBackbone, CastBackbone),
):
    auto_model.register(CastConfig, model_class, exist_ok=True)
AutoImageProcessor.register(CastConfig, image_processor_classes={"pil": CastImageProcessor}, exist_ok=True)
# CAST has no video processor, and says so locally. transformers' `pipeline()` tries `AutoVideoProcessor` on every
# folder (its own pipelines load it softly); from the `AutoImageProcessor` entry of preprocessor_config.json's
# `auto_map` it derives a remote "CastVideoProcessor" and, with no local video processor for the config, asks `[y/N]`
# on the terminal (`resolve_trust_remote_code`). With CastConfig in the mapping, without classes, the local code
# wins: no prompt, the lookup fails, and the pipeline's optional video processor is None. (The top-level
# `transformers.AutoVideoProcessor` is a placeholder without torchvision; `pipeline()` uses the class imported here.)
AutoVideoProcessor.register(CastConfig, video_processor_classes={}, exist_ok=True)
for auto_class, cast_class in AUTO_CLASSES.items():
    cast_class.register_for_auto_class(auto_class)
CastForHierarchicalImageClassification.register_for_auto_class(HIERARCHICAL_AUTO_CLASS)
register_pipelines()  # hierarchical-segmentation, zero-shot-hierarchical-segmentation, hierarchical-image-classification

__version__ = "0.1.0"


__all__ = [
    "AUTO_CLASSES",
    "CAST_PRESETS",
    "CastBackbone",
    "CastConfig",
    "CastForHierarchicalImageClassification",
    "CastForImageClassification",
    "CastForSelfSupervisedPretraining",
    "CastForSemanticSegmentation",
    "CastImageProcessor",
    "CastImageSegmentationPipeline",
    "CastModel",
    "CastModelOutput",
    "CastPreTrainedModel",
    "HIERARCHICAL_AUTO_CLASS",
    "HierarchicalImageClassificationPipeline",
    "HierarchicalSegmentationPipeline",
    "ZeroShotHierarchicalSegmentationPipeline",
    "default_model_path",
    "load_default",
]
