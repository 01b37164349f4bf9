#!/usr/bin/env python
"""Supervised image classification with CAST, DeiT recipe (label smoothing, Mixup / CutMix, RandAugment, random
erasing, optional EMA), on 1 or N processes:

    accelerate launch scripts/train_supervised.py --dataset_name ./my_dataset --model_name_or_path cast-moco \
        --output_dir cast-cls --per_device_train_batch_size 64 --num_train_epochs 30 --num_warmup_steps 500

Add `--resume_from_checkpoint latest` to continue after an interruption. See `--help` for all options.
"""

from hf_hierseg.training.arguments import supervised_parser
from hf_hierseg.training.recipes import train_supervised


def main(argv=None):
    train_supervised(*supervised_parser().parse_args_into_dataclasses(args=argv))


if __name__ == "__main__":
    main()
