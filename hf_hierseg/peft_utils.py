"""LoRA adapters for CAST through peft's own API (`get_peft_model`, `PeftModel.from_pretrained`, `merge_and_unload`).

transformers' `model.load_adapter` / `add_adapter` need peft >= 0.22; with older peft use these helpers or peft
directly.
"""

from peft import LoraConfig, get_peft_model


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


__all__ = ["LORA_TARGET_MODULES", "LORA_EXCLUDE_MODULES", "cast_lora_config", "add_lora"]
