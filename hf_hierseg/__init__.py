"""hf_hierseg: CAST (hierarchical segmentation by graph pooling of superpixel tokens) for Hugging Face."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .configuration_cast import CAST_PRESETS, CastConfig
from .default_model import default_model_path, load_default
from .image_processing_cast import CastImageProcessor
from .modeling_cast import (
    CastBackbone,
    CastForImageClassification,
    CastForSelfSupervisedPretraining,
    CastForSemanticSegmentation,
    CastModel,
    CastModelOutput,
    CastPreTrainedModel,
)
from .pipelines import CastImageSegmentationPipeline, HierarchicalSegmentationPipeline, register_pipelines


AutoConfig.register("cast", CastConfig, exist_ok=True)
AutoModel.register(CastConfig, CastModel, exist_ok=True)
AutoModelForImageClassification.register(CastConfig, CastForImageClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(CastConfig, CastForSemanticSegmentation, exist_ok=True)
AutoBackbone.register(CastConfig, CastBackbone, exist_ok=True)
AutoImageProcessor.register(CastConfig, image_processor_classes={"pil": CastImageProcessor}, exist_ok=True)
CastImageProcessor.register_for_auto_class("AutoImageProcessor")  # preprocessor_config.json gets its auto_map
register_pipelines()  # "hierarchical-segmentation" in transformers' PIPELINE_REGISTRY

__version__ = "0.1.0"


__all__ = [
    "CAST_PRESETS",
    "CastBackbone",
    "CastConfig",
    "CastForImageClassification",
    "CastForSelfSupervisedPretraining",
    "CastForSemanticSegmentation",
    "CastImageProcessor",
    "CastImageSegmentationPipeline",
    "CastModel",
    "CastModelOutput",
    "CastPreTrainedModel",
    "HierarchicalSegmentationPipeline",
    "default_model_path",
    "load_default",
]
