#!/usr/bin/env python
"""LoRA fine-tuning of a CAST classifier with peft, on 1 or N processes (Accelerate); `--streaming` streams the data:

    accelerate launch scripts/finetune_peft.py --model_name_or_path cast-small-in1k --dataset_name ./my_dataset \
        --output_dir cast-lora --per_device_train_batch_size 32 --max_train_steps 2000 --lora_r 8

LoRA goes on the `qkv`, `proj`, `fc1` and `fc2` Linear layers, the classifier is trained in full. The output folder
holds the adapter: `PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base), output_dir)`;
`--save_merged` also writes the merged model. See `--help` for all options.
"""

from hf_hierseg.training.arguments import lora_parser
from hf_hierseg.training.lora import finetune_lora


def main(argv=None):
    finetune_lora(*lora_parser().parse_args_into_dataclasses(args=argv))


if __name__ == "__main__":
    main()
