"""LoRA fine-tuning of a CAST classifier (`scripts/finetune_peft.py`, `hf-hierseg finetune-lora`): the supervised
training loop with LoRA adapters from `hf_hierseg.peft_utils`."""

import os

import PIL.Image
from accelerate.utils import set_seed
from transformers import AutoModelForImageClassification

from ..image_datasets import image_column_of, label_column_of, label_names_of, load_image_datasets
from ..peft_utils import add_lora, freeze_batch_norm_statistics
from . import recipes
from .arguments import positive_int, supervised_parser
from .augment import DeitTransform, ProcessorTransform, RandAugment
from .data import SuperpixelBatches, evaluation_loader
from .loop import create_accelerator, setup_logging, train
from .supervised import SupervisedObjective, evaluate_classifier


def lora_parser():
    """Arguments of `scripts/finetune_peft.py`: those of supervised training plus the LoRA settings."""
    parser = supervised_parser()
    parser.description = "LoRA fine-tuning of a CAST classifier with peft (Accelerate; streamed data supported)."
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=positive_int, default=8, help="Rank of the LoRA updates.")
    lora.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scaling numerator (scale = alpha / r).")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch.")
    lora.add_argument(
        "--save_merged",
        action="store_true",
        help="Also save the merged model (LoRA folded into the weights) under OUTPUT/merged.",
    )
    # Fine-tuning defaults: light augmentation, a larger learning rate for the adapters.
    parser.set_defaults(
        learning_rate=1e-3,
        weight_decay=0.0,
        mixup=0.0,
        cutmix=0.0,
        rand_augment_num_ops=0,
        reprob=0.0,
        label_smoothing=0.0,
    )
    return parser


def finetune_lora(args):
    """Fine-tune LoRA adapters (and the classifier) of a CAST classifier with the supervised training loop.

    `--output_dir` receives the adapter (`adapter_config.json`, `adapter_model.safetensors`: LoRA weights and the
    classifier), the image processor and the model card; `--save_merged` adds the merged model under `merged/`.
    Load the adapter with `PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base), out)`.
    Returns the final metrics.
    """
    if args.model_name_or_path is None:
        raise ValueError("LoRA fine-tuning needs a pre-trained model: give --model_name_or_path.")
    if args.model_ema:
        raise ValueError("--model_ema is not supported with LoRA (the adapter is small: average checkpoints instead).")
    recipes.check_arguments(args)
    os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    splits = load_image_datasets(
        args.dataset_name,
        args.dataset_config_name,
        args.train_dir,
        args.validation_dir,
        args.streaming,
        args.cache_dir,
        args.hub_token,
    )
    train_split, eval_split = recipes.evaluation_split(
        splits, recipes.select_split(splits, args.train_split_name), args
    )
    train_split = recipes.limit(train_split, args.max_train_samples)
    image_column = image_column_of(train_split, args.image_column_name)
    label_column = label_column_of(train_split, args.label_column_name)
    names = label_names_of(train_split, label_column)
    config = recipes.build_config(
        args,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
    )
    base = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, config=config, revision=args.hub_revision, ignore_mismatched_sizes=True
    )
    model = add_lora(base, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    accelerator = create_accelerator(args, find_unused_parameters=True)  # the frozen last pooling gets no gradient
    setup_logging(accelerator)

    class LoraObjective(SupervisedObjective):
        name = "LoRA fine-tuning for image classification"

        def compute_loss(self, module, batch, *args, **kwargs):
            freeze_batch_norm_statistics(module)  # the loop calls module.train(); the adapter has no BN statistics
            return super().compute_loss(module, batch, *args, **kwargs)

    objective = LoraObjective(
        model, args.label_smoothing, args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, seed=args.seed
    )

    processor, encoder = recipes.image_processor_and_encoder(args, config, "supervised", resample=PIL.Image.BICUBIC)
    size = args.image_size or config.image_size
    rand_augment = (
        RandAugment(args.rand_augment_num_ops, args.rand_augment_magnitude) if args.rand_augment_num_ops > 0 else None
    )
    transform = DeitTransform(
        encoder, size, rand_augment, crop_scale=(args.crop_min_scale, 1.0), erasing_probability=args.reprob
    )
    batches = recipes.training_batches(args, accelerator, train_split, transform, image_column, label_column)
    evaluate = None
    if eval_split is not None:
        eval_split = recipes.limit(eval_split, args.max_eval_samples)
        eval_batches = SuperpixelBatches(
            eval_split,
            ProcessorTransform(processor),
            args.per_device_eval_batch_size,
            image_column_of(eval_split, args.image_column_name),
            label_column_of(eval_split, args.label_column_name),
            shuffle=False,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            drop_last=False,
        )

        def evaluate(model, accelerator):
            loader = evaluation_loader(eval_batches, args.dataloader_num_workers, args.dataloader_timeout)
            return evaluate_classifier(model, loader, accelerator)

    card = {
        "base_model": args.model_name_or_path if recipes.is_hub_id(args.model_name_or_path) else None,
        **recipes.dataset_card_fields(args),
    }
    metrics = train(args, accelerator, objective, batches, processor, evaluate=evaluate, card=card)
    if args.save_merged and accelerator.is_main_process:
        merged = model.merge_and_unload()
        merged.save_pretrained(f"{args.output_dir}/merged")
        if processor is not None:
            processor.save_pretrained(f"{args.output_dir}/merged")
    return metrics


__all__ = ["finetune_lora", "lora_parser"]
