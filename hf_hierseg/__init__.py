"""hf_hierseg: CAST (hierarchical segmentation by graph pooling of superpixel tokens) for Hugging Face."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_cast import CAST_PRESETS, CastConfig
from .modeling_cast import (
    CastForImageClassification,
    CastForSelfSupervisedPretraining,
    CastModel,
    CastModelOutput,
    CastPreTrainedModel,
)

AutoConfig.register("cast", CastConfig, exist_ok=True)
AutoModel.register(CastConfig, CastModel, exist_ok=True)
AutoModelForImageClassification.register(CastConfig, CastForImageClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "CAST_PRESETS",
    "CastConfig",
    "CastForImageClassification",
    "CastForSelfSupervisedPretraining",
    "CastModel",
    "CastModelOutput",
    "CastPreTrainedModel",
]
