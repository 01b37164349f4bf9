"""LoRA adapters for CAST through peft's own API (`get_peft_model`, `PeftModel.from_pretrained`, `merge_and_unload`).

transformers' `model.load_adapter` / `add_adapter` need peft >= 0.22; with older peft use these helpers or peft
directly. An adapter holds the LoRA weights and the classifier only: the ConvStem's BatchNorm running statistics are
not in it, so keep them fixed while fine-tuning ([`freeze_batch_norm_statistics`], done by [`finetune_lora`]).
"""

from peft import LoraConfig, get_peft_model
from torch import nn


# The Linear layers of the ViT blocks (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and of graph pooling's centroid
# attention (centroid_fc.attn.qkv / proj).
LORA_TARGET_MODULES = ["qkv", "proj", "fc1", "fc2"]
# `proj` also names the ConvStem (`embeddings.patch_embeddings.proj`, an nn.Sequential LoRA cannot wrap).
LORA_EXCLUDE_MODULES = ["patch_embeddings.proj"]


def cast_lora_config(r=8, lora_alpha=16, lora_dropout=0.0, modules_to_save=("classifier",), **kwargs):
    """A `LoraConfig` for CAST: LoRA on `LORA_TARGET_MODULES`, the task head (`classifier`) trained in full."""
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(LORA_TARGET_MODULES),
        exclude_modules=list(LORA_EXCLUDE_MODULES),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        **kwargs,
    )


def add_lora(model, **kwargs):
    """Wrap a CAST model (package or remote code) in a `PeftModel` with [`cast_lora_config`]`(**kwargs)`."""
    if getattr(getattr(model, "config", None), "model_type", None) != "cast":
        raise TypeError(f"add_lora expects a CAST model (config.model_type 'cast'), got {type(model).__name__}.")
    return get_peft_model(model, cast_lora_config(**kwargs))


def freeze_batch_norm_statistics(model):
    """Put every BatchNorm without trainable parameters (the ConvStem's, under LoRA) in eval mode, so training does not
    change running statistics that the adapter does not save. Call after each `model.train()`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(parameter.requires_grad for parameter in module.parameters()):
                module.eval()
    return model


__all__ = [
    "LORA_TARGET_MODULES",
    "LORA_EXCLUDE_MODULES",
    "add_lora",
    "cast_lora_config",
    "freeze_batch_norm_statistics",
]
