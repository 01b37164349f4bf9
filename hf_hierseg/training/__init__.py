"""Training CAST with Accelerate: MoCo-v3 self-supervised pre-training, DeiT-style supervised classification, LoRA
fine-tuning and semantic segmentation on `datasets` (map-style or streamed), resumable, published with
`push_to_hub`.

Every trainer is one assembly (`recipes.TrainingRun`: data, splits, accelerator, batches, evaluation, the loop) with
its own model, objective and views; the views go through the run's `CastImageProcessor` (`augment.encode_view`).
Settings are dataclasses (`arguments`) parsed with transformers' `HfArgumentParser`:

    from hf_hierseg.training.arguments import moco_parser
    from hf_hierseg.training.recipes import train_moco

    train_moco(*moco_parser().parse_args_into_dataclasses())

Entry points: `scripts/train_moco.py`, `scripts/train_supervised.py`, `scripts/finetune_peft.py`,
`scripts/train_segmentation.py` and `scripts/train_hierarchical.py` (H-CAST, `hierarchical`); the pieces (augmentations, data streams, objectives, loop, checkpoints) are
importable from their modules.
"""

from .augment import DeitTransform, MocoTransform, ProcessorTransform, RandAugment, encode_view
from .data import StreamPosition, SuperpixelBatches, TrainingBatches, datasets_transform
from .moco import CastMocoV3, MocoObjective, contrastive_loss
from .recipes import TrainingRun, train_moco, train_supervised
from .supervised import ModelEma, SupervisedObjective, mixup_cutmix


__all__ = [
    "CastMocoV3",
    "DeitTransform",
    "ModelEma",
    "MocoObjective",
    "MocoTransform",
    "ProcessorTransform",
    "RandAugment",
    "StreamPosition",
    "SupervisedObjective",
    "SuperpixelBatches",
    "TrainingBatches",
    "TrainingRun",
    "contrastive_loss",
    "datasets_transform",
    "encode_view",
    "mixup_cutmix",
    "train_moco",
    "train_supervised",
]
