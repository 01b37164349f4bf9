"""Training CAST with Accelerate: MoCo-v3 self-supervised pre-training and DeiT-style supervised classification on
`datasets` (map-style or streamed), resumable, published with `push_to_hub`.

Entry points: `scripts/train_moco.py` and `scripts/train_supervised.py` (thin wrappers of `recipes.train_moco` /
`recipes.train_supervised`); the pieces (augmentations, data streams, objectives, loop, checkpoints) are importable
from their modules.
"""

from .augment import DeitTransform, EvalTransform, MocoTransform, ProcessorTransform, RandAugment, ViewEncoder
from .data import StreamPosition, SuperpixelBatches, TrainingBatches, datasets_transform
from .moco import CastMocoV3, MocoObjective, contrastive_loss
from .recipes import train_moco, train_supervised
from .supervised import ModelEma, SupervisedObjective, mixup_cutmix


__all__ = [
    "CastMocoV3",
    "DeitTransform",
    "EvalTransform",
    "ModelEma",
    "MocoObjective",
    "MocoTransform",
    "ProcessorTransform",
    "RandAugment",
    "StreamPosition",
    "SupervisedObjective",
    "SuperpixelBatches",
    "TrainingBatches",
    "ViewEncoder",
    "contrastive_loss",
    "datasets_transform",
    "mixup_cutmix",
    "train_moco",
    "train_supervised",
]
