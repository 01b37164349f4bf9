"""LoRA fine-tuning of a CAST classifier (`scripts/finetune_peft.py`, `hf-hierseg finetune-lora`): the supervised
assembly (`recipes.TrainingRun.train_classifier`) with LoRA adapters from `hf_hierseg.peft_utils`."""

from pathlib import Path

from ..errors import InvalidInputError
from ..image_processing_cast import CastImageProcessor
from ..modeling_cast import CastForImageClassification
from ..peft_utils import add_lora, freeze_batch_norm_statistics
from .recipes import ClassLabels, TrainingRun, check_model_source, load_or_create, supervised_objective
from .supervised import SupervisedObjective


class LoraObjective(SupervisedObjective):
    """The supervised objective on a `PeftModel`, whose frozen BatchNorm statistics stay as they are."""

    name = "LoRA fine-tuning for image classification"

    def compute_loss(self, module, batch, step, micro_step, accelerator):
        freeze_batch_norm_statistics(module)  # the loop calls module.train(); the adapter has no BN statistics
        return super().compute_loss(module, batch, step, micro_step, accelerator)


def finetune_lora(data_args, model_args, optimization_args, output_args, evaluation_args, supervised_args, lora_args):
    """Fine-tune LoRA adapters (and the classifier) of a CAST classifier, with the dataclasses of
    `arguments.lora_parser()` in its order.

    `--output_dir` receives the adapter (`adapter_config.json`, `adapter_model.safetensors`: LoRA weights and the
    classifier), the image processor and the model card; `--save_merged` adds the merged model under `merged/`.
    Load the adapter with `PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base), out)`.
    Returns the final metrics.
    """
    if model_args.model_name_or_path is None:
        raise InvalidInputError("LoRA fine-tuning needs a pre-trained model: give --model_name_or_path.")
    if supervised_args.model_ema:
        raise InvalidInputError(
            "--model_ema is not supported with LoRA (the adapter is small: average checkpoints instead)."
        )
    check_model_source(model_args)
    run = TrainingRun(
        data_args,
        model_args,
        optimization_args,
        output_args,
        evaluation_args,
        recipe_args=(supervised_args, lora_args),
    )
    config = run.config(**ClassLabels(supervised_args.label_column_name).config_fields(run.train_split))
    base = load_or_create(CastForImageClassification, model_args, config, supervised_args.ignore_mismatched_sizes)
    model = add_lora(base, r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout)
    objective = supervised_objective(model, optimization_args, supervised_args, objective_class=LoraObjective)
    # The frozen last pooling's adapters get no gradient.
    metrics = run.train_classifier(objective, config, supervised_args, find_unused_parameters=True)
    if lora_args.save_merged and run.accelerator.is_main_process:
        merged_dir = Path(output_args.output_dir) / "merged"
        model.merge_and_unload().save_pretrained(merged_dir)
        CastImageProcessor.from_pretrained(output_args.output_dir).save_pretrained(merged_dir)  # the run's
    return metrics


__all__ = ["LoraObjective", "finetune_lora"]
